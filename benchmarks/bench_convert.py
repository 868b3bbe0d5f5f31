"""Peak memory of `medplib convert` at the published width, streamed versus loading every shard at once.

A medplib model folder of the `paper` preset's widths (LLaMA 4096 wide with the 2-expert MoE, SAM-Med2D
ViT-B, CLIP-L; fewer layers so it fits a laptop) is written with random bf16 weights, then converted
to the published layout (safetensors shards) and back, each in its own process, beside a baseline that
reads every shard into one dict and saves it (what a converter without streaming does). Each process
reports its own peak resident memory; `imports` is the floor every process pays for torch and transformers.

    python benchmarks/bench_convert.py --out runs/bench_convert --llm-layers 2 --vision-layers 4
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from medplib.config import TokenizerConfig, preset
from medplib.model.convert import write_safetensors
from medplib.model.summary import build_on_meta
from medplib.tokenizer import train_tokenizer

PEAK = "import resource; print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"
JOBS = {
    "imports": "import medplib.model.convert, transformers",
    "to_published": "from medplib.model.convert import medplib_to_published as f; "
                    "f('{src}', '{pub}', max_shard_bytes=512 * 2**20, log=lambda s: None)",
    "to_medplib": "from medplib.model.convert import published_to_medplib as f; "
                  "f('{pub}', '{back}', log=lambda s: None)",
    # The baseline: every shard in memory at once, then one save.
    "load_all": "import json; from safetensors.torch import load_file, save_file; "
                "idx = json.load(open('{pub}/model.safetensors.index.json')); sd = {{}}; "
                "[sd.update(load_file('{pub}/' + f)) for f in sorted(set(idx['weight_map'].values()))]; "
                "save_file(sd, '{out}/load_all.safetensors')",
}


def write_model(folder: Path, llm_layers: int, vision_layers: int) -> int:
    """A medplib folder with random bf16 weights, written tensor by tensor; returns its weight bytes."""
    cfg = preset("paper", **{"llm.hf.num_hidden_layers": llm_layers, "vision.hf.num_hidden_layers": vision_layers,
                             "region.spatial": False})
    tok = train_tokenizer(TokenizerConfig(vocab_size=32000))
    folder.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(folder))
    d = cfg.to_dict()
    d["llm"]["hf"] = dict(d["llm"]["hf"], vocab_size=len(tok), tie_word_embeddings=False)
    (folder / "config.json").write_text(json.dumps(d, indent=2))
    shapes = {k: tuple(v.shape) for k, v in build_on_meta(cfg, len(tok)).state_dict().items()}
    entries = [(k, torch.bfloat16, s) for k, s in shapes.items()]
    gen = torch.Generator().manual_seed(0)
    write_safetensors(folder / "model.safetensors", entries,
                      ((k, torch.randn(s, generator=gen).to(torch.bfloat16)) for k, _, s in entries))
    return sum(torch.Size(s).numel() * 2 for s in shapes.values())


def run(job: str, **paths: str) -> dict[str, float]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", JOBS[job].format(**paths) + "; " + PEAK],
                          capture_output=True, text=True, check=True)
    peak = next(int(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("PEAK"))
    return {"peak_rss_gb": round(peak / 1e9, 3), "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--llm-layers", type=int, default=2)
    ap.add_argument("--vision-layers", type=int, default=4)
    args = ap.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    paths = {"src": str(args.out / "medplib"), "pub": str(args.out / "published"), "back": str(args.out / "back"),
             "out": str(args.out)}
    nbytes = write_model(args.out / "medplib", args.llm_layers, args.vision_layers)
    result = {"weights_gb": round(nbytes / 1e9, 3), "llm_layers": args.llm_layers,
              "vision_layers": args.vision_layers, "torch_threads": torch.get_num_threads()}
    for job in ("imports", "to_published", "to_medplib", "load_all"):
        result[job] = run(job, **paths)
    floor = result["imports"]["peak_rss_gb"]
    for job in ("to_published", "to_medplib", "load_all"):
        above = (result[job]["peak_rss_gb"] - floor) / result["weights_gb"]
        result[job]["above_imports_per_weight_byte"] = round(above, 3)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
