"""Volume readers on real files: DICOM series cut from pydicom's CT_small.dcm and MR_small.dcm with
real geometry tags in shuffled file order, broken series, the nilearn MNI152 NIfTI, 3-D phantoms,
and the volume metrics against hand-computed cases with anisotropic voxels."""

from __future__ import annotations

import importlib.resources
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from scipy import ndimage
from scipy.spatial.distance import cdist

from medplib.data.dicom_series import read_dicom_series
from medplib.data.nifti import read_nifti_slice, read_nifti_volume
from medplib.data.phantoms3d import make_phantom_volume, write_phantom_volume
from medplib.errors import InputError
from medplib.evaluation.volumes import dice_3d, hausdorff_95, score_volume


def mni_file(kind: str = "t1") -> Path:
    """The MNI152 2009a template shipped inside the nilearn package (t1, gm or wm)."""
    folder = importlib.resources.files("nilearn.datasets") / "data"
    return Path(str(folder / f"mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz"))


def write_series(folder: Path, template: str = "CT_small.dcm", n: int = 6, step: float = 2.5,
                 tilt: tuple[float, ...] | None = None, seed: int = 0) -> list[tuple[Path, np.ndarray, np.ndarray]]:
    """n slices cut from a pydicom test file: each gets its own pixels (the template's, rolled), an
    ImagePositionPatient `step` mm apart along the slice normal and a rescale, written under
    shuffled, meaningless file names. Returns (path, expected raw values (rows, cols), position) in
    slice order."""
    src = pydicom.dcmread(get_testdata_file(template))
    orient = np.asarray([float(v) for v in (tilt or src.ImageOrientationPatient)])
    normal = np.cross(orient[:3], orient[3:])
    origin = np.asarray([float(v) for v in src.ImagePositionPatient])
    series_uid = generate_uid()
    rng = np.random.default_rng(seed)
    names = [f"IM{int(v):05d}" for v in rng.permutation(n) * 7 + 11]  # file order says nothing about position
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for k in range(n):
        ds = pydicom.dcmread(get_testdata_file(template))
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in orient]
        position = origin + k * step * normal
        ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
        ds.SliceThickness = step
        ds.InstanceNumber = n - k  # reversed, so instance numbers mislead too
        pixels = np.roll(ds.pixel_array, 3 * k, axis=1)
        ds.PixelData = pixels.astype(ds.pixel_array.dtype).tobytes()
        ds.RescaleSlope, ds.RescaleIntercept = 1 + k % 2, -1024 + k
        path = folder / names[k]
        ds.save_as(path)
        out.append((path, pixels.astype(np.float64) * (1 + k % 2) + (-1024 + k), position))
    return out


def test_shuffled_series_reads_in_slice_order(tmp_path: Path) -> None:
    written = write_series(tmp_path / "ct")
    assert [p.name for p, _, _ in written] != sorted(p.name for p, _, _ in written)
    vol = read_dicom_series(tmp_path / "ct")
    assert vol.shape == (128, 128, 6) and vol.voxels.dtype == np.float32
    for k, (path, raw, _) in enumerate(written):
        assert np.array_equal(vol.voxels[:, :, k].T, raw), f"slice {k} ({path.name}) out of place"
    assert vol.source.paths == tuple(str(p) for p, _, _ in written)
    first = pydicom.dcmread(written[0][0])
    assert vol.source.series_uid == first.SeriesInstanceUID and vol.source.study_uid == first.StudyInstanceUID
    assert vol.source.sop_uids == tuple(pydicom.dcmread(p).SOPInstanceUID for p, _, _ in written)
    assert np.allclose(vol.spacing, (0.661468, 0.661468, 2.5), atol=1e-5) and vol.orientation == "LPS"
    # voxel (i=col, j=row, k) sits where DICOM says: IPP + col * dc * row_cos + row * dr * col_cos, in LPS
    ijk = np.asarray([[5, 9, 3]])
    lps = written[3][2] + 5 * 0.661468 * np.array([1, 0, 0]) + 9 * 0.661468 * np.array([0, 1, 0])
    assert np.allclose(vol.world(ijk)[0], lps * [-1, -1, 1], atol=1e-3)
    assert np.allclose(vol.voxel(vol.world(ijk)), ijk)
    assert sorted(vol.meta["rescale"]) == sorted({(1.0 + k % 2, -1024.0 + k) for k in range(6)})


