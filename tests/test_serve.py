"""The HTTP server over real HTTP (uvicorn on a free loopback port), with the official `openai`
package as the client, a model trained on real Kvasir-SEG images, and bad requests of every kind."""

from __future__ import annotations

import base64
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import openai
import pytest
from conftest import KVASIR_QUESTION, kvasir_images
from PIL import Image
from pycocotools import mask as coco_mask

from medplib.inference import Predictor
from medplib.serving.app import ServerSettings, create_app
from medplib.serving.testing import background_server

KEY = "test-key"
MODEL = "kvasir-tiny"
MAX_PIXELS = 600 * 600


def _dice(p: np.ndarray, g: np.ndarray) -> float:
    return float(2 * (p & g).sum() / max(1, p.sum() + g.sum()))


def _data_url(rgb: np.ndarray, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt)
    mime = "jpeg" if fmt == "JPEG" else fmt.lower()
    return f"data:image/{mime};base64," + base64.b64encode(buf.getvalue()).decode()


def _messages(url: str, question: str = KVASIR_QUESTION) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": question},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


@pytest.fixture(scope="module")
def kvasir(shared_data: Path) -> tuple[np.ndarray, np.ndarray]:
    _, img, mask = kvasir_images(shared_data, 1)[0]
    return img, mask


@pytest.fixture(scope="module")
def server(kvasir_model: Path) -> Iterator[str]:
    settings = ServerSettings(model_name=MODEL, api_key=KEY, max_upload_bytes=2 << 20, max_image_pixels=MAX_PIXELS)
    with background_server(create_app(Predictor.from_pretrained(kvasir_model), settings)) as base:
        yield base


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _post(server: str, path: str, body: object = None, *, key: str | None = KEY,
          content: bytes | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server + path, json=body, content=content, headers=headers, timeout=60)


# ------------------------------------------------------------------ the openai client
def test_openai_client_gets_answer_and_mask_for_an_image(client: openai.OpenAI, kvasir: tuple) -> None:
    img, gt = kvasir
    out = client.chat.completions.create(model=MODEL, messages=_messages(_data_url(img, "JPEG")))
    assert out.object == "chat.completion" and out.model == MODEL
    assert out.choices[0].message.content == "Sure, it is [SEG]."
    assert out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens > 0 and out.usage.prompt_tokens > out.usage.completion_tokens
    masks = out.model_extra["medplib"]["masks"]
    assert len(masks) == 1
    rle = dict(masks[0]["rle"], counts=masks[0]["rle"]["counts"].encode())
    from_rle = coco_mask.decode(rle).astype(bool)  # an independent decoder of our RLE
    from_png = np.asarray(Image.open(io.BytesIO(base64.b64decode(masks[0]["png_base64"])))) > 0
    assert from_rle.shape == gt.shape and (from_rle == from_png).all()
    assert _dice(from_rle, gt) >= 0.8
    ys, xs = np.nonzero(from_rle)
    assert masks[0]["box"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_openai_client_streams_the_same_answer(client: openai.OpenAI, kvasir: tuple) -> None:
    img, gt = kvasir
    stream = client.chat.completions.create(model=MODEL, messages=_messages(_data_url(img)), stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 3  # streamed token by token, not in one piece
    assert "".join(pieces) == "Sure, it is [SEG]."
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "stop"
    mask = finals[0].model_extra["medplib"]["masks"][0]
    assert _dice(np.asarray(Image.open(io.BytesIO(base64.b64decode(mask["png_base64"])))) > 0, gt) >= 0.8
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= len(pieces)


def test_openai_client_sends_regions_and_history(client: openai.OpenAI, kvasir: tuple) -> None:
    img, _ = kvasir
    messages = _messages(_data_url(img)) + [{"role": "assistant", "content": "Sure, it is [SEG]."},
                                           {"role": "user", "content": "And this <region>?"}]
    out = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=4,
        extra_body={"medplib": {"regions": [{"kind": "box", "box": [20, 20, 120, 120]}], "return_png": False}})
    assert len(out.choices[0].message.content) > 0
    assert out.usage.completion_tokens <= 4
    assert all("png_base64" not in m for m in out.model_extra["medplib"]["masks"])
    assert [m.id for m in client.models.list()] == [MODEL]


def test_openai_client_sees_auth_and_model_errors(server: str, kvasir: tuple) -> None:
    msgs = _messages(_data_url(kvasir[0]))
    with pytest.raises(openai.AuthenticationError, match="API key"):
        wrong_key = openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0)
        wrong_key.chat.completions.create(model=MODEL, messages=msgs)
    with pytest.raises(openai.NotFoundError, match="not served"):
        right_key = openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)
        right_key.chat.completions.create(model="gpt-4o", messages=msgs)


