"""Predictor on a model trained on real Kvasir-SEG images: per-image feature cache, masks and
boxes in original pixels, streaming, batches, and the incremental detokeniser."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import KVASIR_ANSWER, KVASIR_QUESTION, kvasir_images

from medplib.data.boxes import mask_to_box
from medplib.data.schema import BoxRegion, PointRegion, Turn
from medplib.errors import InputError
from medplib.inference import Prediction, Predictor, Query, TextStream
from medplib.model.medplib import GenerationOutput
from medplib.processing import with_placeholders


def _dice(p: np.ndarray, g: np.ndarray) -> float:
    return float(2 * (p & g).sum() / max(1, p.sum() + g.sum()))


@pytest.fixture(scope="module")
def predictor(kvasir_model: Path) -> Predictor:
    return Predictor.from_pretrained(kvasir_model, cache_entries=2)


@pytest.fixture(scope="module")
def images(shared_data: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    return kvasir_images(shared_data, 3)


def test_ask_grounds_the_polyp_with_masks_and_boxes_in_original_pixels(predictor: Predictor, images: list) -> None:
    _, img, gt = images[0]
    predictor.set_image(img)
    out = predictor.ask(KVASIR_QUESTION)
    assert out.text == "Sure, it is [SEG]." and out.finish_reason == "stop"
    assert len(out.masks) == len(out.boxes) == len(out.scores) == 1
    assert out.masks[0].shape == gt.shape and out.masks[0].dtype == bool
    assert _dice(out.masks[0], gt) >= 0.8
    assert out.boxes[0] == mask_to_box(out.masks[0])
    gx1, gy1, gx2, gy2 = mask_to_box(gt)
    x1, y1, x2, y2 = out.boxes[0]
    assert max(abs(x1 - gx1), abs(y1 - gy1), abs(x2 - gx2), abs(y2 - gy2)) <= 0.1 * max(gt.shape)
    assert out.prompt_tokens > len(out.token_ids) > 0
    assert set(out.timings) == {"image_s", "generate_s", "total_s", "tokens_per_s"}


def test_features_are_cached_by_content_and_bounded(predictor: Predictor, images: list) -> None:
    (_, a, _), (_, b, _), (_, c, _) = images
    predictor.set_image(a)
    assert predictor.set_image(a.copy()) == 0.0  # same pixels, another array: a hit
    assert predictor.ask(KVASIR_QUESTION).timings["image_s"] == 0.0
    assert predictor.set_image(b) > 0.0
    assert predictor.set_image(a) == 0.0  # a and b fit in 2 entries
    assert predictor.set_image(c) > 0.0  # evicts b, the least recently used
    assert predictor.set_image(a) == 0.0
    assert predictor.set_image(b) > 0.0
    bytes_bounded = Predictor(predictor.model, cache_bytes=1)
    bytes_bounded.set_image(a)
    bytes_bounded.set_image(b)
    assert bytes_bounded.set_image(a) > 0.0  # only the current image is kept under a tiny byte budget


def test_second_question_reuses_features_and_gives_the_same_answer(predictor: Predictor, images: list) -> None:
    _, img, _ = images[1]
    first = predictor.ask_many([Query(img, KVASIR_QUESTION)])[0]
    predictor.set_image(img)
    again = predictor.ask(KVASIR_QUESTION)
    assert again.timings["image_s"] == 0.0
    assert again.text == first.text and (again.masks[0] == first.masks[0]).all()


def test_stream_yields_only_text_pieces_and_then_gives_the_prediction(predictor: Predictor, images: list) -> None:
    predictor.set_image(images[0][1])
    stream = predictor.stream(KVASIR_QUESTION)
    pieces = list(stream)
    assert len(pieces) >= 3 and all(isinstance(p, str) for p in pieces)
    final = stream.result()
    assert isinstance(final, Prediction) and "".join(pieces).strip() == final.text == KVASIR_ANSWER
    assert list(stream) == []  # ended: iterating again yields nothing
    early = predictor.stream(KVASIR_QUESTION)
    assert early.result(timeout=60).text == final.text and "".join(early).strip() == final.text  # pieces kept
    bad = predictor.stream("   ")
    with pytest.raises(InputError, match="empty"):
        list(bad)
    with pytest.raises(InputError, match="empty"):
        bad.result()


def test_ask_many_answers_in_order_sharing_features(predictor: Predictor, images: list) -> None:
    (_, a, ga), _, (_, b, gb) = images
    fresh = Predictor(predictor.model)  # an empty cache, so image costs are visible
    queries = [Query(a, KVASIR_QUESTION), Query(b, KVASIR_QUESTION),
               Query(a, "What is <region>?", [PointRegion(point=(10, 10))])]
    outs = fresh.ask_many(queries, max_new_tokens=12)
    assert [len(o.masks) for o in outs[:2]] == [1, 1]
    assert _dice(outs[0].masks[0], ga) >= 0.8 and _dice(outs[1].masks[0], gb) >= 0.8
    assert outs[1].timings["image_s"] > 0
    assert sorted(o.timings["image_s"] > 0 for o in (outs[0], outs[2])) == [False, True]  # a's features computed once


def test_regions_are_checked_and_mapped_back_to_the_image(predictor: Predictor, images: list) -> None:
    _, img, _ = images[0]
    predictor.set_image(img)
    h, w = img.shape[:2]
    with pytest.raises(InputError, match="outside"):
        predictor.ask("What is this?", [PointRegion(point=(w + 5, 3))])
    with pytest.raises(InputError, match="placeholders"):
        predictor.ask("<region> or <region>?", [BoxRegion(box=(0, 0, 5, 5))])
    (drawn,) = predictor.region_masks([BoxRegion(box=(40, 60, 120, 100))])
    assert drawn.shape == (h, w)
    assert mask_to_box(drawn) == pytest.approx((40, 60, 120, 100), abs=w / predictor.model.config.vision.image_size + 1)


def test_boxes_in_the_answer_text_are_scaled_to_pixels(predictor: Predictor, images: list,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    _, img, _ = images[0]
    predictor.set_image(img)
    h, w = img.shape[:2]
    eos = predictor.model.tokenizer.eos_token_id
    monkeypatch.setattr(predictor.model.model, "generate", lambda *a, **k: GenerationOutput([5, eos], [], []))
    monkeypatch.setattr(predictor.model.processor, "decode", lambda ids: "It is at <box>(100,200),(500,1000)</box>.")
    out = predictor.ask("Where is the polyp?")
    assert out.text_boxes == [(100 * w / 1000, 200 * h / 1000, 500 * w / 1000, float(h))]
    assert out.masks == [] and out.boxes == []


def test_text_stream_holds_back_partial_characters(predictor: Predictor) -> None:
    tok = predictor.model.tokenizer
    text = "polyp é 🙂 ünd 息肉"
    ids = tok(text, add_special_tokens=False).input_ids
    stream = TextStream(lambda xs: tok.decode(xs))
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) == tok.decode(ids)
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces  # some byte pieces did not complete a character on their own


def test_placeholders_are_appended_only_when_none_are_written() -> None:
    assert with_placeholders("What is this?", 2) == "What is this? <region> <region>"
    assert with_placeholders("Compare <region> and <region>.", 2) == "Compare <region> and <region>."
    assert with_placeholders("And now?", 1, [Turn(role="user", content="Is <region> a polyp?")]) == "And now?"
    assert with_placeholders("Plain question", 0) == "Plain question"
