"""Pixel encoder, mask decoder, mask post-processing and SAM checkpoint loading."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor

from medplib.config import preset
from medplib.errors import CheckpointError
from medplib.model.mask_decoder import MaskDecoder, postprocess_masks
from medplib.model.pixel_encoder import PixelEncoder
from medplib.model.sam_checkpoint import load_sam_checkpoint, sam_state_dict_to_medplib


@pytest.fixture()
def tiny():
    return preset("tiny")


def test_tiny_shapes(tiny) -> None:
    torch.manual_seed(0)
    enc, dec = PixelEncoder(tiny.pixel), MaskDecoder(tiny.decoder)
    s, g = tiny.pixel.image_size, tiny.pixel.grid
    emb = enc(torch.randn(2, 3, s, s))
    assert emb.shape == (2, tiny.pixel.out_chans, g, g)
    logits, iou = dec(emb, torch.randn(2, 1, tiny.decoder.transformer_dim))
    assert logits.shape == (2, 1, 4 * g, 4 * g)
    assert iou.shape == (2, 1)


@pytest.mark.parametrize("image_size", [160, 144])  # grid 10 (even) and 9 (odd): neither a multiple of window 8
def test_grid_not_multiple_of_window(tiny, image_size: int) -> None:
    cfg = dataclasses.replace(tiny.pixel, image_size=image_size)
    enc, dec = PixelEncoder(cfg), MaskDecoder(tiny.decoder)
    emb = enc(torch.randn(1, 3, image_size, image_size))
    assert emb.shape == (1, cfg.out_chans, cfg.grid, cfg.grid)
    assert dec(emb, torch.randn(1, 2, cfg.out_chans))[0].shape == (1, 1, 4 * cfg.grid, 4 * cfg.grid)


def test_adapter_changes_output_and_trains(tiny) -> None:
    torch.manual_seed(0)
    with_adapter = PixelEncoder(tiny.pixel)
    without = PixelEncoder(dataclasses.replace(tiny.pixel, adapter=False))
    # Same weights everywhere except the adapters: missing keys are exactly the adapter parameters.
    missing, unexpected = without.load_state_dict(with_adapter.state_dict(), strict=False)
    assert not missing and unexpected and all(".Adapter." in k for k in unexpected)
    x = torch.randn(1, 3, 256, 256)
    out = with_adapter(x)
    assert not torch.allclose(out, without(x), atol=1e-4)

    adapter_params = [p for n, p in with_adapter.named_parameters() if ".Adapter." in n]
    assert adapter_params and all(p.requires_grad for p in adapter_params)
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter_params)


def test_gradients_reach_sparse_prompts(tiny) -> None:
    torch.manual_seed(0)
    dec = MaskDecoder(tiny.decoder)
    prompts = torch.randn(3, 1, tiny.decoder.transformer_dim, requires_grad=True)
    logits, iou = dec(torch.randn(3, tiny.decoder.transformer_dim, 8, 8), prompts)
    (logits.sigmoid().mean() + iou.sum()).backward()
    assert prompts.grad is not None and prompts.grad.abs().sum() > 0
    # Rows are independent mask queries: row 0's output does not depend on row 1's prompt.
    prompts.grad = None
    logits, _ = dec(torch.randn(3, tiny.decoder.transformer_dim, 8, 8), prompts)
    logits[0].sum().backward()
    assert prompts.grad[1:].abs().sum() == 0


def test_postprocess_non_square_crops_padding() -> None:
    # A 300 x 200 (H x W) image: longest side -> 256, so the valid region of the padded square is 256 x 171.
    original, input_size = (300, 200), 256
    valid = (256, round(200 * 256 / 300))
    low = torch.full((1, 1, 64, 64), -10.0)
    r0, r1, c0, c1 = 10, 31, 8, 30  # low-res rectangle, rows 10..30, cols 8..29
    low[..., r0:r1, c0:c1] = 10.0
    # Everything beyond the valid width is padding; make it positive so that any leak would show.
    low[..., :, -(-valid[1] // 4):] = 10.0
    out = postprocess_masks(low, input_size, valid, original)
    assert out.shape == (1, 1, *original)

    # Where each original pixel centre falls on the low-res grid (original -> 256 frame -> 64 grid).
    scale = (input_size / max(original)) / 4
    rows = (torch.arange(original[0]) + 0.5) * scale
    cols = (torch.arange(original[1]) + 0.5) * scale
    expected = ((rows >= r0) & (rows < r1))[:, None] & ((cols >= c0) & (cols < c1))[None, :]
    pred = out[0, 0] > 0
    iou = (pred & expected).sum() / (pred | expected).sum()
    assert iou > 0.95
    # Nothing half a low-res cell beyond the rectangle's right edge: in particular no padding at the border.
    assert not pred[:, cols >= c1 + 0.5].any()


def test_paper_shapes_on_meta() -> None:
    cfg = preset("paper")
    with torch.device("meta"):
        enc = PixelEncoder(cfg.pixel)
        plain = PixelEncoder(dataclasses.replace(cfg.pixel, adapter=False))
        dec = MaskDecoder(cfg.decoder)
        emb = enc(torch.empty(2, 3, 256, 256))
        logits, iou = dec(emb, torch.empty(2, 1, 256))
    assert emb.shape == (2, 256, 16, 16)
    assert logits.shape == (2, 1, 64, 64) and iou.shape == (2, 1)

    def count(m: torch.nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    # SAM ViT-B has 89,670,912 encoder parameters at 1024 px; at 256 px pos_embed (16x16 instead of 64x64)
    # and the global blocks' rel_pos tables shrink, leaving 86,672,640.
    assert count(plain) == 86_672_640
    # SAM-Med2D adapters add 15,042,048 per block (the 3x3 and 4x4 768-channel convs dominate): 267,177,216.
    assert count(enc) == 267_177_216
    # SAM's decoder (4,058,340) minus the three unused multimask hypernetworks/IoU rows, plus no_mask_embed.
    assert count(dec) == 3_638_401


def _sam_layout(enc: PixelEncoder, dec: MaskDecoder) -> dict[str, Tensor]:
    """Our weights under segment-anything's names, with the SAM parts medplib drops added back."""
    sd = {f"image_encoder.{k}": v.clone() for k, v in enc.state_dict().items()}
    for k, v in dec.state_dict().items():
        prefix = "prompt_encoder" if k.startswith(("pe_layer.", "no_mask_embed.")) else "mask_decoder"
        sd[f"{prefix}.{k}"] = v.clone()
    dim = dec.cfg.transformer_dim
    # SAM has four hypernetworks and four IoU outputs (one per mask token); medplib keeps number 0.
    for i in (1, 2, 3):
        for k, v in dec.output_hypernetworks_mlps[0].state_dict().items():
            sd[f"mask_decoder.output_hypernetworks_mlps.{i}.{k}"] = torch.randn_like(v)
    last = f"mask_decoder.iou_prediction_head.layers.{dec.cfg.iou_head_depth - 1}"
    sd[f"{last}.weight"] = torch.cat([sd[f"{last}.weight"], torch.randn(3, dec.cfg.iou_head_hidden_dim)])
    sd[f"{last}.bias"] = torch.cat([sd[f"{last}.bias"], torch.randn(3)])
    sd["prompt_encoder.point_embeddings.0.weight"] = torch.randn(1, dim)
    sd["prompt_encoder.mask_downscaling.0.weight"] = torch.randn(4, 1, 2, 2)
    return sd


