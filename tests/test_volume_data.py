"""Volumes as training and evaluation data: phantom cases through `medplib data build --source
volumes` (slices cut with inference's view, every slice of a volume in one split) and `medplib eval
--benchmark volumes` (3-D Dice and HD95 of the stored masks, re-scored here from the files)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from medplib.cli import _register_optional, app
from medplib.data.phantoms3d import make_phantom_volume, write_phantom_volume
from medplib.data.schema import read_jsonl
from medplib.data.volume_cases import case_split, read_case, read_cases, volume_slices
from medplib.errors import InputError
from medplib.evaluation.volumes import score_volume
from medplib.volume_inference import VolumeSlices

_register_optional()
runner = CliRunner()


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cases")
    for seed in range(6):
        write_phantom_volume(make_phantom_volume("mr", seed=seed, shape=(32, 28, 8)), root / f"case{seed}")
    return root


def test_build_from_volumes_keeps_each_volume_in_one_split(cases: Path, tmp_path: Path) -> None:
    out = tmp_path / "data"
    r = runner.invoke(app, ["data", "build", str(cases), "--source", "volumes", "--out", str(out), "--axis", "1",
                            "--modality", "mr", "--val-fraction", "0.3", "--test-fraction", "0.3"])
    assert r.exit_code == 0, r.output
    samples = list(read_jsonl(out / "samples.jsonl"))
    splits: dict[str, set[str]] = defaultdict(set)
    slices: dict[str, set[int]] = defaultdict(set)
    for s in samples:
        splits[s.group].add(s.split)
        slices[s.group].add(s.meta["slice"])
        assert s.meta["axis"] == 1 and s.modality == "mr"
    assert set(splits) == {f"volumes:case{i}" for i in range(6)}
    assert all(len(v) == 1 for v in splits.values())  # one split per volume
    assert len({next(iter(v)) for v in splits.values()}) >= 2  # and the volumes do not all land in one
    # a grounding target is the label volume's slice, cut as inference cuts it
    case = read_case(cases / "case2")
    vs = VolumeSlices(case.volume, axis=1)
    ground = [s for s in samples if s.task == "grounding" and s.group == "volumes:case2" and s.targets]
    assert ground
    for s in ground[:5]:
        target = s.targets[0]
        mask = np.asarray(Image.open(out / target.mask)) > 0
        assert np.array_equal(mask, vs.view(case.labels[target.label], s.meta["slice"]))
        assert np.array_equal(np.asarray(Image.open(out / s.image)), vs.image(s.meta["slice"]))
    # the split evaluation uses for a case is the builder's (default fractions)
    assert case_split(case) in ("train", "val", "test")


def test_case_errors_name_the_problem(cases: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no volume cases"):
        list(read_cases(tmp_path))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "labels.json").write_text('{"1": "brain"}')
    with pytest.raises(InputError, match="no image.nii.gz"):
        read_case(bad)
    vol = read_case(cases / "case0")
    nib.save(nib.Nifti1Image(np.full(vol.volume.shape, 9, dtype=np.uint8), vol.volume.affine),
             str(bad / "labels.nii.gz"))
    nib.save(nib.Nifti1Image(vol.volume.voxels, vol.volume.affine), str(bad / "image.nii.gz"))
    with pytest.raises(InputError, match=r"label values \[9\]"):
        read_case(bad)
    with pytest.raises(InputError, match="step and min_pixels"):
        list(volume_slices([vol], tmp_path / "x", step=0))


def test_eval_scores_volumes_with_dice_and_hd95(cases: Path, kvasir_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    r = runner.invoke(app, ["eval", "--model", str(kvasir_model), "--benchmark", "volumes",
                            "--data", str(cases / "case1"),
                            "--out", str(out), "--split", "all", "--device", "cpu", "--axis", "2"])
    assert r.exit_code == 0, r.output
    metrics = json.loads((out / "metrics.json").read_text())
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    case = read_case(cases / "case1")
    assert {rec["label"] for rec in records} == set(case.vocabulary) and metrics["cases"] == 1
    for rec in records:
        pred = nib.load(out / rec["mask"])
        assert np.allclose(pred.affine, case.volume.affine)
        gt = case.labels.get(rec["label"], np.zeros(case.volume.shape, dtype=bool))
        s = score_volume(np.asarray(pred.dataobj) > 0, gt, case.volume.spacing)
        assert rec["dice"] == pytest.approx(s.dice) and rec["hd95_mm"] == pytest.approx(s.hd95_mm)
        assert rec["slices"] == 8
    assert metrics["dice"] == pytest.approx(np.mean([rec["dice"] for rec in records]))
    assert metrics["slices_per_s"] > 0 and "| **all** |" in (out / "report.md").read_text()
    r = runner.invoke(app, ["eval", "--model", str(kvasir_model), "--benchmark", "volumes",
                            "--data", str(cases / "case1"),
                            "--out", str(tmp_path / "e2"), "--split", "all", "--postprocess", "blur"])
    assert r.exit_code == 2 and "unknown post-processing" in r.output


def test_ask_on_a_dicom_series_writes_nifti_and_dicom_seg(kvasir_model: Path, tmp_path: Path) -> None:
    from conftest import KVASIR_QUESTION

    from medplib.data.dicom_series import read_dicom_series
    from medplib.data.volume_io import read_dicom_seg_volume

    paths = write_phantom_volume(make_phantom_volume("ct", seed=7, shape=(40, 32, 8)), tmp_path / "ct", dicom=True)
    mask_out, seg_out = tmp_path / "out" / "mask.nii.gz", tmp_path / "out" / "seg.dcm"
    r = runner.invoke(app, ["ask", "--model", str(kvasir_model), paths["dicom"], KVASIR_QUESTION,
                            "--mask-out", str(mask_out),
                            "--dicom-seg-out", str(seg_out), "--json", "--postprocess", "largest_component"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout.strip().splitlines()[-1])
    series = read_dicom_series(paths["dicom"])
    mask = nib.load(mask_out)
    assert mask.shape == series.shape and np.allclose(mask.affine, series.affine)
    data = np.asarray(mask.dataobj) > 0
    assert out["voxels"] == int(data.sum()) > 0 and out["slices"] == list(range(8)) and len(out["scores"]) == 8
    assert out["mask_file"] == str(mask_out) and out["dicom_seg_file"] == str(seg_out)
    back = read_dicom_seg_volume(seg_out, series)
    assert np.array_equal(next(iter(back.values())), data)
    from scipy import ndimage

    assert ndimage.label(data, structure=np.ones((3, 3, 3)))[1] == 1  # largest_component was applied

    r = runner.invoke(app, ["ask", "--model", str(kvasir_model), paths["image"], KVASIR_QUESTION,
                            "--dicom-seg-out", str(seg_out)])
    assert isinstance(r.exception, InputError) and "needs a DICOM series" in str(r.exception)
    r = runner.invoke(app, ["ask", "--model", str(kvasir_model), paths["image"], "What is in <region>?", "--volume",
                            "--point", "1,2"])
    assert isinstance(r.exception, InputError) and "i,j,k" in str(r.exception)
