"""Vision tower (CLIP or SigLIP from transformers, or the EfficientNet-Lite0 CNN) and the projector into the LLM
width."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

from medplib.config import VisionConfig
from medplib.errors import CheckpointError
from medplib.model import packaged
from medplib.model.efficientnet import HEAD_CHANNELS, EfficientNetLite0, load_imagenet

_TOWERS = {"clip": (CLIPVisionConfig, CLIPVisionModel), "siglip": (SiglipVisionConfig, SiglipVisionModel)}


class VisionTower(nn.Module):
    """Patch features of one hidden layer (published: the second-to-last), CLS dropped for CLIP; for the CNN,
    the head map at stride 32 (7 x 7 tokens of 1280 channels at 224 px)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.kind == "efficientnet":
            self.model = EfficientNetLite0()
            if cfg.pretrained:
                load_imagenet(self.model, packaged.resolve(cfg.pretrained))
            self.hidden_size = HEAD_CHANNELS
            if cfg.freeze:
                self.model.requires_grad_(False)
            return
        config_cls, model_cls = _TOWERS[cfg.kind]
        if cfg.pretrained:
            try:
                self.model = model_cls.from_pretrained(cfg.pretrained, local_files_only=True)
            except OSError as exc:
                raise CheckpointError(f"cannot load the {cfg.kind} vision tower from {cfg.pretrained}: {exc}") from None
        else:
            self.model = model_cls(config_cls(**cfg.hf))
        self.hidden_size = self.model.config.hidden_size
        if cfg.freeze:
            self.model.requires_grad_(False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised -> (B, grid*grid, D) patch features."""
        if self.cfg.kind == "efficientnet":
            # CLIP's hidden states come out of a LayerNorm'd residual stream; the CNN's ReLU6 head map (norm ~23
            # per position) would reach the LLM at ~7x the scale of its word embeddings (norm ~3.2 in SmolLM2).
            feats = self.model(pixels).head.flatten(2).transpose(1, 2)
            return F.layer_norm(feats, feats.shape[-1:])
        out = self.model(pixel_values=pixels.to(self.model.dtype), output_hidden_states=True)
        feats = out.hidden_states[self.cfg.select_layer]
        return feats[:, 1:] if self.cfg.kind == "clip" and self.cfg.drop_cls else feats


def build_projector(kind: str, vision_dim: int, llm_dim: int) -> nn.Module:
    """`mlp2x_gelu` (LLaVA-1.5, published): Linear, GELU, Linear; or a single Linear."""
    if kind == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(vision_dim, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim))
    if kind == "linear":
        return nn.Linear(vision_dim, llm_dim)
    raise CheckpointError(f"unknown projector '{kind}'")
