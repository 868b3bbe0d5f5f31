"""Memory-lean loading (meta-device build, tensors read straight into place) and sharded safetensors:
the lean path gives the eager path's logits and masks on a real Kvasir-SEG image, ties and buffers
stay right, shards round-trip, and a broken shard is a clear error naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import KVASIR_ANSWER, KVASIR_QUESTION, kvasir_images

from medplib.api import MedPLIB
from medplib.data.schema import Turn
from medplib.errors import CheckpointError
from medplib.model.weights import INDEX, WEIGHTS


@pytest.fixture(scope="module")
def kvasir(shared_data: Path) -> tuple[np.ndarray, np.ndarray]:
    _, img, mask = kvasir_images(shared_data, 1)[0]
    return img, mask


@pytest.fixture(scope="module")
def tiny_moe_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny with MoE MLPs (routers, expert copies) saved once."""
    m = MedPLIB.from_preset("tiny", seed=3, **{"moe.num_experts": 2})
    return m.save_pretrained(tmp_path_factory.mktemp("tiny_moe") / "model")


@pytest.fixture(scope="module")
def lite_folder(tmp_path_factory: pytest.TempPathFactory, lite_model: MedPLIB) -> Path:
    """lite as built from its packaged weights: tied SmolLM2 embeddings, BatchNorm statistics, rotary buffers."""
    return lite_model.save_pretrained(tmp_path_factory.mktemp("lite") / "model")


def _forward(m: MedPLIB, img: np.ndarray, mask: np.ndarray):
    """Teacher-forced grounding answer on the real image: (logits (N, V), [mask logits (H, W)])."""
    turns = [Turn(role="user", content=KVASIR_QUESTION), Turn(role="assistant", content=KVASIR_ANSWER)]
    item = m.processor.encode(img, turns, target_masks=[mask])
    with torch.no_grad():
        out = m.model(**m.collate([item]))
    return out.logits, out.mask_logits[0]


def _same_tensors(a: MedPLIB, b: MedPLIB) -> None:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    # Non-persistent buffers (rotary inv_freq) are not in the state dict: compare them too.
    ba, bb = dict(a.model.named_buffers()), dict(b.model.named_buffers())
    assert ba.keys() == bb.keys()
    for k in ba:
        assert ba[k].dtype == bb[k].dtype and torch.equal(ba[k], bb[k]), k
    assert [p.requires_grad for p in a.model.parameters()] == [p.requires_grad for p in b.model.parameters()]


@pytest.mark.parametrize("which", ["tiny_moe_folder", "lite_folder"])
def test_lean_load_gives_the_eager_logits_and_masks_on_a_real_image(which: str, request: pytest.FixtureRequest,
                                                                   kvasir: tuple) -> None:
    folder = request.getfixturevalue(which)
    eager = MedPLIB.from_pretrained(folder, lean=False)
    lean = MedPLIB.from_pretrained(folder)
    _same_tensors(eager, lean)
    assert not any(t.is_meta for t in [*lean.model.parameters(), *lean.model.buffers()])
    img, mask = kvasir
    (la, ma), (lb, mb) = _forward(eager, img, mask), _forward(lean, img, mask)
    assert torch.equal(la, lb)
    assert len(ma) == len(mb) == 1 and ma[0].shape == mask.shape and torch.equal(ma[0], mb[0])
    q = "What is shown in the image?"
    assert lean.generate(img, q, max_new_tokens=8).token_ids == eager.generate(img, q, max_new_tokens=8).token_ids


def test_lean_load_keeps_tied_embeddings_tied(lite_folder: Path) -> None:
    m = MedPLIB.from_pretrained(lite_folder)
    llm = m.model.llm
    assert llm.config.tie_word_embeddings
    assert llm.get_output_embeddings().weight is llm.get_input_embeddings().weight
    # Stored once: the tied pair is one tensor in the file.
    from safetensors import safe_open

    with safe_open(str(lite_folder / WEIGHTS), "pt") as f:
        keys = set(f.keys())
    assert ("llm.lm_head.weight" in keys) != ("llm.model.embed_tokens.weight" in keys)


