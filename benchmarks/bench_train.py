"""Training throughput per stage (samples/s), and the DeepSpeed ZeRO-2 check on the CPU. Prints JSON lines.

    python benchmarks/bench_train.py --preset small --steps 12            # stages I-IV, samples/s each
    python benchmarks/bench_train.py --deepspeed                          # ZeRO-2 steps on the CPU

Throughput: the demo's settings (phantoms at 256 px, global batch 8, fp32), each stage run for
`--steps` optimizer steps through the real pipeline; the figure is the median over the steps after
the first two (warm-up). The DeepSpeed check launches `accelerate launch --config_file
recipes/accelerate/deepspeed_zero2_cpu.yaml -m medplib.cli train ...` for a few tiny steps and the
same steps without DeepSpeed, and reports both loss trajectories.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from medplib.api import MedPLIB
from medplib.data.phantoms import write_phantom_dataset
from medplib.training.pipeline import STAGES, default_recipes_dir, run_pipeline

REPO = Path(__file__).resolve().parents[1]


def _rows(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def throughput(preset: str, steps: int, work: Path) -> None:
    data = write_phantom_dataset(work / "data", 24, seed=0, size=256).parent
    common = ["train.global_batch=8", "train.micro_batch=8", "checkpoint.every=0", "log.progress=false",
              "log.tensorboard=false"]
    run_pipeline(preset, data, work / "run", steps=[steps] * 4, overrides=common, log=lambda s: None)
    for k, stage in enumerate(STAGES, start=1):
        rows = _rows(work / "run" / f"stage{k}")
        rates = [r["samples_per_s"] for r in rows[2:]] or [r["samples_per_s"] for r in rows]
        print(json.dumps({"bench": "train_samples_per_s", "stage": stage, "preset": preset, "global_batch": 8,
                          "steps_measured": len(rates), "samples_per_s": round(statistics.median(rates), 2),
                          "s_per_step": round(8 / statistics.median(rates), 2)}), flush=True)


def deepspeed_check(work: Path) -> None:
    data = write_phantom_dataset(work / "data", 6, seed=0, size=64).parent
    start = MedPLIB.from_preset("tiny", seed=0).save_pretrained(work / "start")
    args = ["--recipe", str(default_recipes_dir() / "stage2_vl_expert.yaml"), f"model.path={start}",
            f"data.dir={data}", "train.steps=4", "train.global_batch=4", "train.micro_batch=2",
            "train.mixed_precision=fp32", "lora.dropout=0", "checkpoint.every=0", "log.progress=false"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    runs = {
        "deepspeed_zero2": [accelerate, "launch", "--config_file", str(REPO / "recipes/accelerate/deepspeed_zero2_cpu.yaml"),
                            "-m", "medplib.cli", "train"],
        "plain": [sys.executable, "-m", "medplib.cli", "train"],
    }
    losses = {}
    for name, cmd in runs.items():
        out = work / name
        proc = subprocess.run([*cmd, *args, f"output_dir={out}"], env=env, capture_output=True, text=True)
        engine = next((ln for ln in proc.stdout.splitlines() if "accumulation" in ln), "")
        losses[name] = [round(r["loss"], 5) for r in _rows(out)] if proc.returncode == 0 else None
        print(json.dumps({"bench": "deepspeed_cpu_check", "run": name, "returncode": proc.returncode,
                          "setup": engine[engine.find("(") + 1: engine.rfind(")")] if engine else None,
                          "losses": losses[name], "model_saved": (out / "model" / "model.safetensors").is_file(),
                          "stderr_tail": proc.stderr[-300:] if proc.returncode else ""}), flush=True)
    a, b = losses["deepspeed_zero2"], losses["plain"]
    if a and b:
        print(json.dumps({"bench": "deepspeed_cpu_check", "max_abs_loss_difference": max(abs(x - y) for x, y in zip(a, b))}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--deepspeed", action="store_true", help="run the DeepSpeed ZeRO-2 CPU check instead")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.deepspeed:
            deepspeed_check(Path(tmp))
        else:
            throughput(args.preset, args.steps, Path(tmp))


if __name__ == "__main__":
    main()
