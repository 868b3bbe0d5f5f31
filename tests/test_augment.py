"""Training-time flips on real Kvasir-SEG images: image, masks and regions stay aligned; text that names
a side or holds coordinates is never flipped; the augmented stream is a function of the position."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medplib.data.augment import augment, flip, flippable
from medplib.data.loading import LoadedSample, load_sample
from medplib.data.schema import BoxRegion, PointRegion, PolygonRegion, Sample, Target, Turn
from medplib.training.data import StreamView
from medplib.training.pipeline import default_recipes_dir
from medplib.training.recipe import RecipeError, load_recipe

AXES = ("hflip", "vflip", "transpose")


def _kvasir_sample(root: Path, tmp: Path, question: str, answer: str) -> LoadedSample:
    """A real Kvasir-SEG image and its mask (binarised to PNG), with point, box and polygon regions
    on the polyp, loaded through the real reader."""
    folder = root / "kvasir_seg"
    name = sorted(p.stem for p in (folder / "images").glob("*.jpg"))[0]
    mask = np.asarray(Image.open(folder / "masks" / f"{name}.jpg").convert("L")) > 127
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp / "mask.png")
    ys, xs = np.nonzero(mask)
    cy, cx = int(np.median(ys)), int(np.median(xs))
    while not mask[cy, cx]:  # a point on the polyp
        cx += 1
    box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
    poly = [(box[0], box[1]), (box[2], box[1]), (box[0], box[3])]
    sample = Sample(id="k", image=str(folder / "images" / f"{name}.jpg"),
                    conversations=[Turn(role="user", content=f"<image>\n<region> <region> <region> {question}"),
                                   Turn(role="assistant", content=answer)],
                    regions=[PointRegion(point=(cx + 0.5, cy + 0.5)), BoxRegion(box=box), PolygonRegion(polygon=poly)],
                    targets=[Target(mask=str(tmp / "mask.png"))])
    return load_sample(sample, tmp)


def _flip_array(a: np.ndarray, axis: str) -> np.ndarray:
    return {"hflip": a[:, ::-1], "vflip": a[::-1], "transpose": np.swapaxes(a, 0, 1)}[axis]


@pytest.mark.parametrize("axis", AXES)
def test_flip_keeps_image_masks_and_regions_aligned(shared_data: Path, tmp_path: Path, axis: str) -> None:
    s = _kvasir_sample(shared_data, tmp_path, "What is this?", "The polyp is [SEG].")
    f = flip(s, axis)
    assert np.array_equal(f.image, _flip_array(s.image, axis))
    assert np.array_equal(f.target_masks[0], _flip_array(s.target_masks[0], axis))
    mask, fmask = s.target_masks[0], f.target_masks[0]
    # the point still lies on the polyp, and the box still holds all of it
    x, y = f.regions[0].point
    assert fmask[int(y), int(x)]
    x1, y1, x2, y2 = (int(v) for v in f.regions[1].box)
    assert fmask[y1:y2, x1:x2].sum() == fmask.sum() == mask.sum()
    # the polygon's corners move with the box's corners
    assert {tuple(map(int, p)) for p in f.regions[2].polygon} <= {(a, b) for a in (x1, x2) for b in (y1, y2)}
    assert np.array_equal(flip(f, axis).image, s.image)  # every flip is its own inverse


def test_text_naming_a_side_or_holding_coordinates_is_not_flipped(shared_data: Path, tmp_path: Path) -> None:
    side = _kvasir_sample(shared_data, tmp_path, "Is the polyp on the left?", "No.")
    assert not flippable(side, "hflip") and flippable(side, "vflip") and not flippable(side, "transpose")
    upper = _kvasir_sample(shared_data, tmp_path, "Is the polyp in the upper half?", "Yes.")
    assert flippable(upper, "hflip") and not flippable(upper, "vflip")
    coords = _kvasir_sample(shared_data, tmp_path, "Where is the polyp?", "At [12, 40, 200, 230].")
    assert not any(flippable(coords, a) for a in AXES)
    boxed = _kvasir_sample(shared_data, tmp_path, "Where is the polyp?", "Here.")
    boxed = replace(boxed, sample=boxed.sample.model_copy(update={"targets": [Target(box=(1.0, 2.0, 3.0, 4.0))]}))
    assert not any(flippable(boxed, a) for a in AXES)
    rng = np.random.default_rng(0)
    for _ in range(20):  # never mirrored left-right, but flipped top-bottom about half the time
        out = augment(side, AXES, rng)
        assert not np.array_equal(out.image, side.image[:, ::-1]) or np.array_equal(side.image, side.image[:, ::-1])


def test_augmented_stream_is_a_function_of_the_position(shared_data: Path, tmp_path: Path) -> None:
    s = _kvasir_sample(shared_data, tmp_path, "What is this?", "The polyp is [SEG].")
    a = StreamView([s] * 5, 3, list(AXES))
    b = StreamView([s] * 5, 3, list(AXES))
    forward = [a[p].image for p in range(16)]
    backward = [b[p].image for p in reversed(range(16))][::-1]  # another order, another instance
    assert all(np.array_equal(x, y) for x, y in zip(forward, backward))
    variants = {x.tobytes() for x in forward}
    assert 3 <= len(variants) <= 8  # several of the 8 square symmetries, drawn per position
    other = StreamView([s] * 5, 4, list(AXES))
    assert any(not np.array_equal(other[p].image, forward[p]) for p in range(16))


def test_recipe_rejects_an_unknown_augmentation() -> None:
    path = default_recipes_dir() / "stage3_pg_expert.yaml"
    assert load_recipe(path, ["data.augment=[hflip,transpose]"]).data.augment == ["hflip", "transpose"]
    with pytest.raises(RecipeError, match="data.augment"):
        load_recipe(path, ["data.augment=[rotate45]"])
