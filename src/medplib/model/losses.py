"""Mask losses on logits at the original image resolution (published MedPLIB/LISA definitions), and
the label that carries no text loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # a label position without loss (torch's cross_entropy default); the Processor writes it


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - (2I + eps) / (sum P + sum G + eps) on sigmoid probabilities; logits, target (H, W)."""
    p = logits.sigmoid().flatten()
    g = target.flatten()
    return 1 - (2 * (p * g).sum() + eps) / (p.sum() + g.sum() + eps)


def bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean per-pixel binary cross-entropy; logits, target (H, W)."""
    return F.binary_cross_entropy_with_logits(logits, target)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Sigmoid focal loss (RetinaNet / SAM), mean over pixels; logits, target (H, W)."""
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p = logits.sigmoid()
    p_t = p * target + (1 - p) * (1 - target)
    a_t = alpha * target + (1 - alpha) * (1 - target)
    return (a_t * (1 - p_t) ** gamma * ce).mean()


def soft_iou(logits: torch.Tensor, target: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """Hard IoU of the thresholded prediction (the target of SAM's IoU head); 1 when both are empty."""
    pred = logits > threshold
    gt = target > 0.5
    union = (pred | gt).sum()
    return torch.where(union > 0, (pred & gt).sum() / union.clamp(min=1), torch.ones((), device=logits.device))
