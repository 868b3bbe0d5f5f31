"""`medplib eval` across two CPU processes (torchrun, gloo): the samples are shared out, the predictions
merged once into predictions.jsonl in sample order, a run resumes (also from a killed multi-process run's
part stores), and the metrics equal a one-process run's, on real Kvasir-SEG images with the trained tiny model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medplib.evaluation.predictions import PredictionStore

REPO = Path(__file__).resolve().parents[1]


def _eval(model: Path, data: Path, out: Path, limit: int, nproc: int) -> subprocess.CompletedProcess:
    cli = ["-m", "medplib.cli", "eval", "--model", str(model), "--benchmark", "kvasir-seg", "--data", str(data),
           "--out", str(out), "--split", "all", "--limit", str(limit), "--device", "cpu", "--meteor", "nltk"]
    launcher = [sys.executable] if nproc == 1 else [
        shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun", "--standalone",
        f"--nproc_per_node={nproc}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run([*launcher, *cli], env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def _masks(out: Path) -> dict[str, np.ndarray]:
    return {r["id"]: np.asarray(Image.open(out / r["pred_mask"])) for r in _records(out)}


def _scored(out: Path) -> dict:
    m = json.loads((out / "metrics.json").read_text())
    return {k: m[k] for k in ("n", "metrics", "per_modality")}


N = 7  # samples: an odd count, so the two processes get unequal shares


@pytest.fixture(scope="module")
def reference(kvasir_model: Path, shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The one-process run."""
    out = tmp_path_factory.mktemp("eval_dist") / "one"
    _eval(kvasir_model, shared_data / "kvasir_seg", out, N, nproc=1)
    return out


def test_two_processes_shard_merge_resume_and_match_one_process(kvasir_model: Path, shared_data: Path,
                                                                reference: Path, tmp_path: Path) -> None:
    data, one, two = shared_data / "kvasir_seg", reference, tmp_path / "two"
    # 4 samples over 2 processes, then resumed to 7: the 3 new ones are shared out, the 4 stored ones reused.
    _eval(kvasir_model, data, two, 4, nproc=2)
    assert [r["id"] for r in _records(two)] == [r["id"] for r in _records(one)][:4]
    out = _eval(kvasir_model, data, two, N, nproc=2)
    assert out.stdout.count("predictions scored") == 1, "one process reports"
    m = json.loads((two / "metrics.json").read_text())
    assert (m["n"], m["generated"], m["reused"], m["failed"]) == (N, 3, 4, 0)
    assert not list(two.glob("predictions.part-*.jsonl")), "parts are merged and removed"

    # Merged once, in sample order, each sample once, with the same answers and masks as one process.
    ones, twos = _records(one), _records(two)
    assert [r["id"] for r in twos] == [r["id"] for r in ones]

    def strip(r: dict) -> dict:
        return {k: v for k, v in r.items() if k != "seconds"}

    assert [strip(r) for r in twos] == [strip(r) for r in ones]
    a, b = _masks(one), _masks(two)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert any(v.any() for v in a.values()), "the trained model grounds some polyps"
    assert _scored(two) == _scored(one)


def test_a_killed_multi_process_run_resumes_from_its_parts(kvasir_model: Path, shared_data: Path,
                                                           reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    # What two processes leave when killed mid-run: parts, no merged store. Samples 0 and 3 are stored.
    out.mkdir()
    shutil.copytree(reference / "masks", out / "masks")
    recs = _records(reference)
    store = PredictionStore(out / "predictions.jsonl")
    for rank, rec in ((0, recs[0]), (1, recs[3])):
        store.part(rank).path.write_text(json.dumps(rec) + "\n")
    with store.part(1).path.open("a") as fh:
        fh.write('{"id": "torn')  # the line being written when it was killed

    _eval(kvasir_model, shared_data / "kvasir_seg", out, N, nproc=2)
    m = json.loads((out / "metrics.json").read_text())
    assert (m["generated"], m["reused"]) == (N - 2, 2)
    ids = [r["id"] for r in recs]
    assert [r["id"] for r in _records(out)] == [ids[0], ids[3], *ids[1:3], *ids[4:]]
    assert not list(out.glob("predictions.part-*.jsonl"))

    def strip(r: dict) -> dict:
        return {k: v for k, v in r.items() if k != "seconds"}

    assert {r["id"]: strip(r) for r in _records(out)} == {r["id"]: strip(r) for r in recs}
    # The stored order differs from an uninterrupted run (0 and 3 first); the report, bootstrap intervals
    # included, is the same to the last bit.
    assert _scored(out) == _scored(reference)
