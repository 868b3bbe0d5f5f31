"""Peak resident memory while loading a model of the published width: the eager loader (build at random in
fp32, read the files, copy, cast) vs the lean one (meta-device build, each tensor read straight into the
target dtype), side by side in one run. Each load runs in a fresh subprocess, so one's peak is not the other's.

The model is the `paper` preset (LLM 4096 wide, MoE MLPs with 2 experts, CLIP-L 1024 wide, SAM-Med2D
ViT-B) with fewer layers; it is written once, in bf16 (the published dtype) and sharded like the
published checkpoint. Prints one JSON line per loader and one with the ratios. Usage:

    python benchmarks/bench_load.py [--llm-layers 2] [--vision-layers 4] [--dtype bfloat16] [--shard-gb 1]
                                    [--folder runs/bench_load/model]

`peak_rss_over_weights` is the process's peak RSS (ru_maxrss, imports included) over the bytes of the
loaded weights; `added_over_weights` subtracts the RSS before loading (the import floor).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

DTYPES = ("bfloat16", "float16", "float32")


def _rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def write_model(folder: Path, llm_layers: int, vision_layers: int, dtype: str, shard_gb: float) -> None:
    import torch

    from medplib.api import MedPLIB

    overrides = {"llm.hf.num_hidden_layers": llm_layers, "vision.hf.num_hidden_layers": vision_layers}
    m = MedPLIB.from_preset("paper", seed=0, **overrides)
    m.model.to(getattr(torch, dtype))
    m.save_pretrained(folder, max_shard_bytes=int(shard_gb * 2**30))


def child(folder: Path, lean: bool, dtype: str) -> dict:
    """One load, measured in this (fresh) process."""
    import torch

    from medplib.api import MedPLIB

    before = _rss_bytes()
    t0 = time.perf_counter()
    m = MedPLIB.from_pretrained(folder, dtype=getattr(torch, dtype), lean=lean)
    seconds = time.perf_counter() - t0
    peak = _peak_bytes()
    tensors = {id(t): t for t in [*m.model.parameters(), *m.model.buffers()]}.values()  # a tied pair once
    weights = sum(t.numel() * t.element_size() for t in tensors)
    return {"bench": "load", "loader": "lean" if lean else "eager", "dtype": dtype, "seconds": round(seconds, 1),
            "weights_gb": round(weights / 1e9, 3), "rss_before_load_gb": round(before / 1e9, 3),
            "peak_rss_gb": round(peak / 1e9, 3), "peak_rss_over_weights": round(peak / weights, 3),
            "added_over_weights": round((peak - before) / weights, 3),
            "parameters": sum(p.numel() for p in m.model.parameters()),
            "llm_hidden": m.model.llm.config.hidden_size, "llm_layers": m.model.llm.config.num_hidden_layers}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--llm-layers", type=int, default=2)
    ap.add_argument("--vision-layers", type=int, default=4)
    ap.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="stored and loaded dtype")
    ap.add_argument("--shard-gb", type=float, default=1.0, help="largest shard written")
    ap.add_argument("--folder", type=Path, default=Path("runs/bench_load/model"))
    ap.add_argument("--rewrite", action="store_true", help="write the model again even if the folder exists")
    ap.add_argument("--child", choices=("write", "eager", "lean"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "write":
        write_model(args.folder, args.llm_layers, args.vision_layers, args.dtype, args.shard_gb)
        return
    if args.child:
        print(json.dumps(child(args.folder, args.child == "lean", args.dtype)))
        return
    if args.rewrite or not (args.folder / "config.json").is_file():
        # Written in its own process: building the fp32 model to write it peaks too.
        subprocess.run([sys.executable, __file__, "--child", "write", "--folder", str(args.folder),
                        "--dtype", args.dtype,
                        "--llm-layers", str(args.llm_layers), "--vision-layers", str(args.vision_layers),
                        "--shard-gb", str(args.shard_gb)], check=True)
    files = sorted(args.folder.glob("*.safetensors"))
    print(json.dumps({"bench": "load", "folder": str(args.folder), "files": [f.name for f in files],
                      "file_gb": round(sum(f.stat().st_size for f in files) / 1e9, 3)}))
    rows = {}
    for loader in ("eager", "lean"):
        out = subprocess.run([sys.executable, __file__, "--child", loader, "--folder", str(args.folder),
                              "--dtype", args.dtype],
                             check=True, capture_output=True, text=True)
        rows[loader] = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps(rows[loader]))
    print(json.dumps({"bench": "load",
                      "eager_peak_over_lean_peak": round(rows["eager"]["peak_rss_gb"] / rows["lean"]["peak_rss_gb"], 2),
                      "lean_peak_rss_over_weights": rows["lean"]["peak_rss_over_weights"],
                      "eager_peak_rss_over_weights": rows["eager"]["peak_rss_over_weights"]}))


if __name__ == "__main__":
    main()
