"""Volume results out and back in: NIfTI masks with the input's affine, DICOM SEG objects that
reference the source series (highdicom, the maintained library for SEG), and DICOM series.

A mask volume is (I, J, K), indexed like the `Volume` it was predicted on (see medplib.data.volume):
bool for one structure, or an integer label map (0 background). Reading a mask back against a
reference volume returns it in that volume's voxel order, checked to occupy the same world
coordinates, whatever orientation the file was stored in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from medplib.data.volume import Volume, VolumeSource
from medplib.errors import InputError

_AFFINE_TOL = 1e-3  # mm: masks and their reference agree this closely, or they do not line up


def _check_mask(mask: np.ndarray, like: Volume, what: str = "mask") -> np.ndarray:
    mask = np.asarray(mask)
    if mask.shape != like.shape:
        raise InputError(f"{what} of shape {tuple(mask.shape)} does not match the volume's {like.shape}")
    if mask.dtype != np.bool_ and mask.dtype.kind not in "iu":
        raise InputError(f"{what} must be bool or an integer label map, got {mask.dtype}")
    if mask.dtype.kind in "iu" and mask.size and (mask.min() < 0 or mask.max() > np.iinfo(np.uint16).max):
        raise InputError(f"{what} labels must lie in 0..65535, got {mask.min()}..{mask.max()}")
    return mask


# ---- NIfTI ----

def write_nifti_mask(mask: np.ndarray, like: Volume, path: str | Path) -> Path:
    """Save an (I, J, K) bool mask or label map aligned with `like` as NIfTI (uint8, or uint16 for
    labels above 255) with `like.affine` as both qform and sform, so it overlays the input in any viewer."""
    import nibabel as nib

    mask = _check_mask(mask, like)
    dtype = np.uint8 if mask.dtype == np.bool_ or mask.max(initial=0) <= 255 else np.uint16
    img = nib.Nifti1Image(np.asarray(mask, dtype=dtype), like.affine)
    img.set_qform(like.affine, code=1)  # 1 = scanner coordinates: the input's world space
    img.set_sform(like.affine, code=1)
    path = Path(path)
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        raise InputError(f"{path}: a NIfTI mask file must end in .nii or .nii.gz")
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def read_nifti_mask(path: str | Path, like: Volume | None = None) -> Volume:
    """A NIfTI mask or label map -> Volume with integer voxels. With `like`, the voxels are reordered
    (axis permutations and flips, no resampling) into `like`'s voxel order and must then share its
    affine and shape; otherwise they are in closest-canonical RAS order."""
    import nibabel as nib
    from nibabel import orientations as ornt

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: mask file not found")
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types on corrupt files
        raise InputError(f"{path}: cannot read NIfTI ({exc})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(f"{path}: a mask volume must be 3-D, got shape {data.shape}")
    if data.dtype.kind == "f":
        if not np.all(np.isfinite(data)) or not np.array_equal(data, np.round(data)):
            raise InputError(f"{path}: mask voxels must be whole numbers (a label map), got fractional values")
        data = data.astype(np.int64)
    target = ornt.axcodes2ornt("RAS") if like is None else ornt.io_orientation(like.affine)
    transform = ornt.ornt_transform(ornt.io_orientation(affine), target)
    shape = data.shape
    data = ornt.apply_orientation(data, transform)
    affine = affine @ ornt.inv_ornt_aff(transform, shape)
    if like is not None:
        if data.shape != like.shape or not np.allclose(affine, like.affine, atol=_AFFINE_TOL):
            raise InputError(f"{path}: mask does not line up with the volume (shape {data.shape} vs {like.shape}, "
                             f"affine {np.round(affine, 3).tolist()} vs {np.round(like.affine, 3).tolist()})")
    return Volume(voxels=np.ascontiguousarray(data), affine=affine,
                  source=VolumeSource(format="nifti", paths=(str(path),)), meta={"format": "nifti"})


# ---- DICOM SEG ----

def _source_datasets(like: Volume) -> list[Any]:
    """The headers of the series `like` was read from, checked to be the same instances."""
    import pydicom

    if like.source.format != "dicom" or not like.source.paths:
        raise InputError("a DICOM SEG references a DICOM series: the volume was not read from one "
                         f"(source {like.source.format}); save a NIfTI mask instead")
    out = []
    for path, uid in zip(like.source.paths, like.source.sop_uids):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types on corrupt files
            raise InputError(f"{path}: cannot read the source slice ({type(exc).__name__}: {exc})") from None
        if str(ds.SOPInstanceUID) != uid:
            raise InputError(f"{path}: SOPInstanceUID {ds.SOPInstanceUID} is not the {uid} read before; "
                             "the series changed on disk")
        out.append(ds)
    return out


def write_dicom_seg(masks: np.ndarray | Mapping[str, np.ndarray], like: Volume, path: str | Path, *,
                    omit_empty_frames: bool = True, series_description: str = "medplib segmentation") -> Path:
    """Save binary masks over a DICOM series as one DICOM SEG with a segment per label. `masks` is an
    (I, J, K) bool mask (label 'mask') or {label: mask}; `like` is the volume read with
    read_dicom_series. Each frame references its source slice; empty slices are left out unless
    `omit_empty_frames` is False. Segment types are coded generically (SCT 'Tissue'): the label
    names the structure."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    import medplib

    if not isinstance(masks, Mapping):
        masks = {"mask": masks}
    if not masks:
        raise InputError("no masks to save")
    stack = []
    for label, mask in masks.items():
        mask = _check_mask(mask, like, f"mask {label!r}")
        stack.append(mask.astype(bool).transpose(2, 1, 0))  # (I, J, K) -> (slices, rows, columns)
    pixels = np.stack(stack, axis=-1)  # (slices, rows, columns, segments)
    if not pixels.any():
        raise InputError("all masks are empty: a DICOM SEG needs at least one foreground voxel")
    algorithm = hd.AlgorithmIdentificationSequence(name="medplib", version=medplib.__version__,
                                                   family=codes.cid7162.ArtificialIntelligence)
    segments = [hd.seg.SegmentDescription(segment_number=n, segment_label=str(label)[:64],
                                          segmented_property_category=codes.SCT.Tissue,
                                          segmented_property_type=codes.SCT.Tissue,
                                          algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                                          algorithm_identification=algorithm)
                for n, label in enumerate(masks, start=1)]
    sources = _source_datasets(like)
    try:
        seg = hd.seg.Segmentation(
            source_images=sources, pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=segments, series_instance_uid=hd.UID(), series_number=int(sources[0].get(
                "SeriesNumber", 0) or 0) + 1000, sop_instance_uid=hd.UID(), instance_number=1,
            manufacturer="medplib", manufacturer_model_name="medplib", software_versions=medplib.__version__,
            device_serial_number="0", omit_empty_frames=omit_empty_frames, series_description=series_description)
    except (ValueError, TypeError, AttributeError) as exc:  # highdicom validates the source headers
        raise InputError(f"cannot build a DICOM SEG over series {like.source.series_uid}: {exc}") from None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path)
    return path


