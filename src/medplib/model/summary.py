"""Parameter counts and feature shapes of a config, measured on the meta device (no memory, no weights)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from medplib.config import MedPLIBConfig
from medplib.model.medplib import MedPLIBModel, SpecialIds
from medplib.tokenizer import EXTRA_SPECIAL

# LLaMA's 32,000 tokens plus one pad: what a `paper` model has before medplib's special tokens.
PAPER_BASE_VOCAB = 32001


@dataclass
class Summary:
    parts: dict[str, int]  # parameters per component
    total: int
    active: int  # parameters one token passes through (top-k of the experts)
    image_tokens: int
    vision_width: int
    llm_layers: int
    llm_hidden: int
    pixel_embedding: tuple[int, int, int]  # (C, h, w)


def build_on_meta(cfg: MedPLIBConfig, vocab_size: int) -> MedPLIBModel:
    """The model's modules with meta tensors: shapes and counts only; needs no local weights."""
    cfg = MedPLIBConfig.from_dict(cfg.to_dict())
    cfg.vision.pretrained = cfg.llm.pretrained = cfg.pixel.checkpoint = None
    ids = SpecialIds(image=vocab_size - len(EXTRA_SPECIAL), region=vocab_size - 4, seg=vocab_size - 3, eos=2, pad=0,
                     box=(vocab_size - 2, vocab_size - 1))
    with torch.device("meta"):
        return MedPLIBModel(cfg, vocab_size, ids)


def summarize(model: MedPLIBModel) -> Summary:
    def count(m: nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    parts = {
        "vision_tower": count(model.vision),
        "projector": count(model.projector),
        "llm": count(model.llm),
        "region_encoder": count(model.region_encoder),
        "pixel_encoder": count(model.pixel_encoder),
        "mask_decoder": count(model.mask_decoder),
        "seg_projection": count(model.seg_proj),
    }
    if model.tisr is not None:
        parts["tisr"] = count(model.tisr)
    total = sum(parts.values())
    moe = model.cfg.moe
    idle = 0
    if moe.num_experts:
        from medplib.model.moe import moe_layers

        per_expert = sum(count(layer.experts[0]) for layer in moe_layers(model.llm))
        idle = (moe.num_experts - moe.top_k) * per_expert
    cfg = model.cfg
    dev = next(model.parameters()).device
    with torch.no_grad():
        vis = model.vision(torch.empty(1, 3, cfg.vision.image_size, cfg.vision.image_size, device=dev))
        pix = model.pixel_encoder(torch.empty(1, 3, cfg.pixel.image_size, cfg.pixel.image_size, device=dev))
    return Summary(
        parts=parts, total=total, active=total - idle, image_tokens=cfg.vision.num_image_tokens,
        vision_width=vis.shape[2], llm_layers=model.llm.config.num_hidden_layers,
        llm_hidden=model.llm.config.hidden_size, pixel_embedding=tuple(pix.shape[1:]),
    )
