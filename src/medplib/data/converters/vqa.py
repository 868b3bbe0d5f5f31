"""Whole-image VQA sets -> samples: VQA-RAD, SLAKE and PathVQA JSON.

- VQA-RAD: list of {qid, image_name, image_organ, question, answer, answer_type (OPEN|CLOSED,
  sometimes with a trailing space), question_type, phrase_type}; trainset.json / testset.json.
- SLAKE: list of {qid, img_name, question, answer, answer_type, modality, location, q_lang, ...};
  train.json / validate.json / test.json, images under imgs/. English only by default.
- PathVQA (JSON exports): list of {image, question, answer[, answer_type]}.
Each question becomes one sample; the group is the image, so a split helper never separates
the questions of one image (VQA-RAD's official test images also occur in train: kept as published).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from medplib.data.converters.common import MODALITY_ALIASES, load_json, rebase
from medplib.data.schema import IMAGE_TOKEN, Sample, parse_sample
from medplib.errors import DataValidationError, InputError

_SPLIT_FILES = {
    "vqa-rad": {"trainset.json": "train", "testset.json": "test"},
    "slake": {"train.json": "train", "validate.json": "val", "test.json": "test"},
    "pathvqa": {"train.json": "train", "val.json": "val", "test.json": "test"},
}
_IMAGE_KEYS = ("image_name", "img_name", "image")
_YES_NO = {"yes", "no"}


def _answer_type(rec: dict[str, Any]) -> str | None:
    raw = rec.get("answer_type")
    if isinstance(raw, str) and raw.strip().lower() in ("open", "closed"):
        return raw.strip().lower()
    answer = str(rec.get("answer", "")).strip().lower()
    return "closed" if answer in _YES_NO else "open"  # PathVQA: yes/no questions are its closed set


def record_to_sample(rec: Any, index: int, flavor: str, image_dir: Path, out_dir: Path, split: str,
                     path: str | None = None) -> Sample | None:
    """One VQA record -> Sample, or None for a record the flavour skips (non-English SLAKE)."""
    if not isinstance(rec, dict):
        raise DataValidationError("a VQA record must be a JSON object", path=path, field=f"[{index}]")
    if flavor == "slake" and rec.get("q_lang", "en") != "en":
        return None
    image = next((rec[k] for k in _IMAGE_KEYS if isinstance(rec.get(k), str) and rec[k]), None)
    if image is None:
        raise DataValidationError(f"record {index} names no image ({' / '.join(_IMAGE_KEYS)})", path=path,
                                  field=f"[{index}].image_name")
    for key in ("question", "answer"):
        if not isinstance(rec.get(key), (str, int, float)) or str(rec[key]).strip() == "":
            raise DataValidationError(f"record {index} has no {key}", path=path, field=f"[{index}].{key}")
    modality = MODALITY_ALIASES.get(str(rec.get("modality", "")).strip().lower())
    meta = {k: rec[k] for k in ("qid", "image_organ", "question_type", "phrase_type", "location", "content_type",
                                "base_type") if k in rec}
    obj = {
        "id": f"{flavor}:{split}:{rec.get('qid', index)}", "image": rebase(image, image_dir, out_dir),
        "conversations": [{"role": "user", "content": f"{IMAGE_TOKEN}\n{str(rec['question']).strip()}"},
                          {"role": "assistant", "content": str(rec["answer"]).strip()}],
        "modality": modality, "task": "vqa", "answer_type": _answer_type(rec), "source": flavor, "split": split,
        "group": Path(image).stem, "meta": meta,
    }
    return parse_sample(obj, path=path)


def read_vqa(
    src: str | Path, out_dir: str | Path, flavor: str = "vqa-rad", image_dir: str | Path | None = None
) -> Iterator[Sample]:
    """Samples from a VQA dataset folder (its split files) or from one JSON file (split: train,
    or the one its name says). Images are relative to `image_dir` (default `<folder>/images`,
    `<folder>/imgs` for SLAKE)."""
    if flavor not in _SPLIT_FILES:
        raise InputError(f"unknown VQA flavour {flavor!r}; choose from {', '.join(_SPLIT_FILES)}")
    src = Path(src)
    if src.is_dir():
        files = [(src / name, split) for name, split in _SPLIT_FILES[flavor].items() if (src / name).is_file()]
        if not files:
            raise InputError(f"{src}: none of {', '.join(_SPLIT_FILES[flavor])} found")
        folder = src
    else:
        files = [(src, _SPLIT_FILES[flavor].get(src.name, "train"))]
        folder = src.parent
    if image_dir is None:
        image_dir = folder / ("imgs" if flavor == "slake" else "images")
    for path, split in files:
        data = load_json(path)
        if not isinstance(data, list):
            raise DataValidationError("a VQA file must hold a JSON list of records", path=str(path))
        for i, rec in enumerate(data):
            sample = record_to_sample(rec, i, flavor, Path(image_dir), Path(out_dir), split, str(path))
            if sample is not None:
                yield sample