# ------------------------------------------------------------------ other endpoints
def test_segment_preview_models_health(server: str, kvasir: tuple) -> None:
    img, gt = kvasir
    r = _post(server, "/v1/segment", {"image": _data_url(img), "target": "polyp"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["text"] == "Sure, it is [SEG]." and len(body["masks"]) == 1
    assert _dice(np.asarray(Image.open(io.BytesIO(base64.b64decode(body["masks"][0]["png_base64"])))) > 0, gt) >= 0.8

    from pydicom.data import get_testdata_file

    dcm = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    r = _post(server, "/v1/preview", {"image": "data:application/dicom;base64," + base64.b64encode(dcm).decode()})
    assert r.status_code == 200, r.text
    png = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["png_base64"]))))
    assert png.shape == (128, 128, 3) and png.std() > 10  # a windowed CT slice, not a blank

    assert httpx.get(server + "/healthz").json()["status"] == "ok"  # no key needed for health
    assert httpx.get(server + "/v1/models").status_code == 401
    page = httpx.get(server + "/")
    assert page.status_code == 200 and "/static/app.js" in page.text and "http" not in page.text.split("<body>")[1]


# ------------------------------------------------------------------ bad requests
def test_bad_requests_get_4xx_json_and_the_server_keeps_serving(server: str, kvasir: tuple) -> None:
    img, _ = kvasir
    good = {"model": MODEL, "messages": _messages(_data_url(img))}
    big = np.zeros((700, 700, 3), np.uint8)  # 490,000 pixels > 360,000
    noise = np.random.default_rng(0).integers(0, 255, (1200, 1200, 3), dtype=np.uint8)  # ~4 MB PNG > 2 MiB
    cases = [
        ("corrupt base64", good | {"messages": _messages("data:image/png;base64,@@not-base64@@")}, KEY, 400, "base64"),
        ("not an image", good | {"messages": _messages("data:image/png;base64," + base64.b64encode(b"hello").decode())},
         KEY, 400, "PNG"),
        ("remote URL", good | {"messages": _messages("https://example.org/a.png")}, KEY, 400, "data URL"),
        ("too many pixels", good | {"messages": _messages(_data_url(big))}, KEY, 413, "pixels"),
        ("too many bytes", good | {"messages": _messages(_data_url(noise))}, KEY, 413, "bytes"),
        ("region outside", good | {"medplib": {"regions": [{"kind": "point", "point": [900, 10]}]}},
         KEY, 400, "outside"),
        ("bad region", good | {"medplib": {"regions": [{"kind": "box", "box": [50, 50, 10, 10]}]}},
         KEY, 400, "x1 <= x2"),
        ("region as path", good | {"medplib": {"regions": [{"kind": "mask", "mask": "/etc/passwd"}]}}, KEY, 400, "RLE"),
        ("placeholders", good | {"messages": _messages(_data_url(img), "<region> and <region>"),
                                 "medplib": {"regions": [{"kind": "point", "point": [5, 5]}]}},
         KEY, 400, "placeholders"),
        ("no image", good | {"messages": [{"role": "user", "content": "hello"}]}, KEY, 400, "exactly one image"),
        ("unknown model", good | {"model": "llava"}, KEY, 404, "not served"),
        ("missing key", good, None, 401, "API key"),
        ("wrong key", good, "nope", 401, "API key"),
        ("bad temperature", good | {"temperature": 5}, KEY, 400, "temperature"),
        ("segment: both", {"image": _data_url(img), "target": "polyp", "question": "x"}, KEY, 400, "exactly one"),
    ]
    for name, body, key, status, words in cases:
        path = "/v1/segment" if name.startswith("segment") else "/v1/chat/completions"
        r = _post(server, path, body, key=key)
        assert r.status_code == status, (name, r.status_code, r.text)
        assert words.lower() in r.json()["error"]["message"].lower(), (name, r.text)
    r = _post(server, "/v1/chat/completions", content=b'{"model": ')
    assert r.status_code == 400 and "json" in r.json()["error"]["message"].lower()
    assert httpx.get(server + "/v1/nothing").status_code == 404
    r = _post(server, "/v1/chat/completions", good)  # still serving
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "Sure, it is [SEG]."


def test_full_queue_answers_429_then_recovers(kvasir_model: Path, kvasir: tuple) -> None:
    # max_batch=1: with batching, two requests reaching the model thread together run as one batch
    # and only one is left waiting, however long the test waits
    app = create_app(Predictor.from_pretrained(kvasir_model),
                     ServerSettings(model_name=MODEL, queue_size=2, max_batch=1))
    server_state = app.state.server
    gate = threading.Event()
    ask_batch = server_state.predictor.ask_batch
    server_state.predictor.ask_batch = lambda queries: (gate.wait(30), ask_batch(queries))[1]  # hold the model thread
    body = {"model": MODEL, "messages": _messages(_data_url(kvasir[0])), "max_tokens": 3}
    with background_server(app) as base, ThreadPoolExecutor(3) as pool:
        # one request runs (blocked), two wait: the queue is full
        futures = [pool.submit(httpx.post, base + "/v1/chat/completions", json=body, timeout=60) for _ in range(3)]
        deadline = time.monotonic() + 30
        while httpx.get(base + "/healthz").json()["waiting"] < 2:
            assert time.monotonic() < deadline, "requests did not queue"
            time.sleep(0.05)
        r = httpx.post(base + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 429 and "busy" in r.json()["error"]["message"]
        gate.set()
        assert [f.result().status_code for f in futures] == [200, 200, 200]
        assert httpx.post(base + "/v1/chat/completions", json=body, timeout=60).status_code == 200