def read_dicom_seg_volume(path: str | Path, like: Volume) -> dict[str, np.ndarray]:
    """A DICOM SEG over the series of `like` -> {segment label: (I, J, K) bool} in `like`'s voxel
    order. The SEG must reference `like`'s series; slices it has no frame for are empty."""
    import highdicom as hd

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: mask file not found")
    try:
        seg = hd.seg.segread(path)
    except Exception as exc:  # noqa: BLE001 - pydicom/highdicom raise many types on bad files
        raise InputError(f"{path}: cannot read DICOM SEG ({type(exc).__name__}: {exc})") from None
    referenced = {str(item.SeriesInstanceUID) for item in seg.get("ReferencedSeriesSequence", [])}
    if like.source.series_uid not in referenced:
        raise InputError(f"{path}: the SEG references series {sorted(referenced)}, not the volume's "
                         f"{like.source.series_uid}")
    numbers = [int(s.SegmentNumber) for s in seg.SegmentSequence]
    try:
        pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=list(like.source.sop_uids),
                                                   segment_numbers=numbers, assert_missing_frames_are_empty=True)
    except (ValueError, KeyError) as exc:
        raise InputError(f"{path}: frames do not map onto the volume's slices ({exc})") from None
    # (slices, rows, columns, segments) -> one (I, J, K) bool per segment
    return {str(s.SegmentLabel): pixels[..., n].transpose(2, 1, 0) > 0 for n, s in enumerate(seg.SegmentSequence)}


