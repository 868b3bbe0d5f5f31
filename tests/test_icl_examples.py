"""In-context example encodings on real images: the published overlay, the separate mask, and clear
errors for malformed examples (mask size != image size, empty mask, missing file)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medplib.errors import ConfigError, InputError
from medplib.retrieval.examples import (
    OVERLAY_COLOR,
    Encoding,
    check_example,
    encode_example,
    load_example,
    mask_image,
    overlay_example,
)

MONUSEG = "monuseg_lvit_text/Train_Folder"
CXR = "covid_cxr_lungs"


@pytest.fixture(scope="module")
def nuclei(shared_data: Path):
    """A real 1000x1000 H&E tile with its nucleus mask."""
    name = sorted((shared_data / MONUSEG / "img").glob("*.png"))[0].name
    return load_example(f"img/{name}", f"labelcol/{name}", shared_data / MONUSEG, label="nuclei")


def test_load_example_reads_a_real_pair(nuclei) -> None:
    assert nuclei.image.shape == (1000, 1000, 3) and nuclei.image.dtype == np.uint8
    assert nuclei.mask.shape == (1000, 1000) and nuclei.mask.dtype == bool
    assert 0.05 < nuclei.mask.mean() < 0.6  # nuclei cover part of the tile, not none or all of it
    assert nuclei.label == "nuclei"


def test_overlay_is_045_image_plus_055_colour_inside_the_mask(nuclei) -> None:
    out = overlay_example(nuclei)
    assert out.shape == nuclei.image.shape and out.dtype == np.uint8
    assert np.array_equal(out[~nuclei.mask], nuclei.image[~nuclei.mask])  # outside: the image itself
    ys, xs = np.nonzero(nuclei.mask)
    for y, x in zip(ys[::5000], xs[::5000]):  # inside, pixel by pixel, from the published formula
        expected = [round(0.45 * int(v) + 0.55 * c) for v, c in zip(nuclei.image[y, x], OVERLAY_COLOR)]
        assert np.abs(out[y, x].astype(int) - expected).max() <= 1
    red_gain = out[nuclei.mask][:, 0].astype(float).mean() - nuclei.image[nuclei.mask][:, 0].astype(float).mean()
    assert red_gain > 50  # H&E nuclei are purple: the red overlay must be visible
    assert not np.shares_memory(out, nuclei.image)


def test_overlay_weights_at_the_extremes(nuclei) -> None:
    assert np.array_equal(overlay_example(nuclei, image_weight=1.0), nuclei.image)
    pure = overlay_example(nuclei, image_weight=0.0, color=(0, 255, 0))
    assert (pure[nuclei.mask] == (0, 255, 0)).all()
    with pytest.raises(InputError, match="image weight"):
        overlay_example(nuclei, image_weight=1.5)


def test_separate_mask_is_its_own_image(nuclei) -> None:
    image, mask = encode_example(nuclei, "separate")
    assert np.array_equal(image, nuclei.image) and not np.shares_memory(image, nuclei.image)
    assert mask.shape == (1000, 1000, 3) and mask.dtype == np.uint8
    assert np.array_equal(mask[..., 0] == 255, nuclei.mask) and set(np.unique(mask)) == {0, 255}
    assert np.array_equal(mask_image(nuclei), mask)
    (overlay,) = encode_example(nuclei, Encoding.overlay)
    assert np.array_equal(overlay, overlay_example(nuclei))
    with pytest.raises(ConfigError, match="unknown example encoding 'heatmap'"):
        encode_example(nuclei, "heatmap")


def test_grey_chest_xray_is_replicated_to_rgb(shared_data: Path) -> None:
    root = shared_data / CXR
    stem = sorted(p.stem for p in (root / "images").iterdir())[0]
    image = next((root / "images").glob(f"{stem}.*"))
    grey = np.asarray(Image.open(image).convert("L"))
    mask = np.asarray(Image.open(root / "lung_masks" / f"{stem}_mask.png").convert("L")) > 127
    ex = check_example(grey, mask, label="lungs")
    assert ex.image.shape == grey.shape + (3,) and (ex.image == grey[..., None]).all()
    assert ex.mask.sum() == mask.sum()


def test_mask_of_another_size_is_refused(shared_data: Path) -> None:
    root = shared_data / CXR
    names = sorted(p.name for p in (root / "images").iterdir())
    sizes = {n: Image.open(root / "images" / n).size for n in names}
    a, b = next((a, b) for a in names for b in names if sizes[a] != sizes[b])
    with pytest.raises(InputError, match=r"mask is \d+x\d+ \(WxH\) but the image is \d+x\d+") as err:
        load_example(f"images/{a}", f"lung_masks/{Path(b).stem}_mask.png", root)
    assert a in str(err.value) and f"{Path(b).stem}_mask.png" in str(err.value)  # both files are named


def test_empty_mask_is_refused(shared_data: Path, tmp_path: Path) -> None:
    src = sorted((shared_data / MONUSEG / "img").glob("*.png"))[0]
    Image.fromarray(np.zeros((1000, 1000), np.uint8)).save(tmp_path / "empty.png")
    with pytest.raises(InputError, match="the mask is empty"):
        load_example(src, tmp_path / "empty.png")
    with pytest.raises(InputError, match="the mask is empty"):
        check_example(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), bool))


def test_missing_files_are_named(shared_data: Path, tmp_path: Path) -> None:
    src = sorted((shared_data / MONUSEG / "img").glob("*.png"))[0]
    with pytest.raises(InputError, match="image file not found") as err:
        load_example(tmp_path / "nope.png", f"labelcol/{src.name}", shared_data / MONUSEG)
    assert "nope.png" in str(err.value)
    with pytest.raises(InputError, match="mask file not found") as err:
        load_example(src, tmp_path / "nope_mask.png")
    assert "nope_mask.png" in str(err.value)


def test_bad_arrays_are_refused() -> None:
    with pytest.raises(InputError, match="uint8"):
        check_example(np.zeros((4, 4, 3), np.float32), np.ones((4, 4), bool))
    with pytest.raises(InputError, match="2-D bool or integer"):
        check_example(np.zeros((4, 4, 3), np.uint8), np.ones((4, 4, 3), bool))
