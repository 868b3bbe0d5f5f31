"""The trained BPE of the from-scratch presets, with and without the texts of a real data folder
(VQA-RAD) in its corpus: words of the data become whole tokens, special tokens stay single ids, and
a saved model carries its tokenizer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from medplib.api import MedPLIB
from medplib.config import preset
from medplib.data.schema import BOX_END_TOKEN, BOX_START_TOKEN, IMAGE_TOKEN, REGION_TOKEN, SEG_TOKEN
from medplib.errors import ConfigError
from medplib.tokenizer import EXTRA_SPECIAL, build_tokenizer

QUESTION = "Is there evidence of an aortic aneurysm?"


@pytest.fixture(scope="module")
def vqa_rad(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("vqarad") / "data"
    subprocess.run([sys.executable, "-m", "medplib.cli", "data", "build", str(shared_data / "vqa_rad"), "--source",
                    "vqa-rad", "--out", str(out)], check=True, capture_output=True)
    return out


def test_data_corpus_makes_its_words_tokens(vqa_rad: Path) -> None:
    plain = build_tokenizer(preset("small").tokenizer)
    fitted = build_tokenizer(preset("small", **{"tokenizer.corpus": str(vqa_rad)}).tokenizer)
    n_plain = len(plain(QUESTION, add_special_tokens=False)["input_ids"])
    ids = fitted(QUESTION, add_special_tokens=False)["input_ids"]
    assert len(ids) < 0.6 * n_plain  # 20 -> 8 tokens: "evidence", "aortic", "aneurysm" are whole
    assert "Ġaneurysm" in fitted.convert_ids_to_tokens(ids)
    assert fitted.decode(ids) == QUESTION
    for special in EXTRA_SPECIAL:
        assert len(fitted(special, add_special_tokens=False)["input_ids"]) == 1


def test_saved_model_keeps_the_fitted_tokenizer(vqa_rad: Path, tmp_path: Path) -> None:
    m = MedPLIB.from_preset("tiny", **{"tokenizer.corpus": str(vqa_rad)})
    folder = m.save_pretrained(tmp_path / "m")
    assert json.loads((folder / "config.json").read_text())["tokenizer"]["corpus"] is None
    again = MedPLIB.from_pretrained(folder)
    assert again.tokenizer.get_vocab() == m.tokenizer.get_vocab()
    assert again.tokenizer(QUESTION)["input_ids"] == m.tokenizer(QUESTION)["input_ids"]


def test_corpus_without_data_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no .jsonl file"):
        build_tokenizer(preset("tiny", **{"tokenizer.corpus": str(tmp_path)}).tokenizer)


def test_the_tokens_sample_text_carries_are_special_tokens() -> None:
    # data code writes these strings; the model relies on each being one id
    assert {IMAGE_TOKEN, REGION_TOKEN, SEG_TOKEN, BOX_START_TOKEN, BOX_END_TOKEN} <= set(EXTRA_SPECIAL)
