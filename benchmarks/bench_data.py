"""Data-pipeline throughput: samples/s through SampleDataset + collate with 0 and 2 workers.

Builds phantom samples (and, with --kvasir DIR, Kvasir-SEG samples) into a temporary folder,
then reads every sample (image, region masks, target masks) through `make_loader`, once per
worker count, and prints one JSON line per run plus a side-by-side summary line.

    python benchmarks/bench_data.py [--n 200] [--size 256] [--kvasir ../shared/data/kvasir_seg]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from medplib.data.converters import build_source
from medplib.data.dataset import SampleDataset, make_loader
from medplib.data.phantoms import write_phantom_dataset
from medplib.data.schema import write_jsonl


def throughput(path: Path, workers: int, batch_size: int, repeats: int) -> dict:
    ds = SampleDataset(path)
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        n = sum(len(batch) for batch in make_loader(ds, batch_size=batch_size, num_workers=workers, seed=0) if batch)
        best = max(best, n / (time.perf_counter() - start))
    return {"dataset": path.parent.name, "samples": len(ds), "workers": workers, "batch_size": batch_size,
            "samples_per_s": round(best, 1), "skipped": ds.skipped}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=200, help="phantom images")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2, help="passes per setting; the best is reported")
    ap.add_argument("--kvasir", type=Path, default=None, help="Kvasir-SEG folder to add a real dataset")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sets = [write_phantom_dataset(Path(tmp) / "phantoms", n=args.n, size=args.size)]
        if args.kvasir is not None:
            out = Path(tmp) / "kvasir"
            write_jsonl(build_source("kvasir", args.kvasir, out), out / "samples.jsonl")
            sets.append(out / "samples.jsonl")
        for path in sets:
            runs = {w: throughput(path, w, args.batch_size, args.repeats) for w in (0, 2)}
            for r in runs.values():
                print(json.dumps(r))
            print(json.dumps({"dataset": path.parent.name, "samples_per_s_0_workers": runs[0]["samples_per_s"],
                              "samples_per_s_2_workers": runs[2]["samples_per_s"],
                              "speedup": round(runs[2]["samples_per_s"] / runs[0]["samples_per_s"], 2)}))


if __name__ == "__main__":
    main()
