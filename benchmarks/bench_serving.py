"""Serving benchmarks, side by side in one run; prints one JSON object per line.

1. first vs second question on the same image (Predictor, and over HTTP where the server's
   content-keyed cache must recognise the image again): ratio of median latencies;
2. decoding tokens/s with the KV cache on vs off (same prompts, greedy, so the same tokens);
3. N requests at concurrency C against `medplib serve` over loopback HTTP: p50/p99 latency,
   requests/s, errors;
4. the same load at concurrency 1, 4 and 8 (`--levels`), one request at a time (max_batch 1) vs
   decoded together (`--max-batch`), with the answers compared (`--only-batched`: just this).

    python benchmarks/bench_serving.py --model runs/demo/model
    python benchmarks/bench_serving.py            # trains the test suite's tiny Kvasir model first

Images are real Kvasir-SEG images (../shared/data/kvasir_seg or MEDPLIB_DATA)."""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

from medplib.inference import Predictor
from medplib.serving.app import ServerSettings, create_app
from medplib.serving.testing import background_server

QUESTION = "Please segment the polyp."
REPO = Path(__file__).resolve().parents[1]


def emit(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def kvasir(root: Path, n: int) -> list[tuple[Path, np.ndarray, np.ndarray]]:
    folder = root / "kvasir_seg"
    ids = sorted(p.stem for p in (folder / "images").glob("*.jpg"))[:n]
    return [(folder / "images" / f"{i}.jpg",
             np.asarray(Image.open(folder / "images" / f"{i}.jpg").convert("RGB")).copy(),
             np.asarray(Image.open(folder / "masks" / f"{i}.jpg").convert("L")) > 127) for i in ids]


def train_tiny(root: Path, out: Path) -> Path:
    """The test suite's model: `tiny`, 160 steps on 4 Kvasir-SEG images."""
    if (out / "model.safetensors").is_file():
        return out
    from medplib.api import MedPLIB
    from medplib.data.schema import Turn
    from medplib.training.fit import fit

    m = MedPLIB.from_preset("tiny", seed=0)
    items = [m.processor.encode(img, [Turn(role="user", content=QUESTION),
                                      Turn(role="assistant", content="Sure, it is [SEG].")],
                                target_masks=[mask]) for _, img, mask in kvasir(root, 4)]
    fit(m, items, steps=160, batch_size=4, lr=1e-3, seed=0)
    return m.save_pretrained(out)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def bench_second_question(model: Path, images: list, repeats: int, max_new_tokens: int | None) -> None:
    p = Predictor.from_pretrained(model)
    first, second, image = [], [], []
    for _ in range(repeats):
        p = Predictor(p.model)  # empty cache: every image is new again
        for _, img, _ in images:
            t0 = time.perf_counter()
            image.append(p.set_image(img))
            p.ask(QUESTION, max_new_tokens=max_new_tokens)
            first.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            p.set_image(img)
            p.ask(QUESTION, max_new_tokens=max_new_tokens)
            second.append(time.perf_counter() - t0)
    f, s = statistics.median(first), statistics.median(second)
    emit(bench="second_question", via="predictor", model=model.name, n=len(first), first_ms=round(f * 1e3, 1),
         second_ms=round(s * 1e3, 1), image_features_ms=round(statistics.median(image) * 1e3, 1), ratio=round(s / f, 3))


def bench_kv_cache(model: Path, images: list, max_new_tokens: int) -> None:
    p = Predictor.from_pretrained(model)
    questions = ["What is shown in this image?", "Describe the image.", QUESTION]
    totals: dict[bool, list[float]] = {True: [0.0, 0.0], False: [0.0, 0.0]}  # tokens, seconds
    for _, img, _ in images:
        p.set_image(img)
        for q in questions:
            for use_cache in (True, False):
                out = p.ask(q, max_new_tokens=max_new_tokens, use_cache=use_cache)
                totals[use_cache][0] += len(out.token_ids)
                totals[use_cache][1] += out.timings["generate_s"]
    on, off = (totals[c][0] / totals[c][1] for c in (True, False))
    emit(bench="kv_cache", tokens=int(totals[True][0]), max_new_tokens=max_new_tokens,
         tokens_per_s_cache_on=round(on, 1), tokens_per_s_cache_off=round(off, 1), speedup=round(on / off, 2))


def _request(url: str) -> dict:
    return {"model": "bench", "messages": [{"role": "user", "content": [
        {"type": "text", "text": QUESTION}, {"type": "image_url", "image_url": {"url": url}}]}]}


def bench_http(model: Path, images: list, n_requests: int, concurrency: int, repeats: int) -> None:
    urls = ["data:image/jpeg;base64," + base64.b64encode(path.read_bytes()).decode() for path, _, _ in images]
    app = create_app(Predictor.from_pretrained(model), ServerSettings(model_name="bench"))
    with background_server(app) as base, httpx.Client(timeout=120) as client:
        # First vs second question on one image, over HTTP (decode + content hash on every request).
        first, second = [], []
        for _ in range(repeats):
            app.state.server.predictor = Predictor(app.state.server.predictor.model)  # empty cache
            for url in urls:
                for out in (first, second):
                    t0 = time.perf_counter()
                    client.post(base + "/v1/chat/completions", json=_request(url)).raise_for_status()
                    out.append(time.perf_counter() - t0)
        f, s = statistics.median(first), statistics.median(second)
        emit(bench="second_question", via="http", n=len(first), first_ms=round(f * 1e3, 1), second_ms=round(s * 1e3, 1),
             ratio=round(s / f, 3))

        def one(i: int) -> tuple[float, int]:
            t0 = time.perf_counter()
            try:
                r = client.post(base + "/v1/chat/completions", json=_request(urls[i % len(urls)]))
                status = r.status_code
            except httpx.HTTPError:
                status = -1
            return time.perf_counter() - t0, status

        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(one, range(n_requests)))
        wall = time.perf_counter() - t0
        lat = [r[0] for r in results]
        errors = [r[1] for r in results if r[1] != 200]
        emit(bench="load", requests=n_requests, concurrency=concurrency, errors=len(errors),
             error_statuses=sorted(set(errors)), p50_ms=round(pct(lat, 50) * 1e3, 1),
             p99_ms=round(pct(lat, 99) * 1e3, 1), requests_per_s=round(n_requests / wall, 2))


