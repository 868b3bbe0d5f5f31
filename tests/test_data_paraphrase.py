"""Paraphrasing through an OpenAI-compatible endpoint (a local stand-in server): cached, and a
reply that loses a placeholder is refused."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from medplib.data.builder import BuildConfig, build_samples
from medplib.data.paraphrase import Paraphraser
from medplib.data.phantoms import phantom_items
from medplib.errors import InputError


class _Handler(BaseHTTPRequestHandler):
    calls = 0

    def do_POST(self) -> None:  # the name http.server dispatches POST to
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Handler.calls += 1
        question = body["messages"][-1]["content"]
        reply = "Kindly tell me: " + question if "<region>" not in question else "What is shown there?"
        data = json.dumps({"choices": [{"message": {"content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        return None


@pytest.fixture()
def endpoint():
    server = HTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_paraphrase_is_cached_and_keeps_placeholders(endpoint: str, tmp_path: Path) -> None:
    para = Paraphraser(endpoint, "m", tmp_path / "cache.json")
    _Handler.calls = 0
    assert para("Segment the liver.") == "Kindly tell me: Segment the liver."
    assert para("Segment the liver.") == "Kindly tell me: Segment the liver." and _Handler.calls == 1
    assert para("What is <region>?") == "What is <region>?"  # the reply dropped the placeholder
    again = Paraphraser(endpoint, "m", tmp_path / "cache.json")
    assert again("Segment the liver.") == "Kindly tell me: Segment the liver." and _Handler.calls == 2
    cfg = BuildConfig(seed=0, tasks=["grounding", "region_vqa"], paraphrase=para)
    samples = list(build_samples(phantom_items(tmp_path, n=1, size=64), tmp_path, cfg))
    assert all(s.conversations[0].content.startswith("<image>\nKindly") for s in samples if s.task == "grounding")


def test_unreachable_endpoint_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="paraphrase endpoint"):
        Paraphraser("http://127.0.0.1:9/v1", "m", tmp_path / "c.json", timeout=2)("hi")
