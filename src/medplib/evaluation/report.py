"""The model-independent half of `medplib eval`: prediction records -> metrics.json,
predictions.jsonl, report.md, per_modality.png and gallery.png.

A record is a dict with `id` and, by task:
- VQA: `question`, `prediction`, `reference`, `answer_type` ("open" | "closed"), optional
  `question_type`;
- mask grounding: `gt_mask` and `pred_mask` (2-D arrays or PNG paths), optional `image` path;
- box grounding: `pred_boxes` and `gt_boxes` (lists of [x1, y1, x2, y2] in one frame);
- generated text (reports, captions): `prediction`, `reference` (no answer_type);
plus `modality` (default "unknown"). `task` may be given; otherwise it is inferred in that order.
Usage: `run_report(records, out_dir, benchmark, model_name)`; a resumed run first asks
`PredictionStore(out_dir / "predictions.jsonl").done_ids()` which ids to skip.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence

import numpy as np
from PIL import Image

from medplib.errors import InputError
from medplib.evaluation.boxes import bird_recall, grounding_summary, paired_box_iou
from medplib.evaluation.masks import MaskConvention, MaskScores, mask_overlap, summarize_masks
from medplib.evaluation.plots import OverlayItem, modality_chart, overlay_gallery
from medplib.evaluation.predictions import PredictionStore
from medplib.evaluation.stats import bootstrap_ci
from medplib.evaluation.text import sentence_bleu, text_metrics
from medplib.evaluation.vqa import (
    bird_containment,
    exact_match,
    medplib_exact_match,
    normalize_medplib,
    normalize_pefomed,
    normalized_match,
    token_prf,
)

Task = Literal["vqa", "grounding", "box_grounding", "text"]


def record_task(rec: Mapping[str, Any]) -> Task:
    """The record's task: its `task` field, or inferred from the fields it carries."""
    task = rec.get("task")
    if task in ("vqa", "region_vqa"):
        return "vqa"
    if task in ("grounding", "box_grounding"):
        return task
    if task in ("report", "caption", "text"):
        return "text"
    if rec.get("gt_mask") is not None:
        return "grounding"
    if rec.get("gt_boxes") is not None:
        return "box_grounding"
    if str(rec.get("answer_type") or "").strip().lower() in ("open", "closed"):
        return "vqa"
    if rec.get("reference") is not None:
        return "text"
    raise InputError(f"record {rec.get('id')!r}: cannot tell its task (no gt_mask, gt_boxes, answer_type or reference)")


def load_mask(value: Any, base_dir: Path) -> np.ndarray:
    """A mask array or image path -> (H, W) bool. Files: foreground is > 127 when the file holds
    values above 1 (0/255 PNGs, JPEG masks with artefacts), otherwise non-zero (0/1 label maps)."""
    if isinstance(value, (str, Path)):
        path = Path(value) if Path(value).is_absolute() else base_dir / value
        if not path.is_file():
            raise InputError(f"mask file not found: {path}")
        arr = np.asarray(Image.open(path).convert("L"))
        return arr > 127 if arr.max() > 1 else arr > 0
    arr = np.asarray(value)
    if arr.ndim != 2:
        raise InputError(f"a mask must be 2-D (H, W), got shape {arr.shape}")
    return arr > 0.5 if arr.dtype.kind == "f" else arr != 0


def _est(values: Sequence[float], seed: int) -> dict[str, float | int]:
    return bootstrap_ci(np.asarray(values, dtype=np.float64), seed=seed).as_dict()


