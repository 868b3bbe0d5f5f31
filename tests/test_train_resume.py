"""A stage killed with SIGKILL mid-run resumes from its last checkpoint and then follows the
uninterrupted run's loss trajectory exactly (model, optimizer, schedule, RNG and data position)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medplib.api import MedPLIB
from medplib.data.phantoms import write_phantom_dataset

REPO = Path(__file__).resolve().parents[1]
STEPS = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("resume")
    write_phantom_dataset(root / "data", 6, seed=0, size=64)
    model = MedPLIB.from_preset("tiny", seed=0).save_pretrained(root / "start")
    return root / "data", model


def _cmd(data: Path, model: Path, out: Path) -> list[str]:
    # Stage II: LoRA with dropout (so the RNG state matters), accumulation of 2 micro-batches, and
    # random flips (drawn per stream position, so the resumed run must see the same ones).
    return [sys.executable, "-m", "medplib.cli", "train", "--recipe", str(REPO / "recipes" / "stage2_vl_expert.yaml"),
            f"model.path={model}", f"data.dir={data}", f"output_dir={out}", f"train.steps={STEPS}",
            "train.global_batch=4", "train.micro_batch=2", "train.mixed_precision=fp32", "lora.r=4",
            "lora.dropout=0.1", "data.augment=[hflip,vflip,transpose]", "optim.lr=1e-3", "checkpoint.every=3",
            "checkpoint.keep_last=2", "log.progress=false", "log.tensorboard=false"]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}


def _losses(run: Path) -> list[float]:
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    return [r["loss"] for r in rows]


def test_sigkill_mid_stage_then_resume_matches_uninterrupted_run(setup: tuple[Path, Path], tmp_path: Path) -> None:
    data, model = setup
    ref = tmp_path / "ref"
    subprocess.run(_cmd(data, model, ref), env=_env(), check=True, capture_output=True, timeout=300)

    run = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(data, model, run), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 5:  # past the step-3 checkpoint
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "model").exists(), "the run finished before it was killed"
    assert (run / "checkpoints" / "step_00000003" / "state.json").is_file()

    subprocess.run(_cmd(data, model, run), env=_env(), check=True, capture_output=True, timeout=300)
    want, got = _losses(ref), _losses(run)
    assert len(want) == len(got) == STEPS
    assert got == pytest.approx(want, abs=1e-5, rel=0)
    assert len(set(want)) > 1  # the trajectory is not flat: the check has something to compare
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000003", "step_00000006"]
    MedPLIB.from_pretrained(run / "model")  # the resumed run leaves a loadable model
