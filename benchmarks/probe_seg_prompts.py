"""Why grounding stalls on the demo's data: does the mask follow the structure asked for, and does the [SEG] prompt
say which structure that is?

For a model folder (e.g. a demo's `run/stage3/model`) and the demo's data folder, prints JSON lines:
  - per modality, over the held-out single-structure grounding questions the demo scores: mean Dice, and the
    spread of predicted mask areas against that of the targets (a decoder that ignores its prompt draws one
    mask per image, whatever it is asked for: every area alike);
  - a linear probe (logistic regression, features standardised) on the hidden state that predicts [SEG] and on
    `seg_proj`'s output (the decoder's prompt), fitted on training questions and scored on held-out ones: can the
    structure be read from what the decoder is given?
Usage:
    python benchmarks/probe_seg_prompts.py --model runs/demo/run/stage3/model --data runs/demo/data
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from medplib.api import MedPLIB
from medplib.data.loading import load_sample
from medplib.data.schema import Sample, read_jsonl
from medplib.demo import MAX_EVAL, _answer_all, _grounding_score
from medplib.inference import Predictor


def _single(rows: list[Sample], split: str) -> list[Sample]:
    return [r for r in rows if r.split == split and r.task == "grounding" and r.meta.get("kind") != "multi"]


def _prompt_features(m: MedPLIB, rows: list[Sample], data: Path, batch: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Teacher-forced: (n, H) hidden states that predict [SEG] and (n, C) seg_proj outputs, one row per sample."""
    hidden, prompts = [], []

    def keep(module: torch.nn.Module, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        hidden.append(inputs[0].detach())
        prompts.append(output.detach())

    hook = m.model.seg_proj.register_forward_hook(keep)
    try:
        for i in range(0, len(rows), batch):
            loaded = [load_sample(r, data) for r in rows[i: i + batch]]
            items = [m.processor.encode(s.image, s.sample.conversations, s.regions, s.region_masks, s.target_masks)
                     for s in loaded]
            with torch.no_grad():
                m.model(**m.collate(items))
    finally:
        hook.remove()
    return torch.cat(hidden).float().numpy(), torch.cat(prompts).float().numpy()


def _probe(train_x: np.ndarray, train_y: list[str], test_x: np.ndarray, test_y: list[str]) -> float:
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    clf = LogisticRegression(max_iter=3000).fit((train_x - mu) / sd, train_y)
    return float((clf.predict((test_x - mu) / sd) == np.array(test_y)).mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True, help="a demo's data folder (demo.jsonl)")
    ap.add_argument("--train", type=int, default=300, help="training questions for the probe")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    start = time.time()
    m = MedPLIB.from_pretrained(args.model)
    rows = list(read_jsonl(args.data / "demo.jsonl"))

    test = [load_sample(r, args.data) for r in _single(rows, "test")[:MAX_EVAL]]
    per: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for s, a in zip(test, _answer_all(Predictor(m), test, False)):
        pred, dice = _grounding_score(s, a)
        target = s.target_masks[0] if s.target_masks and s.target_masks[0] is not None else None
        row = per[s.sample.modality or "?"]
        row["dice"].append(dice)
        row["pred_area"].append(float(pred.mean()))
        row["target_area"].append(0.0 if target is None else float(target.mean()))
    def cv(xs: list[float]) -> float:  # coefficient of variation of the areas: ~0 = one mask whatever is asked
        return round(float(np.std(xs) / (np.mean(xs) + 1e-9)), 3)

    for modality, row in sorted(per.items()):
        print(json.dumps({"modality": modality, "n": len(row["dice"]), "mdice": round(float(np.mean(row["dice"])), 3),
                          "pred_area_cv": cv(row["pred_area"]), "target_area_cv": cv(row["target_area"])}))

    # Questions with one present structure; the label names modality and structure ("ct:liver").
    def labelled(split: str, n: int) -> tuple[list[Sample], list[str]]:
        rs = [r for r in _single(rows, split) if r.targets and r.targets[0].label][:n]
        return rs, [f"{r.modality}:{r.targets[0].label}" for r in rs]

    train_rows, train_y = labelled("train", args.train)
    test_rows, test_y = labelled("test", 2 * MAX_EVAL)
    (h_tr, p_tr), (h_te, p_te) = (_prompt_features(m, train_rows, args.data),
                                  _prompt_features(m, test_rows, args.data))
    known = [i for i, y in enumerate(test_y) if y in set(train_y)]
    h_te, p_te, test_y = h_te[known], p_te[known], [test_y[i] for i in known]
    for name, tr, te in (("seg_hidden", h_tr, h_te), ("seg_proj", p_tr, p_te)):
        unit = te / np.linalg.norm(te, axis=1, keepdims=True)
        off = ~np.eye(len(te), dtype=bool)
        print(json.dumps({"features": name, "probe_accuracy": round(_probe(tr, train_y, te, test_y), 3),
                          "classes": len(set(train_y)), "n_train": len(train_y), "n_test": len(test_y),
                          # how alike the prompts of different questions are (1 = one prompt for all)
                          "mean_cosine": round(float((unit @ unit.T)[off].mean()), 3)}))
    print(json.dumps({"seconds": round(time.time() - start, 1)}))


if __name__ == "__main__":
    main()
