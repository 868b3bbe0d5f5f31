"""Box conversions are exact (property-based): 0..1000 and 0..100 grids, both text formats, Kvasir rescaling."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from medplib.data.boxes import (
    BOX_FORMATS,
    MED_GRIT_GRID,
    MINIGPT_GRID,
    box_grid,
    box_to_grid,
    format_med_grit,
    format_minigpt,
    grid_to_box,
    mask_to_box,
    parse_boxes,
    parse_med_grit,
    parse_minigpt,
    scale_box,
)

sizes = st.integers(min_value=1, max_value=4096)
grids = st.sampled_from([MED_GRIT_GRID, MINIGPT_GRID])


@st.composite
def grid_boxes(draw, grid: int):
    x1, x2 = sorted(draw(st.lists(st.integers(0, grid), min_size=2, max_size=2)))
    y1, y2 = sorted(draw(st.lists(st.integers(0, grid), min_size=2, max_size=2)))
    return (x1, y1, x2, y2)


@settings(max_examples=300, deadline=None)
@given(data=st.data(), w=sizes, h=sizes, grid=grids)
def test_grid_to_pixels_and_back_is_identity(data, w: int, h: int, grid: int) -> None:
    g = data.draw(grid_boxes(grid))
    assert box_to_grid(grid_to_box(g, w, h, grid), w, h, grid) == g


@settings(max_examples=300, deadline=None)
@given(w=sizes, h=sizes, grid=grids, fx=st.lists(st.floats(0, 1), min_size=4, max_size=4))
def test_pixels_to_grid_error_is_at_most_half_a_cell(w: int, h: int, grid: int, fx: list[float]) -> None:
    box = (fx[0] * w, fx[1] * h, fx[2] * w, fx[3] * h)
    back = grid_to_box(box_to_grid(box, w, h, grid), w, h, grid)
    for v, b, size in zip(box, back, (w, h, w, h)):
        assert abs(v - b) <= size / grid / 2 + 1e-9 * size


@settings(max_examples=200, deadline=None)
@given(data=st.data(), grid=grids)
def test_box_text_round_trips(data, grid: int) -> None:
    boxes = data.draw(st.lists(grid_boxes(grid), min_size=1, max_size=4))
    fmt, parse = (format_med_grit, parse_med_grit) if grid == MED_GRIT_GRID else (format_minigpt, parse_minigpt)
    text = "The lesion is at " + " and ".join(fmt(b) for b in boxes) + "."
    assert parse(text) == boxes


@settings(max_examples=300, deadline=None)
@given(w=sizes, h=sizes, fmt=st.sampled_from(BOX_FORMATS), fx=st.lists(st.floats(0, 1), min_size=4, max_size=4))
def test_pixel_box_through_text_and_back_is_within_half_a_cell(w: int, h: int, fmt, fx: list[float]) -> None:
    """Pixel box -> grid -> the format's text -> parsed -> pixel box, in both formats: off by at most
    half a grid cell per coordinate, and the text holds the one box on the format's grid."""
    x1, x2 = sorted((fx[0] * w, fx[1] * w))
    y1, y2 = sorted((fx[2] * h, fx[3] * h))
    grid = box_grid(fmt)
    write = format_med_grit if fmt == "med-grit" else format_minigpt
    text = f"The polyp is at {write(box_to_grid((x1, y1, x2, y2), w, h, grid))}."
    (gbox,) = parse_boxes(text, fmt)
    assert all(0 <= v <= grid for v in gbox) and gbox[0] <= gbox[2] and gbox[1] <= gbox[3]
    for v, b, size in zip((x1, y1, x2, y2), grid_to_box(gbox, w, h, grid), (w, h, w, h)):
        assert abs(v - b) <= size / grid / 2 + 1e-9 * size
    assert parse_boxes(text, "minigpt" if fmt == "med-grit" else "med-grit") == []  # the formats do not mix


@settings(max_examples=300, deadline=None)
@given(ow=st.integers(1, 2000), oh=st.integers(1, 2000), tw=st.integers(1, 1024), th=st.integers(1, 1024),
       c=st.lists(st.integers(0, 2000), min_size=4, max_size=4))
def test_kvasir_scaling_is_exact(ow: int, oh: int, tw: int, th: int, c: list[int]) -> None:
    box = (min(c[0], ow), min(c[1], oh), min(c[2], ow), min(c[3], oh))
    scaled = scale_box(box, (ow, oh), (tw, th))
    assert scaled == (box[0] * tw / ow, box[1] * th / oh, box[2] * tw / ow, box[3] * th / oh)
    back = scale_box(scaled, (tw, th), (ow, oh))
    assert np.allclose(back, box, rtol=0, atol=1e-9 * max(ow, oh))


@settings(max_examples=200, deadline=None)
@given(h=st.integers(1, 40), w=st.integers(1, 40), data=st.data())
def test_mask_box_is_tight(h: int, w: int, data) -> None:
    r0, r1 = sorted(data.draw(st.lists(st.integers(0, h - 1), min_size=2, max_size=2)))
    c0, c1 = sorted(data.draw(st.lists(st.integers(0, w - 1), min_size=2, max_size=2)))
    mask = np.zeros((h, w), bool)
    mask[r0, c0] = mask[r1, c1] = True
    assert mask_to_box(mask) == (c0, r0, c1 + 1, r1 + 1)
