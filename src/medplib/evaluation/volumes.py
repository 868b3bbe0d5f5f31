"""Volume metrics in world units: 3D Dice and the 95% Hausdorff distance in millimetres.

HD95 follows MONAI's `compute_hausdorff_distance(percentile=95)`: surface voxels are the mask
minus its erosion (6-connected, outside the array counts as background), each surface voxel gets
its Euclidean distance in mm to the nearest surface voxel of the other mask, and the result is the
larger of the two directed 95th percentiles. Written here on scipy's distance transform rather than
taken from MONAI because MONAI is a framework-sized dependency for one function, wants one-hot
torch tensors, and returns NaN for empty masks where evaluation needs a stated convention.

Empty masks:
- Dice: both empty scores `both_empty` ("one" by default, as in medplib.evaluation.masks: a correct
  empty answer is perfect; "zero" or "exclude" = NaN); one empty scores 0.
- HD95: both empty is 0 mm (nothing to miss, or NaN with both_empty="exclude"); one empty is the
  volume's diagonal in mm by default (`one_empty="diagonal"`, the BraTS convention: the worst finite
  distance), or inf / NaN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
from scipy import ndimage

from medplib.errors import InputError

OneEmpty = Literal["diagonal", "inf", "nan"]
BothEmpty = Literal["one", "zero", "exclude"]


def _pair(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    p, g = np.asarray(pred), np.asarray(gt)
    if p.ndim != 3 or p.shape != g.shape:
        raise InputError(f"prediction {tuple(p.shape)} and ground truth {tuple(g.shape)} must be 3-D of one shape")
    if spacing is not None and (len(spacing) != 3 or min(spacing) <= 0 or not np.all(np.isfinite(spacing))):
        raise InputError(f"spacing must be three positive numbers in mm, got {tuple(spacing)}")
    return p.astype(bool, copy=False), g.astype(bool, copy=False)


def dice_3d(pred: np.ndarray, gt: np.ndarray, both_empty: BothEmpty = "one") -> float:
    """2|P & G| / (|P| + |G|) over (I, J, K) masks (bool, or non-zero is foreground)."""
    p, g = _pair(pred, gt)
    total = int(np.count_nonzero(p)) + int(np.count_nonzero(g))
    if total == 0:
        return {"one": 1.0, "zero": 0.0, "exclude": float("nan")}[both_empty]
    return 2.0 * int(np.count_nonzero(p & g)) / total


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(3, 1), border_value=0)


def hausdorff_95(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], percentile: float = 95.0,
                 one_empty: OneEmpty = "diagonal", both_empty: BothEmpty = "one") -> float:
    """Symmetric percentile Hausdorff distance in mm between the surfaces of two (I, J, K) masks
    whose voxels measure `spacing` mm along i, j, k. percentile=100 gives the plain Hausdorff distance."""
    p, g = _pair(pred, gt, spacing)
    if not 0 <= percentile <= 100:
        raise InputError(f"percentile must lie in 0..100, got {percentile}")
    has_p, has_g = bool(p.any()), bool(g.any())
    if not has_p and not has_g:
        return float("nan") if both_empty == "exclude" else 0.0
    if not has_p or not has_g:
        if one_empty == "diagonal":
            return float(np.linalg.norm(np.asarray(p.shape) * np.asarray(spacing, dtype=np.float64)))
        return float("inf") if one_empty == "inf" else float("nan")
    # Crop to both masks' box plus a voxel: every surface voxel lies inside it, so distances are
    # exact, and the padding keeps the array border counting as background for the erosion.
    both = np.argwhere(p | g)
    lo = np.maximum(both.min(axis=0) - 1, 0)
    hi = both.max(axis=0) + 2
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    p, g = np.pad(p[box], 1), np.pad(g[box], 1)
    sp, sg = _surface(p), _surface(g)
    to_g = ndimage.distance_transform_edt(~sg, sampling=spacing)[sp]  # each P surface voxel -> nearest G surface
    to_p = ndimage.distance_transform_edt(~sp, sampling=spacing)[sg]
    return float(max(np.percentile(to_g, percentile), np.percentile(to_p, percentile)))


@dataclass(frozen=True)
class VolumeScores:
    """One label on one volume: Dice, HD95 in mm, and the two volumes in ml."""

    dice: float
    hd95_mm: float
    pred_ml: float
    gt_ml: float


def score_volume(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], one_empty: OneEmpty = "diagonal",
                 both_empty: BothEmpty = "one") -> VolumeScores:
    """Dice, HD95 and volumes of a predicted (I, J, K) mask against the ground truth."""
    p, g = _pair(pred, gt, spacing)
    ml = float(np.prod(np.asarray(spacing, dtype=np.float64))) / 1000.0  # mm^3 per voxel -> ml
    return VolumeScores(dice=dice_3d(p, g, both_empty),
                        hd95_mm=hausdorff_95(p, g, spacing, 95.0, one_empty, both_empty),
                        pred_ml=int(np.count_nonzero(p)) * ml, gt_ml=int(np.count_nonzero(g)) * ml)
