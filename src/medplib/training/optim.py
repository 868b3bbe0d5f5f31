"""The optimizer and its learning-rate schedule, for the recipe runner and `fit` alike: AdamW with
the recipe's betas and weight decay, linear warmup then linear decay to 0 (published)."""

from __future__ import annotations

import math
from typing import Iterable

import torch

from medplib.training.recipe import OptimSection


def warmup_linear(step: int, total: int, warmup: int) -> float:
    """LR multiplier: 0 -> 1 over `warmup` steps, then linearly to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def build_optimizer(params: Iterable[torch.nn.Parameter], optim: OptimSection, steps: int,
                    warmup: int | None = None) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW and its schedule over `steps` optimizer steps; `warmup` steps (default: the section's
    `warmup_ratio` of `steps`, rounded up). The schedule is stepped once per optimizer step."""
    params = list(params)
    # The fused kernel: over lite's stage III parameters (a 28M-value embedding matrix among them) a CPU step of
    # the per-tensor loop took 0.2 s, the fused one 0.03 s (docs/BENCHMARKS.md). It needs floating-point tensors
    # on CPU or CUDA.
    fused = optim.fused and bool(params) and all(
        p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    opt = torch.optim.AdamW(params, lr=optim.lr, betas=(optim.betas[0], optim.betas[1]),
                            weight_decay=optim.weight_decay, fused=fused)
    warm = warmup if warmup is not None else (math.ceil(optim.warmup_ratio * steps) if optim.warmup_ratio > 0 else 0)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_linear(s, steps, warm))
