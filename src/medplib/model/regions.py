"""Region encoder: each region mask becomes one LLM token built from the vision patch features.

Published recipe: sample up to `max_points` points inside the region, bilinearly sample the
(un-projected) vision features there, mean-pool, then Linear(vision_dim, llm_dim). Points are
taken at the vision input resolution, so a region smaller than one patch still yields features
(the published code rasterises onto the patch grid, where such a region vanishes).

Optional extension (`spatial=True`, on in the tiny/small presets): a Linear over the region's
geometry (normalised box, centroid, sqrt of area) is added to the token. Mean-pooling discards
where a region is, so "left lung" vs "right lung" must otherwise be read from the features
alone, which a small tower trained from scratch cannot do. It is off in the `paper` preset, so
published weights keep their exact meaning.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RegionEncoder(nn.Module):
    def __init__(self, vision_dim: int, llm_dim: int, max_points: int, spatial: bool = False):
        super().__init__()
        self.proj = nn.Linear(vision_dim, llm_dim)
        self.max_points = max_points
        self.spatial = nn.Linear(7, llm_dim) if spatial else None

    @staticmethod
    def _geometry(mask: torch.Tensor) -> torch.Tensor:
        """(S, S) bool -> (7,): x1, y1, x2, y2, cx, cy in [-1, 1] and sqrt(area fraction)."""
        ys, xs = torch.nonzero(mask, as_tuple=True)
        size = mask.shape[-1]
        x = (xs.float() + 0.5) / size * 2 - 1
        y = (ys.float() + 0.5) / size * 2 - 1
        area = torch.tensor(xs.numel() / mask.numel(), device=mask.device).sqrt()
        return torch.stack([x.min(), y.min(), x.max(), y.max(), x.mean(), y.mean(), area])

    def _points(self, mask: torch.Tensor) -> torch.Tensor:
        """(S, S) bool -> (P, 2) normalised (x, y) in [-1, 1] at pixel centres, P <= max_points.

        Training samples points at random (a new subset every step); evaluation takes an evenly
        strided subset so answers are deterministic."""
        ys, xs = torch.nonzero(mask, as_tuple=True)
        n = ys.numel()
        if n > self.max_points:
            idx = torch.randperm(n, device=mask.device)[: self.max_points] if self.training else \
                torch.linspace(0, n - 1, self.max_points, device=mask.device).round().long()
            ys, xs = ys[idx], xs[idx]
        size = mask.shape[-1]
        return torch.stack([(xs.float() + 0.5) / size * 2 - 1, (ys.float() + 0.5) / size * 2 - 1], dim=-1)

    def forward(self, features: torch.Tensor, region_masks: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        """features (B, g*g, Dv); region_masks[b] = list of (S, S) bool -> list over b of (R_b, llm_dim)."""
        b, n, d = features.shape
        g = int(round(n**0.5))
        grid = features.transpose(1, 2).reshape(b, d, g, g)
        out = []
        for i, masks in enumerate(region_masks):
            if not masks:
                out.append(features.new_zeros((0, self.proj.out_features)))
                continue
            pooled, geometry = [], []
            for m in masks:
                m = m.to(features.device)
                pts = self._points(m).to(features.dtype)
                sampled = F.grid_sample(grid[i : i + 1], pts.view(1, 1, -1, 2), mode="bilinear", align_corners=False)
                pooled.append(sampled.view(d, -1).mean(dim=1))
                geometry.append(self._geometry(m))
            tokens = self.proj(torch.stack(pooled))
            if self.spatial is not None:
                tokens = tokens + self.spatial(torch.stack(geometry).to(tokens.dtype))
            out.append(tokens)
        return out
