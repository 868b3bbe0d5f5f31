"""Grammar-constrained box decoding through the model: a random-init `tiny` MedPLIB, steered to open a
box at every token (a bias on the logits of the tokens that hold the opener), answers about real
Kvasir-SEG images. With `box_format` every box it writes parses and lies on the grid, in both formats,
in every decoding path (eager, static, the uncached reference, batched with a format per row,
sampled, `medplib ask`, the server); without it the same setting writes boxes that do not parse."""

from __future__ import annotations

import base64
import io
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import httpx
import numpy as np
import pytest
import torch
import typer
from conftest import kvasir_images
from PIL import Image
from typer.testing import CliRunner

from medplib.api import MedPLIB
from medplib.data.boxes import BOX_FORMATS, BoxFormat, box_grid, grid_to_box, parse_boxes
from medplib.errors import ConfigError, InputError
from medplib.inference import Predictor, Query
from medplib.model.box_grammar import BoxGrammar, token_texts
from medplib.serving.app import ServerSettings, create_app
from medplib.serving.testing import background_server

OPENERS: dict[BoxFormat, str] = {"med-grit": "<box>", "minigpt": "{"}
QUESTION = "Where is the polyp?"
STEPS = 48  # room for two boxes of either format


@pytest.fixture(scope="module")
def model() -> MedPLIB:
    return MedPLIB.from_preset("tiny", seed=0)


@pytest.fixture(scope="module")
def images(shared_data: Path) -> list[np.ndarray]:
    return [img for _, img, _ in kvasir_images(shared_data, 2)]


def opener_bias(m: MedPLIB, fmt: BoxFormat, size: float = 50.0) -> torch.Tensor:
    """(V,) logit bias: +size on every token whose text holds the format's opener, so greedy decoding
    opens a box whenever it may."""
    texts = token_texts(m.tokenizer)
    bias = torch.zeros(m.model.llm.get_output_embeddings().weight.shape[0])
    bias[: len(texts)] = torch.tensor([size if OPENERS[fmt] in t else 0.0 for t in texts])
    return bias


@contextmanager
def steered(m: MedPLIB, bias: torch.Tensor) -> Iterator[None]:
    """The LM head's logits plus `bias` ((V,), or (B, V): one row per batch row), in every decoding path."""
    hook = m.model.llm.get_output_embeddings().register_forward_hook(lambda mod, args, out: out + bias.to(out))
    try:
        yield
    finally:
        hook.remove()


def check_boxes(text: str, fmt: BoxFormat) -> list[tuple[int, int, int, int]]:
    """Every opened box parses, is on the grid and has ordered corners; returns the boxes."""
    boxes = parse_boxes(text, fmt)
    assert len(boxes) == text.count(OPENERS[fmt]), text
    grid = box_grid(fmt)
    for x1, y1, x2, y2 in boxes:
        assert 0 <= x1 <= x2 <= grid and 0 <= y1 <= y2 <= grid, text
    return boxes


@pytest.mark.parametrize("fmt", BOX_FORMATS)
def test_steered_model_writes_well_formed_boxes_only_under_the_grammar(model: MedPLIB, images: list, fmt) -> None:
    h, w = images[0].shape[:2]
    with steered(model, opener_bias(model, fmt)):
        free = model.generate(images[0], QUESTION, max_new_tokens=STEPS)
        ans = model.generate(images[0], QUESTION, max_new_tokens=STEPS, box_format=fmt)
        reference = model.generate(images[0], QUESTION, max_new_tokens=STEPS, box_format=fmt, use_cache=False)
    # Without the grammar the steered model opens box after box and closes none: the test can fail.
    assert free.text.count(OPENERS[fmt]) > len(parse_boxes(free.text, fmt)) + 5, free.text
    boxes = check_boxes(ans.text, fmt)
    assert len(boxes) >= 2  # it did open boxes (and, steered, as many as the budget allowed)
    assert ans.text.startswith(OPENERS[fmt])
    assert ans.text_boxes == [grid_to_box(b, w, h, box_grid(fmt)) for b in boxes]  # read in the asked format
    assert all(0 <= x1 <= x2 <= w and 0 <= y1 <= y2 <= h for x1, y1, x2, y2 in ans.text_boxes)
    assert reference.token_ids == ans.token_ids  # the uncached reference path applies the same rule


@pytest.mark.parametrize("fmt", BOX_FORMATS)
def test_short_budgets_and_sampling_still_close_every_box(model: MedPLIB, images: list, fmt) -> None:
    with steered(model, opener_bias(model, fmt)):
        for limit in (3, 13, 14, 17, 22, 23, 30):  # below, at and above the shortest box of each format
            check_boxes(model.generate(images[1], QUESTION, max_new_tokens=limit, box_format=fmt).text, fmt)
        torch.manual_seed(0)
        sampled = [model.generate(images[1], QUESTION, max_new_tokens=STEPS, box_format=fmt, temperature=1.5).text
                   for _ in range(3)]
    assert sum(len(check_boxes(t, fmt)) for t in sampled) >= 3
    assert len(set(sampled)) > 1  # really sampled


