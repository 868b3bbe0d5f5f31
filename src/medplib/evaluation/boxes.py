"""Box metrics: IoU, accuracy at IoU >= 0.5 (PFMVG), BiRD's recall@0.5 macro-averaged over modalities.

Boxes are (x1, y1, x2, y2) in one coordinate frame (pixels or a grid, the same for both sides);
areas are continuous (x2 - x1) * (y2 - y1), no +1 pixel convention.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from medplib.errors import InputError
from medplib.evaluation.stats import Estimate, bootstrap_ci, macro_average, mean_by_group


def _boxes(b: Sequence[Sequence[float]] | np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(b, dtype=np.float64).reshape(-1, 4) if np.size(b) else np.zeros((0, 4))
    if (arr[:, 2] < arr[:, 0]).any() or (arr[:, 3] < arr[:, 1]).any():
        raise InputError(f"{name}: every box must satisfy x1 <= x2 and y1 <= y2")
    return arr


def box_iou_matrix(a: Sequence[Sequence[float]] | np.ndarray, b: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    """Pairwise IoU of boxes a (N, 4) and b (M, 4) -> (N, M). Two zero-area boxes score 0."""
    a, b = _boxes(a, "a"), _boxes(b, "b")
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def paired_box_iou(
    pred: Sequence[Sequence[float]] | np.ndarray, gt: Sequence[Sequence[float]] | np.ndarray
) -> np.ndarray:
    """IoU of pred[i] with gt[i], both (N, 4) -> (N,)."""
    p, g = _boxes(pred, "pred"), _boxes(gt, "gt")
    if p.shape != g.shape:
        raise InputError(f"{p.shape[0]} predicted boxes but {g.shape[0]} ground-truth boxes")
    lt = np.maximum(p[:, :2], g[:, :2])
    rb = np.minimum(p[:, 2:], g[:, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[:, 0] * wh[:, 1]
    union = (p[:, 2] - p[:, 0]) * (p[:, 3] - p[:, 1]) + (g[:, 2] - g[:, 0]) * (g[:, 3] - g[:, 1]) - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def grounding_summary(
    ious: Sequence[float] | np.ndarray, *, threshold: float = 0.5, seed: int = 0
) -> dict[str, dict[str, float | int]]:
    """PFMVG-style box grounding: mIoU and accuracy at IoU >= threshold, with bootstrap intervals.

    A sample with no parsable predicted box should enter with IoU 0.
    """
    arr = np.asarray(ious, dtype=np.float64)
    miou: Estimate = bootstrap_ci(arr, seed=seed)
    acc: Estimate = bootstrap_ci((arr >= threshold).astype(np.float64), seed=seed)
    return {"miou": miou.as_dict(), f"acc@{threshold:g}": acc.as_dict()}


def bird_hits(
    pred_boxes: Sequence[Sequence[float]], gt_boxes: Sequence[Sequence[float]], *, threshold: float = 0.5
) -> np.ndarray:
    """BiRD VG: gt box j is hit when any predicted box has IoU strictly greater than threshold -> (M,) bool."""
    gt = _boxes(gt_boxes, "gt")
    if gt.shape[0] == 0:
        return np.zeros(0, dtype=bool)
    pred = _boxes(pred_boxes, "pred")
    if pred.shape[0] == 0:
        return np.zeros(gt.shape[0], dtype=bool)
    return (box_iou_matrix(pred, gt) > threshold).any(axis=0)


def bird_recall(
    pred_boxes: Sequence[Sequence[Sequence[float]]],
    gt_boxes: Sequence[Sequence[Sequence[float]]],
    modalities: Sequence[str],
    *,
    threshold: float = 0.5,
) -> dict[str, object]:
    """BiRD recall@0.5: per sample a list of predicted and a list of gt boxes; recall over gt boxes
    within each modality, then the unweighted mean over modalities (`macro`) as published.
    `micro` (over all gt boxes) is given beside it for comparison.
    """
    if not len(pred_boxes) == len(gt_boxes) == len(modalities):
        raise InputError(
            f"lengths differ: {len(pred_boxes)} predictions, {len(gt_boxes)} references, "
            f"{len(modalities)} modalities"
        )
    hits: list[float] = []
    labels: list[str] = []
    for p, g, m in zip(pred_boxes, gt_boxes, modalities):
        h = bird_hits(p, g, threshold=threshold)
        hits.extend(h.astype(np.float64).tolist())
        labels.extend([m] * h.size)
    per_modality = mean_by_group(hits, labels)
    return {
        "macro": macro_average(per_modality),
        "micro": float(np.mean(hits)) if hits else float("nan"),
        "per_modality": {m: e.as_dict() for m, e in per_modality.items()},
        "n_gt_boxes": len(hits),
    }