def test_oblique_mr_series_sorts_along_its_normal(tmp_path: Path) -> None:
    # An oblique plane whose normal points mostly along -y: sorting by z or by name would be wrong.
    c, s = np.cos(np.radians(70)), np.sin(np.radians(70))
    written = write_series(tmp_path / "mr", "MR_small.dcm", n=5, step=0.8, tilt=(1, 0, 0, 0, c, s), seed=3)
    vol = read_dicom_series(tmp_path / "mr")
    for k, (_, raw, _) in enumerate(written):
        assert np.array_equal(vol.voxels[:, :, k].T, raw)
    normal = np.cross([1, 0, 0], [0, c, s])
    assert np.allclose(vol.affine[:3, 2], 0.8 * normal * [-1, -1, 1], atol=1e-4)
    assert vol.spacing[2] == pytest.approx(0.8, abs=1e-4)


def test_two_series_mixed_are_named_and_one_can_be_picked(tmp_path: Path) -> None:
    write_series(tmp_path / "mix", n=4)
    write_series(tmp_path / "other", n=3, seed=1)
    for p in (tmp_path / "other").iterdir():
        shutil.copy(p, tmp_path / "mix" / f"X{p.name}")
    with pytest.raises(InputError, match="2 series mixed") as err:
        read_dicom_series(tmp_path / "mix")
    other_uid = pydicom.dcmread(next((tmp_path / "other").iterdir())).SeriesInstanceUID
    assert other_uid in str(err.value) and "3 file(s)" in str(err.value) and "4 file(s)" in str(err.value)
    assert read_dicom_series(tmp_path / "mix", series_uid=other_uid).shape[2] == 3


def test_missing_slice_names_the_neighbours(tmp_path: Path) -> None:
    written = write_series(tmp_path / "gap", n=6)
    written[3][0].unlink()
    with pytest.raises(InputError, match="slice gap") as err:
        read_dicom_series(tmp_path / "gap")
    msg = str(err.value)
    assert written[2][0].name in msg and written[4][0].name in msg and "about 1 missing" in msg


def test_uneven_spacing_warns_and_duplicates_fail(tmp_path: Path) -> None:
    written = write_series(tmp_path / "uneven", n=5)
    ds = pydicom.dcmread(written[2][0])
    pos = np.asarray([float(v) for v in ds.ImagePositionPatient])
    ds.ImagePositionPatient = [f"{v:.4f}" for v in pos + [0, 0, 0.4]]  # 2.9 mm then 2.1 mm
    ds.save_as(written[2][0])
    with pytest.warns(UserWarning, match="uneven slice spacing") as rec:
        vol = read_dicom_series(tmp_path / "uneven")
    assert written[2][0].name in str(rec[0].message) and vol.meta["uneven_spacing"]
    ds.ImagePositionPatient = [f"{v:.4f}" for v in written[1][2]]
    ds.save_as(written[2][0])
    with pytest.raises(InputError, match="same position") as err:
        read_dicom_series(tmp_path / "uneven")
    assert written[1][0].name in str(err.value) and written[2][0].name in str(err.value)


