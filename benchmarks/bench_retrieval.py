"""Example retrieval: exact (IndexFlatIP) vs HNSW search on synthetic embeddings, and index build time on
real images, side by side in one run.

1. `N` synthetic unit vectors of `--dim` dimensions (clustered like image embeddings, and uniform on the
   sphere, the hardest case for a graph index) go into one exact and one HNSW ExampleIndex; `--queries`
   held-out vectors are searched one at a time through `ExampleIndex.search` (k=3, the published top-3).
   Reported per index: build seconds, median and p95 query latency, and recall@3 of HNSW against exact
   search, for several `ef_search` values.
2. `medplib data build --source kvasir` samples of `--images` real Kvasir-SEG images are embedded by a
   random preset model's vision tower into an exact index (read, checked, embedded, added, saved):
   seconds per 1,000 images.

Prints one JSON line per measurement. Usage:
    python benchmarks/bench_retrieval.py [--n 100000] [--dim 256] [--queries 1000] [--kvasir DIR]
        [--images 1000] [--presets tiny] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from medplib.api import MedPLIB
from medplib.data.converters import build_source
from medplib.data.schema import write_jsonl
from medplib.retrieval.embed import ImageEmbedder
from medplib.retrieval.index import ExampleIndex, HNSWParams, IndexEntry, add_library


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def synthetic(kind: str, n: int, dim: int, seed: int) -> np.ndarray:
    """(n, dim) unit vectors: `clustered` (2,000 centres, noise of a third of the centre norm) or `uniform`."""
    rng = np.random.default_rng(seed)
    if kind == "uniform":
        return _unit(rng.standard_normal((n, dim), dtype=np.float32))
    centres = _unit(rng.standard_normal((2000, dim), dtype=np.float32))
    noise = rng.standard_normal((n, dim), dtype=np.float32) / (3 * np.sqrt(dim))
    return _unit(centres[rng.integers(0, len(centres), n)] + noise)


def _entries(n: int) -> list[IndexEntry]:
    return [IndexEntry(image=f"synthetic/{i}.png", mask=f"synthetic/{i}_mask.png", label="synthetic", sample=str(i),
                       modality=None, source="synthetic", split="train", hash=f"{i:032x}") for i in range(n)]


def _latency(index: ExampleIndex, queries: np.ndarray, k: int) -> tuple[list[list[int]], float, float]:
    ids, times = [], []
    for q in queries:
        start = time.perf_counter()
        hits = index.search(q, k)
        times.append(time.perf_counter() - start)
        ids.append([h.position for h in hits])
    return ids, float(np.median(times) * 1e3), float(np.percentile(times, 95) * 1e3)


def bench_search(args: argparse.Namespace, tmp: Path) -> None:
    for data in ("clustered", "uniform"):
        vectors = synthetic(data, args.n + args.queries, args.dim, seed=0)
        library, queries = vectors[:args.n], vectors[args.n:]
        entries = _entries(args.n)
        exact_ids = None
        for kind in ("flat", "hnsw"):
            hnsw = HNSWParams(m=args.hnsw_m, ef_construction=args.ef_construction)
            index = ExampleIndex.create(tmp / f"{data}-{kind}", dim=args.dim, fingerprint="synthetic", kind=kind,
                                        hnsw=hnsw)
            start = time.perf_counter()
            index.add(library, entries)
            build_s = time.perf_counter() - start
            start = time.perf_counter()
            index.save()
            index = ExampleIndex.load(index.folder)
            save_load_s = time.perf_counter() - start
            for ef in (args.ef_search if kind == "hnsw" else [None]):
                if ef is not None:
                    index.hnsw = HNSWParams(args.hnsw_m, args.ef_construction, ef)
                ids, p50, p95 = _latency(index, queries, args.k)
                if kind == "flat":
                    exact_ids = ids
                recall = np.mean([len(set(a) & set(b)) / args.k for a, b in zip(ids, exact_ids)])
                print(json.dumps({"bench": "retrieval_search", "data": data, "n": args.n, "dim": args.dim,
                                  "kind": kind, "hnsw_m": args.hnsw_m if kind == "hnsw" else None, "ef_search": ef,
                                  "build_s": round(build_s, 2), "save_load_s": round(save_load_s, 2),
                                  "query_ms_p50": round(p50, 3), "query_ms_p95": round(p95, 3),
                                  f"recall_at_{args.k}": round(float(recall), 4), "queries": len(queries)}))


def bench_build(args: argparse.Namespace, tmp: Path) -> None:
    data = tmp / "kvasir"
    samples = [s for s in build_source("kvasir", args.kvasir, data) if s.task == "grounding"][:args.images]
    write_jsonl(samples, data / "samples.jsonl")
    for preset in args.presets:
        model = MedPLIB.from_preset(preset, seed=0)
        model.model.eval()
        embedder = ImageEmbedder(model, batch_size=args.batch_size)
        index = ExampleIndex.create(tmp / f"kvasir-{preset}", dim=embedder.dim, fingerprint=embedder.fingerprint)
        start = time.perf_counter()
        report = add_library(index, embedder, data)
        index.save()
        seconds = time.perf_counter() - start
        print(json.dumps({"bench": "retrieval_build", "preset": preset, "images": report.added, "dim": embedder.dim,
                          "image_size": "256x256", "batch_size": args.batch_size, "seconds": round(seconds, 2),
                          "seconds_per_1000_images": round(seconds * 1000 / report.added, 2),
                          "skipped": len(report.skipped)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000, help="synthetic library size")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--hnsw-m", type=int, default=32)
    ap.add_argument("--ef-construction", type=int, default=200)
    ap.add_argument("--ef-search", type=int, nargs="+", default=[16, 64, 128, 256])
    ap.add_argument("--kvasir", type=Path, default=None, help="Kvasir-SEG folder for the real build timing")
    ap.add_argument("--images", type=int, default=1000, help="real images to index")
    ap.add_argument("--presets", nargs="+", default=["tiny"])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2, help="torch and faiss CPU threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        bench_search(args, Path(tmp))
        if args.kvasir is not None:
            bench_build(args, Path(tmp))


if __name__ == "__main__":
    main()