def _vqa_block(recs: Sequence[Mapping[str, Any]], seed: int) -> dict[str, Any]:
    """Closed and open VQA metrics of a set of records, every convention side by side."""
    out: dict[str, Any] = {"n": len(recs)}
    for kind in ("closed", "open"):
        sub = [r for r in recs if str(r.get("answer_type") or "").strip().lower() == kind]
        if not sub:
            continue
        p = [str(r.get("prediction") or "") for r in sub]
        ref = [str(r.get("reference") or "") for r in sub]
        block: dict[str, Any] = {
            "n": len(sub),
            "accuracy_medplib": _est([normalized_match(a, b, normalize_medplib) for a, b in zip(p, ref)], seed),
            "accuracy_pefomed": _est([normalized_match(a, b, normalize_pefomed) for a, b in zip(p, ref)], seed),
            "exact_match": _est([exact_match(a, b) for a, b in zip(p, ref)], seed),
            "bird_containment": _est([bird_containment(a, b) for a, b in zip(p, ref)], seed),
        }
        if kind == "open":
            prf = [token_prf(a, b) for a, b in zip(p, ref)]
            block["recall"] = _est([x.recall for x in prf], seed)
            block["precision"] = _est([x.precision for x in prf], seed)
            block["f1"] = _est([x.f1 for x in prf], seed)
            block["medplib_exact_match"] = _est([medplib_exact_match(a, b) for a, b in zip(p, ref)], seed)
            for n in (1, 2, 3, 4):
                block[f"bleu{n}"] = _est([sentence_bleu(a, b, n) for a, b in zip(p, ref)], seed)
        out[kind] = block
    return out


class _Grounding:
    """Per-record Dice/IoU of the mask-grounding records (masks are loaded once)."""

    def __init__(self, recs: Sequence[Mapping[str, Any]], base_dir: Path, convention: MaskConvention) -> None:
        self.recs = list(recs)
        self.dice = np.zeros(len(self.recs))
        self.iou = np.zeros(len(self.recs))
        inter, union, parea, garea = (np.zeros(len(self.recs)) for _ in range(4))
        for i, r in enumerate(self.recs):
            gt = load_mask(r["gt_mask"], base_dir)
            pred = load_mask(r["pred_mask"], base_dir) if r.get("pred_mask") is not None else np.zeros_like(gt)
            s = mask_overlap(pred, gt, convention)
            self.dice[i], self.iou[i] = s.dice[0], s.iou[0]
            inter[i], union[i], parea[i], garea[i] = s.intersection[0], s.union[0], s.pred_area[0], s.gt_area[0]
        self.scores = MaskScores(self.dice, self.iou, inter, union, parea, garea, convention)


def _modality(r: Mapping[str, Any]) -> str:
    return str(r.get("modality") or "unknown")


def compute_metrics(
    records: Sequence[Mapping[str, Any]],
    *,
    base_dir: Path,
    mask_convention: MaskConvention = MaskConvention(),
    meteor_backend: Literal["coco", "nltk"] = "coco",
    seed: int = 0,
) -> tuple[dict[str, Any], _Grounding | None]:
    """The metrics.json blocks `metrics`, `per_modality`, `per_question_type` of a record set."""
    by_task: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    # Scored in id order: the figures (float sums, bootstrap resamples) are the set's, not the store's order,
    # so a resumed or multi-process run reports exactly what an uninterrupted one does.
    for r in sorted(records, key=lambda r: str(r["id"])):
        by_task[record_task(r)].append(r)
    metrics: dict[str, Any] = {}
    per_modality: dict[str, dict[str, Any]] = defaultdict(dict)
    per_question_type: dict[str, Any] = {}
    grounding = None

    if by_task["grounding"]:
        grounding = _Grounding(by_task["grounding"], base_dir, mask_convention)
        summary = summarize_masks(grounding.scores, [_modality(r) for r in grounding.recs], seed=seed)
        metrics["grounding"] = summary["overall"]
        for m, block in summary["per_modality"].items():  # type: ignore[union-attr]
            per_modality[m]["grounding"] = block

    if by_task["vqa"]:
        vqa = by_task["vqa"]
        metrics["vqa"] = _vqa_block(vqa, seed)
        for m in sorted({_modality(r) for r in vqa}):
            per_modality[m]["vqa"] = _vqa_block([r for r in vqa if _modality(r) == m], seed)
        for qt in sorted({str(r.get("question_type") or "unknown") for r in vqa}):
            per_question_type[qt] = _vqa_block([r for r in vqa if str(r.get("question_type") or "unknown") == qt], seed)

    if by_task["box_grounding"]:
        boxes = by_task["box_grounding"]
        # PFMVG scores the first predicted box against the (single) reference box; none -> IoU 0.
        ious = [
            float(paired_box_iou([r["pred_boxes"][0]], [r["gt_boxes"][0]])[0])
            if r["pred_boxes"] and r["gt_boxes"]
            else 0.0
            for r in boxes
        ]
        block = grounding_summary(ious, seed=seed)
        bird = bird_recall(
            [r["pred_boxes"] for r in boxes], [r["gt_boxes"] for r in boxes], [_modality(r) for r in boxes]
        )
        metrics["box_grounding"] = {
            **block,
            "bird_recall@0.5_macro": bird["macro"],
            "bird_recall@0.5_micro": bird["micro"],
            "n": len(boxes),
        }
        for m in sorted({_modality(r) for r in boxes}):
            idx = [i for i, r in enumerate(boxes) if _modality(r) == m]
            per_modality[m]["box_grounding"] = {
                **grounding_summary([ious[i] for i in idx], seed=seed),
                "bird_recall@0.5": bird["per_modality"][m],
            }

    if by_task["text"]:
        text = by_task["text"]
        preds = [str(r.get("prediction") or "") for r in text]
        refs = [str(r.get("reference") or "") for r in text]
        metrics["text"] = {"n": len(text), **text_metrics(preds, refs, meteor_backend=meteor_backend)}

    return {"metrics": metrics, "per_modality": dict(per_modality), "per_question_type": per_question_type}, grounding


