"""Metric throughput: Dice/IoU over N masks of HxW, vectorised vs a per-sample loop, one run.

Prints one JSON line per measurement and a final ratio line. Run:
    .venv/bin/python benchmarks/bench_metrics.py --n 10000 --size 256
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from medplib.evaluation.masks import mask_overlap


def _per_sample_loop(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The usual evaluation-script baseline: one numpy Dice/IoU per mask pair."""
    dice = np.empty(pred.shape[0])
    iou = np.empty(pred.shape[0])
    for i in range(pred.shape[0]):
        p, g = pred[i], gt[i]
        inter = np.logical_and(p, g).sum()
        union = np.logical_or(p, g).sum()
        total = p.sum() + g.sum()
        iou[i] = inter / union if union else 1.0
        dice[i] = 2 * inter / total if total else 1.0
    return dice, iou


def _best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    # Random blobs: a disc per mask at a random centre and radius, prediction shifted a little.
    yy, xx = np.mgrid[: args.size, : args.size]
    cy, cx = rng.integers(40, args.size - 40, (2, args.n))
    r = rng.integers(10, 40, args.n)
    gt = np.empty((args.n, args.size, args.size), dtype=bool)
    pred = np.empty_like(gt)
    for i in range(args.n):
        gt[i] = (yy - cy[i]) ** 2 + (xx - cx[i]) ** 2 < r[i] ** 2
        pred[i] = (yy - cy[i] - 3) ** 2 + (xx - cx[i] + 2) ** 2 < r[i] ** 2

    vec = mask_overlap(pred, gt)
    loop_dice, loop_iou = _per_sample_loop(pred, gt)
    assert np.allclose(vec.dice, loop_dice) and np.allclose(vec.iou, loop_iou)

    common = {"n": args.n, "size": args.size, "threads": args.threads, "device": "cpu"}
    t_vec = _best_of(lambda: mask_overlap(pred, gt), args.repeats)
    t_loop = _best_of(lambda: _per_sample_loop(pred, gt), args.repeats)
    print(json.dumps({"metric": "dice_iou", "impl": "vectorised (medplib.evaluation.masks.mask_overlap)", **common,
                      "seconds": round(t_vec, 4), "masks_per_s": round(args.n / t_vec, 1)}))
    print(json.dumps({"metric": "dice_iou", "impl": "per-sample numpy loop", **common,
                      "seconds": round(t_loop, 4), "masks_per_s": round(args.n / t_loop, 1)}))
    print(json.dumps({"metric": "dice_iou", "speedup_vectorised_over_loop": round(t_loop / t_vec, 2), **common}))


if __name__ == "__main__":
    main()
