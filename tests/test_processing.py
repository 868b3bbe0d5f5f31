"""The Processor: template, loss masking, image geometry, region rasterisation, bad input."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from medplib.config import preset
from medplib.data.schema import BoxRegion, MaskRegion, PointRegion, PolygonRegion, Turn
from medplib.errors import InputError
from medplib.processing import IGNORE_INDEX, Processor
from medplib.tokenizer import SEG, train_tokenizer


@pytest.fixture(scope="module")
def proc() -> Processor:
    cfg = preset("tiny")
    return Processor(cfg, train_tokenizer(cfg.tokenizer))


def _img(h: int = 200, w: int = 300) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)


def test_template_masks_everything_but_answers(proc: Processor) -> None:
    turns = [Turn(role="user", content="Where is the liver?"), Turn(role="assistant", content="Sure, it is [SEG]."),
             Turn(role="user", content="And the spleen?"), Turn(role="assistant", content="left")]
    ids, labels = proc.encode_conversation(turns)
    text = proc.tokenizer.decode([i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX])
    assert text == " Sure, it is [SEG].</s> left</s>"
    assert ids.count(proc.image_id) == proc.num_image_tokens == 64
    assert ids[ids.index(proc.image_id) - 1] == proc.im_start_id
    full = proc.tokenizer.decode([i for i in ids if i != proc.image_id])
    assert full.startswith("<s>A chat between a curious human")
    assert " USER: <im_start><im_end>\nWhere is the liver? ASSISTANT:" in full


def test_generation_prompt_ends_with_assistant(proc: Processor) -> None:
    ids, labels = proc.encode_conversation([Turn(role="user", content="What modality?")], add_generation_prompt=True)
    assert proc.tokenizer.decode(ids[-3:]).endswith("ASSISTANT:")
    assert all(lab == IGNORE_INDEX for lab in labels)


def test_image_geometry_non_square(proc: Processor) -> None:
    img = proc.prepare_image(_img(200, 300))
    assert img.original_hw == (200, 300)
    assert img.pixel_valid_hw == (171, 256)  # longest side 300 -> 256
    assert img.vision_pixels.shape == (3, 112, 112) and img.pixel_values.shape == (3, 256, 256)
    assert torch.all(img.pixel_values[:, 171:, :] == 0)  # padded at the bottom with the mean colour


def test_regions_land_where_they_should(proc: Processor) -> None:
    hw = (200, 300)
    s = 112 / 300
    box = proc.rasterize_region(BoxRegion(box=(30, 60, 150, 120)), hw)
    ys, xs = torch.nonzero(box, as_tuple=True)
    assert abs(xs.min().item() - 30 * s) <= 1 and abs(xs.max().item() - 150 * s) <= 2
    assert abs(ys.min().item() - 60 * s) <= 1 and abs(ys.max().item() - 120 * s) <= 2
    pt = proc.rasterize_region(PointRegion(point=(150, 100)), hw)
    ys, xs = torch.nonzero(pt, as_tuple=True)
    assert abs(xs.float().mean().item() - 150 * s) < 1 and abs(ys.float().mean().item() - 100 * s) < 1
    assert pt.sum() == pytest.approx(14 * 14, rel=0.3)  # the configured point square
    poly = proc.rasterize_region(PolygonRegion(polygon=[(0, 0), (300, 0), (0, 200)]), hw)
    assert poly[2, 2] and not poly[70, 100]  # upper-left triangle; lower right empty; padding empty
    m = np.zeros(hw, bool)
    m[100:200, 200:300] = True
    free = proc.rasterize_region(MaskRegion(mask="m.png"), hw, m)
    ys, xs = torch.nonzero(free, as_tuple=True)
    assert xs.min().item() == pytest.approx(200 * s, abs=1) and ys.max().item() == pytest.approx(200 * s - 1, abs=1)


@pytest.mark.parametrize(
    "region, array, message",
    [
        (PointRegion(point=(301, 10)), None, "outside"),
        (BoxRegion(box=(10, 10, 50, 250)), None, "outside"),
        (PolygonRegion(polygon=[(-5, 0), (10, 0), (10, 10)]), None, "outside"),
        (MaskRegion(mask="m.png"), np.zeros((200, 300), bool), "empty"),
        (MaskRegion(mask="m.png"), np.ones((100, 100), bool), "image is 300x200"),
    ],
)
def test_bad_regions_are_clear_errors(proc: Processor, region, array, message: str) -> None:
    with pytest.raises(InputError, match=message):
        proc.rasterize_region(region, (200, 300), array)


def test_bad_inputs_are_clear_errors(proc: Processor) -> None:
    turns = [Turn(role="user", content="What is <region> and <region>?"), Turn(role="assistant", content="a")]
    with pytest.raises(InputError, match="2 <region> placeholders but 1 regions"):
        proc.encode(_img(), turns, [PointRegion(point=(1, 1))])
    with pytest.raises(InputError, match=re.escape(f"1 {SEG} tokens but 0 target masks")):
        proc.encode(_img(), [Turn(role="user", content="seg"), Turn(role="assistant", content=f"{SEG}")])
    with pytest.raises(InputError, match="target mask is 10x10"):
        proc.encode(_img(), [Turn(role="user", content="seg"), Turn(role="assistant", content=SEG)],
                    target_masks=[np.ones((10, 10))])
    with pytest.raises(InputError, match="uint8"):
        proc.prepare_image(np.zeros((20, 20, 3), np.float32))
    with pytest.raises(InputError, match="expected an image"):
        proc.prepare_image(b"\x89PNG corrupt")


def test_image_files_are_read_and_corrupt_files_are_clear_errors(proc: Processor, tmp_path, shared_data) -> None:
    kvasir = sorted((shared_data / "kvasir_seg" / "images").glob("*.jpg"))[0]
    img = proc.prepare_image(kvasir)
    assert img.original_hw == (256, 256)
    bad = tmp_path / "scan.png"
    bad.write_bytes(kvasir.read_bytes()[:300])  # a truncated download
    with pytest.raises(InputError, match="scan.png"):
        proc.prepare_image(bad)
    with pytest.raises(InputError, match="not found"):
        proc.prepare_image(tmp_path / "missing.png")
