"""Report generation on phantoms with and without TISR (model/tisr.py), the same data, steps and seed.

Train phantoms and held-out phantoms (other images: a different phantom seed) get the builder's report
sample (`tasks=report`: PeFoMed's fixed `[report]` prompt, the templated report as the answer). Each variant
trains one stage through the recipe runner (`medplib.training.loop.train`) from the same preset and seed:
`plain` is the report generator alone (loss: ce), `tisr` adds the pseudo-words (`tisr.enabled`) and the
image-report contrastive loss (`loss.contrastive`). Then both answer the held-out prompts greedily under an
answer-length limit, and are scored: BLEU-1..4 (corpus), METEOR, ROUGE-L, CIDEr-D
(`medplib.evaluation.text`), the MiniLM similarity (`medplib.evaluation.semantic`), and the finding-level
scores (`medplib.evaluation.findings`: each templated finding of the image stated exactly, the impression).
Prints one JSON line per variant, then one with the differences (tisr - plain). Usage:

    python benchmarks/bench_reports.py --preset lite --steps 200 --train 64 --test 32
    python benchmarks/bench_reports.py --preset tiny --steps 2 --train 4 --test 2 --no-semantic   # smoke run

On `tiny` (random init) every part trains; on `lite` (pretrained LLM and vision) PeFoMed's recipe in small:
LoRA on q,v and the projector (and TISR's module).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medplib.api import MedPLIB
from medplib.data.builder import BuildConfig, LabelledImage, build_samples
from medplib.data.images import read_image
from medplib.data.phantoms import MODALITIES, phantom_items
from medplib.data.reports import REPORT_PROMPT, findings_of
from medplib.data.schema import write_jsonl
from medplib.evaluation.findings import finding_scores
from medplib.evaluation.text import text_metrics
from medplib.training.loop import end_processes, train
from medplib.training.recipe import recipe_from_dict

VARIANTS = ("plain", "tisr")


def phantom_reports(root: Path, n_train: int, n_test: int, seed: int, size: int,
                    modalities: tuple[str, ...]) -> tuple[list[LabelledImage], list[str]]:
    """Training phantoms under `root/data` with their report samples in `root/data/reports.jsonl`, and
    held-out phantoms under `root/test` (another phantom seed: no held-out image is a training image).
    Returns the held-out images and the builder's report for each (the references)."""
    cfg = BuildConfig(seed=seed, tasks=("report",))
    train_items = [replace(it, split="train") for it in phantom_items(root / "data", n_train, seed, size, modalities)]
    write_jsonl(build_samples(train_items, root / "data", cfg), root / "data" / "reports.jsonl")
    held_out = list(phantom_items(root / "test", n_test, seed + 1000, size, modalities))
    refs = [s.conversations[1].content for s in build_samples(held_out, root / "test", cfg)]
    return held_out, refs


def recipe(variant: str, args: argparse.Namespace, data: Path, out: Path) -> dict[str, Any]:
    tisr = variant == "tisr"
    overrides: dict[str, Any] = {"tisr.enabled": True, "tisr.tokens": args.tokens} if tisr else {}
    if args.preset == "lite":
        trainable, lora = ["lora", "projector", "tisr"], {"r": args.lora, "alpha": 16, "dropout": 0.0,
                                                          "targets": ["q_proj", "v_proj"]}
    else:  # random init: nothing is pretrained, so everything trains
        trainable, lora = ["llm", "projector", "vision", "tisr"], {"r": 0}
    return {
        "name": f"reports_{variant}", "output_dir": str(out / variant),
        "model": {"preset": args.preset, "overrides": overrides},
        "data": {"dir": str(data), "sources": [{"file": "reports.jsonl", "tasks": ["report"]}], "split": "train"},
        "trainable": trainable, "lora": lora,
        "loss": {"ce": 1.0, "bce": 0.0, "dice": 0.0, "contrastive": args.contrastive if tisr else 0.0},
        "optim": {"lr": args.lr, "warmup_ratio": 0.05},
        "train": {"steps": args.steps, "global_batch": args.batch, "micro_batch": args.batch, "seed": args.seed},
        "checkpoint": {"every": 0, "resume": False},
        "log": {"tensorboard": False, "progress": False},
    }


