"""Overlays a person can read: masks as translucent colours with outlines, regions as outlines."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

PALETTE = [(255, 64, 64), (64, 200, 255), (255, 200, 0), (120, 255, 120), (220, 90, 255), (255, 140, 40)]


def overlay(image: np.ndarray, masks: Sequence[np.ndarray], *, alpha: float = 0.45,
            regions: Sequence[np.ndarray] = ()) -> np.ndarray:
    """image (H, W, 3) uint8; masks and regions (H, W) bool -> (H, W, 3) uint8.

    Each mask gets a palette colour blended at `alpha` and a solid 1-pixel outline; each region
    prompt gets a white outline so the reader sees what was asked about."""
    out = image.astype(np.float32).copy()
    for k, m in enumerate(masks):
        m = np.asarray(m, bool)
        color = np.array(PALETTE[k % len(PALETTE)], np.float32)
        out[m] = (1 - alpha) * out[m] + alpha * color
        out[m & ~ndimage.binary_erosion(m)] = color
    for r in regions:
        r = np.asarray(r, bool)
        out[r & ~ndimage.binary_erosion(r, iterations=2)] = 255
    return out.clip(0, 255).astype(np.uint8)
