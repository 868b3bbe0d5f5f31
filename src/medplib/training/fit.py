"""A plain single-process training loop over encoded samples, for tests and quick experiments (the
stage recipes run on `medplib.training.loop`).

AdamW with the published betas (0.9, 0.95) and schedule (`medplib.training.optim`), gradient
clipping at 1.0, the loss weighted by a recipe `LossSection` (the published stage IV weights by
default), deterministic batch order for a seed. Only parameters with `requires_grad` train.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from medplib.api import MedPLIB
from medplib.errors import InputError
from medplib.processing import Encoded
from medplib.training.optim import build_optimizer
from medplib.training.recipe import LossSection, OptimSection


def fit(
    m: MedPLIB,
    items: Sequence[Encoded],
    *,
    steps: int,
    batch_size: int = 4,
    lr: float = 1e-3,
    warmup: int | None = None,
    seed: int = 0,
    grad_clip: float = 1.0,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    loss: LossSection | None = None,
) -> list[dict[str, float]]:
    """Train for `steps` optimizer steps; returns the per-step loss and its parts."""
    if not items:
        raise InputError("no training samples")
    weights = loss or LossSection()
    params = [p for p in m.model.parameters() if p.requires_grad]
    warm = warmup if warmup is not None else max(1, math.ceil(0.03 * steps))
    opt, sched = build_optimizer(params, OptimSection(lr=lr, weight_decay=0.0), steps, warmup=warm)
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    history = []
    m.model.train()
    for step in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(len(items), generator=gen).tolist()
        batch_idx, order = order[:batch_size], order[batch_size:]
        batch = m.collate([items[i] for i in batch_idx])
        out = m.model(**batch)
        total = weights.combine(out.parts)
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        sched.step()
        parts = {"loss": float(total.detach()), **{k: float(v.detach()) for k, v in out.parts.items()}}
        history.append(parts)
        if on_step is not None:
            on_step(step, parts)
    m.model.eval()
    return history
