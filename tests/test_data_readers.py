"""Readers on real files: pydicom's CT/MR/ultrasound/SEG files, nibabel's anatomical.nii, 16-bit
PNG and TIFF, label maps, NPZ and COCO RLE (checked against pycocotools)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from medplib.data.dicom import WINDOW_PRESETS, read_dicom
from medplib.data.images import read_image
from medplib.data.masks import read_dicom_seg, read_label_map, read_mask, rle_decode, rle_encode
from medplib.errors import InputError


def dicom_file(name: str) -> Path:
    return Path(pydicom.data.get_testdata_file(name))


def test_ct_small_gives_hounsfield_units_and_presets() -> None:
    ds = pydicom.dcmread(dicom_file("CT_small.dcm"))
    img = read_image(dicom_file("CT_small.dcm"))
    expected = ds.pixel_array.astype(float) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert np.array_equal(img.raw, expected) and img.rgb.shape == (128, 128, 3)
    assert img.meta["window_source"] == "minmax"  # CT_small has no window tags
    lung = read_dicom(dicom_file("CT_small.dcm"), window="ct-lung")
    center, width = WINDOW_PRESETS["ct-lung"]
    hu = expected[64, 64]
    want = np.clip((hu - (center - width / 2)) / width, 0, 1) * 255
    assert abs(int(lung.rgb[64, 64, 0]) - want) <= 1
    bone = read_image(f"{dicom_file('CT_small.dcm')}#window=ct-bone")
    assert not np.array_equal(bone.rgb, lung.rgb)


def test_mr_small_uses_window_tags_and_monochrome1_inverts(tmp_path: Path) -> None:
    mr = read_image(dicom_file("MR_small.dcm"))
    assert mr.meta["window_source"] == "tags" and mr.meta["window"] == (600.0, 1600.0)
    ds = pydicom.dcmread(dicom_file("MR_small.dcm"))
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "mono1.dcm")
    inverted = read_image(tmp_path / "mono1.dcm")
    assert np.array_equal(inverted.rgb, 255 - mr.rgb)
    assert np.array_equal(inverted.raw, mr.raw)


def test_ultrasound_rgb_and_multiframe() -> None:
    us = read_image(dicom_file("examples_rgb_color.dcm"))
    assert us.meta["modality"] == "US" and us.rgb.shape == (240, 320, 3)
    assert np.array_equal(us.rgb, pydicom.dcmread(dicom_file("examples_rgb_color.dcm")).pixel_array)
    multi = read_image(f"{dicom_file('SC_rgb_rle_2frame.dcm')}#frame=1")
    frames = pydicom.dcmread(dicom_file("SC_rgb_rle_2frame.dcm")).pixel_array
    assert multi.meta["n_frames"] == 2 and np.array_equal(multi.rgb, frames[1])
    with pytest.raises(InputError, match="frame 5 out of range"):
        read_image(f"{dicom_file('SC_rgb_rle_2frame.dcm')}#frame=5")


def test_liver_dicom_seg() -> None:
    frames = read_dicom_seg(dicom_file("liver_1frame.dcm"))
    assert [(f.segment, f.label) for f in frames] == [(1, "Liver")]
    mask = read_mask(str(dicom_file("liver_1frame.dcm")))
    assert mask.shape == (512, 512)
    assert int(mask.sum()) == int(pydicom.dcmread(dicom_file("liver_1frame.dcm")).pixel_array.sum())
    assert np.array_equal(read_mask(f"{dicom_file('liver_1frame.dcm')}#1"), mask)
    with pytest.raises(InputError, match="no segment 2"):
        read_mask(f"{dicom_file('liver_1frame.dcm')}#2")


def test_nifti_slices_are_canonical() -> None:
    import nibabel as nib
    from nibabel.testing import data_path

    path = Path(data_path) / "anatomical.nii"
    canon = nib.as_closest_canonical(nib.load(path)).get_fdata()
    for axis in (0, 1, 2):
        img = read_image(f"{path}#axis={axis},index=10")
        plane = np.take(canon, 10, axis=axis)
        assert np.allclose(img.raw, plane.T[::-1, ::-1])
        assert img.rgb.shape == (*plane.T.shape, 3) and img.rgb.dtype == np.uint8
    middle = read_image(path)
    assert middle.meta["index"] == canon.shape[2] // 2
    with pytest.raises(InputError, match="out of range"):
        read_image(f"{path}#axis=2,index=999")


def test_16bit_png_and_tiff_keep_raw_values(tmp_path: Path) -> None:
    values = (np.arange(40 * 30, dtype=np.uint16).reshape(40, 30) * 50)
    for name in ("x.png", "x.tif"):
        Image.fromarray(values).save(tmp_path / name)
        img = read_image(tmp_path / name)
        assert np.array_equal(img.raw, values)
        assert img.rgb.shape == (40, 30, 3) and img.rgb[0, 0, 0] == 0 and img.rgb[-1, -1, 0] == 255
    Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(tmp_path / "rgb.jpg")
    assert read_image(tmp_path / "rgb.jpg").rgb.shape == (4, 5, 3)


def test_png_masks_label_maps_and_npz(tmp_path: Path) -> None:
    labels = np.zeros((6, 7), np.uint8)
    labels[1:3, 1:3], labels[4:, 4:] = 1, 2
    Image.fromarray(labels).save(tmp_path / "lab.png")
    assert read_mask("lab.png", tmp_path).sum() == 4 + 6  # any value >= 1
    parts = read_label_map(tmp_path / "lab.png", {1: "liver", 2: "spleen", 3: "kidney"})
    assert set(parts) == {"liver", "spleen"} and parts["spleen"].sum() == 6
    assert np.array_equal(read_mask("lab.png#2", tmp_path), parts["spleen"])
    np.savez(tmp_path / "m.npz", liver=labels == 1, spleen=labels == 2)
    assert np.array_equal(read_mask("m.npz#liver", tmp_path), labels == 1)
    with pytest.raises(InputError, match="name one"):
        read_mask("m.npz", tmp_path)
    with pytest.raises(InputError, match="mask is 7x6"):
        read_mask("lab.png", tmp_path, size=(7, 6))


def test_rle_matches_pycocotools() -> None:
    coco = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (5, 9), (37, 23), (64, 64)]:
        for density in (0.0, 0.3, 1.0):
            mask = rng.random(shape) < density
            ref = coco.encode(np.asfortranarray(mask.astype(np.uint8)))
            ours = rle_encode(mask)
            assert ours.counts == ref["counts"].decode() and list(ours.size) == ref["size"]
            assert np.array_equal(rle_decode({"size": ref["size"], "counts": ref["counts"].decode()}), mask)
            assert np.array_equal(rle_decode(rle_encode(mask, compressed=False)), mask)
