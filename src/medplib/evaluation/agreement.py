"""Agreement between score columns (PeFoMed's consistency study): BLEU vs judge vs human.

For every pair of columns: Pearson (Fisher-z interval), Spearman and Kendall tau-b (seeded
bootstrap intervals), and, when both columns hold whole-number ratings (e.g. 0-4 Likert or 1/0
correctness), Cohen's kappa, optionally linear- or quadratic-weighted, with a bootstrap interval.
"""

from __future__ import annotations

import itertools
import warnings
from typing import Literal, Mapping, Sequence

import numpy as np
from scipy import stats as sps

from medplib.errors import InputError
from medplib.evaluation.stats import Estimate, bootstrap_ci

KappaWeights = Literal["none", "linear", "quadratic"]


def cohen_kappa(a: Sequence[float], b: Sequence[float], weights: KappaWeights = "none") -> float:
    """Cohen's kappa of two raters' labels (N,) each; categories are the union of seen values.

    kappa = 1 - sum(W * O) / sum(W * E) with O the observed and E the chance joint distribution;
    W is 1 off the diagonal ("none"), |i-j| ("linear") or (i-j)^2 ("quadratic") over the sorted
    category indices. NaN when chance disagreement is zero (one category only).
    """
    x, y = np.asarray(a), np.asarray(b)
    if x.shape != y.shape or x.ndim != 1:
        raise InputError(f"kappa needs two equal-length 1-D rating lists, got {x.shape} and {y.shape}")
    cats = np.unique(np.concatenate([x, y]))
    k = cats.size
    xi, yi = np.searchsorted(cats, x), np.searchsorted(cats, y)
    observed = np.zeros((k, k))
    np.add.at(observed, (xi, yi), 1.0)
    observed /= observed.sum()
    expected = np.outer(observed.sum(axis=1), observed.sum(axis=0))
    i, j = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
    if weights == "none":
        w = (i != j).astype(np.float64)
    elif weights == "linear":
        w = np.abs(i - j).astype(np.float64)
    elif weights == "quadratic":
        w = ((i - j) ** 2).astype(np.float64)
    else:
        raise InputError(f"kappa weights must be 'none', 'linear' or 'quadratic', got {weights!r}")
    chance = float((w * expected).sum())
    return float("nan") if chance == 0 else 1.0 - float((w * observed).sum()) / chance


def _pearson_ci(r: float, n: int, confidence: float) -> tuple[float, float]:
    if not np.isfinite(r) or (n < 4 and abs(r) < 1):
        return float("nan"), float("nan")
    if abs(r) >= 1:
        return r, r
    z, se = np.arctanh(r), 1.0 / np.sqrt(n - 3)
    q = sps.norm.ppf(0.5 + confidence / 2)
    return float(np.tanh(z - q * se)), float(np.tanh(z + q * se))


def _paired(stat: str, weights: KappaWeights = "none"):
    def f(data: np.ndarray) -> np.ndarray:  # data: (B, N, 2)
        out = np.empty(data.shape[0])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # constant resamples give NaN, which the bootstrap drops
            for b, d in enumerate(data):
                if stat == "spearman":
                    out[b] = sps.spearmanr(d[:, 0], d[:, 1]).statistic
                elif stat == "kendall":
                    out[b] = sps.kendalltau(d[:, 0], d[:, 1]).statistic
                else:
                    out[b] = cohen_kappa(d[:, 0], d[:, 1], weights)
        return out

    return f


def _whole(x: np.ndarray) -> bool:
    return bool(np.all(np.isfinite(x)) and np.all(x == np.round(x)))


def pair_agreement(
    a: Sequence[float],
    b: Sequence[float],
    *,
    kappa_weights: KappaWeights = "quadratic",
    confidence: float = 0.95,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, object]:
    """Correlations (and kappa for whole-number ratings) of two paired score lists (N,).
    Pairs with a missing value (NaN, e.g. an unparsable judge reply) are dropped first."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise InputError(f"score columns must be equal-length 1-D lists, got {x.shape} and {y.shape}")
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    n = int(x.size)
    data = np.stack([x, y], axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = float(sps.pearsonr(x, y).statistic) if n >= 2 else float("nan")
    lo, hi = _pearson_ci(r, n, confidence)
    kw = {"confidence": confidence, "n_resamples": n_resamples, "seed": seed}
    out: dict[str, object] = {
        "n": n,
        "n_dropped": int((~keep).sum()),
        "pearson": Estimate(r, lo, hi, n).as_dict(),
        "spearman": bootstrap_ci(data, _paired("spearman"), **kw).as_dict(),
        "kendall": bootstrap_ci(data, _paired("kendall"), **kw).as_dict(),
    }
    if _whole(x) and _whole(y):
        out["kappa"] = {"weights": kappa_weights, **bootstrap_ci(data, _paired("kappa", kappa_weights), **kw).as_dict()}
    return out


def agreement_table(
    columns: Mapping[str, Sequence[float]],
    *,
    kappa_weights: KappaWeights = "quadratic",
    confidence: float = 0.95,
    n_resamples: int = 1000,
    seed: int = 0,
) -> list[dict[str, object]]:
    """Every unordered pair of two or more named score columns -> one row per pair."""
    if len(columns) < 2:
        raise InputError("agreement needs at least two score columns")
    lengths = {name: len(v) for name, v in columns.items()}
    if len(set(lengths.values())) != 1:
        raise InputError(f"score columns differ in length: {lengths}")
    return [
        {"a": a, "b": b, **pair_agreement(columns[a], columns[b], kappa_weights=kappa_weights,
                                          confidence=confidence, n_resamples=n_resamples, seed=seed)}
        for a, b in itertools.combinations(columns, 2)
    ]
