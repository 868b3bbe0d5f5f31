"""Training-time augmentation of a loaded sample: random flips and transposition of the image with its
masks and regions.

Flips and the transposition (together: the 8 rotations and reflections of the square) are the
augmentation a small segmentation set needs most (polyps, nuclei and lesions have no preferred
orientation). They are off by default and opt-in per recipe (`data.augment`), because a
flip changes anatomy: a horizontal flip swaps the patient's left and right. A sample whose text
names a side of the flipped axis ("left", "right" for horizontal; "upper", "lower", "top", "bottom"
for vertical, both for the transposition) is never flipped on that axis, so the answer stays true;
nor is a sample with box-only targets or coordinates in its text (BiRD-style boxes in text would
no longer match the image).

The draw is a pure function of (seed, stream position), so a resumed run sees the same flips.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Sequence

import numpy as np

from medplib.data.loading import LoadedSample
from medplib.data.schema import BoxRegion, PointRegion, PolygonRegion, Region

AUGMENTATIONS = ("hflip", "vflip", "transpose")
_SIDE_WORDS = {
    "hflip": re.compile(r"\b(left|right)\b", re.IGNORECASE),
    "vflip": re.compile(r"\b(upper|lower|top|bottom|above|below)\b", re.IGNORECASE),
}
_SIDE_WORDS["transpose"] = re.compile(f"{_SIDE_WORDS['hflip'].pattern}|{_SIDE_WORDS['vflip'].pattern}", re.IGNORECASE)
_COORDINATES = re.compile(r"[\[(]\s*\d")  # "[12, 40, ...]" or "(0.31, ...)" in a question or answer


def _flip_region(region: Region, axis: str, h: int, w: int) -> Region:
    """The region after flipping an (h, w) image; mask regions are flipped as arrays by the caller."""
    if axis == "transpose":
        def swap(pts: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
            return [(y, x) for x, y in pts]

        if isinstance(region, PointRegion):
            return region.model_copy(update={"point": swap([region.point])[0]})
        if isinstance(region, BoxRegion):
            x1, y1, x2, y2 = region.box
            return region.model_copy(update={"box": (y1, x1, y2, x2)})
        if isinstance(region, PolygonRegion):
            return region.model_copy(update={"polygon": swap(region.polygon)})
        return region

    def fx(x: float) -> float:
        return w - x if axis == "hflip" else x

    def fy(y: float) -> float:
        return h - y if axis == "vflip" else y

    if isinstance(region, PointRegion):
        return region.model_copy(update={"point": (fx(region.point[0]), fy(region.point[1]))})
    if isinstance(region, BoxRegion):
        x1, y1, x2, y2 = region.box
        xs, ys = sorted((fx(x1), fx(x2))), sorted((fy(y1), fy(y2)))
        return region.model_copy(update={"box": (xs[0], ys[0], xs[1], ys[1])})
    if isinstance(region, PolygonRegion):
        return region.model_copy(update={"polygon": [(fx(x), fy(y)) for x, y in region.polygon]})
    return region


def flippable(loaded: LoadedSample, axis: str) -> bool:
    """False when flipping along `axis` would make the sample's text wrong: it names a side along
    that axis, holds coordinates, or the sample has box-only targets (answered as boxes in text)."""
    if any(t.box is not None and t.mask is None for t in loaded.sample.targets):
        return False
    return not any(_SIDE_WORDS[axis].search(t.content) or _COORDINATES.search(t.content)
                   for t in loaded.sample.conversations)


def flip(loaded: LoadedSample, axis: str) -> LoadedSample:
    """The sample flipped along `axis` ("hflip": columns, "vflip": rows, "transpose": rows <->
    columns): image (H, W, 3), every (H, W) mask and every geometric region."""
    h, w = loaded.image.shape[:2]

    def arr(a: np.ndarray | None) -> np.ndarray | None:
        if a is None:
            return None
        if axis == "transpose":
            return np.ascontiguousarray(np.swapaxes(a, 0, 1))
        return np.ascontiguousarray(np.flip(a, axis=1 if axis == "hflip" else 0))

    return replace(
        loaded,
        image=arr(loaded.image),
        regions=[_flip_region(r, axis, h, w) for r in loaded.regions],
        region_masks=[arr(m) for m in loaded.region_masks],
        target_masks=[arr(m) for m in loaded.target_masks],
    )


def augment(loaded: LoadedSample, names: Sequence[str], rng: np.random.Generator) -> LoadedSample:
    """Each augmentation in `names` applied with probability 1/2 (where the text allows it)."""
    for name in names:
        if rng.random() < 0.5 and flippable(loaded, name):
            loaded = flip(loaded, name)
    return loaded
