"""A non-editable install: build the wheel, install it into a fresh virtualenv, and run `medplib pipeline`
from outside the checkout, so the stage recipes must come from the installed package (package data),
never from the source tree.

The fresh venv borrows this environment's third-party packages through a `.pth` path line (torch and
friends are not reinstalled); a path line does not run the editable install's own `.pth` hook, so
`import medplib` can only find the wheel's copy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

from medplib.data.phantoms import write_phantom_dataset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bin folder of a fresh venv with the medplib wheel installed (no dependencies reinstalled)."""
    root = tmp_path_factory.mktemp("install")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(root / "dist"), str(REPO)], check=True, capture_output=True)
    wheel = next((root / "dist").glob("medplib-*.whl"))
    env_dir = root / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    (Path(site) / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q",
                    str(wheel)], check=True, capture_output=True)
    return env_dir / "bin"


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(args, cwd=cwd, env={**env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True)


def test_wheel_ships_the_recipes(installed: Path, tmp_path: Path) -> None:
    code = ("import json, medplib; from medplib.training.pipeline import STAGES, default_recipes_dir; "
            "from medplib.training.recipe import load_recipe; d = default_recipes_dir(); "
            "print(json.dumps({'module': medplib.__file__, 'dir': str(d), "
            "'stages': [type(load_recipe(d / f'{s}.yaml', [])).__name__ for s in STAGES], "
            "'accelerate': sorted(p.name for p in (d / 'accelerate').glob('*.yaml'))}))")
    out = _run([str(installed / "python"), "-c", code], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    # The package and its recipes come from the venv, not from the checkout.
    assert Path(info["module"]).resolve().is_relative_to(installed.parent.resolve())
    assert not Path(info["dir"]).resolve().is_relative_to(REPO.resolve())
    assert info["stages"] == ["Recipe"] * 4
    assert info["accelerate"] == sorted(p.name for p in (REPO / "src/medplib/recipes/accelerate").glob("*.yaml"))


def test_installed_pipeline_runs_outside_the_checkout(installed: Path, tmp_path: Path) -> None:
    jsonl = write_phantom_dataset(tmp_path / "data", 8, seed=0, size=64)
    out = _run([str(installed / "medplib"), "pipeline", "--preset", "tiny", "--data", str(jsonl.parent),
                "--out", str(tmp_path / "run"), "--steps", "1,1,1,1", "train.global_batch=2",
                "train.micro_batch=2", "log.progress=false", "log.tensorboard=false", "checkpoint.every=0"],
               cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert config["moe"]["num_experts"] == 2