def test_corrupt_and_foreign_files(tmp_path: Path) -> None:
    written = write_series(tmp_path / "bad", n=4)
    (tmp_path / "bad" / "README.txt").write_text("exported by a PACS\n")
    vol = read_dicom_series(tmp_path / "bad")
    assert vol.meta["skipped"] == ["README.txt"] and vol.shape[2] == 4
    data = written[1][0].read_bytes()
    written[1][0].write_bytes(data[: len(data) // 2])  # truncated in the pixel data
    (tmp_path / "bad" / "broken.dcm").write_bytes(b"\x00" * 128 + b"DICM" + b"\xff" * 40)  # a mangled header
    with pytest.raises(InputError, match="corrupt DICOM") as err:
        read_dicom_series(tmp_path / "bad")
    assert "broken.dcm" in str(err.value)
    (tmp_path / "bad" / "broken.dcm").unlink()
    with pytest.raises(InputError, match="corrupt DICOM") as err:
        read_dicom_series(tmp_path / "bad")
    assert written[1][0].name in str(err.value)


def test_series_with_different_orientation_or_no_geometry(tmp_path: Path) -> None:
    written = write_series(tmp_path / "loc", n=4)
    ds = pydicom.dcmread(written[0][0])
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]  # a sagittal localizer in the axial series
    ds.save_as(written[0][0])
    with pytest.raises(InputError, match="ImageOrientationPatient differs") as err:
        read_dicom_series(tmp_path / "loc")
    assert written[0][0].name in str(err.value)
    del ds.ImagePositionPatient
    ds.save_as(written[0][0])
    with pytest.raises(InputError, match=f"ImagePositionPatient missing in {written[0][0].name}"):
        read_dicom_series(tmp_path / "loc")
    with pytest.raises(InputError, match="not found"):
        read_dicom_series(tmp_path / "nowhere")


def test_mni_nifti_volume_keeps_its_affine() -> None:
    path = mni_file("t1")
    img = nib.load(path)
    vol = read_nifti_volume(path)
    assert vol.shape == img.shape == (197, 233, 189) and vol.orientation == "RAS"
    assert np.array_equal(vol.affine, img.affine) and vol.spacing == (1.0, 1.0, 1.0)
    assert np.array_equal(vol.voxels, np.asarray(img.dataobj, dtype=np.float32))
    assert vol.source.format == "nifti" and vol.source.paths == (str(path),)
    # world coordinates land on anatomy: centrum semiovale (MNI +-26, -20, 30 mm) is white matter,
    # the precentral cortex (-40, -20, 50) grey matter; the maps beside the T1 store 0..255
    wm, gm = read_nifti_volume(mni_file("wm")), read_nifti_volume(mni_file("gm"))
    assert np.array_equal(wm.affine, vol.affine) and np.array_equal(gm.affine, vol.affine)
    white = [tuple(v) for v in np.round(vol.voxel([[-26.0, -20.0, 30.0], [26.0, -20.0, 30.0]])).astype(int)]
    grey = tuple(np.round(vol.voxel([[-40.0, -20.0, 50.0]])[0]).astype(int))
    assert all(wm.voxels[c] > 0.9 * 255 for c in white) and gm.voxels[grey] > 0.6 * 255
    assert min(vol.voxels[c] for c in white) > vol.voxels[grey]  # T1-weighted: white matter is brighter
    # the slice reader and the volume reader agree
    mid = read_nifti_slice(path, axis=2, index=94)
    assert np.allclose(mid.raw, vol.voxels[:, :, 94].T[::-1, ::-1])


def test_nifti_in_another_orientation_is_made_canonical(tmp_path: Path) -> None:
    img = nib.load(mni_file("gm"))
    data = np.asarray(img.dataobj)[::-1, :, ::-1].transpose(1, 0, 2)  # LAI-ish storage: permuted and flipped
    flip = nib.orientations.inv_ornt_aff(np.array([[1, -1], [0, 1], [2, -1]]), img.shape)
    affine = img.affine @ flip
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "gm_pli.nii.gz")
    vol = read_nifti_volume(tmp_path / "gm_pli.nii.gz")
    assert vol.orientation == "RAS" and np.allclose(vol.affine, img.affine)
    assert np.allclose(vol.voxels, np.asarray(img.dataobj, dtype=np.float32))


def test_bad_nifti_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not a nifti at all")
    with pytest.raises(InputError, match="broken.nii.gz: cannot read NIfTI"):
        read_nifti_volume(bad)


def test_phantom_volumes_are_exact_and_survive_dicom(tmp_path: Path) -> None:
    ph = make_phantom_volume("ct", seed=2, shape=(48, 40, 16), spacing=(3.0, 3.0, 6.0))
    assert set(ph.labels) == {"liver", "spleen", "right kidney", "left kidney", "aorta", "vertebra", "lesion"}
    labels = list(ph.labels.values())
    total = np.sum(labels, axis=0)
    assert total.max() == 1 and all(m.any() for m in labels)  # disjoint, none empty
    # exact: every labelled voxel carries its structure's intensity band, e.g. bone above 300 HU
    assert ph.volume.voxels[ph.labels["vertebra"]].min() > 300
    assert ph.volume.voxels[ph.labels["aorta"]].mean() == pytest.approx(200, abs=3)
    x_liver = ph.volume.world(np.argwhere(ph.labels["liver"]))[:, 0].mean()
    assert x_liver > 0 > ph.volume.world(np.argwhere(ph.labels["spleen"]))[:, 0].mean()  # liver on the right (RAS +x)
    again = make_phantom_volume("ct", seed=2, shape=(48, 40, 16), spacing=(3.0, 3.0, 6.0))
    assert np.array_equal(again.volume.voxels, ph.volume.voxels)
    paths = write_phantom_volume(ph, tmp_path / "ph", dicom=True)
    series = read_dicom_series(paths["dicom"])
    assert np.array_equal(series.voxels, ph.volume.voxels) and np.allclose(series.affine, ph.volume.affine)
    label_map = nib.load(paths["labels"])
    assert np.allclose(label_map.affine, ph.volume.affine)
    assert int((np.asarray(label_map.dataobj) == 1).sum()) == int(ph.labels["liver"].sum())
    mr = make_phantom_volume("mr", seed=0, shape=(40, 48, 32))
    assert set(mr.labels) == {"brain", "ventricle", "tumor"}
    with pytest.raises(InputError, match="unknown 3-D phantom modality"):
        make_phantom_volume("xray")


# ---- metrics: hand-computed cases, voxels of 0.5 x 1 x 3 mm ----

SPACING = (0.5, 1.0, 3.0)


def _plane(axis: int, index: int, shape: tuple[int, int, int] = (10, 10, 10)) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    sl = [slice(None)] * 3
    sl[axis] = index
    m[tuple(sl)] = True
    return m