def bench_batched(model: Path, images: list, n_requests: int, concurrencies: list[int], max_batch: int,
                  decode: str) -> None:
    """Requests/s and p50/p99 latency at each concurrency, one request at a time (max_batch 1) vs
    decoded together (max_batch), in one run; the batched answers are checked against the unbatched ones.
    Both servers run side by side and take turns at each concurrency, so a change in the machine's
    load hits both alike."""
    from contextlib import ExitStack

    urls = ["data:image/jpeg;base64," + base64.b64encode(path.read_bytes()).decode() for path, _, _ in images]
    rows: dict[tuple[int, int], float] = {}
    answers: dict[int, dict[int, str]] = {}
    with ExitStack() as stack, httpx.Client(timeout=300) as client:
        servers = {}
        for batch in (1, max_batch):
            app = create_app(Predictor.from_pretrained(model),
                             ServerSettings(model_name="bench", max_batch=batch, decode=decode,
                                            queue_size=max(64, n_requests)))
            base = stack.enter_context(background_server(app))
            for url in urls:  # warm: every image's features cached, as in a steady-state server
                client.post(base + "/v1/chat/completions", json=_request(url)).raise_for_status()
            servers[batch] = (app, base)
        for c in concurrencies:
            for batch, (app, base) in servers.items():
                def one(i: int, base: str = base) -> tuple[float, int, str]:
                    t0 = time.perf_counter()
                    r = client.post(base + "/v1/chat/completions", json=_request(urls[i % len(urls)]))
                    text = r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else ""
                    return time.perf_counter() - t0, r.status_code, text

                app.state.server.worker.batch_sizes.clear()
                t0 = time.perf_counter()
                with ThreadPoolExecutor(c) as pool:
                    results = list(pool.map(one, range(n_requests)))
                wall = time.perf_counter() - t0
                lat = [r[0] for r in results]
                sizes = app.state.server.worker.batch_sizes
                rows[(batch, c)] = n_requests / wall
                answers.setdefault(batch, {}).update({i % len(urls): r[2] for i, r in enumerate(results)})
                emit(bench="serve_load", max_batch=batch, decode=decode, concurrency=c, requests=n_requests,
                     errors=sum(r[1] != 200 for r in results), p50_ms=round(pct(lat, 50) * 1e3, 1),
                     p99_ms=round(pct(lat, 99) * 1e3, 1), requests_per_s=round(rows[(batch, c)], 2),
                     mean_batch=round(float(np.mean(sizes)), 2) if sizes else 0.0)
    for c in concurrencies:
        emit(bench="serve_batched_over_unbatched", concurrency=c, max_batch=max_batch,
             requests_per_s_ratio=round(rows[(max_batch, c)] / rows[(1, c)], 2),
             same_answers=answers[1] == answers[max_batch])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, help="a saved medplib model folder (default: train the tiny Kvasir model)")
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("MEDPLIB_DATA", REPO.parent / "shared" / "data")))
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steady figures on a shared machine)")
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 4, 8],
                    help="concurrencies of the batched-vs-not load test")
    ap.add_argument("--max-batch", type=int, default=8, help="the batched server's max_batch")
    ap.add_argument("--decode", default="eager", help="the servers' decode mode (eager, static, compiled)")
    ap.add_argument("--only-batched", action="store_true", help="run only the batched-vs-not load test")
    ap.add_argument("--preset", action="append", default=[],
                    help="also time the first/second question on a random-init preset (answers fixed at 9 tokens)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    model = args.model or train_tiny(args.data, REPO / "runs" / "bench_serving" / "model")
    images = kvasir(args.data, args.images)
    emit(bench="setup", model=str(model), images=len(images), torch_threads=args.threads, cpus=os.cpu_count())
    if args.only_batched:
        bench_batched(model, images, args.requests, args.levels, args.max_batch, args.decode)
        return
    bench_second_question(model, images, args.repeats, None)
    for name in args.preset:
        from medplib.api import MedPLIB

        folder = MedPLIB.from_preset(name, seed=0).save_pretrained(REPO / "runs" / "bench_serving" / f"random-{name}")
        bench_second_question(folder, images[:2], 1, 9)
    bench_kv_cache(model, images, args.max_new_tokens)
    bench_http(model, images, args.requests, args.concurrency, args.repeats)
    bench_batched(model, images, args.requests, args.levels, args.max_batch, args.decode)


if __name__ == "__main__":
    main()