def _outputs(enc: PixelEncoder, dec: MaskDecoder, x: Tensor, prompts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    with torch.no_grad():
        emb = enc(x)
        return (emb, *dec(emb, prompts))


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_sam_layout_checkpoint_round_trip(tiny, tmp_path: Path, fmt: str) -> None:
    torch.manual_seed(0)
    enc, dec = PixelEncoder(tiny.pixel).eval(), MaskDecoder(tiny.decoder).eval()
    sd = _sam_layout(enc, dec)
    path = tmp_path / f"sam.{fmt}"
    if fmt == "pth":
        torch.save({"model": sd, "epoch": 3}, path)  # SAM-Med2D nests the weights under "model"
    else:
        save_file(sd, str(path))

    torch.manual_seed(1)
    enc2, dec2 = PixelEncoder(tiny.pixel).eval(), MaskDecoder(tiny.decoder).eval()
    x, prompts = torch.randn(2, 3, 256, 256), torch.randn(2, 1, tiny.decoder.transformer_dim)
    before = _outputs(enc2, dec2, x, prompts)
    load_sam_checkpoint(path, enc2, dec2)
    after, expected = _outputs(enc2, dec2, x, prompts), _outputs(enc, dec, x, prompts)
    assert not torch.equal(before[1], expected[1])
    for got, want in zip(after, expected):
        assert torch.equal(got, want)


class _Payload:
    """Any class: unpickling it would run arbitrary code paths, so it must be refused."""


def test_pickled_object_is_refused(tiny, tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"model": {"image_encoder.pos_embed": torch.zeros(1)}, "payload": _Payload()}, path)
    with pytest.raises(CheckpointError, match="safetensors"):
        load_sam_checkpoint(path, PixelEncoder(tiny.pixel), MaskDecoder(tiny.decoder))