def test_hd95_of_parallel_planes_uses_each_axis_spacing() -> None:
    # one-voxel-thick planes are all surface; every voxel is the same distance from the other plane
    assert hausdorff_95(_plane(2, 2), _plane(2, 5), SPACING) == pytest.approx(9.0)  # 3 slices x 3 mm
    assert hausdorff_95(_plane(0, 1), _plane(0, 4), SPACING) == pytest.approx(1.5)  # 3 columns x 0.5 mm
    assert hausdorff_95(_plane(1, 0), _plane(1, 9), SPACING) == pytest.approx(9.0)
    assert hausdorff_95(_plane(2, 2), _plane(2, 2), SPACING) == 0.0
    a, b = np.zeros((10, 10, 10), bool), np.zeros((10, 10, 10), bool)
    a[2, 3, 1], b[5, 7, 3] = True, True
    assert hausdorff_95(a, b, SPACING) == pytest.approx(np.sqrt(1.5**2 + 4.0**2 + 6.0**2))


def test_hd95_ignores_a_small_outlier_and_the_maximum_does_not() -> None:
    gt = _plane(2, 2)  # 100 voxels
    pred = gt.copy()
    pred[4, 4, 8] = True  # one stray voxel 6 slices away: 1 of 101 surface voxels
    assert hausdorff_95(pred, gt, SPACING) == 0.0
    assert hausdorff_95(pred, gt, SPACING, percentile=100) == pytest.approx(18.0)
    pred = gt | _plane(2, 4)  # half the prediction's surface 2 slices off: its 95th percentile is 6 mm
    assert hausdorff_95(pred, gt, SPACING) == pytest.approx(6.0)
    assert hausdorff_95(gt, pred, SPACING) == pytest.approx(6.0)  # symmetric
    assert dice_3d(pred, gt) == pytest.approx(2 * 100 / 300)


def test_hd95_matches_brute_force_surface_distances() -> None:
    rng = np.random.default_rng(0)
    for _ in range(4):
        a, b = (ndimage.gaussian_filter(rng.standard_normal((16, 14, 10)), 2) > 0.1 for _ in range(2))
        surf = [np.argwhere(m & ~ndimage.binary_erosion(m, border_value=0)) * SPACING for m in (a, b)]
        d = cdist(*surf)
        want = max(np.percentile(d.min(axis=1), 95), np.percentile(d.min(axis=0), 95))
        assert hausdorff_95(a, b, SPACING) == pytest.approx(want)


def test_empty_mask_conventions() -> None:
    empty, box = np.zeros((10, 10, 10), bool), np.zeros((10, 10, 10), bool)
    box[2:5, 2:5, 2:5] = True
    assert dice_3d(empty, empty) == 1.0 and dice_3d(empty, empty, both_empty="zero") == 0.0
    assert np.isnan(dice_3d(empty, empty, both_empty="exclude")) and dice_3d(empty, box) == 0.0
    assert hausdorff_95(empty, empty, SPACING) == 0.0
    assert np.isnan(hausdorff_95(empty, empty, SPACING, both_empty="exclude"))
    assert hausdorff_95(empty, box, SPACING) == pytest.approx(np.sqrt(5.0**2 + 10.0**2 + 30.0**2))  # the diagonal
    assert hausdorff_95(box, empty, SPACING, one_empty="inf") == np.inf
    assert np.isnan(hausdorff_95(box, empty, SPACING, one_empty="nan"))
    s = score_volume(box, box, SPACING)
    assert (s.dice, s.hd95_mm) == (1.0, 0.0) and s.gt_ml == pytest.approx(27 * 1.5 / 1000)
    with pytest.raises(InputError, match="must be 3-D of one shape"):
        dice_3d(box, box[:5])
    with pytest.raises(InputError, match="spacing"):
        hausdorff_95(box, box, (1.0, 0.0, 1.0))


def test_read_volume_dispatches_on_what_it_is_given(tmp_path: Path) -> None:
    from medplib.data.volume import read_volume

    written = write_series(tmp_path / "ct", n=4)
    write_series(tmp_path / "other", n=3, seed=1)
    for p in (tmp_path / "other").iterdir():
        shutil.copy(p, tmp_path / "ct" / f"X{p.name}")
    one = read_volume(written[2][0])  # a file: its own series, though the folder holds two
    assert one.shape[2] == 4 and one.source.sop_uids[2] == pydicom.dcmread(written[2][0]).SOPInstanceUID
    assert read_volume(mni_file("gm")).orientation == "RAS"
    with pytest.raises(InputError, match="2 series mixed"):
        read_volume(tmp_path / "ct")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="not a volume"):
        read_volume(tmp_path / "notes.txt")
