"""One volume type for CT/MR/PET series and NIfTI files: voxels, affine and where they came from.

Voxels are indexed `(i, j, k)` the NIfTI way and `affine @ (i, j, k, 1)` is the centre of voxel
(i, j, k) in RAS+ millimetres (x grows towards the patient's right, y anterior, z superior; DICOM's
LPS+ has x and y negated). For a DICOM series `i` is the column, `j` the row and `k` the slice in
order along the slice normal, so `voxels[:, :, k].T` is the k-th slice's pixel array as stored;
NIfTI volumes are in closest-canonical (RAS) voxel order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from medplib.errors import InputError


@dataclass(frozen=True)
class VolumeSource:
    """Where a volume came from. paths: the files (DICOM: one per slice, in slice order). The UIDs are
    set for DICOM only; sop_uids has one SOPInstanceUID per slice, in the same order as `paths`."""

    format: Literal["dicom", "nifti", "array"]
    paths: tuple[str, ...] = ()
    series_uid: str | None = None
    study_uid: str | None = None
    frame_of_reference_uid: str | None = None
    sop_uids: tuple[str, ...] = ()


@dataclass
class Volume:
    """voxels: (I, J, K) array (float32 intensities after rescale, or a label volume). affine: (4, 4)
    voxel index -> RAS+ mm. meta: how it was read (modality, rescale, skipped files, ...)."""

    voxels: np.ndarray
    affine: np.ndarray
    source: VolumeSource = field(default_factory=lambda: VolumeSource("array"))
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.voxels.ndim != 3:
            raise InputError(f"a volume must be 3-D, got shape {tuple(self.voxels.shape)}")
        if self.affine.shape != (4, 4) or not np.all(np.isfinite(self.affine)):
            raise InputError(f"a volume affine must be a finite 4x4 matrix, got {self.affine.shape}")
        if abs(np.linalg.det(self.affine[:3, :3])) < 1e-12:
            raise InputError("a volume affine must be invertible")
        if self.source.sop_uids and len(self.source.sop_uids) != self.voxels.shape[2]:
            raise InputError(f"{len(self.source.sop_uids)} SOP instance UIDs for {self.voxels.shape[2]} slices")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.voxels.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along i, j, k (the lengths of the affine's columns)."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def orientation(self) -> str:
        """Axis codes, e.g. 'RAS' (NIfTI canonical) or 'LPS' (a usual axial DICOM series): the
        direction each of i, j, k points to, from nibabel.aff2axcodes."""
        import nibabel as nib

        return "".join(nib.aff2axcodes(self.affine))

    def world(self, ijk: np.ndarray) -> np.ndarray:
        """(N, 3) voxel coordinates -> (N, 3) RAS+ mm."""
        ijk = np.atleast_2d(np.asarray(ijk, dtype=np.float64))
        return ijk @ self.affine[:3, :3].T + self.affine[:3, 3]

    def voxel(self, xyz: np.ndarray) -> np.ndarray:
        """(N, 3) RAS+ mm -> (N, 3) fractional voxel coordinates."""
        xyz = np.atleast_2d(np.asarray(xyz, dtype=np.float64))
        return (xyz - self.affine[:3, 3]) @ np.linalg.inv(self.affine[:3, :3]).T


def affine_from_spacing(spacing: tuple[float, float, float], origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
                        ) -> np.ndarray:
    """A RAS-aligned (4, 4) affine with the given voxel size in mm and the centre of voxel 0 at `origin`."""
    if len(spacing) != 3 or min(spacing) <= 0:
        raise InputError(f"spacing must be three positive numbers, got {spacing}")
    affine = np.diag([*map(float, spacing), 1.0])
    affine[:3, 3] = origin
    return affine


def read_volume(path: str | Path, series_uid: str | None = None) -> Volume:
    """A NIfTI file (.nii, .nii.gz), a folder holding a DICOM series, or one DICOM file (the series
    it belongs to, read from its folder) -> Volume."""
    from medplib.data.dicom_series import read_dicom_series
    from medplib.data.images import is_dicom
    from medplib.data.nifti import read_nifti_volume

    path = Path(path)
    if path.is_dir():
        return read_dicom_series(path, series_uid)
    if not path.is_file():
        raise InputError(f"{path}: volume not found (a NIfTI file or a folder of DICOM slices)")
    if path.name.lower().endswith((".nii", ".nii.gz")):
        return read_nifti_volume(path)
    if is_dicom(path):
        if series_uid is None:
            import pydicom

            try:
                series_uid = str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)
            except Exception as exc:  # noqa: BLE001 - pydicom raises many types on corrupt files
                raise InputError(f"{path}: cannot read DICOM ({type(exc).__name__}: {exc})") from None
        return read_dicom_series(path.parent, series_uid)
    raise InputError(f"{path}: not a volume (expected .nii, .nii.gz, a DICOM file or a folder of DICOM slices)")
