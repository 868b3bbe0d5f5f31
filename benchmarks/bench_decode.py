"""Decoding speed, eager vs static KV cache vs compiled step, dense vs MoE, side by side in one run.

Prints one JSON object per line: one per (preset, MLP, mode) with tokens/s, then per preset and
MLP the static and compiled speed-ups over eager, and per mode the MoE / dense time ratio. Usage:

    python benchmarks/bench_decode.py --presets small lite --tokens 64 --repeats 3

Each run decodes exactly `--tokens` tokens (no id ends an answer) for one question about one
random image, greedy, after a warm-up run (which pays the compile: its seconds are reported as
`warmup_s`); the timed runs go round every (MLP, mode) in turn, best of `--repeats` kept. Timed is `Predictor.ask` on an image whose features and prefix cache are kept, so
what is measured is the question's prefill plus the decoding steps. MoE is the preset with
`moe.num_experts=2` (top-1, so one expert's arithmetic per token); its decoding steps are
sync-free (`set_sync_free`) in the static and compiled modes, where a host read of the chosen
expert would split the compiled graph, and host-routed in eager mode, its fastest there.
Greedy tokens are checked to be the same in every mode."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import numpy as np
import torch

from medplib.api import MedPLIB
from medplib.inference import Predictor
from medplib.model.decoding import DECODE_MODES
from medplib.model.moe import set_sync_free

QUESTION = "Describe the image."


def emit(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def _predictor(name: str, experts: int) -> Predictor:
    overrides = {"moe.num_experts": experts} if experts else {}
    m = MedPLIB.from_preset(name, seed=0, **overrides)
    m.model.ids = dataclasses.replace(m.model.ids, eos=-1)  # every run decodes exactly `tokens` tokens
    p = Predictor(m)
    p.set_image(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8))
    return p


def _run(p: Predictor, mode: str, tokens: int) -> tuple[float, list[int]]:
    p.model.model.decode_mode = mode
    set_sync_free(p.model.model.llm, mode != "eager")
    t0 = time.perf_counter()
    ids = p.ask(QUESTION, max_new_tokens=tokens).token_ids
    return time.perf_counter() - t0, ids


def bench_preset(name: str, tokens: int, repeats: int, modes: list[str]) -> None:
    """tokens/s per (MLP, mode) for one preset. Every configuration is warmed up (and compiled)
    first, then the timed runs go round all of them `repeats` times, best kept: load from other
    jobs on the machine then hits every configuration alike, and the ratios stay fair."""
    models = {"dense": _predictor(name, 0), "moe": _predictor(name, 2)}
    best: dict[tuple[str, str], float] = {}
    reference: dict[str, list[int]] = {}
    warm: dict[tuple[str, str], float] = {}
    for mode in modes:
        for mlp, p in models.items():
            warm[(mlp, mode)], ids = _run(p, mode, tokens)  # the warm-up pays the compile
            reference.setdefault(mlp, ids)
            best[(mlp, mode)] = float("inf")
    same = {key: True for key in best}
    for _ in range(repeats):
        for mode in modes:
            for mlp, p in models.items():
                seconds, ids = _run(p, mode, tokens)
                best[(mlp, mode)] = min(best[(mlp, mode)], seconds)
                same[(mlp, mode)] &= ids == reference[mlp]
    speed = {key: tokens / s for key, s in best.items()}
    for (mlp, mode), s in best.items():
        emit(bench="decode", preset=name, mlp=mlp, mode=mode, tokens=tokens, seconds=round(s, 4),
             tokens_per_s=round(speed[(mlp, mode)], 1), warmup_s=round(warm[(mlp, mode)], 1),
             same_tokens_as_eager=same[(mlp, mode)])
    for mlp in models:
        if "eager" in modes:
            emit(bench="decode_speedup", preset=name, mlp=mlp, **{f"{mode}_over_eager": round(speed[(mlp, mode)] / speed[(mlp, "eager")], 2)
                                                              for mode in modes if mode != "eager"})
    emit(bench="moe_over_dense", preset=name, **{f"{mode}_time_ratio": round(best[("moe", mode)] / best[("dense", mode)], 3)
                                                 for mode in modes})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="+", default=["small"])
    ap.add_argument("--modes", nargs="+", default=list(DECODE_MODES), choices=DECODE_MODES)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steady figures on a shared machine)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    emit(bench="setup", torch=torch.__version__, torch_threads=args.threads, cpus=os.cpu_count(), tokens=args.tokens)
    for name in args.presets:
        bench_preset(name, args.tokens, args.repeats, args.modes)


if __name__ == "__main__":
    main()