# ---- DICOM series ----

def _storage(voxels: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Voxels -> (stored int16/uint16 values, slope, intercept): integer volumes that fit int16 are
    stored as they are, anything else linearly over 0..65535."""
    finite = voxels[np.isfinite(voxels)]
    if finite.size != voxels.size:
        raise InputError("a DICOM series cannot store NaN or infinite voxels")
    lo, hi = float(finite.min()), float(finite.max())
    if np.array_equal(voxels, np.round(voxels)) and lo >= -32768 and hi <= 32767:
        return voxels.astype(np.int16), 1.0, 0.0
    slope = (hi - lo) / 65535.0 if hi > lo else 1.0
    return np.round((voxels - lo) / slope).astype(np.uint16), slope, lo


def write_dicom_series(volume: Volume, folder: str | Path, *, modality: str = "CT", patient_id: str = "ANON",
                       series_description: str = "", study_uid: str | None = None) -> list[Path]:
    """Write `volume` as a DICOM series (CT or MR Image Storage, one file per k slice, named by slice
    number) with ImagePositionPatient, ImageOrientationPatient, PixelSpacing and SliceThickness from
    its affine and a RescaleSlope/Intercept keeping the values; read_dicom_series reads it back
    voxel for voxel. The i and j axes must be orthogonal (DICOM pixels are rectangular)."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    from pydicom.valuerep import format_number_as_ds

    sop_class = {"CT": pydicom.uid.CTImageStorage, "MR": pydicom.uid.MRImageStorage}.get(modality)
    if sop_class is None:
        raise InputError(f"modality {modality!r}: write CT or MR")
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ volume.affine
    col_step, row_step, slice_step = lps[:3, 0], lps[:3, 1], lps[:3, 2]
    dx, dy, dz = volume.spacing
    row_cos, col_cos = col_step / dx, row_step / dy
    if abs(float(row_cos @ col_cos)) > 1e-6:
        raise InputError("the volume's i and j axes are not orthogonal: DICOM cannot store sheared pixels")
    normal = np.cross(row_cos, col_cos)
    stored, slope, intercept = _storage(volume.voxels)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid, frame_uid = generate_uid(), generate_uid()
    paths = []
    for k in range(volume.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Anonymous^", patient_id, "", ""
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20000101"
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "000000"
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, 1, k + 1
        ds.SeriesDescription, ds.Manufacturer = series_description, "medplib"
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        position = lps[:3, 3] + k * slice_step
        ds.ImagePositionPatient = [round(float(v), 6) for v in position]
        ds.ImageOrientationPatient = [round(float(v), 8) for v in (*row_cos, *col_cos)]
        ds.PixelSpacing = [round(dy, 6), round(dx, 6)]  # (row spacing, column spacing)
        ds.SliceThickness = round(dz, 6)
        ds.SliceLocation = round(float(position @ normal), 6)
        ds.PositionReferenceIndicator = ""
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1 if stored.dtype == np.int16 else 0
        ds.RescaleSlope, ds.RescaleIntercept = format_number_as_ds(slope), format_number_as_ds(intercept)
        if modality == "CT":
            ds.RescaleType, ds.KVP = "HU", ""
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        path = folder / f"slice_{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
