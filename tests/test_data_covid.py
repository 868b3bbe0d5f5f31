"""The COVID-19 chest X-ray lung boxes through the converter and the builder: "Right Lung" (the
patient's right) stays on the image's left in every question and answer, and the boxes round-trip
in both text formats (BiRD 0-1000 through a Med-GRIT export and import, PFMVG 0-100)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medplib.data.boxes import (
    BOX_FORMATS,
    MED_GRIT_GRID,
    MINIGPT_GRID,
    BoxFormat,
    box_grid,
    box_to_grid,
    grid_to_box,
    parse_boxes,
    parse_med_grit,
    parse_minigpt,
)
from medplib.data.builder import BuildConfig, build_samples
from medplib.data.converters import build_source
from medplib.data.converters.covid_cxr import read_covid_cxr
from medplib.data.converters.med_grit import read_med_grit, write_med_grit
from medplib.data.images import image_size
from medplib.data.masks import read_mask
from medplib.data.schema import BoxRegion, MaskRegion, PointRegion
from medplib.errors import DataValidationError, InputError

KNOWN = "ARDSSevere.png"  # 790 x 631 PA film; Right Lung bbox [36, 2, 356, 546], Left Lung [428, 0, 333, 598]
KNOWN_BOXES = {"right lung": (36.0, 2.0, 392.0, 548.0), "left lung": (428.0, 0.0, 761.0, 598.0)}


@pytest.fixture(scope="module")
def covid(shared_data: Path) -> Path:
    return shared_data / "covid_cxr_lungs"


@pytest.fixture(scope="module")
def items(covid: Path, tmp_path_factory: pytest.TempPathFactory) -> list:
    return list(read_covid_cxr(covid, tmp_path_factory.mktemp("covid")))


def _known(items: list):
    return next(it for it in items if it.image.endswith(KNOWN))


def test_right_lung_is_the_image_left_in_every_image(items: list) -> None:
    assert len(items) == 46
    for it in items:
        right, left = (next(i for i in it.instances if i.label == name) for name in ("right lung", "left lung"))
        assert right.box[0] + right.box[2] < left.box[0] + left.box[2], it.image  # box centres
        assert np.nonzero(right.mask)[1].mean() < np.nonzero(left.mask)[1].mean(), it.image  # mask centroids
        assert not (right.mask & left.mask).any()  # the lung mask is split, not shared


def test_known_image_keeps_the_side_convention_in_questions_and_answers(items: list, tmp_path: Path) -> None:
    item = _known(items)
    assert {i.label: i.box for i in item.instances} == KNOWN_BOXES
    # The builder asks about one lung per image and seed: several seeds ask about both.
    samples = [s for seed in range(6) for s in build_samples([item], tmp_path, BuildConfig(seed=seed))]
    width = 790
    side_answers = {}
    for s in samples:
        q, a = s.conversations[0].content, s.conversations[1].content
        if s.meta.get("kind") == "side":
            side_answers["right lung" if "right lung" in q else "left lung"] = a
        if s.meta.get("kind") == "location":
            assert ("left" in a) == ("right lung" in q), (q, a)  # image side of the patient's lung
        if s.task == "box_grounding":
            (x1, _, x2, _), = parse_med_grit(a)
            assert (x1 + x2) / 2 < MED_GRIT_GRID / 2 if "right lung" in q else (x1 + x2) / 2 > MED_GRIT_GRID / 2, (q, a)
        for region in s.regions:  # every region the question points at lies on its lung's image side
            if isinstance(region, PointRegion):
                cx = region.point[0]
            elif isinstance(region, BoxRegion):
                cx = (region.box[0] + region.box[2]) / 2
            else:
                assert isinstance(region, MaskRegion)
                cx = np.nonzero(read_mask(region.mask, tmp_path))[1].mean()
            assert (cx < width / 2) == (region.label == "right lung"), (q, region)
            if s.meta.get("kind") in ("label", "description"):
                assert f"the {region.label}" in a.lower(), (q, a)
    assert side_answers == {"right lung": "The left side.", "left lung": "The right side."}
    assert sum(s.task == "region_vqa" for s in samples) >= 4 and sum(s.task == "box_grounding" for s in samples) == 12


@pytest.mark.parametrize("box_format,grid,parse", [("med-grit", MED_GRIT_GRID, parse_med_grit),
                                                   ("minigpt", MINIGPT_GRID, parse_minigpt)])
def test_box_text_round_trips_to_the_official_boxes(items: list, tmp_path: Path, box_format: str, grid: int,
                                                    parse) -> None:
    cfg = BuildConfig(tasks=("box_grounding",), box_format=box_format)
    samples = list(build_samples(items[:8], tmp_path, cfg))
    assert len(samples) == 16
    for s in samples:
        h, w = image_size(s.image, tmp_path)
        (gbox,) = parse(s.conversations[1].content)
        official = s.targets[0].box
        assert gbox == box_to_grid(official, w, h, grid)
        assert box_to_grid(grid_to_box(gbox, w, h, grid), w, h, grid) == gbox
        back = grid_to_box(gbox, w, h, grid)
        for v, b, size in zip(official, back, (w, h, w, h)):
            assert abs(v - b) <= size / grid / 2 + 1e-9


@pytest.mark.parametrize("box_format", BOX_FORMATS)
def test_known_image_box_questions_and_answers_keep_the_side_in_both_formats(items: list, tmp_path: Path,
                                                                             box_format: BoxFormat) -> None:
    """VG on ARDSSevere.png: the question names the patient's lung, the answer's box lies on the image's
    other half (Right Lung on the left) and reads back to the official box within half a grid cell."""
    item, grid = _known(items), box_grid(box_format)
    samples = [s for seed in range(3) for s in build_samples(
        [item], tmp_path, BuildConfig(seed=seed, tasks=("box_grounding",), box_format=box_format))]
    assert len(samples) == 6  # both lungs, for every seed (the question wording varies)
    for s in samples:
        q, a = s.conversations[0].content, s.conversations[1].content
        label = "right lung" if "right lung" in q else "left lung"
        assert ("right lung" in q) != ("left lung" in q) and f"The {label} is at " in a, (q, a)
        assert s.meta["box_format"] == box_format and [t.label for t in s.targets] == [label]
        (gbox,) = parse_boxes(a, box_format)
        centre = (gbox[0] + gbox[2]) / 2
        assert (centre < grid / 2) == (label == "right lung"), (q, a)  # the patient's right: the image's left
        back = grid_to_box(gbox, 790, 631, grid)
        for v, b, size in zip(KNOWN_BOXES[label], back, (790, 631, 790, 631)):
            assert abs(v - b) <= size / grid / 2 + 1e-9, (label, back)


def test_bird_boxes_survive_a_med_grit_export_and_import(items: list, covid: Path, tmp_path: Path) -> None:
    samples = list(build_samples(items[:8], tmp_path, BuildConfig(tasks=("box_grounding",))))
    written, skipped = write_med_grit(samples, tmp_path, tmp_path / "med_grit.json")
    assert (written, skipped) == (16, [])
    back = list(read_med_grit(tmp_path / "med_grit.json", tmp_path, image_dir=covid / "images"))
    for ours, theirs in zip(samples, back):
        assert theirs.conversations[1].content == ours.conversations[1].content
        official, imported = ours.targets[0].box, theirs.targets[0].box
        h, w = image_size(ours.image, tmp_path)
        assert box_to_grid(imported, w, h, MED_GRIT_GRID) == box_to_grid(official, w, h, MED_GRIT_GRID)
        assert all(abs(a - b) <= max(w, h) / MED_GRIT_GRID / 2 + 1e-9 for a, b in zip(official, imported))


def test_build_source_registers_covid_cxr(covid: Path, tmp_path: Path) -> None:
    first = next(iter(build_source("covid-cxr", covid, tmp_path, BuildConfig(tasks=("caption",)))))
    assert first.source == "covid-cxr" and first.modality == "xray" and first.group.startswith("patient-")


def test_missing_lung_box_or_layout_is_a_clear_error(covid: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="lung_bounding_boxes.json"):
        next(read_covid_cxr(tmp_path, tmp_path))
    coco = json.loads((covid / "lung_bounding_boxes.json").read_text())
    coco["annotations"] = coco["annotations"][1:]  # the first image loses one of its boxes
    (tmp_path / "lung_bounding_boxes.json").write_text(json.dumps(coco))
    with pytest.raises(DataValidationError, match="Right Lung and a Left Lung"):
        next(read_covid_cxr(tmp_path, tmp_path))
