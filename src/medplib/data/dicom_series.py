"""A DICOM series from a folder -> Volume, via pydicom.

Files are grouped by SeriesInstanceUID and ordered by ImagePositionPatient projected on the slice
normal (the cross product of the ImageOrientationPatient cosines), never by file name: scanners and
PACS exports name files in any order. Pixels get each slice's RescaleSlope/Intercept (HU for CT).

What stops a read, with the files named: a corrupt file, two series in one folder (unless one is
picked with `series_uid`), slices with different orientation, size or pixel spacing, two slices at
one position, a gap where slices are missing. Uneven spacing without a gap is a warning, and the
affine uses the mean step. Files that are not DICOM at all (no .dcm suffix, no DICM preamble), a
DICOMDIR and objects without pixels are skipped and listed in `meta["skipped"]`.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from medplib.data.images import is_dicom
from medplib.data.volume import Volume, VolumeSource
from medplib.errors import InputError

_DICOMDIR_UID = "1.2.840.10008.1.3.10"
_GAP_FACTOR = 1.5  # a step this many times the usual one means slices are missing
_UNEVEN_TOL = 0.01  # relative step deviation above which spacing counts as uneven (1%)
_ORIENT_TOL = 1e-4  # direction cosines agree to this (they are stored with ~6 decimals)


def _names(paths: list[Path], limit: int = 6) -> str:
    shown = ", ".join(p.name for p in paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def _candidate_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _read_headers(files: list[Path]) -> tuple[list[tuple[Path, Any]], list[str]]:
    """Parse every file; corrupt DICOM files raise one error naming all of them."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    datasets, skipped, corrupt = [], [], []
    for path in files:
        try:
            ds = pydicom.dcmread(path)
        except InvalidDicomError as exc:
            if is_dicom(path):
                corrupt.append(f"{path.name} ({exc})")
            else:
                skipped.append(path.name)
            continue
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types on truncated files
            corrupt.append(f"{path.name} ({type(exc).__name__}: {exc})")
            continue
        if str(ds.file_meta.get("MediaStorageSOPClassUID", "")) == _DICOMDIR_UID:
            skipped.append(path.name)
            continue
        if "SOPInstanceUID" not in ds:  # pydicom parses garbage after a DICM preamble into a few odd elements
            corrupt.append(f"{path.name} (no SOPInstanceUID: the header is damaged)")
            continue
        if "PixelData" not in ds:  # a report, presentation state or other object without an image
            skipped.append(path.name)
            continue
        datasets.append((path, ds))
    if corrupt:
        folder = files[0].parent
        raise InputError(f"{folder}: {len(corrupt)} corrupt DICOM file(s): " + "; ".join(corrupt[:6])
                         + (f" and {len(corrupt) - 6} more" if len(corrupt) > 6 else ""))
    return datasets, skipped


def _pick_series(folder: Path, datasets: list[tuple[Path, Any]], series_uid: str | None) -> list[tuple[Path, Any]]:
    groups: dict[str, list[tuple[Path, Any]]] = defaultdict(list)
    for path, ds in datasets:
        groups[str(ds.get("SeriesInstanceUID", ""))].append((path, ds))
    described = "; ".join(f"{uid or '(no SeriesInstanceUID)'}: {len(g)} file(s), {_names([p for p, _ in g], 3)}"
                          for uid, g in sorted(groups.items(), key=lambda kv: -len(kv[1])))
    if series_uid is not None:
        if series_uid not in groups:
            raise InputError(f"{folder}: no series {series_uid} (found {described})")
        return groups[series_uid]
    if len(groups) > 1:
        raise InputError(f"{folder}: {len(groups)} series mixed in one folder ({described}); "
                         "pick one with series_uid or move the others out")
    if "" in groups:
        raise InputError(f"{folder}: files without SeriesInstanceUID: {_names([p for p, _ in groups['']])}")
    return next(iter(groups.values()))


