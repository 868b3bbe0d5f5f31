"""Pixel encoder, mask decoder, mask post-processing and SAM checkpoint loading."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from medplib.config import preset
from medplib.model.mask_decoder import MaskDecoder, postprocess_masks
from medplib.model.pixel_encoder import PixelEncoder


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
