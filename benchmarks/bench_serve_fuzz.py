"""Resident memory of a `medplib serve` process before and after a fuzz, with the prompt limits on
(the defaults) and off, side by side in one run. Prints JSON lines.

Each variant is a fresh server process. After a warm-up of valid requests (model loaded, image
features cached) its RSS is read ("before"); then it gets `--requests` bodies that schemathesis
generates from the server's own `/openapi.json` (valid and schema-violating, a quarter of them
with the served model's name and a real image), and the heavy cases an outside tester sent:
2-million-character questions (12 MB bodies), a 1x1 DICOM, temperatures of 1e-300 and 5e-324,
and a valid request sent just behind each long question (its latency is reported). RSS is
sampled every 20 ms during the fuzz ("peak") and read again after ("after"); the target is
after / before <= 1.25.

    python benchmarks/bench_serve_fuzz.py                    # a `tiny` model with fresh weights
    python benchmarks/bench_serve_fuzz.py --model runs/demo/model --requests 2000
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil
import pydicom
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.data import get_testdata_file
from schemathesis import GenerationMode

from medplib.data.phantoms import make_phantom

MODEL = "bench"
LIMITS_OFF = ["--max-prompt-chars", str(10**9), "--max-messages", str(10**9), "--max-regions", str(10**9)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _image_url() -> str:
    rgb = make_phantom("ct", seed=0, size=128).image
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _one_pixel_dicom_url() -> str:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.Rows, ds.Columns = 1, 1  # pixel data left as it was: 128x128
    buf = io.BytesIO()
    ds.save_as(buf)
    return "data:application/dicom;base64," + base64.b64encode(buf.getvalue()).decode()


def _chat(url: str, question: str = "What imaging modality is this?", **extra: Any) -> dict[str, Any]:
    content = [{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": url}}]
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4, **extra}


class Server:
    """A `medplib serve` subprocess on a free loopback port, and its RSS sampled in a thread."""

    def __init__(self, model: Path, extra: list[str]):
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "medplib.cli", "serve", "--model", str(model), "--model-name", MODEL,
               "--port", str(self.port), *extra]
        self.log = tempfile.TemporaryFile("w+")  # not a pipe: a full pipe would stall the server
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.log, text=True)
        self.ps = psutil.Process(self.proc.pid)
        self.peak = 0
        self._stop = threading.Event()
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(self.base + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start: {self.close()}")
            time.sleep(0.2)

    def rss(self) -> int:
        return self.ps.memory_info().rss

    def sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.rss())

    def close(self) -> str:
        """Stop the server; its log."""
        self._stop.set()
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.seek(0)
        return self.log.read()


def fuzz(base: str, n: int, image_url: str) -> Counter[int]:
    """`n` schema-generated requests over the three POST routes; statuses counted."""
    schema = schemathesis.openapi.from_url(base + "/openapi.json")
    statuses: Counter[int] = Counter()

    def fuzz_route(path: str, mode: GenerationMode, max_examples: int) -> None:
        @settings(max_examples=max_examples, deadline=None, database=None, derandomize=True,
                  phases=[Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=schema[path]["POST"].as_strategy(generation_mode=mode), deep=st.integers(0, 3))
        def send(case: Any, deep: int) -> None:
            if deep == 0 and isinstance(case.body, dict):  # past the model-name and image checks
                case.body["model"] = MODEL
                if path == "/v1/chat/completions":
                    case.body["messages"] = _chat(image_url)["messages"]
                else:
                    case.body["image"] = image_url
            statuses[case.call(base_url=base, timeout=120).status_code] += 1

        send()

    ops = [("/v1/chat/completions", 0.5), ("/v1/segment", 0.3), ("/v1/preview", 0.2)]
    for path, share in ops:
        for mode in GenerationMode:
            fuzz_route(path, mode, max(1, round(n * share / 2)))
    return statuses


def heavy(base: str, image_url: str, repeats: int) -> tuple[Counter[int], list[float]]:
    """The outside tester's cases; returns statuses and the latency of a valid request sent 50 ms
    after each long question."""
    statuses: Counter[int] = Counter()
    behind: list[float] = []
    long_question = "\u00e9" * 2_000_000  # 12 MB of JSON escapes
    dicom = _one_pixel_dicom_url()
    with ThreadPoolExecutor(2) as pool:
        for _ in range(repeats):
            big = pool.submit(httpx.post, base + "/v1/chat/completions", json=_chat(image_url, long_question),
                              timeout=300)
            time.sleep(0.05)
            start = time.perf_counter()
            statuses[httpx.post(base + "/v1/chat/completions", json=_chat(image_url), timeout=300).status_code] += 1
            behind.append(time.perf_counter() - start)
            statuses[big.result().status_code] += 1
            for body, path in [({"image": dicom}, "/v1/preview"), (_chat(dicom), "/v1/chat/completions"),
                               (_chat(image_url, temperature=1e-300), "/v1/chat/completions"),
                               (_chat(image_url, temperature=5e-324), "/v1/chat/completions")]:
                statuses[httpx.post(base + path, json=body, timeout=300).status_code] += 1
    return statuses, behind


def run(model: Path, name: str, extra: list[str], n: int, heavy_repeats: int) -> dict[str, Any]:
    image_url = _image_url()
    server = Server(model, extra)
    try:
        for _ in range(5):  # warm-up: the model's first answers and the image's features
            httpx.post(server.base + "/v1/chat/completions", json=_chat(image_url), timeout=120).raise_for_status()
        before = server.rss()
        sampler = threading.Thread(target=server.sample, daemon=True)
        sampler.start()
        start = time.perf_counter()
        statuses = fuzz(server.base, n, image_url)
        heavy_statuses, behind = heavy(server.base, image_url, heavy_repeats)
        elapsed = time.perf_counter() - start
        time.sleep(0.5)  # let the last responses' buffers go
        after = server.rss()
    finally:
        log = server.close()
    statuses.update(heavy_statuses)
    return {"bench": "serve_fuzz_memory", "variant": name, "requests": sum(statuses.values()),
            "statuses": {str(k): v for k, v in sorted(statuses.items())}, "seconds": round(elapsed, 1),
            "rss_before_mb": round(before / 2**20, 1), "rss_peak_mb": round(max(server.peak, after) / 2**20, 1),
            "rss_after_mb": round(after / 2**20, 1), "after_over_before": round(after / before, 3),
            "valid_behind_long_question_s": round(statistics.median(behind), 3),
            "tracebacks_in_log": log.count("Traceback")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", type=Path, help="a saved medplib model folder (default: `tiny`, fresh weights)")
    ap.add_argument("--requests", type=int, default=1000, help="schema-generated requests per variant")
    ap.add_argument("--heavy", type=int, default=5, help="rounds of the heavy cases per variant")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from medplib.api import MedPLIB

            model = MedPLIB.from_preset("tiny", seed=0).save_pretrained(Path(tmp) / "tiny")
        for name, extra in (("prompt_limits", []), ("prompt_limits_off", LIMITS_OFF)):
            print(json.dumps({**run(model, name, extra, args.requests, args.heavy), "model": Path(model).name}),
                  flush=True)


if __name__ == "__main__":
    main()