def test_lean_load_in_bfloat16_matches_eager_cast(tiny_moe_folder: Path) -> None:
    eager = MedPLIB.from_pretrained(tiny_moe_folder, lean=False, dtype=torch.bfloat16)
    lean = MedPLIB.from_pretrained(tiny_moe_folder, dtype=torch.bfloat16)
    assert next(lean.model.parameters()).dtype == torch.bfloat16
    _same_tensors(eager, lean)


def test_sharded_round_trip(tiny_moe_folder: Path, tmp_path: Path, kvasir: tuple) -> None:
    ref = MedPLIB.from_pretrained(tiny_moe_folder)
    out = ref.save_pretrained(tmp_path / "sharded", max_shard_bytes=2 << 20)
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3 and not (out / WEIGHTS).exists()
    index = json.loads((out / INDEX).read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert all(s.name.endswith(f"-of-{len(shards):05d}.safetensors") for s in shards)
    state = ref.model.state_dict()
    assert set(index["weight_map"]) == set(state)  # tiny ties nothing: every key is stored
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    assert max(s.stat().st_size for s in shards) < (2 << 20) + (1 << 20)  # a shard is at most one tensor over
    for lean in (True, False):
        _same_tensors(ref, MedPLIB.from_pretrained(out, lean=lean))
    img, mask = kvasir
    (la, ma), (lb, mb) = _forward(ref, img, mask), _forward(MedPLIB.from_pretrained(out), img, mask)
    assert torch.equal(la, lb) and torch.equal(ma[0], mb[0])
    # Saving again in one file replaces the shard layout rather than leaving two.
    ref.save_pretrained(out)
    assert (out / WEIGHTS).is_file() and not (out / INDEX).exists() and not list(out.glob("model-*-of-*.safetensors"))
    _same_tensors(ref, MedPLIB.from_pretrained(out))


@pytest.fixture
def sharded(tiny_moe_folder: Path, tmp_path: Path) -> Path:
    return MedPLIB.from_pretrained(tiny_moe_folder).save_pretrained(tmp_path / "sharded", max_shard_bytes=2 << 20)


@pytest.mark.parametrize("lean", [True, False])
def test_truncated_shard_is_a_clear_error_naming_the_file(sharded: Path, lean: bool) -> None:
    shard = sorted(sharded.glob("model-*-of-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{shard.name}.*(truncated|not a readable safetensors)"):
        MedPLIB.from_pretrained(sharded, lean=lean)


@pytest.mark.parametrize("lean", [True, False])
def test_corrupt_shard_header_is_a_clear_error_naming_the_file(sharded: Path, lean: bool) -> None:
    shard = sorted(sharded.glob("model-*-of-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[8:40] = b"\x00" * 32  # the JSON header overwritten
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{shard.name}.*not a readable safetensors"):
        MedPLIB.from_pretrained(sharded, lean=lean)


def test_missing_shard_and_mismatched_keys_are_clear_errors(sharded: Path) -> None:
    index = json.loads((sharded / INDEX).read_text())
    last = sorted(sharded.glob("model-*-of-*.safetensors"))[-1]
    last.rename(last.with_suffix(".bak"))
    with pytest.raises(CheckpointError, match=last.name):
        MedPLIB.from_pretrained(sharded)
    last.with_suffix(".bak").rename(last)
    # An index that lists a key no shard holds is named; so is a model tensor that no file has.
    key, shard = next(iter(index["weight_map"].items()))
    broken = dict(index, weight_map={**index["weight_map"], "llm.no_such.weight": shard})
    (sharded / INDEX).write_text(json.dumps(broken))
    with pytest.raises(CheckpointError, match="llm.no_such.weight"):
        MedPLIB.from_pretrained(sharded)
    dropped = dict(index, weight_map={k: v for k, v in index["weight_map"].items() if k != key})
    (sharded / INDEX).write_text(json.dumps(dropped))
    with pytest.raises(CheckpointError, match=f"missing .*{key}"):
        MedPLIB.from_pretrained(sharded)
