"""In-context segmentation: Dice at k = 0, 1, 2, 3 examples, retrieved vs random examples of the same
label, beside the model's zero-shot text-only answer, on a label of a medplib data folder.

For every query (an annotated structure of `--query-split` with `--label`, up to `--limit`):
- text: the grounding question `Please segment the {label}.` with no example;
- k = 0: the in-context question (`--question`) with no example;
- k = 1..3, retrieved: the index's top-k of that label for the query image (never the query itself);
- k = 1..3, random: k structures of that label drawn at random from `--library-split` (seeded, never
  the query image).
A query's Dice is that of the answer's first mask (`medplib.evaluation.masks`; no mask = an empty one). Examples come
from the library split only, so a held-out query never sees its own patient through the index when
the library is the training split.

Prints one JSON line per (mode, k) and a markdown table. Usage:
    medplib data build ../shared/data/covid_cxr_lungs --source covid-cxr --out data/cxr
    medplib index build data/cxr --out runs/cxr-index --model M --split train
    python benchmarks/bench_icl.py --model M --data data/cxr --index runs/cxr-index --label "right lung" \
        [--query-split test] [--library-split train] [--limit 50] [--ks 0,1,2,3] [--seed 0] [--out runs/icl.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from medplib.data.masks import read_mask
from medplib.evaluation.masks import mask_overlap
from medplib.inference import SEGMENT_TEMPLATE, Predictor
from medplib.retrieval.examples import load_example
from medplib.retrieval.index import ExampleIndex, embedder_for, retrieve_examples
from medplib.retrieval.library import LibraryItem, load_item, read_library


def _items(data: Path, split: str, label: str) -> list[LibraryItem]:
    return [it for it in read_library(data, [split]) if it.label == label]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True, help="a medplib data folder (samples.jsonl)")
    ap.add_argument("--index", type=Path, required=True, help="an index of the library split (medplib index build)")
    ap.add_argument("--label", required=True)
    ap.add_argument("--query-split", default="test")
    ap.add_argument("--library-split", default="train")
    ap.add_argument("--question", default="Segment the same structure in this image.")
    ap.add_argument("--ks", default="0,1,2,3")
    ap.add_argument("--limit", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--out", type=Path, default=None, help="write every per-query Dice here (JSON)")
    args = ap.parse_args()

    ks = [int(k) for k in args.ks.split(",")]
    queries = _items(args.data, args.query_split, args.label)[: args.limit]
    library = _items(args.data, args.library_split, args.label)
    if not queries or not library:
        raise SystemExit(f"need {args.label!r} structures in both splits: {len(queries)} queries "
                         f"({args.query_split}), {len(library)} library items ({args.library_split})")
    predictor = Predictor.from_pretrained(args.model)
    index = ExampleIndex.load(args.index)
    embedder = embedder_for(index, predictor.model)
    rng = np.random.default_rng(args.seed)
    hashes = [load_item(it)[1] for it in library]
    scores: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    for q in queries:
        rgb, qhash = load_item(q)
        gt = read_mask(q.mask, q.root)
        predictor.set_image(rgb)

        def run(mode: str, question: str, examples: list, gt: np.ndarray = gt) -> None:
            pred = predictor.ask(question, examples=examples, max_new_tokens=args.max_new_tokens)
            mask = pred.masks[0] if pred.masks else np.zeros_like(gt)  # no mask answered counts as empty
            scores.setdefault(mode, []).append(float(mask_overlap(mask, gt).dice[0]))

        run("text", SEGMENT_TEMPLATE.format(target=args.label), [])
        for k in ks:
            if k == 0:
                run("icl k=0", args.question, [])
                continue
            run(f"retrieved k={k}", args.question, retrieve_examples(index, embedder, rgb, k, label=args.label))
            pool = [i for i, h in enumerate(hashes) if h != qhash]
            picks = rng.choice(len(pool), size=min(k, len(pool)), replace=False)
            run(f"random k={k}", args.question,
                [load_example(library[pool[int(i)]].image, library[pool[int(i)]].mask, library[pool[int(i)]].root)
                 for i in picks])
    seconds = time.perf_counter() - t0
    rows = []
    for mode, values in scores.items():
        row = {"mode": mode, "label": args.label, "queries": len(values), "mdice": float(np.mean(values)),
               "std": float(np.std(values))}
        rows.append(row)
        print(json.dumps(row))
    print(json.dumps({"seconds": seconds, "model": str(args.model), "data": str(args.data)}))
    print("\n| k | retrieved mDice | random mDice |\n|---|---|---|")
    text = next(r for r in rows if r["mode"] == "text")
    for k in ks:
        if k == 0:
            r0 = next(r for r in rows if r["mode"] == "icl k=0")
            print(f"| 0 | {r0['mdice']:.3f} | {r0['mdice']:.3f} |")
            continue
        ret = next(r for r in rows if r["mode"] == f"retrieved k={k}")
        ran = next(r for r in rows if r["mode"] == f"random k={k}")
        print(f"| {k} | {ret['mdice']:.3f} | {ran['mdice']:.3f} |")
    print(f"\ntext-only zero-shot (`{SEGMENT_TEMPLATE.format(target=args.label)}`): {text['mdice']:.3f} "
          f"over {text['queries']} queries")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"rows": rows, "per_query": scores}, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
