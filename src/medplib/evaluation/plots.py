"""Figures for report.md: a per-modality bar chart and a gallery of grounding overlays (PNG).

Figures are built as `matplotlib.figure.Figure` objects, not through pyplot: no backend is selected and no display
is needed (savefig renders PNG with Agg), and nothing is left in pyplot's figure registry to close.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from medplib.errors import InputError


@dataclass(frozen=True)
class OverlayItem:
    """One gallery tile: the image (H, W) or (H, W, 3), the two masks (H, W) bool, a caption."""

    image: np.ndarray
    gt_mask: np.ndarray
    pred_mask: np.ndarray
    caption: str


def modality_chart(
    per_modality: Mapping[str, Mapping[str, float]], out_path: str | Path, *, metric: str, title: str
) -> Path:
    """Bar per modality with its 95% interval as an error bar and n under the label.
    per_modality: {modality: {"value", "low", "high", "n"}} (Estimate dicts)."""
    if not per_modality:
        raise InputError("no per-modality values to chart")
    names = list(per_modality)
    vals = np.array([per_modality[m]["value"] for m in names], dtype=np.float64)
    low = np.array([per_modality[m]["low"] for m in names], dtype=np.float64)
    high = np.array([per_modality[m]["high"] for m in names], dtype=np.float64)
    # Intervals are NaN for n < 2: draw no whisker there.
    err = np.nan_to_num(np.stack([vals - low, high - vals]), nan=0.0).clip(min=0)
    fig = Figure(figsize=(max(4.0, 1.1 * len(names) + 2), 3.6), dpi=110)
    ax = fig.subplots()
    bars = ax.bar(range(len(names)), vals, yerr=err, capsize=4, color="#4C78A8", edgecolor="black", linewidth=0.5)
    for bar, v, top in zip(bars, vals, np.where(np.isnan(high), vals, high)):
        # Above the whisker, so the label never sits on the error bar.
        x = bar.get_x() + bar.get_width() / 2
        ax.text(x, max(v, top) + 0.015, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(names)), [f"{m}\n(n={int(per_modality[m]['n'])})" for m in names], fontsize=8)
    ax.set_ylim(0, 1.12)
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out


def _tile(ax: Axes, item: OverlayItem) -> None:
    img = np.asarray(item.image)
    if img.shape[:2] != item.gt_mask.shape or item.gt_mask.shape != item.pred_mask.shape:
        raise InputError(
            f"{item.caption}: image {img.shape[:2]} and masks {item.gt_mask.shape}, {item.pred_mask.shape} "
            "differ in size"
        )
    ax.imshow(img, cmap="gray" if img.ndim == 2 else None)
    red = np.zeros((*item.pred_mask.shape, 4))
    red[item.pred_mask] = (1.0, 0.15, 0.15, 0.45)
    ax.imshow(red)
    if item.gt_mask.any() and not item.gt_mask.all():
        ax.contour(item.gt_mask.astype(float), levels=[0.5], colors=["#00FF66"], linewidths=1.4)
    ax.set_title(item.caption, fontsize=7)
    ax.axis("off")


def overlay_gallery(
    best: Sequence[OverlayItem], worst: Sequence[OverlayItem], out_path: str | Path, *, title: str
) -> Path:
    """Two rows: the best and the worst samples; prediction filled red, ground truth outlined green."""
    if not best and not worst:
        raise InputError("no grounding samples for the gallery")
    cols = max(len(best), len(worst))
    fig = Figure(figsize=(2.4 * cols, 6.2), dpi=110)
    axes = fig.subplots(2, cols, squeeze=False)
    for row, (label, items) in enumerate((("best", best), ("worst", worst))):
        for c in range(cols):
            ax = axes[row][c]
            if c < len(items):
                _tile(ax, items[c])
            else:
                ax.axis("off")
        axes[row][0].text(
            -0.08, 0.5, label, transform=axes[row][0].transAxes,
            rotation=90, ha="right", va="center", fontsize=10, weight="bold",
        )
    handles = [
        Patch(color=(1.0, 0.15, 0.15, 0.45), label="prediction"),
        Line2D([0], [0], color="#00FF66", lw=1.4, label="ground truth"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0.02, 0.04, 1, 0.95), h_pad=2.5)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out
