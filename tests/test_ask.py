"""`medplib ask`: a trained model answers about a real Kvasir-SEG image from the shell and writes
the mask and overlay; DICOM and NIfTI inputs, region options, JSON output and errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import typer
from conftest import KVASIR_QUESTION, kvasir_images
from PIL import Image
from typer.testing import CliRunner

from medplib.data.masks import rle_decode
from medplib.errors import InputError

MEDPLIB = [sys.executable, "-c", "from medplib.cli import main; main()"]


def _dice(p: np.ndarray, g: np.ndarray) -> float:
    return float(2 * (p & g).sum() / max(1, p.sum() + g.sum()))


def test_ask_on_kvasir_prints_answer_and_writes_mask_and_overlay(
    kvasir_model: Path, shared_data: Path, tmp_path: Path
) -> None:
    image_id, rgb, gt = kvasir_images(shared_data, 1)[0]
    image = shared_data / "kvasir_seg" / "images" / f"{image_id}.jpg"
    mask_out, overlay_out = tmp_path / "out" / "mask.png", tmp_path / "out" / "overlay.png"
    run = subprocess.run([*MEDPLIB, "ask", "--model", str(kvasir_model), str(image), KVASIR_QUESTION,
                          "--mask-out", str(mask_out), "--overlay-out", str(overlay_out)],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == "Sure, it is [SEG]."
    assert lines[1].startswith("mask 1: ") and str(mask_out) in lines[1]
    mask = np.asarray(Image.open(mask_out))
    assert mask.shape == gt.shape and set(np.unique(mask)) <= {0, 255}
    assert _dice(mask > 0, gt) >= 0.8
    ov = np.asarray(Image.open(overlay_out).convert("RGB")).astype(int)
    assert ov.shape == rgb.shape
    changed = np.abs(ov - rgb.astype(int)).sum(axis=2) > 0
    assert _dice(changed, mask > 0) >= 0.95  # the overlay colours the mask and nothing else

    bad = subprocess.run([*MEDPLIB, "ask", "--model", str(kvasir_model), str(image), "What is this?",
                          "--point", "5000,3"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert bad.returncode == 2 and "outside" in bad.stderr and "Traceback" not in bad.stderr


def test_ask_json_on_dicom_with_point_and_free_form_region(
    runner_app: typer.Typer, kvasir_model: Path, tmp_path: Path
) -> None:
    from pydicom.data import get_testdata_file

    dcm = get_testdata_file("CT_small.dcm")  # a real 128 x 128 CT slice
    region = np.zeros((128, 128), np.uint8)
    region[40:70, 50:90] = 255
    Image.fromarray(region).save(tmp_path / "region.png")
    overlay_out = tmp_path / "ov.png"
    res = CliRunner().invoke(runner_app, ["ask", dcm, "Is <region> brighter than <region>?",
                                          "--model", str(kvasir_model), "--point", "64,64",
                                          "--region-mask", str(tmp_path / "region.png"), "--json",
                                          "--max-new-tokens", "6", "--overlay-out", str(overlay_out)])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert isinstance(out["text"], str) and out["overlay_file"] == str(overlay_out)
    assert set(out["timings"]) >= {"image_s", "generate_s"}
    for m in out["masks"]:
        assert rle_decode(m["rle"]).shape == (128, 128)
    ov = np.asarray(Image.open(overlay_out).convert("RGB"))
    assert ov.shape == (128, 128, 3) and (ov == 255).all(axis=2)[40:71, 50:91].any()  # the region's outline is drawn


def test_ask_on_a_nifti_slice(runner_app: typer.Typer, kvasir_model: Path) -> None:
    import nibabel.testing

    nii = Path(nibabel.testing.data_path) / "standard.nii.gz"
    res = CliRunner().invoke(runner_app, ["ask", str(nii), "What is shown?", "--model", str(kvasir_model),
                                          "--slice", "1", "--box", "0,0,2,2", "--json", "--max-new-tokens", "4"])
    assert res.exit_code == 0, res.output
    assert "text" in json.loads(res.stdout)
    res = CliRunner().invoke(runner_app, ["ask", str(nii), "What?", "--model", str(kvasir_model), "--slice", "99"])
    assert isinstance(res.exception, InputError) and "out of range" in str(res.exception)


@pytest.mark.parametrize("args, words", [
    (["--point", "1,2,3"], "2 comma-separated"),
    (["--box", "50,50,10,10"], "x1 <= x2"),
    (["--box", "a,b,c,d"], "4 comma-separated"),
])
def test_ask_rejects_malformed_regions(
    runner_app: typer.Typer, kvasir_model: Path, shared_data: Path, args: list, words: str
) -> None:
    image_id = kvasir_images(shared_data, 1)[0][0]
    image = shared_data / "kvasir_seg" / "images" / f"{image_id}.jpg"
    res = CliRunner().invoke(runner_app, ["ask", str(image), "What?", "--model", str(kvasir_model), *args])
    assert isinstance(res.exception, InputError) and words in str(res.exception)


def test_unwritable_outputs_fail_before_the_model_runs(
    runner_app: typer.Typer, shared_data: Path, tmp_path: Path
) -> None:
    import nibabel.testing

    image_id = kvasir_images(shared_data, 1)[0][0]
    image = shared_data / "kvasir_seg" / "images" / f"{image_id}.jpg"
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    nii = Path(nibabel.testing.data_path) / "standard.nii.gz"
    for args in (["--mask-out", str(blocker / "m.png")], ["--overlay-out", str(tmp_path)],
                 ["--mask-out", str(blocker / "wm.nii.gz")]):
        src = nii if args[1].endswith(".nii.gz") else image
        res = CliRunner().invoke(runner_app, ["ask", str(src), "Please segment the polyp.", "--model", "/no/such/model",
                                              *args])
        # the model path is never read: the output is refused first, naming its option
        assert isinstance(res.exception, InputError) and args[0] in str(res.exception), res.output


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init `tiny` model folder: enough to run `medplib ask` end to end."""
    from medplib.api import MedPLIB

    return MedPLIB.from_preset("tiny", seed=0).save_pretrained(tmp_path_factory.mktemp("tiny") / "model")


def test_ask_prints_no_library_warnings(tiny_model: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(tmp_path / "img.png")
    mask = np.zeros((48, 64), np.uint8)
    mask[10:30, 20:40] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    run = subprocess.run([sys.executable, "-W", "error::FutureWarning", *MEDPLIB[1:], "ask", str(tmp_path / "img.png"),
                          "What is <region>?", "--model", str(tiny_model), "--point", "30,20", "--max-new-tokens", "6",
                          "--example", f"{tmp_path / 'img.png'}:{tmp_path / 'mask.png'}"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr
    assert "Warning" not in run.stderr and "deprecated" not in run.stderr.lower(), run.stderr
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("image ")  # only the timings line


def test_every_ask_failure_is_one_error_line(tiny_model: Path, tmp_path: Path) -> None:
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "img.png")
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tokenizer / name).write_bytes((tiny_model / name).read_bytes())
    cases = [
        ([str(tmp_path / "gone.png"), "What?", "--model", str(tiny_model)], "image file not found"),
        ([str(tmp_path / "img.png"), "What?", "--model", str(no_tokenizer)], "cannot load tokenizer"),
        ([str(tmp_path / "img.png"), "What?", "--model", str(tiny_model), "--device", "nope"], "unknown device"),
    ]
    for args, words in cases:
        run = subprocess.run([*MEDPLIB, "ask", *args], capture_output=True, text=True, timeout=300,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert run.returncode == 2 and run.stdout == "", (args, run.stderr)
        lines = run.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], (args, run.stderr)
