"""NIfTI via nibabel: a whole volume, or one 2-D slice percentile-windowed, in canonical (RAS+) orientation.

Slices are shown the radiological way: patient's right on the image's left, anterior (axial) or
superior (coronal, sagittal) at the top.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medplib.data.images import ImageData, grey_to_rgb, window_to_uint8
from medplib.data.volume import Volume, VolumeSource
from medplib.errors import InputError


def _load_canonical(path: Path, volume: int) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """(I, J, K) float32 voxels in closest-canonical RAS order, their (4, 4) affine, and the file's shape."""
    import nibabel as nib

    if not path.is_file():
        raise InputError(f"{path}: image file not found")
    try:
        img = nib.as_closest_canonical(nib.load(str(path)))
        shape = img.shape
        if len(shape) == 4:
            if not 0 <= volume < shape[3]:
                raise InputError(f"{path}: volume {volume} out of range (the file has {shape[3]})")
            data = np.asarray(img.dataobj[..., volume], dtype=np.float32)
        elif len(shape) == 3:
            data = np.asarray(img.dataobj, dtype=np.float32)
        else:
            raise InputError(f"{path}: a NIfTI volume must be 3-D or 4-D, got shape {shape}")
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types on corrupt files
        raise InputError(f"{path}: cannot read NIfTI ({exc})") from None
    return data, np.asarray(img.affine, dtype=np.float64), tuple(int(s) for s in shape)


def read_nifti_volume(path: str | Path, volume: int = 0) -> Volume:
    """A 3-D NIfTI file, or time point `volume` of a 4-D one -> Volume with (I, J, K) float32 voxels
    (scaled by the header's slope/intercept) reoriented to the closest canonical RAS+ order with
    nibabel.as_closest_canonical; the affine is the file's, permuted and flipped to match."""
    path = Path(path)
    data, affine, shape = _load_canonical(path, volume)
    return Volume(voxels=data, affine=affine, source=VolumeSource(format="nifti", paths=(str(path),)),
                  meta={"format": "nifti", "volume": volume, "file_shape": shape})


def read_nifti_slice(path: str | Path, axis: int = 2, index: int | None = None, volume: int = 0,
                     percentiles: tuple[float, float] = (0.5, 99.5)) -> ImageData:
    """Slice `index` (default: the middle) along RAS+ `axis` (0 sagittal, 1 coronal, 2 axial) of a
    3-D or 4-D (`volume` picks the time point) NIfTI -> ImageData with raw (H, W) float32."""
    path = Path(path)
    if axis not in (0, 1, 2):
        raise InputError(f"{path}: axis must be 0, 1 or 2, got {axis}")
    data, _, shape = _load_canonical(path, volume)
    n = data.shape[axis]
    index = n // 2 if index is None else index
    if not 0 <= index < n:
        raise InputError(f"{path}: slice {index} out of range along axis {axis} (size {n})")
    plane = np.take(data, index, axis=axis)
    raw = np.ascontiguousarray(plane.T[::-1, ::-1])  # rows: A/S at the top; columns: patient right on the left
    finite = data[np.isfinite(data)]
    if finite.size == 0:
        raise InputError(f"{path}: volume has no finite values")
    low, high = (float(v) for v in np.percentile(finite, percentiles))  # per volume, so slices match
    grey = window_to_uint8(np.nan_to_num(raw, nan=low), low, high)
    meta = {"format": "nifti", "axis": axis, "index": index, "volume": volume, "shape": tuple(int(s) for s in shape),
            "window": (low, high), "orientation": "RAS+"}
    return ImageData(rgb=grey_to_rgb(grey), raw=raw, meta=meta)
