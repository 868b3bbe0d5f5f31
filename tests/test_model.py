"""The composed model: losses, several [SEG] -> several masks, KV cache, save/load, paper shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medplib.api import MedPLIB
from medplib.config import preset
from medplib.data.schema import BoxRegion, PointRegion, Turn
from medplib.errors import CheckpointError, InputError
from medplib.model.summary import PAPER_BASE_VOCAB, build_on_meta, summarize
from medplib.tokenizer import EXTRA_SPECIAL
from medplib.training.recipe import LOSS_PARTS, LossSection


@pytest.fixture(scope="module")
def tiny() -> MedPLIB:
    return MedPLIB.from_preset("tiny", seed=0)


def _image(h: int = 120, w: int = 180) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 255, (h, w, 3), dtype=np.uint8)


def _two_seg_batch(m: MedPLIB) -> dict:
    img = _image()
    a = np.zeros(img.shape[:2], np.uint8)
    a[10:60, 20:90] = 1
    b = np.zeros(img.shape[:2], np.uint8)
    b[70:110, 100:170] = 255
    turns = [Turn(role="user", content="Segment <region> and the spleen."),
             Turn(role="assistant", content="liver [SEG] and spleen [SEG].")]
    enc = m.processor.encode(img, turns, [BoxRegion(box=(20, 10, 90, 60))], target_masks=[a, b])
    plain = m.processor.encode(img, [Turn(role="user", content="Modality?"), Turn(role="assistant", content="CT")])
    return m.collate([enc, plain])


def test_forward_losses_and_one_mask_per_seg(tiny: MedPLIB) -> None:
    batch = _two_seg_batch(tiny)
    out = tiny.model(**batch)
    assert set(out.parts) == set(LOSS_PARTS) and out.parts["bce"] > 0 and out.parts["dice"] > 0
    loss = LossSection().combine(out.parts)
    assert torch.isfinite(loss)
    assert [len(x) for x in out.mask_logits] == [2, 0]
    assert all(m.shape == (120, 180) for m in out.mask_logits[0])  # original image size
    loss.backward()
    assert tiny.model.seg_proj[0].weight.grad is not None and tiny.model.region_encoder.proj.weight.grad is not None
    tiny.model.zero_grad(set_to_none=True)


def test_greedy_generation_same_with_and_without_kv_cache(tiny: MedPLIB) -> None:
    img = _image()
    q = "What is in <region>?"
    regions = [PointRegion(point=(40, 50))]
    cached = tiny.generate(img, q, regions, max_new_tokens=20, use_cache=True)
    plain = tiny.generate(img, q, regions, max_new_tokens=20, use_cache=False)
    assert len(cached.token_ids) >= 5
    assert cached.token_ids == plain.token_ids


def test_answer_without_seg_has_no_mask(tiny: MedPLIB) -> None:
    ans = tiny.generate(_image(), "Describe the image.", max_new_tokens=8)
    assert tiny.processor.seg_id not in ans.token_ids
    assert ans.masks == [] and ans.scores == []


def test_masks_come_from_generated_seg_hidden_states(tiny: MedPLIB) -> None:
    """Force the LM head to emit [SEG] first: generate must decode exactly one mask per [SEG]."""
    head = tiny.model.llm.get_output_embeddings()
    saved = head.weight.detach().clone()
    seg = tiny.processor.seg_id
    try:
        with torch.no_grad():
            head.weight.zero_()
            head.weight[seg] = 1e-3  # every other logit is 0: [SEG] wins wherever h . w > 0
        ans = tiny.generate(_image(90, 200), "Segment it.", max_new_tokens=3)
    finally:
        with torch.no_grad():
            head.weight.copy_(saved)
    assert ans.token_ids.count(seg) == len(ans.masks) == len(ans.scores) >= 1
    assert ans.masks[0].shape == (90, 200) and ans.masks[0].dtype == bool


def test_bad_questions_are_clear_errors(tiny: MedPLIB) -> None:
    with pytest.raises(InputError, match="2 <region> placeholders but 1 regions"):
        tiny.generate(_image(), "Compare <region> and <region>.", [PointRegion(point=(1, 1))])
    with pytest.raises(InputError, match="outside"):
        tiny.generate(_image(), "What is <region>?", [BoxRegion(box=(0, 0, 500, 10))])
    with pytest.raises(InputError, match="empty"):
        tiny.generate(_image(), "   ")


def test_save_load_round_trip_is_exact(tiny: MedPLIB, tmp_path) -> None:
    tiny.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) >= ["config.json", "model.safetensors", "tokenizer.json"]
    loaded = MedPLIB.from_pretrained(tmp_path / "m")
    batch = _two_seg_batch(tiny)
    tiny.model.eval()
    with torch.no_grad():
        a, b = tiny.model(**batch), loaded.model(**_two_seg_batch(loaded))
    assert torch.equal(a.logits, b.logits)
    assert all(torch.equal(x, y) for x, y in zip(a.mask_logits[0], b.mask_logits[0]))
    q = tiny.generate(_image(), "What is this?", max_new_tokens=6)
    assert loaded.generate(_image(), "What is this?", max_new_tokens=6).token_ids == q.token_ids


def test_loading_refuses_non_model_folders_and_pickles(tiny: MedPLIB, tmp_path) -> None:
    with pytest.raises(CheckpointError, match="not a medplib model folder"):
        MedPLIB.from_pretrained(tmp_path)
    folder = tiny.save_pretrained(tmp_path / "m")
    torch.save({"w": torch.zeros(1)}, folder / "model.safetensors")  # a pickle under the weights' name
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        MedPLIB.from_pretrained(folder)


def test_qwen2_and_siglip_are_a_config_change() -> None:
    cfg = preset("tiny", **{"llm.kind": "qwen2", "vision.kind": "siglip", "vision.drop_cls": False})
    m = MedPLIB.from_config(cfg)
    assert type(m.model.llm).__name__ == "Qwen2ForCausalLM"
    assert type(m.model.vision.model).__name__ == "SiglipVisionModel"
    ans = m.generate(_image(), "What is this?", max_new_tokens=4)
    assert len(ans.token_ids) >= 1


def test_tiny_builds_fast_with_a_few_million_parameters() -> None:
    m = MedPLIB.from_preset("tiny")
    n = sum(p.numel() for p in m.model.parameters())
    assert 1_000_000 < n < 10_000_000


def test_paper_preset_has_the_published_shapes() -> None:
    model = build_on_meta(preset("paper"), PAPER_BASE_VOCAB + len(EXTRA_SPECIAL))
    s = summarize(model)
    assert (s.image_tokens, s.vision_width) == (576, 1024)
    assert (s.llm_layers, s.llm_hidden) == (32, 4096)
    assert s.pixel_embedding == (256, 16, 16)
    assert s.parts["region_encoder"] == 1024 * 4096 + 4096  # Linear(1024, 4096)
    assert s.parts["seg_projection"] == (4096 * 4096 + 4096) + (4096 * 256 + 256)
    assert 11.0e9 < s.total < 12.5e9 and 6.8e9 < s.active < 7.6e9  # published: ~12B total, ~7B active


def test_bfloat16_load_and_generate(kvasir_model, shared_data) -> None:
    """dtype is a loading option, not a code path: bf16 weights still ground the polyp."""
    from conftest import KVASIR_QUESTION, kvasir_images

    m = MedPLIB.from_pretrained(kvasir_model, dtype=torch.bfloat16)
    assert next(m.model.parameters()).dtype == torch.bfloat16
    _, img, gt = kvasir_images(shared_data, 1)[0]
    ans = m.generate(img, KVASIR_QUESTION)
    assert len(ans.masks) == 1 and ans.masks[0].shape == gt.shape
    assert 2 * (ans.masks[0] & gt).sum() / (ans.masks[0].sum() + gt.sum()) > 0.8


def test_second_question_reuses_the_image_prefix_cache(tiny: MedPLIB) -> None:
    img = _image()
    feats = tiny.image_features(img)
    first = tiny.generate(img, "What modality is this?", features=feats, max_new_tokens=8)
    assert feats[1].prefix_cache is not None
    cached_len = feats[1].prefix_cache.get_seq_length()
    second = tiny.generate(img, "What is in <region>?", [PointRegion(point=(30, 30))], features=feats, max_new_tokens=8)
    assert feats[1].prefix_cache.get_seq_length() == cached_len  # generation never grows the stored prefix
    fresh = tiny.generate(img, "What is in <region>?", [PointRegion(point=(30, 30))], max_new_tokens=8, use_cache=False)
    assert second.token_ids == fresh.token_ids
    assert len(first.token_ids) >= 1
