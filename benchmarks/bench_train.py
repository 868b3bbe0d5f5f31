"""Training throughput per stage (samples/s), and the engine check (DeepSpeed / FSDP). Prints JSON lines.

    python benchmarks/bench_train.py --preset small --steps 12            # stages I-IV, samples/s each
    python benchmarks/bench_train.py --deepspeed                          # ZeRO-2 steps on the CPU
    python benchmarks/bench_train.py --engine deepspeed_zero3             # on a GPU; also fsdp, deepspeed_zero2

Throughput: the demo's settings (phantoms at 256 px, global batch 8, fp32), each stage run for
`--steps` optimizer steps through the real pipeline; the figure is the median over the steps after
the first two (warm-up). The engine check launches `accelerate launch --config_file
recipes/accelerate/<engine>.yaml --num_processes 1 -m medplib.cli train ...` for 8 tiny steps with a
checkpoint every 2, the same steps without the engine, and the engine run again, killed with SIGKILL
once its step-2 checkpoint exists and relaunched; it reports the three loss trajectories and their
largest differences (engine vs plain, engine vs killed-and-resumed).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file

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


def _launch(cmd: list[str], env: dict[str, str], kill_at: Path | None = None) -> subprocess.CompletedProcess:
    """Run `cmd`; with `kill_at`, SIGKILL it and every process under it as soon as that file exists
    (the launcher's workers may run in their own sessions, so a process-group kill can miss them)."""
    import psutil  # an accelerate dependency

    if kill_at is None:
        return subprocess.run(cmd, env=env, capture_output=True, text=True)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None and not kill_at.is_file():
        time.sleep(0.05)
    if proc.poll() is None:
        tree = psutil.Process(proc.pid)
        for p in [*tree.children(recursive=True), tree]:
            p.send_signal(signal.SIGKILL)
    out, err = proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def engine_check(work: Path, config: str) -> None:
    """Train a few tiny steps under an accelerate engine config and without one, then kill the engine
    run with SIGKILL after its step-2 checkpoint and resume it: both loss trajectories are compared."""
    data = write_phantom_dataset(work / "data", 6, seed=0, size=64).parent
    start = MedPLIB.from_preset("tiny", seed=0).save_pretrained(work / "start")
    args = ["--recipe", str(default_recipes_dir() / "stage2_vl_expert.yaml"), f"model.path={start}",
            f"data.dir={data}", "train.steps=8", "train.global_batch=4", "train.micro_batch=2",
            "train.mixed_precision=fp32", "lora.dropout=0", "checkpoint.every=2", "checkpoint.keep_last=2",
            "log.progress=false"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    engine = [accelerate, "launch", "--config_file", str(REPO / "recipes/accelerate" / f"{config}.yaml"),
              "--num_processes", "1", "-m", "medplib.cli", "train"]
    plain = [sys.executable, "-m", "medplib.cli", "train"]
    losses: dict[str, list[float] | None] = {}
    for name, cmd, kill in (("engine", engine, False), ("plain", plain, False), ("engine_killed", engine, True),
                            ("engine_resumed", engine, False)):
        out = work / ("engine_killed" if name == "engine_resumed" else name)
        kill_at = out / "checkpoints" / "step_00000002" / "state.json" if kill else None
        proc = _launch([*cmd, *args, f"output_dir={out}"], env, kill_at)
        setup = next((ln for ln in proc.stdout.splitlines() if "accumulation" in ln), "")
        resumed = re.findall(r"resuming at step (\d+)", proc.stdout)
        losses[name] = [round(r["loss"], 5) for r in _rows(out)] if proc.returncode == 0 else None
        print(json.dumps({"bench": "engine_check", "config": config, "run": name, "returncode": proc.returncode,
                          "setup": setup[setup.find("(") + 1: setup.rfind(")")] if setup else None,
                          "resumed_from_step": int(resumed[0]) if resumed else None,
                          "losses": losses[name], "model_saved": (out / "model" / "model.safetensors").is_file(),
                          "stderr_tail": proc.stderr[-400:] if proc.returncode and not kill else ""}), flush=True)
    weights = {name: load_file(str(work / name / "model" / "model.safetensors"))
               for name in ("engine", "plain") if (work / name / "model" / "model.safetensors").is_file()}
    if len(weights) == 2:  # the final model gathered from the engine's shards against the plain run's
        diff = max(float((weights["engine"][k].float() - weights["plain"][k].float()).abs().max())
                   for k in weights["plain"])
        print(json.dumps({"bench": "engine_check", "config": config, "compare": "final weights, engine vs plain",
                          "same_keys": weights["engine"].keys() == weights["plain"].keys(),
                          "max_abs_weight_difference": diff}), flush=True)
    ref = losses["engine"]
    for name in ("plain", "engine_resumed"):
        other = losses[name]
        if ref and other:
            print(json.dumps({"bench": "engine_check", "config": config, "compare": f"engine vs {name}",
                              "max_abs_loss_difference": max(abs(x - y) for x, y in zip(ref, other))}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--deepspeed", action="store_true", help="the engine check with DeepSpeed ZeRO-2 on the CPU")
    ap.add_argument("--engine",
                    help="the engine check with recipes/accelerate/<ENGINE>.yaml (e.g. deepspeed_zero3, fsdp)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.deepspeed or args.engine:
            engine_check(Path(tmp), args.engine or "deepspeed_zero2_cpu")
        else:
            throughput(args.preset, args.steps, Path(tmp))


if __name__ == "__main__":
    main()