def answer(m: MedPLIB, images: list[np.ndarray], max_new_tokens: int, batch: int) -> list[str]:
    """Greedy answers to the report prompt, `batch` prompts decoded together."""
    texts: list[str] = []
    for i in range(0, len(images), batch):
        reqs = [m.decode_request(REPORT_PROMPT, features=m.image_features(img), max_new_tokens=max_new_tokens)
                for img in images[i:i + batch]]
        for out in m.generate_batch(reqs):
            if isinstance(out, Exception):
                raise out
            texts.append(out.text)
    return texts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=("tiny", "lite"), default="lite")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--train", type=int, default=64, help="training phantoms")
    ap.add_argument("--test", type=int, default=32, help="held-out phantoms")
    ap.add_argument("--size", type=int, default=256, help="phantom side in pixels")
    ap.add_argument("--modalities", nargs="+", choices=MODALITIES, default=list(MODALITIES))
    ap.add_argument("--batch", type=int, default=8, help="global batch")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lora", type=int, default=8, help="LoRA rank on q,v (lite)")
    ap.add_argument("--tokens", type=int, default=4, help="TISR pseudo-words")
    ap.add_argument("--contrastive", type=float, default=0.1, help="loss.contrastive for the tisr variant")
    ap.add_argument("--max-new-tokens", type=int, default=96, help="the answer-length limit")
    ap.add_argument("--meteor", choices=("coco", "nltk"), default="coco", help="coco needs Java")
    ap.add_argument("--no-semantic", action="store_true", help="skip the MiniLM similarity")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=None, help="keep data and runs here (default: a temporary folder)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_reports_"))
    held_out, refs = phantom_reports(work, args.train, args.test, args.seed, args.size, tuple(args.modalities))
    images = [read_image(it.image, work / "test").rgb for it in held_out]
    refs_findings = [findings_of(it) for it in held_out]
    vocabs = [list(it.vocabulary) for it in held_out]
    semantic = None
    if not args.no_semantic:
        from medplib.evaluation.semantic import SemanticScorer

        semantic = SemanticScorer()
    rows: dict[str, dict[str, Any]] = {}
    try:
        for variant in VARIANTS:
            began = time.perf_counter()
            result = train(recipe_from_dict(recipe(variant, args, work / "data", work / "runs")), log=lambda s: None)
            train_s = time.perf_counter() - began
            began = time.perf_counter()
            preds = answer(result.model, images, args.max_new_tokens, args.batch)
            text = text_metrics(preds, refs, meteor_backend=args.meteor)
            last = result.history[-1]
            row: dict[str, Any] = {
                "bench": "reports", "variant": variant, "preset": args.preset, "steps": args.steps,
                "train_images": args.train, "test_images": args.test, "global_batch": args.batch, "lr": args.lr,
                **({"tisr_tokens": args.tokens, "loss_contrastive": args.contrastive} if variant == "tisr" else {}),
                **{f"bleu{n}": round(text[f"corpus_bleu{n}"], 4) for n in (1, 2, 3, 4)},
                "meteor": round(text["meteor" if args.meteor == "coco" else "meteor_nltk_no_synonyms"], 4),
                "rouge_l": round(text["rouge_l"], 4), "cider_d": round(text["cider_d"], 4),
                **{k: round(v, 4) for k, v in finding_scores(preds, refs_findings, vocabs).items()
                   if not k.startswith("n_")},
                "final_ce": round(last["ce"], 4), "final_contrastive": round(last["contrastive"], 4),
                "train_s": round(train_s, 1), "eval_s": round(time.perf_counter() - began, 1),
                "example": {"reference": refs[0], "prediction": preds[0]},
            }
            if semantic is not None:
                row["minilm_cosine"] = round(float(semantic.similarity(preds, refs).mean()), 4)
            rows[variant] = row
            print(json.dumps(row), flush=True)
    finally:
        end_processes()
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    plain, tisr = rows["plain"], rows["tisr"]
    keys = [k for k, v in plain.items() if isinstance(v, float) and k in tisr and k not in ("lr",)]
    print(json.dumps({"bench": "reports", "variant": "tisr - plain",
                      **{k: round(tisr[k] - plain[k], 4) for k in keys}}), flush=True)


if __name__ == "__main__":
    main()
