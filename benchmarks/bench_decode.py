"""Decoding speed, eager vs static KV cache vs compiled step, dense vs MoE, side by side in one run.

Prints one JSON object per line: one per (preset, MLP, weights, mode) with tokens/s, then per preset
and MLP the speed-ups over fp32 eager, and per mode the MoE / dense time ratio. Usage:

    python benchmarks/bench_decode.py --presets lite small --tokens 64 --repeats 3

Each run decodes exactly `--tokens` tokens (no id ends an answer) for one question about one
random image, greedy, after a warm-up run (which pays the compile: its seconds are reported as
`warmup_s`); the timed runs go round every configuration in turn, best of `--repeats` kept, so
load from other jobs on the machine hits every configuration alike. Timed is `Predictor.ask` on an
image whose features and prefix cache are kept, so what is measured is the question's prefill plus
the decoding steps. MoE is the preset with `moe.num_experts=2` (top-1): host-routed in the eager
and static modes, routed through `torch.cond` in the compiled step, one expert's weights read per
token in every mode.

`--int8` adds the compiled step on weight-only int8 LLM weights (`quantize_llm_weight_only`,
gpt-fast's recipe) as rows of their own (`weights: int8_weight_only`): they are not fp32 decoding,
and their greedy tokens are checked against the same int8 model decoded eagerly (one untimed run),
while every fp32 mode is checked against fp32 eager."""

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
from medplib.model.quantize import quantize_llm_weight_only

QUESTION = "Describe the image."
FP32, INT8 = "fp32", "int8_weight_only"


def emit(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def _predictor(name: str, experts: int, weights: str) -> Predictor:
    overrides = {"moe.num_experts": experts} if experts else {}
    m = MedPLIB.from_preset(name, seed=0, **overrides)
    if weights == INT8:
        quantize_llm_weight_only(m.model)
    m.model.ids = dataclasses.replace(m.model.ids, eos=-1)  # every run decodes exactly `tokens` tokens
    p = Predictor(m)
    p.set_image(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8))
    return p


def _run(p: Predictor, mode: str, tokens: int) -> tuple[float, list[int]]:
    p.model.model.decode_mode = mode
    t0 = time.perf_counter()
    ids = p.ask(QUESTION, max_new_tokens=tokens).token_ids
    return time.perf_counter() - t0, ids


def bench_preset(name: str, tokens: int, repeats: int, modes: list[str], int8: bool) -> None:
    """tokens/s per (MLP, weights, mode) for one preset: every configuration is warmed up (and
    compiled) first, then the timed runs go round all of them `repeats` times, best kept."""
    models = {(mlp, w): _predictor(name, experts, w) for w in ((FP32, INT8) if int8 else (FP32,))
              for mlp, experts in (("dense", 0), ("moe", 2))}
    configs = [(mlp, w, mode) for (mlp, w) in models for mode in (modes if w == FP32 else ["compiled"])]
    reference: dict[tuple[str, str], list[int]] = {}
    for (mlp, w), p in models.items():
        if w == INT8:
            reference[(mlp, w)] = _run(p, "eager", tokens)[1]  # untimed: the int8 model's own eager tokens
    warm: dict[tuple[str, str, str], float] = {}
    for mlp, w, mode in configs:
        warm[(mlp, w, mode)], ids = _run(models[(mlp, w)], mode, tokens)  # the warm-up pays the compile
        reference.setdefault((mlp, w), ids)
    best = {c: float("inf") for c in configs}
    same = {c: True for c in configs}
    for _ in range(repeats):
        for mlp, w, mode in configs:
            seconds, ids = _run(models[(mlp, w)], mode, tokens)
            best[(mlp, w, mode)] = min(best[(mlp, w, mode)], seconds)
            same[(mlp, w, mode)] &= ids == reference[(mlp, w)]
    speed = {c: tokens / s for c, s in best.items()}
    for (mlp, w, mode), s in best.items():
        emit(bench="decode", preset=name, mlp=mlp, weights=w, mode=mode, tokens=tokens, seconds=round(s, 4),
             tokens_per_s=round(speed[(mlp, w, mode)], 1), ms_per_token=round(1000 * s / tokens, 1),
             warmup_s=round(warm[(mlp, w, mode)], 1), same_tokens_as_eager=same[(mlp, w, mode)])
    if "eager" in modes:
        for mlp in ("dense", "moe"):
            base = speed[(mlp, FP32, "eager")]
            emit(bench="decode_speedup", preset=name, mlp=mlp,
                 **{f"{mode}{'' if w == FP32 else '_int8'}_over_fp32_eager": round(speed[(m, w, mode)] / base, 2)
                    for m, w, mode in configs if m == mlp and (w, mode) != (FP32, "eager")})
    emit(bench="moe_over_dense", preset=name,
         **{f"{mode}{'' if w == FP32 else '_int8'}_time_ratio":
            round(best[("moe", w, mode)] / best[("dense", w, mode)], 3)
            for m, w, mode in configs if m == "dense"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="+", default=["small"])
    ap.add_argument("--modes", nargs="+", default=list(DECODE_MODES), choices=DECODE_MODES)
    ap.add_argument("--int8", action="store_true", help="add the compiled step on weight-only int8 weights")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steady figures on a shared machine)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    emit(bench="setup", torch=torch.__version__, torch_threads=args.threads, cpus=os.cpu_count(), tokens=args.tokens)
    for name in args.presets:
        bench_preset(name, args.tokens, args.repeats, args.modes, args.int8)


if __name__ == "__main__":
    main()
