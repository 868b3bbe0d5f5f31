"""A CNN pixel encoder: ImageNet EfficientNet-Lite0 and an FPN neck, in front of the SAM-style mask decoder.

The SAM ViT encoder (`pixel_encoder.py`) gives the decoder a stride-16 embedding (16 x 16 at 256 px). Here a
feature pyramid fuses the backbone's strides 8, 16 and 32 into one stride-8 embedding (32 x 32 at 256 px) of
the decoder's width, so the mask keeps the detail that stride-8 features hold; the decoder itself is unchanged
(it upsamples 4x, to 128 x 128 logits). Measured against the stride-16 variant in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from medplib.config import PixelEncoderConfig
from medplib.model.common import LayerNorm2d
from medplib.model.efficientnet import LEVEL_CHANNELS, EfficientNetLite0


class CNNPixelEncoder(nn.Module):
    """pixels -> (B, out_chans, S / patch_size, S / patch_size); patch_size is the output stride, 8 or 16."""

    def __init__(self, cfg: PixelEncoderConfig) -> None:
        super().__init__()
        if cfg.patch_size not in (8, 16):
            raise ValueError(f"the CNN pixel encoder has output stride 8 or 16, not pixel.patch_size={cfg.patch_size}")
        self.cfg = cfg
        self.backbone = EfficientNetLite0()
        c = cfg.out_chans
        levels = LEVEL_CHANNELS[:3] if cfg.patch_size == 8 else LEVEL_CHANNELS[1:3]
        self.lateral = nn.ModuleList(nn.Conv2d(ch, c, 1) for ch in levels)
        self.neck = nn.Sequential(
            nn.Conv2d(c, c, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(c),
            nn.GELU(),
            nn.Conv2d(c, c, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(c),
        )

    def forward(self, pixels: Tensor) -> Tensor:
        """pixels: (B, 3, S, S) normalised -> (B, out_chans, S / stride, S / stride)."""
        f = self.backbone(pixels)
        maps = [f.s8, f.s16, f.s32] if self.cfg.patch_size == 8 else [f.s16, f.s32]
        # Top-down: upsample the coarser sum and add the next finer level (FPN).
        x = self.lateral[-1](maps[-1])
        for lateral, m in zip(reversed(self.lateral[:-1]), reversed(maps[:-1])):
            x = lateral(m) + F.interpolate(x, size=m.shape[-2:], mode="bilinear", align_corners=False)
        return self.neck(x)
