"""Volume inference: slices cut and put back in any voxel orientation, masks that line up with the
input (checked against the NIfTI slice reader and in world coordinates with nibabel), a DICOM
series and its NIfTI twin giving the same mask in the world, voxel region prompts reaching the
slices they touch, the VQA default slice, post-processing and batched features.

The model is the session's tiny Kvasir-SEG one (it answers grounding questions with a [SEG]):
these tests check geometry, scores and errors, not segmentation quality."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import KVASIR_QUESTION
from test_volume import mni_file, write_series

from medplib.api import MedPLIB
from medplib.data.dicom_series import read_dicom_series
from medplib.data.nifti import read_nifti_slice, read_nifti_volume
from medplib.data.phantoms3d import make_phantom_volume
from medplib.data.volume import Volume
from medplib.data.volume_io import read_dicom_seg_volume, read_nifti_mask
from medplib.errors import InputError
from medplib.inference import Predictor
from medplib.volume_inference import VolumeSlices, VoxelBox, VoxelPoint, largest_component, slice_consistency


@pytest.fixture(scope="module")
def predictor(kvasir_model: Path) -> Predictor:
    return Predictor.from_pretrained(kvasir_model)


def _world(vol: Volume, mask: np.ndarray) -> set[tuple[float, ...]]:
    return {tuple(p) for p in np.round(vol.world(np.argwhere(mask)), 2)}


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slices_go_back_voxel_for_voxel_in_any_orientation(axis: int) -> None:
    # A permuted, flipped, anisotropic affine (i -> -y, j -> z, k -> -x): no RAS order at all.
    affine = np.array([[0, 0, -1.5, 5], [-2.0, 0, 0, 1], [0, 3.0, 0, 2], [0, 0, 0, 1]])
    rng = np.random.default_rng(axis)
    vol = Volume(voxels=rng.normal(size=(7, 8, 9)).astype(np.float32), affine=affine)
    vs = VolumeSlices(vol, axis)
    assert vs.n == vol.shape[axis]
    mask = rng.random(vol.shape) > 0.5
    assert np.array_equal(vs.assemble({k: vs.view(mask, k) for k in range(vs.n)}), mask)
    # a voxel's footprint on its slice shows that voxel's intensity, windowed
    ijk = (3, 5, 2)
    point = np.zeros(vol.shape, dtype=bool)
    point[ijk] = True
    k = ijk[axis]
    (r, c), = np.argwhere(vs.view(point, k))
    low, high = vs.window
    expected = np.round(np.clip((vol.voxels[ijk] - low) / (high - low), 0, 1) * 255)
    assert vs.image(k)[r, c, 0] == expected
    # the slice is shown in RAS orientation whatever the storage: the display matches the
    # canonical volume's (the NIfTI reader's) view of the same slice
    canonical = nib.as_closest_canonical(nib.Nifti1Image(vol.voxels, affine))
    codes = nib.aff2axcodes(affine)
    ras_axis = "RAS".index({"L": "R", "P": "A", "I": "S"}.get(codes[axis], codes[axis]))
    ras_k = k if codes[axis] in "RAS" else vol.shape[axis] - 1 - k
    plane = np.take(np.asarray(canonical.dataobj), ras_k, axis=ras_axis).T[::-1, ::-1]
    assert np.array_equal(vs.view(vol.voxels, k), plane)


def test_mni_mask_matches_the_slice_reader_and_lines_up_in_the_world(predictor: Predictor, tmp_path: Path) -> None:
    t1 = read_nifti_volume(mni_file("t1"))
    predictor.set_volume(t1, axis=2)
    asked = [80, 96, 112]
    out = predictor.ask_volume(KVASIR_QUESTION, slices=asked)
    assert out.mask.shape == t1.shape and out.mask.dtype == bool and out.slices == asked
    assert out.scores.shape == (t1.shape[2],)
    assert np.all(np.isnan(np.delete(out.scores, asked))) and not np.isnan(out.scores[asked]).any()
    assert set(np.flatnonzero(out.slice_has_mask)) <= set(asked) and out.mask.any()
    assert out.reference == 96 and set(out.texts) == set(asked) and "[SEG]" in out.text

    # Independently of the volume code: the model's 2-D mask on the NIfTI reader's slice image,
    # turned back from display order (rows A at the top, columns R on the left) into (i, j).
    for k in asked:
        image = read_nifti_slice(mni_file("t1"), axis=2, index=k)
        predictor.set_image(image.rgb)
        pred = predictor.ask(KVASIR_QUESTION)
        assert np.array_equal(np.logical_or.reduce(pred.masks)[::-1, ::-1].T, out.mask[:, :, k])

    path = out.save_nifti(tmp_path / "mask.nii.gz")
    img = nib.load(path)  # a third-party reader
    assert img.shape == t1.shape and np.allclose(img.affine, t1.affine)
    data = np.asarray(img.dataobj) > 0
    assert np.array_equal(data, out.mask)
    ijk = np.argwhere(data)[::97]
    assert np.allclose(nib.affines.apply_affine(img.affine, ijk), t1.world(ijk))
    assert np.array_equal(read_nifti_mask(path, like=t1).voxels > 0, out.mask)


def test_dicom_series_and_its_nifti_twin_give_one_mask_in_the_world(predictor: Predictor, tmp_path: Path) -> None:
    write_series(tmp_path / "ct", n=6)  # pydicom's CT_small geometry, shuffled file names
    series = read_dicom_series(tmp_path / "ct")
    twin = tmp_path / "twin.nii.gz"
    nib.save(nib.Nifti1Image(series.voxels, series.affine), str(twin))
    nifti = read_nifti_volume(twin)  # the same voxels in closest-canonical order
    assert series.orientation == "LPS" and nifti.orientation == "RAS"
    predictor.set_volume(tmp_path / "ct", axis=2)  # a folder: read as a DICOM series
    from_dicom = predictor.ask_volume(KVASIR_QUESTION, batch_size=4)
    predictor.set_volume(twin, axis=2)
    from_nifti = predictor.ask_volume(KVASIR_QUESTION, batch_size=4)
    assert from_dicom.slices == from_nifti.slices == list(range(6))
    a, b = _world(series, from_dicom.mask), _world(nifti, from_nifti.mask)
    assert a and len(a & b) / max(len(a), len(b)) >= 0.99
    assert np.allclose(from_dicom.scores, from_nifti.scores, atol=1e-4, equal_nan=True)

    seg = from_dicom.save_dicom_seg(tmp_path / "seg.dcm", label="liver")
    back = read_dicom_seg_volume(seg, series)
    assert np.array_equal(back["liver"], from_dicom.mask)
    import pydicom

    ds = pydicom.dcmread(seg)
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == series.source.series_uid
    assert int(ds.NumberOfFrames) == int(from_dicom.slice_has_mask.sum())
    with pytest.raises(InputError, match="DICOM SEG references a DICOM series"):
        from_nifti.save_dicom_seg(tmp_path / "no.dcm")


def test_voxel_regions_reach_the_slices_they_touch(predictor: Predictor) -> None:
    phantom = make_phantom_volume("mr", seed=1, shape=(40, 40, 12))
    vs = predictor.set_volume(phantom.volume, axis=2)
    out = predictor.ask_volume(KVASIR_QUESTION, [VoxelPoint((20.2, 18.0, 6.6))])
    assert out.slices == [7] and out.mask[:, :, [k for k in range(12) if k != 7]].sum() == 0
    box = VoxelBox((10, 12, 3), (30, 28, 5))
    out = predictor.ask_volume(KVASIR_QUESTION, [box])
    assert out.slices == [3, 4, 5] and out.reference == 4
    assert np.all(np.isnan(out.scores[[0, 1, 2, 6, 7, 8, 9, 10, 11]]))
    # the 2-D prompt on a touched slice is the box's footprint, as displayed
    region = np.zeros(phantom.volume.shape, dtype=bool)
    region[10:31, 12:29, 3:6] = True
    rows, cols = np.nonzero(vs.view(region, 4))
    assert (cols.max() + 1 - cols.min(), rows.max() + 1 - rows.min()) == (21, 17)
    # a free-form 3-D region reaches only the slices where it has voxels
    blob = np.zeros(phantom.volume.shape, dtype=bool)
    blob[15:20, 15:20, 9:11] = True
    assert predictor.ask_volume(KVASIR_QUESTION, [blob], slices="all").slices == [9, 10]
    with pytest.raises(InputError, match="outside the volume"):
        predictor.ask_volume(KVASIR_QUESTION, [VoxelPoint((40, 0, 0))])
    with pytest.raises(InputError, match="share no slice"):
        predictor.ask_volume(KVASIR_QUESTION, [VoxelPoint((1, 1, 1)), VoxelPoint((1, 1, 9))])
    with pytest.raises(InputError, match="not touched by every region"):
        predictor.ask_volume(KVASIR_QUESTION, [box], slices=[8])
    with pytest.raises(InputError, match="out of range"):
        predictor.ask_volume(KVASIR_QUESTION, slices=[12])
    with pytest.raises(InputError, match="unknown post-processing"):
        predictor.ask_volume(KVASIR_QUESTION, postprocess=["smooth"])
    with pytest.raises(InputError, match="axis must be 0, 1 or 2"):
        predictor.set_volume(phantom.volume, axis=3)


def test_vqa_answers_from_the_middle_slice_and_grounding_sweeps() -> None:
    predictor = Predictor(MedPLIB.from_preset("tiny", seed=0))  # random weights: no [SEG] in its answers
    with pytest.raises(InputError, match="no volume is set"):
        predictor.ask_volume("What is shown?")
    phantom = make_phantom_volume("ct", seed=0, shape=(32, 32, 9))
    predictor.set_volume(phantom.volume, axis=1)
    vqa = predictor.ask_volume("Which modality is this?", max_new_tokens=4)
    assert vqa.slices == [16] and vqa.reference == 16 and vqa.text == vqa.texts[16] and not vqa.mask.any()
    assert predictor.ask_volume("Which modality is this?", slices=[3, 5], max_new_tokens=4).slices == [3, 5]
    # a question asking for a mask is asked on every slice even when the reference slice has none
    grounding = predictor.ask_volume("Please segment the liver.", max_new_tokens=4)
    assert grounding.slices == list(range(32)) and len(grounding.texts) == 32


def test_prefetch_batches_the_towers_into_the_cache() -> None:
    m = MedPLIB.from_preset("tiny", seed=0)
    predictor = Predictor(m)
    vs = VolumeSlices(make_phantom_volume("mr", seed=2, shape=(36, 30, 10)).volume, axis=2)
    images = [vs.image(k) for k in range(4)]
    assert predictor.prefetch(images) > 0 and predictor.prefetch(images) == 0.0
    for rgb in images:
        assert predictor.set_image(rgb) == 0.0  # a cache hit
        entry = predictor._current()
        img, feats = m.image_features(rgb)
        with torch.no_grad():
            pixel = m.model.encode_pixels(img.pixel_values[None])
        assert torch.allclose(entry.features.vision, feats.vision, atol=1e-5)
        assert torch.allclose(entry.features.pixel, pixel, atol=1e-5)


def test_post_processing_keeps_the_largest_component_and_smooths_along_the_axis() -> None:
    mask = np.zeros((20, 20, 9), dtype=bool)
    mask[2:10, 2:10, 1:8] = True  # the structure: slices 1..7
    mask[15:18, 15:18, 4] = True  # a one-slice false detection
    mask[:, :, 5] = False  # a missed slice
    assert largest_component(mask).sum() == 8 * 8 * 4  # slices 1..4 and 6..7 are two components: 1..4 wins
    smooth = slice_consistency(mask, axis=2)
    assert not smooth[15:18, 15:18, 4].any()  # isolated: gone
    assert smooth[2:10, 2:10, 5].all()  # filled from its neighbours
    assert np.array_equal(smooth[2:10, 2:10, 1:8], np.ones((8, 8, 7), dtype=bool)) and smooth.sum() == 8 * 8 * 7
