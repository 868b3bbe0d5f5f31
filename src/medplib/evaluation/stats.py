"""Summary statistics shared by every metric: means with seeded percentile-bootstrap intervals."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np

from medplib.errors import InputError


@dataclass(frozen=True)
class Estimate:
    """A point estimate with a two-sided confidence interval (NaN bounds when n < 2)."""

    value: float
    low: float
    high: float
    n: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    statistic: Callable[[np.ndarray], np.ndarray] | None = None,
    *,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> Estimate:
    """Percentile bootstrap of `statistic` (default: the mean) over `values` (N,) or (N, K).

    `statistic` receives resampled data of shape (B, N, ...) and returns (B,); the default is the
    mean over axis 1. NaN values are dropped first (they are samples excluded by a convention).
    The RNG is seeded so a report is reproducible byte for byte.
    """
    if not 0 < confidence < 1:
        raise InputError(f"confidence must be in (0, 1), got {confidence}")
    data = np.asarray(values, dtype=np.float64)
    if data.ndim == 1:
        data = data[~np.isnan(data)]
    else:
        data = data[~np.isnan(data).any(axis=tuple(range(1, data.ndim)))]
    n = int(data.shape[0])
    stat = statistic or (lambda x: x.mean(axis=1))
    if n == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    value = float(stat(data[None])[0])
    if n < 2:
        return Estimate(value, float("nan"), float("nan"), n)
    rng = np.random.default_rng(seed)
    # Resample indices in chunks so 10k samples x 2000 resamples stays a few MB.
    stats: list[np.ndarray] = []
    chunk = max(1, 2_000_000 // n)
    for start in range(0, n_resamples, chunk):
        idx = rng.integers(0, n, size=(min(chunk, n_resamples - start), n))
        stats.append(np.asarray(stat(data[idx]), dtype=np.float64))
    boot = np.concatenate(stats)
    boot = boot[~np.isnan(boot)]
    if boot.size == 0:
        return Estimate(value, float("nan"), float("nan"), n)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(boot, [alpha, 1 - alpha])
    return Estimate(value, float(low), float(high), n)


def mean_by_group(
    values: Sequence[float] | np.ndarray,
    groups: Sequence[str],
    *,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> dict[str, Estimate]:
    """Bootstrap mean of `values` (N,) within each group label (N,), groups sorted by name."""
    data = np.asarray(values, dtype=np.float64)
    labels = np.asarray(list(groups), dtype=object)
    if data.shape[0] != labels.shape[0]:
        raise InputError(f"{data.shape[0]} values but {labels.shape[0]} group labels")
    return {
        str(g): bootstrap_ci(data[labels == g], confidence=confidence, n_resamples=n_resamples, seed=seed)
        for g in sorted(set(labels.tolist()), key=str)
    }


def macro_average(per_group: dict[str, Estimate]) -> float:
    """Unweighted mean over groups (BiRD, OmniMedVQA): every group counts once, whatever its size."""
    vals = [e.value for e in per_group.values() if not np.isnan(e.value)]
    return float(np.mean(vals)) if vals else float("nan")
