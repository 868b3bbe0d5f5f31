"""Which report metric can be trusted: on the IU-Xray test reports, does a meaning-preserving rewrite
score above a report with a known clinical error, metric by metric and corruption by corruption?

For each test report r: the reference is r, candidate A = rewrite(r) (same findings), candidate
B = corrupt(r, kind) (negated finding, swapped sides, dropped key finding, added false finding).
A metric ranks the pair correctly when score(A, r) > score(B, r); the table gives that share with
a seeded bootstrap interval (medplib.evaluation.stats), the share of ties, and the mean scores.
Reports where either edit is skipped leave the pair out (counts are printed). CIDEr-D takes its
IDF from the 590 references, the same for every candidate set. The LLM judge runs only when
MEDPLIB_JUDGE_BASE_URL and MEDPLIB_JUDGE_MODEL are set. Prints one JSON object. Run:
    .venv/bin/python benchmarks/bench_metric_validity.py --data ../shared/data
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from medplib.evaluation.corruptions import KINDS, corrupt, rewrite
from medplib.evaluation.stats import bootstrap_ci
from medplib.evaluation.text import cider, meteor, rouge_l, sentence_bleu


def _scores(candidates: list[str], refs: list[str], meteor_backend: str, semantic) -> dict[str, np.ndarray]:
    """Per-sample scores (N,) of candidates[i] against refs[i], one entry per metric."""
    out = {f"bleu{n}": np.array([sentence_bleu(c, r, n) for c, r in zip(candidates, refs)]) for n in (1, 2, 3, 4)}
    out["meteor"] = meteor(candidates, refs, backend=meteor_backend)[1]  # type: ignore[arg-type]
    out["rouge_l"] = rouge_l(candidates, refs)
    out["cider_d"] = cider(candidates, refs)[1]
    if semantic is not None:
        out["minilm_cosine"] = semantic.similarity(candidates, refs).astype(np.float64)
    return out


def _judge_scores(candidates: list[str], refs: list[str], cache: Path) -> np.ndarray:
    from medplib.evaluation.judge import Judge, JudgeConfig

    with Judge(JudgeConfig.from_env(cache_dir=cache)) as judge:
        res = judge.judge_reports(refs, candidates)
    return np.array([np.nan if s is None else float(s) for s in res.scores])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("MEDPLIB_DATA", "../shared/data")))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--meteor", choices=["coco", "nltk"], default="coco")
    ap.add_argument("--no-semantic", action="store_true", help="skip the MiniLM similarity")
    ap.add_argument("--judge-cache", type=Path, default=Path(".judge_cache"))
    args = ap.parse_args()
    start = time.perf_counter()
    records = json.loads((args.data / "iu_xray" / "annotation.json").read_text(encoding="utf-8"))["test"]
    refs = [r["report"] for r in records]

    rewrites = [rewrite(r, seed=args.seed) for r in refs]
    corrupted = {k: [corrupt(r, k, seed=args.seed) for r in refs] for k in KINDS}
    # Skipped edits are filled with the reference so every candidate set scores against the same refs
    # (CIDEr's IDF); they are left out of the pairs below.
    def texts(edits):
        return [e.text if not e.skipped else r for e, r in zip(edits, refs)]

    semantic = None
    if not args.no_semantic:
        from medplib.evaluation.semantic import SemanticScorer

        semantic = SemanticScorer()
    sets = {"rewrite": texts(rewrites), **{k: texts(v) for k, v in corrupted.items()}}
    scores = {name: _scores(c, refs, args.meteor, semantic) for name, c in sets.items()}
    judge_status = "not run: set MEDPLIB_JUDGE_BASE_URL and MEDPLIB_JUDGE_MODEL to an OpenAI-compatible endpoint"
    if os.environ.get("MEDPLIB_JUDGE_BASE_URL") and os.environ.get("MEDPLIB_JUDGE_MODEL"):
        for name, c in sets.items():
            scores[name]["llm_judge_likert"] = _judge_scores(c, refs, args.judge_cache)
        judge_status = f"run: model {os.environ['MEDPLIB_JUDGE_MODEL']}"

    table: dict[str, dict[str, object]] = {}
    pairs: dict[str, dict[str, int]] = {}
    for kind, edits in corrupted.items():
        keep = np.array([not a.skipped and not b.skipped for a, b in zip(rewrites, edits)])
        pairs[kind] = {"pairs": int(keep.sum()), "corruption_skipped": sum(e.skipped for e in edits)}
        for metric, a in scores["rewrite"].items():
            b = scores[kind][metric]
            ok = keep & ~np.isnan(a) & ~np.isnan(b)
            above = bootstrap_ci((a[ok] > b[ok]).astype(np.float64), seed=args.seed)
            table.setdefault(metric, {})[kind] = {
                "rewrite_above": round(above.value, 4), "ci95": [round(above.low, 4), round(above.high, 4)],
                "ties": round(float(np.mean(a[ok] == b[ok])), 4), "n": int(ok.sum()),
                "mean_rewrite": round(float(a[ok].mean()), 4), "mean_corrupted": round(float(b[ok].mean()), 4),
            }
    print(json.dumps({
        "data": "IU-Xray test (R2Gen split)", "reports": len(refs), "seed": args.seed, "meteor": args.meteor,
        "rewrite_skipped": sum(e.skipped for e in rewrites), "pairs": pairs, "llm_judge": judge_status,
        "table": table, "seconds": round(time.perf_counter() - start, 1),
    }, indent=1))


if __name__ == "__main__":
    main()
