"""Greedy generation speed with the KV cache on vs off, side by side in one run.

Prints one JSON line per (preset, cache) and one with the ratio. Usage:
    python benchmarks/bench_generate.py [--presets tiny small] [--tokens 48] [--repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
import torch

from medplib.api import MedPLIB


def _time(m: MedPLIB, image: np.ndarray, tokens: int, use_cache: bool, repeats: int) -> tuple[float, int]:
    best, n = float("inf"), 0
    for _ in range(repeats):
        feats = m.image_features(image)  # fresh per run: the prompt prefill is part of what is timed
        start = time.perf_counter()
        ans = m.generate(image, "Describe the image.", features=feats, max_new_tokens=tokens, use_cache=use_cache)
        best = min(best, time.perf_counter() - start)
        n = len(ans.token_ids)
    return best, n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"])
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steady figures on a shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    image = np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    for name in args.presets:
        m = MedPLIB.from_preset(name, seed=0)
        # No id is "end": every run decodes exactly `tokens` tokens, so the two settings compare like for like.
        m.model.ids = dataclasses.replace(m.model.ids, eos=-1)
        rows = {}
        for cache in (True, False):
            seconds, n = _time(m, image, args.tokens, cache, args.repeats)
            rows[cache] = n / seconds
            print(json.dumps({"bench": "generate", "preset": name, "kv_cache": cache, "tokens": n,
                              "seconds": round(seconds, 4), "tokens_per_s": round(n / seconds, 1)}))
        print(json.dumps({"bench": "generate", "preset": name,
                          "speedup_cache_on_over_off": round(rows[True] / rows[False], 2)}))


if __name__ == "__main__":
    main()