def _same(values: list[tuple[Path, np.ndarray]], what: str, folder: Path, tol: float) -> np.ndarray:
    """The value all slices share; otherwise an error naming the slices that differ from the first."""
    first = values[0][1]
    odd = [p for p, v in values if v.shape != first.shape or not np.allclose(v, first, atol=tol, rtol=0)]
    if odd:
        raise InputError(f"{folder}: {what} differs between slices ({values[0][0].name}: {first.tolist()}; "
                         f"different in {_names(odd)})")
    return first


def _geometry(folder: Path, series: list[tuple[Path, Any]]) -> dict[str, Any]:
    for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        missing = [p for p, ds in series if tag not in ds]
        if missing:
            raise InputError(f"{folder}: {tag} missing in {_names(missing)}: the slices cannot be placed")
    multi = [p for p, ds in series if int(ds.get("NumberOfFrames", 1) or 1) > 1]
    if multi:
        raise InputError(f"{folder}: multi-frame file(s) {_names(multi)}: read them one frame at a time "
                         "with read_image('file.dcm#frame=N')")
    colour = [p for p, ds in series if int(ds.get("SamplesPerPixel", 1)) != 1]
    if colour:
        raise InputError(f"{folder}: colour slice(s) {_names(colour)}: a volume must be greyscale")
    orient = _same([(p, np.asarray(ds.ImageOrientationPatient, float)) for p, ds in series],
                   "ImageOrientationPatient", folder, _ORIENT_TOL)
    size = _same([(p, np.asarray([ds.Rows, ds.Columns], float)) for p, ds in series], "Rows/Columns", folder, 0)
    pixel = _same([(p, np.asarray(ds.PixelSpacing, float)) for p, ds in series], "PixelSpacing", folder, 1e-4)
    row_cos, col_cos = orient[:3], orient[3:]
    normal = np.cross(row_cos, col_cos)
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-3):
        raise InputError(f"{folder}: ImageOrientationPatient {orient.tolist()} is not two orthogonal unit vectors")
    return {"row_cos": row_cos, "col_cos": col_cos, "normal": normal, "rows": int(size[0]),
            "cols": int(size[1]), "pixel_spacing": pixel}


def _order(folder: Path, series: list[tuple[Path, Any]], normal: np.ndarray
           ) -> tuple[list[tuple[Path, Any]], np.ndarray, bool]:
    """Slices sorted along the normal, their (N, 3) positions, and whether spacing is uneven."""
    positions = np.asarray([np.asarray(ds.ImagePositionPatient, float) for _, ds in series])
    depth = positions @ normal
    order = np.argsort(depth, kind="stable")
    series = [series[i] for i in order]
    positions, depth = positions[order], depth[order]
    if len(series) == 1:
        return series, positions, False
    steps = np.diff(depth)
    dup = np.flatnonzero(steps < 1e-3)
    if dup.size:
        pairs = ", ".join(f"{series[i][0].name} and {series[i + 1][0].name}" for i in dup[:4])
        raise InputError(f"{folder}: {dup.size} pair(s) of slices at the same position ({pairs}): "
                         "several acquisitions, echoes or time points in one series")
    usual = float(np.median(steps))
    gaps = np.flatnonzero(steps > _GAP_FACTOR * usual)
    if gaps.size:
        desc = ", ".join(f"{steps[i]:.3g} mm between {series[i][0].name} and {series[i + 1][0].name} "
                         f"(about {round(steps[i] / usual) - 1} missing)" for i in gaps[:4])
        raise InputError(f"{folder}: slice gap(s) in the series, usual step {usual:.3g} mm: {desc}")
    worst = int(np.argmax(np.abs(steps - usual)))
    uneven = abs(steps[worst] - usual) > _UNEVEN_TOL * usual
    if uneven:
        warnings.warn(f"{folder}: uneven slice spacing, {steps.min():.4g} to {steps.max():.4g} mm (worst "
                      f"{steps[worst]:.4g} mm between {series[worst][0].name} and {series[worst + 1][0].name}); "
                      "the affine uses the mean step", stacklevel=3)
    return series, positions, bool(uneven)


