"""Mask overlap metrics, vectorised over a batch: Dice, IoU, gIoU, cIoU, per modality.

Conventions are explicit (`MaskConvention`) because published numbers differ silently:
MedPLIB thresholds sigmoid(logits) at 0.1, scores IoU 0 when prediction and ground truth are
both empty, and reports Dice as 2 IoU / (1 + IoU). Per sample that equals the pixel Dice
2|P&G| / (|P| + |G|) exactly, so the two Dice rules differ only where both masks are empty.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np
import torch

from medplib.errors import InputError
from medplib.evaluation.stats import Estimate, bootstrap_ci

BothEmpty = Literal["one", "zero", "exclude"]
_FILL = {"one": 1.0, "zero": 0.0, "exclude": float("nan")}


@dataclass(frozen=True)
class MaskConvention:
    """How raw predictions become binary masks and how empty masks score.

    threshold: float predictions are foreground where value > threshold (after sigmoid if
      `logits`); bool and integer masks are foreground where non-zero.
    both_empty: score when prediction and ground truth are both empty: "one" (a correct empty
      answer is perfect), "zero" (MedPLIB's published code), "exclude" (NaN, left out of means).
      One empty side and one non-empty side always scores 0.
    dice: "pixels" = 2|P&G| / (|P|+|G|); "from_iou" = 2 IoU / (1 + IoU) as published.
    """

    threshold: float = 0.5
    logits: bool = False
    both_empty: BothEmpty = "one"
    dice: Literal["pixels", "from_iou"] = "pixels"

    def __post_init__(self) -> None:
        if self.both_empty not in ("one", "zero", "exclude"):
            raise InputError(f"both_empty must be 'one', 'zero' or 'exclude', got {self.both_empty!r}")
        if self.dice not in ("pixels", "from_iou"):
            raise InputError(f"dice must be 'pixels' or 'from_iou', got {self.dice!r}")


MEDPLIB_PUBLISHED = MaskConvention(threshold=0.1, logits=True, both_empty="zero", dice="from_iou")


@dataclass(frozen=True)
class MaskScores:
    """Per-sample results, each of shape (N,). Dice/IoU are NaN for excluded samples."""

    dice: np.ndarray
    iou: np.ndarray
    intersection: np.ndarray
    union: np.ndarray
    pred_area: np.ndarray
    gt_area: np.ndarray
    convention: MaskConvention = field(default_factory=MaskConvention)


def binarize(masks: np.ndarray | torch.Tensor, threshold: float = 0.5, logits: bool = False) -> torch.Tensor:
    """(N, H, W) or (H, W) bool/int/float masks -> bool tensor of the same shape."""
    t = torch.as_tensor(masks)
    if t.dtype == torch.bool:
        return t
    if not t.is_floating_point():
        return t != 0
    if logits:
        t = torch.sigmoid(t)
    return t > threshold


def _batch(masks: np.ndarray | torch.Tensor, name: str) -> torch.Tensor:
    t = torch.as_tensor(masks)
    if t.ndim == 2:
        t = t[None]
    if t.ndim != 3:
        raise InputError(f"{name} must have shape (N, H, W) or (H, W), got {tuple(t.shape)}")
    return t


def mask_overlap(
    pred: np.ndarray | torch.Tensor,
    gt: np.ndarray | torch.Tensor,
    convention: MaskConvention = MaskConvention(),
) -> MaskScores:
    """Per-sample Dice and IoU of predictions (N, H, W) against ground truth (N, H, W).

    `pred` is thresholded by the convention; `gt` must be binary (bool, or any dtype where
    non-zero is foreground).
    """
    p = _batch(pred, "pred")
    g = _batch(gt, "gt")
    if p.shape != g.shape:
        raise InputError(f"prediction shape {tuple(p.shape)} does not match ground truth {tuple(g.shape)}")
    pb = binarize(p, convention.threshold, convention.logits)
    gb = g.bool() if g.dtype != torch.bool else g
    inter = (pb & gb).sum(dim=(1, 2)).double()
    p_area = pb.sum(dim=(1, 2)).double()
    g_area = gb.sum(dim=(1, 2)).double()
    union = p_area + g_area - inter
    both_empty = union == 0
    safe_union = torch.where(both_empty, torch.ones_like(union), union)
    iou = inter / safe_union
    if convention.dice == "from_iou":
        dice = 2 * iou / (1 + iou)
    else:
        dice = 2 * inter / torch.where(both_empty, torch.ones_like(union), p_area + g_area)
    fill = _FILL[convention.both_empty]
    iou = torch.where(both_empty, torch.full_like(iou, fill), iou)
    dice = torch.where(both_empty, torch.full_like(dice, fill), dice)
    return MaskScores(
        dice=dice.numpy(),
        iou=iou.numpy(),
        intersection=inter.numpy(),
        union=union.numpy(),
        pred_area=p_area.numpy(),
        gt_area=g_area.numpy(),
        convention=convention,
    )


def ciou(scores: MaskScores) -> float:
    """Cumulative IoU: total intersection / total union over the set (large masks weigh more).

    Samples excluded by the convention are left out; an all-empty set scores like one empty pair.
    """
    keep = ~np.isnan(scores.iou)
    if not keep.any():
        return float("nan")
    union = float(scores.union[keep].sum())
    if union == 0:
        return _FILL[scores.convention.both_empty]
    return float(scores.intersection[keep].sum()) / union


def summarize_masks(
    scores: MaskScores,
    modalities: Sequence[str] | None = None,
    *,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> dict[str, object]:
    """mDice and gIoU (= mean per-sample IoU) with bootstrap intervals, cIoU, per modality.

    Returns {"overall": {...}, "per_modality": {modality: {...}}}; each block holds
    `dice` and `giou` as Estimate dicts, `ciou`, `n` and `n_excluded`.
    """

    def block(idx: np.ndarray) -> dict[str, object]:
        sub = MaskScores(
            scores.dice[idx], scores.iou[idx], scores.intersection[idx], scores.union[idx],
            scores.pred_area[idx], scores.gt_area[idx], scores.convention,
        )
        dice: Estimate = bootstrap_ci(sub.dice, confidence=confidence, n_resamples=n_resamples, seed=seed)
        giou: Estimate = bootstrap_ci(sub.iou, confidence=confidence, n_resamples=n_resamples, seed=seed)
        return {
            "dice": dice.as_dict(),
            "giou": giou.as_dict(),
            "ciou": ciou(sub),
            "n": int(idx.size),
            "n_excluded": int(np.isnan(sub.iou).sum()),
        }

    n = scores.dice.shape[0]
    out: dict[str, object] = {"overall": block(np.arange(n))}
    if modalities is not None:
        labels = np.asarray(list(modalities), dtype=object)
        if labels.shape[0] != n:
            raise InputError(f"{n} mask scores but {labels.shape[0]} modality labels")
        out["per_modality"] = {
            str(m): block(np.flatnonzero(labels == m)) for m in sorted(set(labels.tolist()), key=str)
        }
    return out
