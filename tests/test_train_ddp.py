"""Two CPU processes (torchrun, gloo DDP) train like one process with the same global batch:
parameters stay identical across ranks and the per-step loss matches the one-process run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medplib.api import MedPLIB
from medplib.data.phantoms import make_phantom
from medplib.data.schema import Sample, Turn, write_jsonl
from medplib.model.losses import IGNORE_INDEX as IGNORE

REPO = Path(__file__).resolve().parents[1]
STEPS = 3

WORKER = """
import sys
import torch
from safetensors.torch import save_model
from medplib.training.loop import end_processes, train
from medplib.training.recipe import load_recipe

result = train(load_recipe(sys.argv[1], sys.argv[3:]), log=lambda s: None)
rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
save_model(result.model.model, f"{sys.argv[2]}/rank{rank}.safetensors")
end_processes()
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 images, one question each with an answer of the same length, so the mean loss over the
    global batch equals the mean of the two processes' means (token counts are equal)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("ddp_data")
    samples = []
    for i in range(8):
        ph = make_phantom(["ct", "mr"][i % 2], seed=i, size=64)
        Image.fromarray(ph.image).save(root / f"img{i}.png")
        samples.append(Sample(id=f"s{i}", image=f"img{i}.png", task="vqa", conversations=[
            Turn(role="user", content="<image>\nIs this a CT image?"),
            Turn(role="assistant", content=["yes", "no"][i % 2])]))
    write_jsonl(samples, root / "samples.jsonl")
    proc = MedPLIB.from_preset("tiny").processor
    n_labels = {sum(1 for x in proc.encode_conversation(s.conversations)[1] if x != IGNORE) for s in samples}
    assert len(n_labels) == 1, "the samples must have equally many answer tokens"
    return root


def _run(data: Path, out: Path, nproc: int, micro: int) -> None:
    out.mkdir(parents=True)
    script = out / "worker.py"
    script.write_text(WORKER)
    args = [str(REPO / "recipes" / "stage1_alignment.yaml"), str(out), "model.preset=tiny", f"data.dir={data}",
            f"output_dir={out / 'run'}", f"train.steps={STEPS}", "train.global_batch=4", f"train.micro_batch={micro}",
            "train.mixed_precision=fp32", "unfreeze=[vision,llm]", "checkpoint.every=0", "log.progress=false",
            "log.tensorboard=false"]
    launcher = [sys.executable, str(script)] if nproc == 1 else [
        shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun",
        "--standalone", f"--nproc_per_node={nproc}", str(script)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run([*launcher, *args], env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _losses(run: Path) -> list[float]:
    return [json.loads(ln)["loss"] for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def test_two_gloo_processes_match_one_process(data: Path, tmp_path: Path) -> None:
    _run(data, tmp_path / "one", nproc=1, micro=4)
    _run(data, tmp_path / "two", nproc=2, micro=2)
    r0 = load_file(str(tmp_path / "two" / "rank0.safetensors"))
    r1 = load_file(str(tmp_path / "two" / "rank1.safetensors"))
    assert r0.keys() == r1.keys()
    assert all(torch.equal(r0[k], r1[k]) for k in r0), "parameters differ between ranks"

    one, two = _losses(tmp_path / "one" / "run"), _losses(tmp_path / "two" / "run")
    assert len(one) == len(two) == STEPS
    assert two == pytest.approx(one, rel=1e-4)
    assert one[-1] < one[0]  # it trained

    single = load_file(str(tmp_path / "one" / "rank0.safetensors"))
    start = load_file(str(tmp_path / "one" / "run" / "model" / "model.safetensors"))
    moved = max(float((single[k] - r0[k]).abs().max()) for k in single)
    assert moved < 1e-4, f"DDP weights drifted from the one-process run by {moved}"
    assert torch.equal(start["projector.0.weight"], single["projector.0.weight"])  # saved model = trained model
