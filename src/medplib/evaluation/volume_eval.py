"""`medplib eval --benchmark volumes`: segment every structure of every chosen volume case slice by
slice and score the mask volume with 3-D Dice and HD95 in mm (medplib.evaluation.volumes).

Cases are read with medplib.data.volume_cases (image + label map + labels.json per folder). The
split of a case is the one the instruction builder gives all its slices (`case_split`, default
seed and fractions), so `--split test` evaluates exactly the volumes whose slices a model built
from `medplib data build --source volumes` never trained on. Each structure of a case's
vocabulary is asked with "Please segment the {label}." on every slice along `axis`; a structure
absent from the case is scored against an empty ground truth (the conventions of
medplib.evaluation.volumes: an empty answer is then perfect, any voxel scores Dice 0).

OUT gets predictions.jsonl (one record per case and structure), masks/<case>--<label>.nii.gz (the
predicted masks, on the input's grid), metrics.json (means overall and per structure, slices/s)
and report.md.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from tqdm import tqdm

from medplib.data.builder import SEGMENT_QUESTION
from medplib.errors import InputError
from medplib.evaluation.volumes import score_volume


def _mean(values: Sequence[float]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def _slug(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in label)


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean Dice / HD95 overall and per label, over (case, label) records."""
    labels = sorted({r["label"] for r in records})
    per_label = {lab: {"n": sum(r["label"] == lab for r in records),
                       "dice": _mean([r["dice"] for r in records if r["label"] == lab]),
                       "hd95_mm": _mean([r["hd95_mm"] for r in records if r["label"] == lab])} for lab in labels}
    seconds = sum(r["seconds"] for r in records)
    slices = sum(r["slices"] for r in records)
    return {"n": len(records), "cases": len({r["case"] for r in records}),
            "dice": _mean([r["dice"] for r in records]), "hd95_mm": _mean([r["hd95_mm"] for r in records]),
            "per_label": per_label, "slices_per_s": slices / seconds if seconds > 0 else None}


def _report(metrics: dict[str, Any], records: Sequence[dict[str, Any]]) -> str:
    def f(v: float | None, digits: int = 3) -> str:
        return "n/a" if v is None else f"{v:.{digits}f}"

    lines = [f"# Volumes: {metrics['model']}", "",
             f"{metrics['cases']} case(s), split {metrics['split']}, axis {metrics['axis']}, "
             f"post-processing {', '.join(metrics['postprocess']) or 'none'}; "
             f"{f(metrics['slices_per_s'], 1)} slices/s.", "",
             "| structure | n | 3D Dice | HD95 (mm) |", "|---|---|---|---|"]
    for lab, m in metrics["per_label"].items():
        lines.append(f"| {lab} | {m['n']} | {f(m['dice'])} | {f(m['hd95_mm'], 1)} |")
    lines.append(f"| **all** | {metrics['n']} | {f(metrics['dice'])} | {f(metrics['hd95_mm'], 1)} |")
    lines += ["", "| case | structure | Dice | HD95 (mm) | predicted ml | reference ml |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['label']} | {f(r['dice'])} | {f(r['hd95_mm'], 1)} | "
              f"{r['pred_ml']:.1f} | {r['gt_ml']:.1f} |"
              for r in records]
    return "\n".join(lines) + "\n"


def run_volume_benchmark(model_path: str | Path, data: str | Path, out: str | Path, *, split: str = "test",
                         limit: int | None = None, axis: int = 2, postprocess: Sequence[str] = (),
                         device: str = "cpu", batch_size: int = 8, log: Callable[[str], None] = print
                         ) -> dict[str, Any]:
    """Score every (case, structure) of the chosen cases; writes OUT as described above."""
    from medplib.data.volume_cases import case_folders, case_split, read_case
    from medplib.inference import Predictor

    if split not in ("test", "val", "train", "all"):
        raise InputError(f"unknown split {split!r}; choose from test, val, train, all")
    out = Path(out)
    chosen = []
    for folder in case_folders(data):
        case = read_case(folder)
        if split == "all" or case_split(case) == split:
            chosen.append(case)
            if limit is not None and len(chosen) == limit:
                break
    if not chosen:
        raise InputError(f"{data}: no {split} volume cases (--split all takes every case)")
    (out / "masks").mkdir(parents=True, exist_ok=True)
    predictor = Predictor.from_pretrained(model_path, device=device)
    records: list[dict[str, Any]] = []
    jobs = [(case, label) for case in chosen for label in (case.vocabulary or tuple(case.labels))]
    for case, label in tqdm(jobs, desc="volumes", unit="structure", file=sys.stderr, dynamic_ncols=True):
        start = time.perf_counter()
        predictor.set_volume(case.volume, axis=axis)
        pred = predictor.ask_volume(SEGMENT_QUESTION.format(target=label), slices="all", postprocess=postprocess,
                                    batch_size=batch_size)
        seconds = time.perf_counter() - start
        gt = case.labels.get(label, np.zeros(case.volume.shape, dtype=bool))
        s = score_volume(pred.mask, gt, case.volume.spacing)
        mask_file = pred.save_nifti(out / "masks" / f"{case.name}--{_slug(label)}.nii.gz")
        records.append({"case": case.name, "label": label, "dice": s.dice, "hd95_mm": s.hd95_mm, "pred_ml": s.pred_ml,
                        "gt_ml": s.gt_ml, "slices": len(pred.slices), "seconds": seconds,
                        "mask": str(mask_file.relative_to(out))})
    with open(out / "predictions.jsonl", "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
    metrics = {**summarize(records), "benchmark": "volumes", "model": str(model_path),
               "data": str(Path(data).resolve()), "split": split, "axis": axis, "postprocess": list(postprocess)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    (out / "report.md").write_text(_report(metrics, records), encoding="utf-8")
    log(f"volumes: {len(records)} structures on {len(chosen)} case(s): Dice {metrics['dice']}, HD95 "
        f"{metrics['hd95_mm']} mm; wrote metrics.json, predictions.jsonl, report.md and masks/ to {out}")
    return metrics
