"""Load one validated sample into arrays: the image, region masks and target masks, with checks
that the masks fit the image and the regions lie inside it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from medplib.data.images import read_image
from medplib.data.masks import read_mask
from medplib.data.schema import BoxRegion, MaskRegion, PointRegion, PolygonRegion, Region, Sample
from medplib.errors import InputError

if TYPE_CHECKING:
    from medplib.retrieval.examples import Example

# regions may touch the far image edge (pixel-edge coordinates run 0..W and 0..H); a hair of
# slack absorbs float round-off from rescaled boxes
_EDGE_SLACK = 1e-6


@dataclass
class LoadedSample:
    """sample: the validated Sample. image: (H, W, 3) uint8 RGB. regions: the schema regions, in
    placeholder order. region_masks: per region a (H, W) bool mask for MaskRegion, None for
    point/box/polygon (they stay geometric). target_masks: per target a (H, W) bool mask, None
    for box-only targets. examples: the in-context examples, read and checked."""

    sample: Sample
    image: np.ndarray
    regions: list[Region]
    region_masks: list[np.ndarray | None]
    target_masks: list[np.ndarray | None]
    examples: list["Example"] = field(default_factory=list)


def _inside(x: float, y: float, w: int, h: int) -> bool:
    return -_EDGE_SLACK <= x <= w + _EDGE_SLACK and -_EDGE_SLACK <= y <= h + _EDGE_SLACK


def check_region(region: Region, size: tuple[int, int], where: str) -> None:
    """Raise InputError when a point/box/polygon region leaves the (H, W) image."""
    h, w = size
    if isinstance(region, PointRegion):
        pts = [region.point]
    elif isinstance(region, BoxRegion):
        pts = [region.box[:2], region.box[2:]]
    elif isinstance(region, PolygonRegion):
        pts = list(region.polygon)
    else:
        return
    for x, y in pts:
        if not (np.isfinite(x) and np.isfinite(y)) or not _inside(x, y, w, h):
            raise InputError(f"{where}: {region.kind} region at ({x}, {y}) lies outside the {w}x{h} image")


def load_sample(sample: Sample, root: str | Path) -> LoadedSample:
    """Read the image and every mask of `sample` (paths relative to `root`). Raises InputError
    (naming the file) for an unreadable file, a mask of the wrong size or a region outside."""
    root = Path(root)
    data = read_image(sample.image, root)
    size = data.size
    where = f"{root / sample.image} (sample {sample.id})"
    region_masks: list[np.ndarray | None] = []
    for region in sample.regions:
        check_region(region, size, where)
        if isinstance(region, MaskRegion):
            mask = read_mask(region.mask, root, size=size)
            if not mask.any():
                name = region.mask if isinstance(region.mask, str) else "RLE"
                raise InputError(f"{where}: region mask {name} is empty")
            region_masks.append(mask)
        else:
            region_masks.append(None)
    target_masks: list[np.ndarray | None] = []
    for target in sample.targets:
        if target.box is not None:
            x1, y1, x2, y2 = target.box
            if not (_inside(x1, y1, size[1], size[0]) and _inside(x2, y2, size[1], size[0])):
                raise InputError(f"{where}: target box {target.box} lies outside the {size[1]}x{size[0]} image")
        target_masks.append(read_mask(target.mask, root, size=size) if target.mask is not None else None)
    from medplib.retrieval.examples import load_example

    examples = [load_example(e.image, e.mask, root, label=e.label) for e in sample.examples]
    return LoadedSample(sample=sample, image=data.rgb, regions=list(sample.regions), region_masks=region_masks,
                        target_masks=target_masks, examples=examples)
