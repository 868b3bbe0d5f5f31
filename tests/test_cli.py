"""The `medplib` command: subcommands listed, the paper summary printed, errors without tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medplib.cli", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_every_subcommand() -> None:
    out = _run("--help")
    assert out.returncode == 0
    for name in ("info", "demo", "data"):
        assert name in out.stdout


def test_info_prints_the_paper_parameter_count() -> None:
    out = _run("info", "--preset", "paper", "--json")
    assert out.returncode == 0, out.stderr
    s = json.loads(out.stdout)
    assert s["image_tokens"] == 576 and s["llm_layers"] == 32 and s["pixel_embedding"] == [256, 16, 16]
    assert 11e9 < s["total"] < 12.5e9 and 6.8e9 < s["active"] < 7.6e9


def test_bad_input_is_one_line_not_a_traceback() -> None:
    out = _run("info", "--preset", "huge")
    assert out.returncode == 2
    assert out.stderr.strip() == "error: unknown preset 'huge' (choose from tiny, small, lite, paper)"
    assert "Traceback" not in out.stderr


def test_the_package_exports_its_public_face_without_importing_torch() -> None:
    code = ("import sys, medplib; assert 'torch' not in sys.modules; "
            "from medplib import MedPLIB, Predictor, preset; "
            "from medplib.api import MedPLIB as M; from medplib.inference import Predictor as P; "
            "assert MedPLIB is M and Predictor is P and preset('tiny').name == 'tiny'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
