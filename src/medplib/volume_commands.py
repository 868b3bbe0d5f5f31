"""`medplib ask VOLUME ...`: one question about a NIfTI file or a DICOM series folder, answered
slice by slice (medplib.volume_inference), the mask volume written as NIfTI and/or DICOM SEG.
Called by `medplib ask` (medplib.serving.commands) when its input is a volume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import typer

from medplib.errors import InputError

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_volume_request(image: Path, mask_out: Optional[Path], dicom_seg_out: Optional[Path], volume: bool) -> bool:
    """A folder (a DICOM series), a NIfTI mask or a DICOM SEG asked for, or --volume."""
    nifti_out = mask_out is not None and mask_out.name.lower().endswith(NIFTI_SUFFIXES)
    return volume or image.is_dir() or dicom_seg_out is not None or nifti_out


def _voxel_regions(points: Sequence[str], boxes: Sequence[str], masks: Sequence[Path], like: Any) -> list[Any]:
    from medplib.data.volume_io import read_nifti_mask
    from medplib.volume_inference import parse_voxel_region

    regions: list[Any] = [parse_voxel_region("point", p) for p in points]
    regions += [parse_voxel_region("box", b) for b in boxes]
    for m in masks:
        if not m.name.lower().endswith(NIFTI_SUFFIXES):
            raise InputError(f"--region-mask {m}: a region over a volume is a NIfTI mask (.nii, .nii.gz)")
        regions.append(read_nifti_mask(m, like=like).voxels > 0)
    return regions


def ask_volume_command(image: Path, question: str, *, model: Path, point: Sequence[str] = (), box: Sequence[str] = (),
                       region_mask: Sequence[Path] = (), slice_index: Optional[int] = None, axis: int = 2,
                       mask_out: Optional[Path] = None, dicom_seg_out: Optional[Path] = None,
                       overlay_out: Optional[Path] = None, postprocess: Sequence[str] = (), as_json: bool = False,
                       max_new_tokens: Optional[int] = None, device: str = "cpu",
                       quantize: Optional[str] = None) -> None:
    from PIL import Image

    from medplib.data.volume import read_volume
    from medplib.inference import Predictor
    from medplib.visualize import overlay

    if mask_out is not None and not mask_out.name.lower().endswith(NIFTI_SUFFIXES):
        raise InputError(f"--mask-out {mask_out}: a mask volume is written as NIfTI (.nii or .nii.gz)")
    steps = [s.strip() for item in postprocess for s in item.split(",") if s.strip()]
    vol = read_volume(image)
    regions = _voxel_regions(point, box, region_mask, vol)
    if dicom_seg_out is not None and vol.source.format != "dicom":
        raise InputError(f"--dicom-seg-out needs a DICOM series as input; {image} is {vol.source.format}")
    predictor = Predictor.from_pretrained(model, device=device, quantize=quantize)
    vs = predictor.set_volume(vol, axis=axis)
    pred = predictor.ask_volume(question, regions, slices=slice_index, postprocess=steps, verbose=not as_json,
                                max_new_tokens=max_new_tokens)
    written: dict[str, str | None] = {"mask_file": None, "dicom_seg_file": None, "overlay_file": None}
    if mask_out is not None:
        written["mask_file"] = str(pred.save_nifti(mask_out))
    if dicom_seg_out is not None:
        if pred.mask.any():
            written["dicom_seg_file"] = str(pred.save_dicom_seg(dicom_seg_out, label=question[:64]))
        else:
            typer.echo(f"the mask is empty: no DICOM SEG written to {dicom_seg_out}", err=True)
    if overlay_out is not None:
        k = pred.reference
        Image.fromarray(overlay(vs.image(k), [vs.view(pred.mask, k)])).save(overlay_out)
        written["overlay_file"] = str(overlay_out)
    voxels = int(pred.mask.sum())
    ml = voxels * float(np.prod(vol.spacing)) / 1000.0
    if as_json:
        typer.echo(json.dumps({
            "text": pred.text, "texts": {str(k): t for k, t in pred.texts.items()}, "reference": pred.reference,
            "slices": pred.slices, "axis": pred.axis, "shape": list(vol.shape),
            "scores": [None if np.isnan(s) else float(s) for s in pred.scores], "voxels": voxels, "volume_ml": ml,
            "postprocess": list(pred.postprocess), **written, "timings": pred.timings,
        }))
        return
    typer.echo(pred.text)
    masked = np.flatnonzero(pred.slice_has_mask)
    where = f"slices {masked[0]}..{masked[-1]} of axis {axis}" if masked.size else "no slice"
    typer.echo(f"asked {len(pred.slices)} of {vs.n} slices; mask: {voxels} voxels ({ml:.1f} ml) on {where}")
    for key, path in written.items():
        if path:
            typer.echo(f"{key.replace('_', ' ')} -> {path}")
    t = pred.timings
    typer.echo(f"{t['total_s']:.2f} s ({t['slices_per_s']:.1f} slices/s)", err=True)