def _nan_to_none(v: Any) -> Any:
    """metrics.json is strict JSON: an undefined value (NaN, e.g. an interval of one sample) is null."""
    if isinstance(v, Mapping):
        return {k: _nan_to_none(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_nan_to_none(x) for x in v]
    if isinstance(v, (float, np.floating)):
        return None if math.isnan(v) else float(v)
    return v


def _fmt(v: Any) -> str:
    if isinstance(v, Mapping) and "value" in v:
        if v["value"] is None:
            return "n/a"
        if v.get("low") is None:
            return f"{v['value']:.4f}"
        return f"{v['value']:.4f} [{v['low']:.4f}, {v['high']:.4f}]"
    if isinstance(v, float):
        return f"{v:.4f}"
    return "n/a" if v is None else str(v)


def _flat(block: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for k, v in block.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and "value" not in v:
            rows.extend(_flat(v, key + "."))
        else:
            rows.append((key, v))
    return rows


def _table(rows: Iterable[tuple[str, Any]], headers: tuple[str, str] = ("metric", "value [95% CI]")) -> str:
    lines = [f"| {headers[0]} | {headers[1]} |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in rows]
    return "\n".join(lines)


def _chart_values(per_modality: Mapping[str, Mapping[str, Any]]) -> tuple[str, dict[str, Any]] | None:
    """The headline per-modality metric: Dice, else closed accuracy, else open recall, else box acc."""
    picks = (
        ("Dice", lambda b: b.get("grounding", {}).get("dice")),
        (
            "closed accuracy (MedPLIB normalisation)",
            lambda b: b.get("vqa", {}).get("closed", {}).get("accuracy_medplib"),
        ),
        ("open token recall", lambda b: b.get("vqa", {}).get("open", {}).get("recall")),
        ("box accuracy at IoU >= 0.5", lambda b: b.get("box_grounding", {}).get("acc@0.5")),
    )
    for name, get in picks:
        values = {m: get(b) for m, b in per_modality.items() if get(b) is not None}
        if values:
            return name, values
    return None


def _load_rgb(path: Any, size: tuple[int, int], base_dir: Path) -> np.ndarray:
    """The record's image resized to the mask's (W, H); a grey canvas when there is none."""
    if path is None:
        return np.full((size[1], size[0], 3), 40, dtype=np.uint8)
    p = Path(path) if Path(path).is_absolute() else base_dir / path
    if not p.is_file():
        raise InputError(f"image file not found: {p}")
    img = Image.open(p).convert("RGB")
    return np.asarray(img if img.size == size else img.resize(size, Image.BILINEAR))


def _gallery(grounding: _Grounding, out_path: Path, base_dir: Path, k: int, title: str) -> Path:
    valid = np.flatnonzero(~np.isnan(grounding.dice))
    order = valid[np.argsort(-grounding.dice[valid], kind="stable")]
    k = min(k, max(1, order.size // 2)) if order.size > 1 else order.size
    best, worst = order[:k].tolist(), order[::-1][:k].tolist()

    def item(i: int) -> OverlayItem:
        r = grounding.recs[i]
        gt = load_mask(r["gt_mask"], base_dir)
        pred = load_mask(r["pred_mask"], base_dir) if r.get("pred_mask") is not None else np.zeros_like(gt)
        image = _load_rgb(r.get("image"), (gt.shape[1], gt.shape[0]), base_dir)
        return OverlayItem(image, gt, pred, f"{str(r['id'])[:18]}\n{_modality(r)}  Dice {grounding.dice[i]:.3f}")

    return overlay_gallery([item(i) for i in best], [item(i) for i in worst], out_path, title=title)


def run_report(
    records: Iterable[Mapping[str, Any]],
    out_dir: str | Path,
    benchmark: str,
    model_name: str,
    *,
    samples_per_s: float | None = None,
    mask_convention: MaskConvention = MaskConvention(),
    meteor_backend: Literal["coco", "nltk"] = "coco",
    gallery_size: int = 4,
    seed: int = 0,
) -> dict[str, Any]:
    """Append new records to out_dir/predictions.jsonl (ids already there are kept, not
    rewritten), score everything stored, and write metrics.json, report.md and the figures.
    Returns the metrics.json content."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    store = PredictionStore(out / "predictions.jsonl")
    done = store.done_ids()
    for r in records:
        if str(r.get("id")) not in done:
            store.append(r)
            done.add(str(r["id"]))
    stored = list(store.read())
    if not stored:
        raise InputError("no prediction records to report on")
    blocks, grounding = compute_metrics(
        stored, base_dir=out, mask_convention=mask_convention, meteor_backend=meteor_backend, seed=seed
    )
    result: dict[str, Any] = {
        "benchmark": benchmark,
        "model": model_name,
        "n": len(stored),
        **blocks,
        "samples_per_s": samples_per_s,
        "conventions": {
            "masks": {k: getattr(mask_convention, k) for k in ("threshold", "logits", "both_empty", "dice")},
            "meteor": meteor_backend,
            "intervals": f"95% percentile bootstrap, 2000 resamples, seed {seed}",
        },
    }
    result = _nan_to_none(result)
    (out / "metrics.json").write_text(json.dumps(result, indent=2, allow_nan=False) + "\n", encoding="utf-8")

    figures: list[str] = []
    chart = _chart_values(result["per_modality"])
    if chart is not None:
        name, values = chart
        modality_chart(
            values, out / "per_modality.png", metric=name, title=f"{benchmark} / {model_name}: {name} per modality"
        )
        figures.append(f"## Per modality\n\n![{name} per modality](per_modality.png)\n")
    if grounding is not None and grounding.recs:
        _gallery(
            grounding, out / "gallery.png", out, gallery_size,
            f"{benchmark}: best (top) and worst (bottom) grounding by Dice",
        )
        figures.append(
            "## Grounding gallery\n\nPrediction filled red, ground truth outlined green.\n\n"
            "![best and worst grounding](gallery.png)\n"
        )
    _write_markdown(out / "report.md", result, figures)
    return result


def _write_markdown(path: Path, result: Mapping[str, Any], figures: Sequence[str]) -> None:
    sps = result["samples_per_s"]
    parts = [
        f"# {result['benchmark']}: {result['model']}\n",
        f"- samples: {result['n']}\n- throughput: {'n/a' if sps is None else f'{sps:.3f} samples/s'}\n"
        f"- conventions: `{json.dumps(result['conventions'])}`\n",
        "## Metrics\n",
        _table(_flat(result["metrics"])) + "\n",
    ]
    if result["per_modality"]:
        parts.append("## Metrics per modality\n")
        for m, block in result["per_modality"].items():
            parts += [f"### {m}\n", _table(_flat(block)) + "\n"]
    if result["per_question_type"]:
        parts.append("## VQA per question type\n")
        rows = []
        for qt, block in result["per_question_type"].items():
            for kind in ("closed", "open"):
                if kind in block:
                    rows.append((f"{qt} ({kind}, n={block[kind]['n']})", block[kind]["accuracy_pefomed"]))
        parts.append(_table(rows, ("question type", "accuracy, PeFoMed normalisation [95% CI]")) + "\n")
    parts += list(figures)
    path.write_text("\n".join(parts), encoding="utf-8")
