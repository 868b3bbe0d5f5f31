"""Mask volumes out and back: NIfTI masks line up with their input in world coordinates (checked
with nibabel), DICOM SEG objects reference the source series frame by frame (checked with pydicom
and highdicom), on the nilearn MNI152 and on a DICOM series cut from pydicom's CT_small.dcm."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from test_volume import mni_file, write_series

from medplib.data.dicom_series import read_dicom_series
from medplib.data.masks import read_dicom_seg
from medplib.data.nifti import read_nifti_volume
from medplib.data.volume import Volume
from medplib.data.volume_io import read_dicom_seg_volume, read_nifti_mask, write_dicom_seg, write_nifti_mask
from medplib.errors import InputError


@pytest.fixture()
def ct_series(tmp_path: Path) -> Volume:
    write_series(tmp_path / "ct", n=6)
    return read_dicom_series(tmp_path / "ct")


def _world_set(vol: Volume, mask: np.ndarray) -> set[tuple[float, ...]]:
    return {tuple(p) for p in np.round(vol.world(np.argwhere(mask)), 3)}


def test_nifti_mask_on_mni_lines_up_in_world_coordinates(tmp_path: Path) -> None:
    t1 = read_nifti_volume(mni_file("t1"))
    wm = read_nifti_volume(mni_file("wm")).voxels > 0.5 * 255
    path = write_nifti_mask(wm, t1, tmp_path / "wm_mask.nii.gz")
    img = nib.load(path)  # third-party reader
    assert np.array_equal(img.affine, t1.affine) and img.header.get_data_dtype() == np.uint8
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
    data = np.asarray(img.dataobj).astype(bool)
    assert np.array_equal(data, wm)
    # a voxel of the mask and the same voxel of the input map to one world point, on white matter
    ijk = np.argwhere(data)[::5000]
    assert np.allclose(nib.affines.apply_affine(img.affine, ijk), t1.world(ijk))
    assert t1.voxels[data].mean() > t1.voxels[t1.voxels > 0].mean()  # T1: the masked voxels are bright
    back = read_nifti_mask(path, like=t1)
    assert np.array_equal(back.voxels.astype(bool), wm)


def test_nifti_mask_over_an_lps_dicom_series(tmp_path: Path, ct_series: Volume) -> None:
    mask = np.zeros(ct_series.shape, dtype=bool)
    mask[10:40, 60:70, 1:4] = True  # columns 10..39, rows 60..69, slices 1..3
    path = write_nifti_mask(mask, ct_series, tmp_path / "mask.nii")
    img = nib.load(path)
    assert np.allclose(img.affine, ct_series.affine) and "".join(nib.aff2axcodes(img.affine)) == "LPS"
    assert _world_set(ct_series, np.asarray(img.dataobj) > 0) == _world_set(ct_series, mask)
    same = read_nifti_mask(path, like=ct_series)
    assert np.array_equal(same.voxels > 0, mask)
    canonical = read_nifti_mask(path)  # without a reference: RAS voxel order, same place in the world
    assert canonical.orientation == "RAS" and not np.array_equal(canonical.voxels > 0, mask)
    assert _world_set(canonical, canonical.voxels > 0) == _world_set(ct_series, mask)
    # labels above 255 are kept in uint16
    labels = mask.astype(np.int32) * 300
    assert np.array_equal(read_nifti_mask(write_nifti_mask(labels, ct_series, tmp_path / "l.nii.gz"), ct_series).voxels,
                          labels)


def test_nifti_mask_refuses_what_does_not_line_up(tmp_path: Path, ct_series: Volume) -> None:
    mask = np.zeros(ct_series.shape, dtype=bool)
    with pytest.raises(InputError, match="does not match the volume"):
        write_nifti_mask(mask[:, :, :3], ct_series, tmp_path / "m.nii.gz")
    with pytest.raises(InputError, match="bool or an integer label map"):
        write_nifti_mask(mask.astype(np.float32), ct_series, tmp_path / "m.nii.gz")
    t1 = read_nifti_volume(mni_file("t1"))
    path = write_nifti_mask(np.zeros(t1.shape, bool), t1, tmp_path / "mni.nii.gz")
    with pytest.raises(InputError, match="does not line up"):
        read_nifti_mask(path, like=ct_series)
    shifted = Volume(t1.voxels, t1.affine + _shift(2.0))  # 2 mm to the right: same shape, wrong place
    with pytest.raises(InputError, match="does not line up"):
        read_nifti_mask(path, like=shifted)


def _shift(mm: float) -> np.ndarray:
    out = np.zeros((4, 4))
    out[0, 3] = mm
    return out


def test_dicom_seg_references_the_series(tmp_path: Path, ct_series: Volume) -> None:
    liver = np.zeros(ct_series.shape, dtype=bool)
    liver[20:60, 30:90, 1:5] = True  # slices 1..4
    lesion = np.zeros(ct_series.shape, dtype=bool)
    lesion[70:80, 70:75, 3] = True  # slice 3 only
    path = write_dicom_seg({"liver": liver, "lesion": lesion}, ct_series, tmp_path / "seg.dcm")
    ds = pydicom.dcmread(path)  # third-party reader
    assert ds.Modality == "SEG" and ds.SegmentationType == "BINARY"
    assert [s.SegmentLabel for s in ds.SegmentSequence] == ["liver", "lesion"]
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == ct_series.source.series_uid
    assert ds.StudyInstanceUID == ct_series.source.study_uid
    assert ds.FrameOfReferenceUID == ct_series.source.frame_of_reference_uid
    assert int(ds.NumberOfFrames) == 4 + 1  # one frame per non-empty (slice, segment)
    sources = pydicom.dcmread(ct_series.source.paths[0])
    for item in ds.PerFrameFunctionalGroupsSequence:
        ref = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        k = ct_series.source.sop_uids.index(ref)
        position = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        source = pydicom.dcmread(ct_series.source.paths[k])
        assert np.allclose(position, [float(v) for v in source.ImagePositionPatient])
        segment = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        assert k in ((1, 2, 3, 4) if segment == 1 else (3,))
    assert sources.SOPClassUID == ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPClassUID
    seg = hd.seg.segread(path)  # highdicom reads it back too
    assert {uid for _, _, uid in seg.get_source_image_uids()} <= set(ct_series.source.sop_uids)
    back = read_dicom_seg_volume(path, ct_series)
    assert set(back) == {"liver", "lesion"}
    assert np.array_equal(back["liver"], liver) and np.array_equal(back["lesion"], lesion)
    frames = read_dicom_seg(path)  # the project's 2-D SEG reader sees the same frames
    assert len(frames) == 5 and sorted({f.label for f in frames}) == ["lesion", "liver"]
    assert sum(int(f.mask.sum()) for f in frames) == int(liver.sum() + lesion.sum())


def test_dicom_seg_with_every_frame_and_its_errors(tmp_path: Path, ct_series: Volume) -> None:
    mask = np.zeros(ct_series.shape, dtype=bool)
    mask[5:9, 5:9, 2] = True
    path = write_dicom_seg(mask, ct_series, tmp_path / "all.dcm", omit_empty_frames=False)
    assert int(pydicom.dcmread(path).NumberOfFrames) == ct_series.shape[2]
    assert np.array_equal(read_dicom_seg_volume(path, ct_series)["mask"], mask)
    with pytest.raises(InputError, match="all masks are empty"):
        write_dicom_seg(np.zeros_like(mask), ct_series, tmp_path / "empty.dcm")
    t1 = read_nifti_volume(mni_file("t1"))
    with pytest.raises(InputError, match="not read from one"):
        write_dicom_seg(np.ones(t1.shape, bool), t1, tmp_path / "nifti.dcm")
    write_series(tmp_path / "other", n=6, seed=5)
    other = read_dicom_series(tmp_path / "other")
    with pytest.raises(InputError, match=f"not the volume's {other.source.series_uid}"):
        read_dicom_seg_volume(path, other)
    Path(ct_series.source.paths[0]).unlink()
    with pytest.raises(InputError, match="cannot read the source slice"):
        write_dicom_seg(mask, ct_series, tmp_path / "gone.dcm")