def test_missing_adapter_keys_are_reported(tiny, tmp_path: Path) -> None:
    plain = PixelEncoder(dataclasses.replace(tiny.pixel, adapter=False))
    path = tmp_path / "medsam.safetensors"
    save_file(_sam_layout(plain, MaskDecoder(tiny.decoder)), str(path))
    with pytest.raises(CheckpointError, match=r"missing: blocks\.0\.Adapter.*pixel\.adapter=false"):
        load_sam_checkpoint(path, PixelEncoder(tiny.pixel), MaskDecoder(tiny.decoder))


def test_positions_resized_from_1024px_checkpoint(tiny) -> None:
    cfg = tiny.pixel  # grid 16, window 8, global attention in block 1
    head_dim = cfg.embed_dim // cfg.num_heads
    sd = {
        "image_encoder.pos_embed": torch.full((1, 64, 64, cfg.embed_dim), 0.5),
        "image_encoder.blocks.0.attn.rel_pos_h": torch.randn(2 * 14 - 1, head_dim),  # SAM's window 14
        "image_encoder.blocks.1.attn.rel_pos_h": torch.randn(2 * 64 - 1, head_dim),  # global at 64 x 64
        "image_encoder.blocks.1.attn.rel_pos_w": torch.randn(2 * 64 - 1, head_dim),
    }
    enc_sd, dec_sd = sam_state_dict_to_medplib(sd, cfg)
    assert enc_sd["pos_embed"].shape == (1, 16, 16, cfg.embed_dim)
    assert torch.allclose(enc_sd["pos_embed"], torch.tensor(0.5))  # a constant stays constant
    assert enc_sd["blocks.0.attn.rel_pos_h"].shape == (2 * 8 - 1, head_dim)
    assert enc_sd["blocks.1.attn.rel_pos_h"].shape == enc_sd["blocks.1.attn.rel_pos_w"].shape == (31, head_dim)
    assert not dec_sd
    # Without a config nothing is resized.
    assert sam_state_dict_to_medplib(sd)[0]["pos_embed"].shape == (1, 64, 64, cfg.embed_dim)


def test_model_built_from_a_config_naming_a_sam_checkpoint_holds_its_tensors(tmp_path: Path) -> None:
    """`pixel.checkpoint` is loaded where the model is built (from_config / the pipeline's first stage)."""
    from medplib.api import MedPLIB

    cfg = preset("tiny")
    torch.manual_seed(0)
    enc, dec = PixelEncoder(cfg.pixel).eval(), MaskDecoder(cfg.decoder).eval()
    path = tmp_path / "sam.safetensors"
    save_file(_sam_layout(enc, dec), str(path))
    m = MedPLIB.from_config(preset("tiny", **{"pixel.checkpoint": str(path)}), seed=1)
    for mine, theirs in ((m.model.pixel_encoder, enc), (m.model.mask_decoder, dec)):
        got, want = mine.state_dict(), theirs.state_dict()
        assert set(got) == set(want)
        assert all(torch.equal(got[k], want[k]) for k in want)
    random = MedPLIB.from_config(preset("tiny"), seed=1)
    assert not torch.equal(random.model.pixel_encoder.pos_embed, m.model.pixel_encoder.pos_embed)
