"""Boxes: from masks, between pixels and the integer grids that models write in text, and as text.

Pixel boxes are (x1, y1, x2, y2) in pixel-edge coordinates: a mask whose only pixel is (row 0,
col 0) has the box (0, 0, 1, 1). Grid boxes are integers on 0..N (N = 1000 for Med-GRIT/Qwen-VL,
100 for MiniGPT-v2/PFMVG), where N is the right or bottom image edge. Pixel -> grid rounds to the
nearest grid line (error at most half a grid cell); grid -> pixel -> grid is the identity.
"""

from __future__ import annotations

import re
from typing import Literal

import numpy as np

from medplib.data.schema import BOX_END_TOKEN, BOX_START_TOKEN
from medplib.errors import InputError

Box = tuple[float, float, float, float]
GridBox = tuple[int, int, int, int]
BoxFormat = Literal["med-grit", "minigpt"]  # BiRD / Med-GRIT text on 0..1000, MiniGPT-v2 / PFMVG on 0..100
BOX_FORMATS: tuple[BoxFormat, ...] = ("med-grit", "minigpt")

MED_GRIT_GRID = 1000
MINIGPT_GRID = 100

_MED_GRIT_RE = re.compile(re.escape(BOX_START_TOKEN) + r"\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)\s*,"
                          r"\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)\s*" + re.escape(BOX_END_TOKEN))
_MINIGPT_RE = re.compile(r"\{\s*<(\d+)>\s*<(\d+)>\s*<(\d+)>\s*<(\d+)>\s*\}")


def mask_to_box(mask: np.ndarray) -> Box:
    """Tight pixel-edge box of a (H, W) bool mask. Raises InputError for an empty mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise InputError("cannot take the box of an empty mask")
    return (float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1))


def _check_size(width: int, height: int) -> None:
    if width <= 0 or height <= 0:
        raise InputError(f"image size must be positive, got width={width} height={height}")


def box_to_grid(box: Box, width: int, height: int, grid: int) -> GridBox:
    """Pixel box -> integer grid box on 0..grid, clipped to the image."""
    _check_size(width, height)
    x1, y1, x2, y2 = box

    def q(v: float, size: int) -> int:
        return int(min(max(round(v * grid / size), 0), grid))

    return (q(x1, width), q(y1, height), q(x2, width), q(y2, height))


def grid_to_box(gbox: GridBox, width: int, height: int, grid: int) -> Box:
    """Integer grid box on 0..grid -> pixel box. Raises InputError for values off the grid."""
    _check_size(width, height)
    if any(int(v) != v or v < 0 or v > grid for v in gbox):
        raise InputError(f"grid box {tuple(gbox)} is not on the integer grid 0..{grid}")
    x1, y1, x2, y2 = gbox
    return (x1 * width / grid, y1 * height / grid, x2 * width / grid, y2 * height / grid)


def format_med_grit(gbox: GridBox) -> str:
    """`<box>(x1,y1),(x2,y2)</box>` (Med-GRIT / BiRD, Qwen-VL convention, 0..1000)."""
    x1, y1, x2, y2 = gbox
    return f"{BOX_START_TOKEN}({x1},{y1}),({x2},{y2}){BOX_END_TOKEN}"


def format_minigpt(gbox: GridBox) -> str:
    """`{<x1><y1><x2><y2>}` (MiniGPT-v2 / PeFoMed / PFMVG, 0..100)."""
    x1, y1, x2, y2 = gbox
    return f"{{<{x1}><{y1}><{x2}><{y2}>}}"


def parse_med_grit(text: str) -> list[GridBox]:
    """All Med-GRIT boxes in `text`, in order."""
    return [tuple(int(v) for v in m.groups()) for m in _MED_GRIT_RE.finditer(text)]  # type: ignore[misc]


def parse_minigpt(text: str) -> list[GridBox]:
    """All MiniGPT-v2 boxes in `text`, in order."""
    return [tuple(int(v) for v in m.groups()) for m in _MINIGPT_RE.finditer(text)]  # type: ignore[misc]


def parse_boxes(text: str, box_format: BoxFormat) -> list[GridBox]:
    """All boxes of `box_format` in `text`, in order, on that format's grid (off-grid values are kept)."""
    return {"med-grit": parse_med_grit, "minigpt": parse_minigpt}[check_box_format(box_format)](text)


def box_grid(box_format: BoxFormat) -> int:
    """The grid size N of a box format (integers on 0..N)."""
    return {"med-grit": MED_GRIT_GRID, "minigpt": MINIGPT_GRID}[check_box_format(box_format)]


def check_box_format(box_format: str) -> BoxFormat:
    """`box_format` if it names a format; else InputError."""
    if box_format not in BOX_FORMATS:
        raise InputError(f"unknown box format {box_format!r}; choose from {', '.join(BOX_FORMATS)}")
    return box_format  # type: ignore[return-value]


def scale_box(box: Box, from_size: tuple[int, int], to_size: tuple[int, int]) -> Box:
    """Rescale a pixel box between image sizes given as (width, height) (e.g. Kvasir-SEG's original
    resolution to the resized images)."""
    (fw, fh), (tw, th) = from_size, to_size
    _check_size(fw, fh)
    _check_size(tw, th)
    x1, y1, x2, y2 = box
    return (x1 * tw / fw, y1 * th / fh, x2 * tw / fw, y2 * th / fh)