def _pixels(folder: Path, series: list[tuple[Path, Any]], rows: int, cols: int) -> tuple[np.ndarray, list]:
    """(cols, rows, N) float32 after rescale, and the (slope, intercept) of each slice."""
    stack = np.empty((len(series), rows, cols), dtype=np.float32)
    rescale = []
    for k, (path, ds) in enumerate(series):
        try:
            arr = ds.pixel_array
        except Exception as exc:  # noqa: BLE001 - pixel decoders raise many types on corrupt data
            raise InputError(f"{folder}: corrupt DICOM file {path.name}: cannot decode pixels "
                             f"({type(exc).__name__}: {exc})") from None
        if arr.shape != (rows, cols):
            raise InputError(f"{folder}: {path.name} has pixels of shape {arr.shape}, expected {(rows, cols)}")
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        stack[k] = arr.astype(np.float32) * np.float32(slope) + np.float32(intercept)
        rescale.append((slope, intercept))
    return stack.transpose(2, 1, 0), rescale  # a view: Fortran order, as nibabel keeps volumes


def read_dicom_series(folder: str | Path, series_uid: str | None = None) -> Volume:
    """The DICOM series in `folder` (one level, no subfolders) -> Volume with voxels (cols, rows, N)
    float32 and an RAS+ affine. `series_uid` picks one series where a folder holds several."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: DICOM series folder not found")
    files = _candidate_files(folder)
    if not files:
        raise InputError(f"{folder}: folder is empty")
    datasets, skipped = _read_headers(files)
    if not datasets:
        raise InputError(f"{folder}: no DICOM image files among {len(files)} file(s)")
    series = _pick_series(folder, datasets, series_uid)
    geo = _geometry(folder, series)
    series, positions, uneven = _order(folder, series, geo["normal"])
    voxels, rescale = _pixels(folder, series, geo["rows"], geo["cols"])
    first = series[0][1]
    if len(series) > 1:
        step = (positions[-1] - positions[0]) / (len(series) - 1)  # follows a gantry tilt, too
    else:
        step = geo["normal"] * float(first.get("SpacingBetweenSlices", first.get("SliceThickness", 1.0)) or 1.0)
    row_spacing, col_spacing = (float(v) for v in geo["pixel_spacing"])  # PixelSpacing is (row, column)
    lps = np.eye(4)
    lps[:3, 0] = geo["row_cos"] * col_spacing  # i: along a row, one column to the next
    lps[:3, 1] = geo["col_cos"] * row_spacing  # j: down a column, one row to the next
    lps[:3, 2] = step
    lps[:3, 3] = positions[0]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # DICOM patient space is LPS+
    source = VolumeSource(format="dicom", paths=tuple(str(p) for p, _ in series),
                          series_uid=str(first.SeriesInstanceUID),
                          study_uid=str(first.get("StudyInstanceUID", "")) or None,
                          frame_of_reference_uid=str(first.get("FrameOfReferenceUID", "")) or None,
                          sop_uids=tuple(str(ds.SOPInstanceUID) for _, ds in series))
    meta: dict[str, Any] = {"format": "dicom", "modality": first.get("Modality"), "skipped": skipped,
                            "uneven_spacing": uneven, "photometric": str(first.get("PhotometricInterpretation", "")),
                            "rescale": sorted(set(rescale)),
                            "slice_thickness": float(first.get("SliceThickness", 0) or 0) or None}
    if "WindowCenter" in first and "WindowWidth" in first:
        from medplib.data.dicom import _first

        meta["window"] = (_first(first.WindowCenter), _first(first.WindowWidth))
    return Volume(voxels=voxels, affine=affine, source=source, meta=meta)
