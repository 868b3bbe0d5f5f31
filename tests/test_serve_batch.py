"""Batched serving over real HTTP: concurrent chat requests on real Kvasir-SEG images are decoded
together and answered exactly as one at a time; a request that fails inside a batch fails alone."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import KVASIR_QUESTION, kvasir_images
from PIL import Image

from medplib.inference import Predictor
from medplib.serving.app import ServerSettings, create_app
from medplib.serving.testing import background_server

MODEL = "kvasir-tiny"


def _data_url(rgb: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _body(url: str, question: str = KVASIR_QUESTION, **extra: Any) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": url}}]}], **extra}


@pytest.fixture(scope="module")
def bodies(shared_data: Path) -> list[dict]:
    """Six requests on four real images: grounding questions, a region prompt with its own token
    limit, an open question, and history."""
    urls = [_data_url(img) for _, img, _ in kvasir_images(shared_data, 4)]
    return [
        _body(urls[0]),
        _body(urls[1]),
        _body(urls[2], "What is at <region>?", max_tokens=5,
              medplib={"regions": [{"kind": "box", "box": [30, 40, 200, 220]}]}),
        _body(urls[3], "Describe the image.", max_tokens=9),
        {"model": MODEL, "messages": _body(urls[0])["messages"] + [
            {"role": "assistant", "content": "Sure, it is [SEG]."},
            {"role": "user", "content": "And the polyp again?"}]},
        _body(urls[1], medplib={"regions": [{"kind": "point", "point": [150, 120]}]}),
    ]


def _answer(r: httpx.Response) -> tuple[str, list]:
    assert r.status_code == 200, r.text
    out = r.json()
    return out["choices"][0]["message"]["content"], [(m["rle"], m["box"]) for m in out["medplib"]["masks"]]


def _streamed(r: httpx.Response) -> tuple[str, list]:
    """The text and masks of a streamed answer, from its server-sent events."""
    assert r.status_code == 200, r.text
    text, masks = "", []
    for line in r.text.splitlines():
        if line.startswith("data: {"):
            event = json.loads(line[6:])
            choice = event["choices"][0]
            text += choice["delta"].get("content") or ""
            if choice["finish_reason"]:
                masks = [(m["rle"], m["box"]) for m in event["medplib"]["masks"]]
    return text, masks


def _post(base: str, body: dict) -> httpx.Response:
    return httpx.post(base + "/v1/chat/completions", json=body, timeout=120)


def _together(app: Any, bodies: list[dict]) -> tuple[list[httpx.Response], list[int]]:
    """Send `bodies` concurrently so that they reach the model thread together: a first request
    holds the model thread until all of them wait in the queue. Returns their responses (in order)
    and the sizes of the batches the worker ran."""
    server = app.state.server
    gate = threading.Event()
    ask_batch = server.predictor.ask_batch

    def held(queries: list) -> list:
        gate.wait(60)  # only the first call waits: the gate stays open after
        return ask_batch(queries)

    server.predictor.ask_batch = held
    with background_server(app) as base, ThreadPoolExecutor(len(bodies) + 1) as pool:
        first = pool.submit(_post, base, bodies[0])
        deadline = time.monotonic() + 60
        while server.worker.waiting > 0 or not server.worker.batch_sizes:  # the first request is on the model thread
            assert time.monotonic() < deadline, "the first request did not start"
            time.sleep(0.02)
        futures = [pool.submit(_post, base, b) for b in bodies]
        while server.worker.waiting < len(bodies):
            assert time.monotonic() < deadline, "requests did not queue"
            time.sleep(0.02)
        gate.set()
        assert first.result().status_code == 200
        return [f.result() for f in futures], list(server.worker.batch_sizes)


def test_concurrent_requests_are_decoded_together_and_answered_as_one_at_a_time(kvasir_model: Path,
                                                                                 bodies: list[dict]) -> None:
    alone = create_app(Predictor.from_pretrained(kvasir_model), ServerSettings(model_name=MODEL, max_batch=1))
    with background_server(alone) as base:
        reference = [_answer(_post(base, b)) for b in bodies]
        reference_streamed = _streamed(_post(base, dict(bodies[2], stream=True)))
    assert reference_streamed == reference[2]
    assert reference[0][0] == "Sure, it is [SEG]." and len(reference[0][1]) == 1  # the trained answer, with a mask
    assert len({text for text, _ in reference}) > 1  # different requests, different answers

    sent = bodies + [dict(bodies[2], stream=True)]  # a streamed request in the same batch
    app = create_app(Predictor.from_pretrained(kvasir_model), ServerSettings(model_name=MODEL, max_batch=8))
    responses, sizes = _together(app, sent)
    assert sizes == [1, len(sent)]  # the holder alone, then all the others as one batch
    assert [_answer(r) for r in responses[:-1]] == reference  # the same texts, and the same masks to the pixel
    assert _streamed(responses[-1]) == reference[2]
    assert all(r.json()["medplib"]["timings"]["batch"] == len(sent) for r in responses[:-1])


@pytest.mark.parametrize("where", ["its own request", "the whole batch"])
def test_a_request_failing_inside_a_batch_fails_alone(kvasir_model: Path, bodies: list[dict], where: str) -> None:
    """A model-thread failure of one request: raised for that request only (`ask_batch` returns its
    exception), or raised for the whole batch (the worker retries each request on its own)."""
    predictor = Predictor.from_pretrained(kvasir_model)
    one_at_a_time = create_app(Predictor.from_pretrained(kvasir_model), ServerSettings(model_name=MODEL, max_batch=1))
    with background_server(one_at_a_time) as base:
        reference = [_answer(_post(base, b)) for b in bodies[:4]]
    decode_request, generate_batch = predictor.model.decode_request, predictor.model.generate_batch
    poison = "Please segment the poison."

    def failing_request(question: str, *args: Any, **kwargs: Any) -> Any:
        if question == poison:
            raise RuntimeError("this request broke")
        return decode_request(question, *args, **kwargs)

    def failing_batch(requests: list) -> list:
        texts = [predictor.model.processor.decode(r.input_ids.tolist()) for r in requests]
        if any("poison" in t for t in texts):
            if len(requests) > 1:
                raise RuntimeError("the batch broke")
            raise RuntimeError("this request broke")
        return generate_batch(requests)

    if where == "its own request":
        predictor.model.decode_request = failing_request
    else:
        predictor.model.generate_batch = failing_batch
    app = create_app(predictor, ServerSettings(model_name=MODEL, max_batch=8))
    bad = _body(bodies[0]["messages"][0]["content"][1]["image_url"]["url"], poison)
    responses, sizes = _together(app, [bodies[0], bodies[1], bad, bodies[2], bodies[3]])
    assert sizes[:2] == [1, 5]
    assert responses[2].status_code == 500 and responses[2].json()["error"]["code"] == "server_error"
    assert [_answer(r) for i, r in enumerate(responses) if i != 2] == reference
    if where == "the whole batch":
        assert sizes[2:] == [1, 1, 1, 1, 1]  # each request of the broken batch again, alone
