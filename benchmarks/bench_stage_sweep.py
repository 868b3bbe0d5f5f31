"""One stage of a finished `medplib demo` run trained again for longer, scored on the demo's held-out questions at
several step counts of one schedule (the demo's own scoring, `medplib.demo.evaluate`).

The stage starts from the same model and data as in the demo (its `recipe.yaml`); only the step count and the
output folder change. Prints one JSON line per milestone. Usage:
    python benchmarks/bench_stage_sweep.py --demo runs/demo --stage 2 --steps 50,100,150,200 --kinds region modality
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from medplib.data.loading import load_sample
from medplib.data.schema import read_jsonl
from medplib.demo import evaluate
from medplib.inference import Predictor
from medplib.training.loop import StageRunner
from medplib.training.recipe import load_recipe

# The demo's scored question kinds: (task, meta kind) per name; None matches any kind.
KINDS = {"modality": ("vqa", "modality"), "region": ("region_vqa", "label"), "grounding": ("grounding", None)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--demo", type=Path, required=True, help="the OUT folder of a finished `medplib demo`")
    ap.add_argument("--stage", type=int, choices=(1, 2, 3, 4), required=True)
    ap.add_argument("--steps", default="50,100,150,200", help="milestones; the schedule runs to the largest")
    ap.add_argument("--kinds", nargs="+", choices=sorted(KINDS), default=sorted(KINDS))
    ap.add_argument("--work", type=Path, default=None, help="output folder (default: DEMO/sweep_stageN)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("overrides", nargs="*", help="extra recipe overrides, key=value")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    miles = sorted(int(x) for x in args.steps.split(","))
    work = args.work or args.demo / f"sweep_stage{args.stage}"
    recipe = load_recipe(args.demo / "run" / f"stage{args.stage}" / "recipe.yaml", [
        *args.overrides, f"train.steps={miles[-1]}", f"output_dir={work}", "checkpoint.every=0",
        "checkpoint.resume=false", "log.progress=false", "log.tensorboard=false"])
    data = args.demo / "data"
    wanted = [KINDS[k] for k in args.kinds]
    test = [load_sample(s, data) for s in read_jsonl(data / "demo.jsonl") if s.split == "test"
            and any(s.task == t and (k is None or s.meta.get("kind") == k) for t, k in wanted)]
    runner = StageRunner(recipe, log=print)
    runner.setup()
    train_s = 0.0
    for step in range(runner.steps):
        start = time.perf_counter()
        runner.record(runner.train_step(step))
        train_s += time.perf_counter() - start
        if step + 1 in miles:
            m = runner.m
            m.model.eval()
            with torch.no_grad():
                scores = evaluate(Predictor(m), test)  # a fresh one: its feature cache is of these weights
            m.model.train()
            print(json.dumps({"stage": args.stage, "step": step + 1, "of": miles[-1], "train_s": round(train_s, 1),
                              **{k: v for k, v in scores.items() if v == v}}), flush=True)  # v == v: drop NaN


if __name__ == "__main__":
    main()
