"""In-context examples through the front ends, on real Kvasir-SEG images: `medplib ask --example` and
`--retrieve INDEX --k`, and the HTTP API's `medplib.examples` (image + mask data URLs), with malformed
examples as clear errors (CLI) and 4xx JSON (HTTP) while the server keeps serving."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import pytest
import typer
from conftest import kvasir_images
from PIL import Image
from typer.testing import CliRunner

from medplib.api import MedPLIB
from medplib.errors import InputError
from medplib.inference import Predictor

QUESTION = "Segment the same structure in this image."
SIDE = 160  # the real images shrunk (the tiny preset reads 112 px; the CPU is shared)


def _small(img: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h, w = mask.shape
    size = (round(w * SIDE / max(h, w)), round(h * SIDE / max(h, w)))
    return (np.asarray(Image.fromarray(img).resize(size, Image.BILINEAR)),
            np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 0)


@pytest.fixture(scope="module")
def files(
    shared_data: Path, tmp_path_factory: pytest.TempPathFactory
) -> list[tuple[Path, Path, np.ndarray, np.ndarray]]:
    """Four real (image, polyp mask) pairs written as PNG files: (image path, mask path, rgb, mask)."""
    folder = tmp_path_factory.mktemp("kvasir_small")
    out = []
    for name, img, mask in kvasir_images(shared_data, 4):
        rgb, m = _small(img, mask)
        ip, mp = folder / f"{name}.png", folder / f"{name}_mask.png"
        Image.fromarray(rgb).save(ip)
        Image.fromarray(m.astype(np.uint8) * 255).save(mp)
        out.append((ip, mp, rgb, m))
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return MedPLIB.from_preset("tiny", seed=0).save_pretrained(tmp_path_factory.mktemp("tiny") / "model")


def _ask(app: typer.Typer, *args: str):
    return CliRunner().invoke(app, ["ask", *map(str, args)])


def test_cli_examples_answer_as_the_predictor_does(runner_app, files, model_dir: Path) -> None:
    (q, _, rgb, _), ex = files[3], files[:2]
    res = _ask(runner_app, q, QUESTION, "--model", model_dir, "--json", "--max-new-tokens", "5",
               *[a for ip, mp, *_ in ex for a in ("--example", f"{ip}:{mp}")])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    assert out["examples"] == 2
    p = Predictor.from_pretrained(model_dir)
    p.set_image(rgb)
    want = p.ask(QUESTION, examples=[(e[2], e[3]) for e in ex], max_new_tokens=5)
    assert out["text"] == want.text
    none = p.ask(QUESTION, max_new_tokens=5)
    assert want.prompt_tokens > none.prompt_tokens  # the examples are in the prompt


def test_cli_malformed_examples_are_input_errors(runner_app, files, model_dir: Path, tmp_path: Path) -> None:
    q, mask_path, rgb, mask = files[3]
    cropped, empty = tmp_path / "cropped.png", tmp_path / "empty.png"
    Image.fromarray(mask[:-7].astype(np.uint8) * 255).save(cropped)
    Image.fromarray(np.zeros_like(mask, np.uint8)).save(empty)
    cases = [(f"{files[0][0]}:{cropped}", "the mask is"), (f"{files[0][0]}:{empty}", "mask is empty"),
             (f"{tmp_path / 'gone.png'}:{mask_path}", "not found"),
             (f"{files[0][0]}:{tmp_path / 'gone.png'}", "not found"),
             (str(files[0][0]), "IMAGE:MASK")]
    for spec, words in cases:
        res = _ask(runner_app, q, QUESTION, "--model", model_dir, "--example", spec)
        assert isinstance(res.exception, InputError) and words in str(res.exception), (spec, res.output, res.exception)


def test_cli_retrieve_uses_the_index_and_never_the_query(runner_app, files, model_dir: Path, tmp_path: Path) -> None:
    from medplib.retrieval.embed import ImageEmbedder, image_hash
    from medplib.retrieval.index import ExampleIndex, IndexEntry, retrieve_examples

    m = MedPLIB.from_pretrained(model_dir)
    emb = ImageEmbedder(m)
    index = ExampleIndex.create(tmp_path / "idx", dim=emb.dim, fingerprint=emb.fingerprint, model=model_dir)
    entries = [IndexEntry(image=str(ip), mask=str(mp), label="polyp", sample=ip.stem, modality="endoscopy",
                          source="kvasir", split="train", hash=image_hash(rgb)) for ip, mp, rgb, _ in files]
    index.add(emb.embed([f[2] for f in files]), entries)
    index.save()
    q, _, rgb, _ = files[0]  # indexed itself: it must not be its own example
    got = retrieve_examples(ExampleIndex.load(tmp_path / "idx"), emb, rgb, k=3)
    assert len(got) == 3 and not any(np.array_equal(e.image, rgb) for e in got)
    res = _ask(runner_app, q, QUESTION, "--model", model_dir, "--json", "--max-new-tokens", "4",
               "--retrieve", tmp_path / "idx", "--k", "2")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    p = Predictor(m)
    p.set_image(rgb)
    assert out["examples"] == 2 and out["text"] == p.ask(QUESTION, examples=got[:2], max_new_tokens=4).text
    res = _ask(runner_app, q, QUESTION, "--model", model_dir, "--retrieve", tmp_path / "idx",
               "--retrieve-label", "liver")
    assert isinstance(res.exception, InputError) and "no example labelled 'liver'" in str(res.exception)


# ------------------------------------------------------------------ HTTP
def _url(array: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(array.astype(np.uint8) * 255 if array.dtype == bool else array).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[str]:
    from medplib.serving.app import ServerSettings, create_app
    from medplib.serving.testing import background_server

    with background_server(create_app(Predictor.from_pretrained(model_dir), ServerSettings(model_name="tiny"))) as base:
        yield base


def test_http_examples_in_the_medplib_field(server: str, files, model_dir: Path) -> None:
    (_, _, rgb, _), ex = files[3], files[:2]
    pairs = [{"image": _url(e[2]), "mask": _url(e[3])} for e in ex]
    body = {"model": "tiny", "max_tokens": 5, "medplib": {"examples": pairs},
            "messages": [{"role": "user", "content": [{"type": "text", "text": QUESTION},
                                                      {"type": "image_url", "image_url": {"url": _url(rgb)}}]}]}
    r = httpx.post(server + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    p = Predictor.from_pretrained(model_dir)
    p.set_image(rgb)
    want = p.ask(QUESTION, examples=[(e[2], e[3]) for e in ex], max_new_tokens=5)
    assert r.json()["choices"][0]["message"]["content"] == want.text
    assert r.json()["usage"]["prompt_tokens"] == want.prompt_tokens
    seg = httpx.post(server + "/v1/segment", json={"image": _url(rgb), "question": QUESTION, "examples": pairs,
                                                   "max_tokens": 5}, timeout=120)
    assert seg.status_code == 200 and seg.json()["text"] == want.text


def test_http_malformed_examples_get_400_and_the_server_keeps_serving(server: str, files) -> None:
    (_, _, rgb, mask), img = files[3], files[0][2]
    ok = {"image": _url(img), "mask": _url(files[0][3])}
    cases = [
        ("size", [{"image": _url(img), "mask": _url(mask[:-5])}], "examples[0]: the mask is"),
        ("empty", [ok, {"image": _url(img), "mask": _url(np.zeros(files[0][3].shape, bool))}],
         "examples[1]: the mask is empty"),
        ("not an image", [{"image": _url(img), "mask": "data:image/png;base64," + base64.b64encode(b"hi").decode()}],
         "examples[0]: mask is not a readable"),
        ("too many", [ok] * 4, "at most 3"),
        ("no mask", [{"image": _url(img)}], "mask"),
    ]
    for name, examples, words in cases:
        r = httpx.post(server + "/v1/segment", json={"image": _url(rgb), "question": QUESTION, "examples": examples},
                       timeout=60)
        assert r.status_code == 400, (name, r.status_code, r.text)
        assert words.lower() in r.json()["error"]["message"].lower(), (name, r.text)
    r = httpx.post(server + "/v1/segment", json={"image": _url(rgb), "question": QUESTION, "max_tokens": 3}, timeout=60)
    assert r.status_code == 200  # still serving
