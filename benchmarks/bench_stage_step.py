"""Seconds per training step of the `lite` preset's stage III (pixel-grounding expert), side by side in one run:
the settings as the published recipe has them (LoRA r8 with dropout 0.05 on the MLPs of all 30 layers, the
`[SEG]` rows trained on both sides of the tied embedding, AdamW's per-tensor loop) and the changes that the
`lite` pipeline makes one at a time: the fused AdamW kernel, no LoRA dropout, LoRA on the top 6 layers with the
`[SEG]` row trained through the head only (the backward pass then stops at layer 24).

Real inputs: a small phantom set (the demo's grounding questions, one [SEG] or several per answer) at 256 px,
global batch 8. The model is the preset's pretrained parts with fresh heads, as stage III's cost does not depend
on what earlier stages learnt. Prints one JSON line per variant (median seconds of the timed steps after a
warm-up step) and one with the ratios to the first. Usage:
    python benchmarks/bench_stage_step.py [--steps 4] [--threads 2] [--work runs/bench_stage_step]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import torch

from medplib.data.builder import BuildConfig, build_samples
from medplib.data.phantoms import phantom_items
from medplib.data.schema import write_jsonl
from medplib.training.loop import StageRunner
from medplib.training.pipeline import default_recipes_dir, preset_settings
from medplib.training.recipe import load_recipe

PUBLISHED = ("lora.dropout=0.05", "optim.fused=false", "lora.last_layers=0",
             "trainable=[lora,mask_decoder,seg_proj,seg_token]")
VARIANTS = {
    "published set (dropout 0.05, per-tensor AdamW, LoRA on 30 layers)": PUBLISHED,
    "+ fused AdamW": ("lora.dropout=0.05", "optim.fused=true", *PUBLISHED[2:]),
    "+ no LoRA dropout": ("lora.dropout=0", "optim.fused=true", *PUBLISHED[2:]),
    "+ LoRA on the top 6 layers, [SEG] row via the head (lite)": (
        "lora.dropout=0", "optim.fused=true", "lora.last_layers=6",
        "trainable=[lora,mask_decoder,seg_proj,seg_token_out]"),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4, help="timed steps per variant (after one warm-up step)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("runs/bench_stage_step"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = args.work / "data"
    if not (data / "samples.jsonl").is_file():
        items = list(phantom_items(data, 27, seed=0, size=256))
        write_jsonl([s for s in build_samples(items, data, BuildConfig(seed=0, tasks=("grounding",),
                                                                       multi_grounding=4))], data / "samples.jsonl")
    stage = "stage3_pg_expert"
    rows = []
    for name, overrides in VARIANTS.items():
        run = args.work / "run"
        shutil.rmtree(run, ignore_errors=True)
        recipe = load_recipe(default_recipes_dir() / f"{stage}.yaml", [
            "model.preset=lite", "model.path=null", f"data.dir={data}", f"output_dir={run}",
            "train.mixed_precision=fp32", "unfreeze=[pixel_encoder]", "log.progress=false", "log.tensorboard=false",
            f"train.steps={args.steps + 1}", *preset_settings("lite", stage), *overrides])
        runner = StageRunner(recipe, log=lambda _: None)
        runner.setup()
        times = []
        for step in range(args.steps + 1):
            start = time.perf_counter()
            runner.train_step(step)
            times.append(time.perf_counter() - start)
        row = {"variant": name, "s_per_step": round(statistics.median(times[1:]), 3),
               "steps": args.steps, "threads": args.threads}
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = rows[0]["s_per_step"]
    print(json.dumps({"ratio_to_published": {r["variant"]: round(r["s_per_step"] / base, 3) for r in rows}}))


if __name__ == "__main__":
    main()
