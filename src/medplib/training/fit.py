"""A plain single-process training loop over encoded samples, for tests and quick experiments (the
stage recipes run on `medplib.training.loop`).

AdamW with the published betas (0.9, 0.95), linear warmup then linear decay, gradient clipping
at 1.0, deterministic batch order for a seed. Only parameters with `requires_grad` train.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from medplib.api import MedPLIB
from medplib.errors import InputError
from medplib.processing import Encoded


def warmup_linear(step: int, total: int, warmup: int) -> float:
    """LR multiplier: 0 -> 1 over `warmup` steps, then linearly to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


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
) -> list[dict[str, float]]:
    """Train for `steps` optimizer steps; returns the per-step loss parts."""
    if not items:
        raise InputError("no training samples")
    params = [p for p in m.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    warm = warmup if warmup is not None else max(1, math.ceil(0.03 * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_linear(s, steps, warm))
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
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        sched.step()
        parts = {"loss": float(out.loss.detach()), **{k: float(v.detach()) for k, v in out.parts.items()}}
        history.append(parts)
        if on_step is not None:
            on_step(step, parts)
    m.model.eval()
    return history