@pytest.mark.parametrize("mode", ["eager", "static"])
def test_a_batch_constrains_each_row_by_its_own_format(model: MedPLIB, images: list, mode: str) -> None:
    rows: list[tuple[BoxFormat, BoxFormat | None, int]] = [  # (steered towards, grammar, token limit)
        ("med-grit", "med-grit", STEPS), ("minigpt", "minigpt", 30), ("med-grit", None, 20), ("minigpt", "minigpt", 9),
        ("minigpt", "med-grit", STEPS)]
    queries = [Query(images[i % 2], QUESTION + " Answer with a box." * (i % 3), max_new_tokens=n, box_format=g)
               for i, (_, g, n) in enumerate(rows)]
    biases = [opener_bias(model, s) for s, _, _ in rows]
    predictor = Predictor(model)
    alone = []
    for q, bias in zip(queries, biases):
        predictor.set_image(q.image)
        with steered(model, bias):
            alone.append(predictor.ask(q.question, max_new_tokens=q.max_new_tokens, box_format=q.box_format))
    model.model.decode_mode = mode
    try:
        with steered(model, torch.stack(biases)):
            batch = predictor.ask_batch(queries)
    finally:
        model.model.decode_mode = "eager"
    assert [b.token_ids for b in batch] == [a.token_ids for a in alone]  # every row as if alone
    grit, mini, free, short, other = (b.text for b in batch)
    assert len(check_boxes(grit, "med-grit")) >= 2 and len(check_boxes(mini, "minigpt")) >= 1
    assert free.count("<box>") > len(parse_boxes(free, "med-grit"))  # the unconstrained row stays unconstrained
    assert check_boxes(short, "minigpt") == []  # 9 tokens cannot hold a 14-character box: none is opened
    assert other.count("{") > 2 and check_boxes(other, "med-grit") == []  # "{" is free text outside a <box>
    assert batch[1].text_boxes and batch[0].text_boxes


def test_grammars_are_built_once_and_bad_formats_are_clear_errors(model: MedPLIB, images: list) -> None:
    assert model.box_grammar("minigpt") is model.box_grammar("minigpt")
    with pytest.raises(InputError, match="unknown box format"):
        model.generate(images[0], QUESTION, box_format="yolo")  # type: ignore[arg-type]
    grammar = BoxGrammar(model.tokenizer, "med-grit")
    walk = grammar.start(10)
    walk.advance(model.tokenizer.convert_tokens_to_ids("<box>"))
    with pytest.raises(ConfigError, match="breaks the med-grit box grammar"):
        walk.advance(model.tokenizer.eos_token_id)  # the end of the answer inside a box


def test_medplib_ask_box_format(runner_app: typer.Typer, model: MedPLIB, shared_data: Path, tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    folder = model.save_pretrained(tmp_path / "model")
    load = Predictor.from_pretrained.__func__  # type: ignore[attr-defined]

    def steered_predictor(cls: type, *args: Any, **kwargs: Any) -> Predictor:  # the saved model, steered to PFMVG
        p = load(cls, *args, **kwargs)
        bias = opener_bias(p.model, "minigpt")
        p.model.model.llm.get_output_embeddings().register_forward_hook(lambda mod, a, out: out + bias.to(out))
        return p

    monkeypatch.setattr(Predictor, "from_pretrained", classmethod(steered_predictor))
    image_id, rgb, _ = kvasir_images(shared_data, 1)[0]
    image = shared_data / "kvasir_seg" / "images" / f"{image_id}.jpg"
    res = CliRunner().invoke(runner_app, ["ask", str(image), QUESTION, "--model", str(folder), "--json",
                                   "--max-new-tokens", "30", "--box-format", "minigpt"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    boxes = check_boxes(out["text"], "minigpt")
    h, w = rgb.shape[:2]
    assert boxes and out["text_boxes"] == [list(grid_to_box(b, w, h, 100)) for b in boxes]
    res = CliRunner().invoke(runner_app, ["ask", str(image), QUESTION, "--model", str(folder), "--box-format", "bird"])
    assert isinstance(res.exception, InputError) and "unknown box format" in str(res.exception)


def test_the_server_takes_a_box_format_per_request(model: MedPLIB, images: list) -> None:
    buf = io.BytesIO()
    Image.fromarray(images[0]).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

    def body(**medplib: object) -> dict:
        return {"model": "tiny", "max_tokens": 30, "medplib": medplib, "messages": [{"role": "user", "content": [
            {"type": "text", "text": QUESTION}, {"type": "image_url", "image_url": {"url": url}}]}]}

    h, w = images[0].shape[:2]
    app = create_app(Predictor(model), ServerSettings(model_name="tiny", max_batch=1))
    with background_server(app) as base:
        for fmt in BOX_FORMATS:
            with steered(model, opener_bias(model, fmt)):
                r = httpx.post(base + "/v1/chat/completions", json=body(box_format=fmt), timeout=120)
            assert r.status_code == 200, r.text
            text = r.json()["choices"][0]["message"]["content"]
            boxes = check_boxes(text, fmt)
            assert boxes and r.json()["medplib"]["text_boxes"] == [list(grid_to_box(b, w, h, box_grid(fmt)))
                                                                   for b in boxes]
        bad = httpx.post(base + "/v1/chat/completions", json=body(box_format="yolo"), timeout=120)
        assert bad.status_code == 400 and "box_format" in bad.text
