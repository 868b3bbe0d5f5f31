"""Boxes measured: BiRD's VG / RO / GC and PFMVG's phrase -> box, on real boxes and phantoms. Not a CI test.

One model (`--preset`, default `lite`) is trained in one stage on three sources together:
- Kvasir-SEG (`medplib data build --source kvasir`): the 1,000 official polyp boxes, as text-box questions
  (VG) and `[SEG]` questions about the same polyps;
- the COVID chest X-rays' named lung boxes ("Right Lung" is the patient's right, on the image's left): VG,
  `[SEG]` and region questions whose region is the lung's box (RO: box -> label; GC: box -> description);
- phantoms of every modality: the same three tasks (held-out phantoms come from another seed).
Region questions use box regions only (`BuildConfig.region_kinds`), as BiRD's RO and GC do.

Then, on the held-out images of each source:
- VG, text boxes: the box question answered under the box grammar (`box_format`), its boxes against the
  reference boxes: BiRD recall@0.5 (a reference box is found when some predicted box has IoU > 0.5; macro over
  modalities), PFMVG mIoU and accuracy at IoU >= 0.5 (the first predicted box against the first reference box;
  no box -> IoU 0).
- VG, boxes from masks: the `[SEG]` question for the same phrase on the same image, the predicted mask's
  connected components (those of at least 10% of the largest one's area, so a speck is not a box) as boxes, scored
  the same way (PFMVG: the largest component's box).
- RO: accuracy under BiRD's containment rule (every word of the label appears in the answer), macro over modalities.
- GC: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D of the description against the builder's, per modality and macro.

    python benchmarks/bench_boxes.py --work runs/q_boxes --steps 300 --threads 2
    python benchmarks/bench_boxes.py --preset tiny --steps 2 --phantoms 9 --max-eval 4 --work runs/q_boxes_smoke

Prints one JSON line per source and one with the macro figures over the sources' modalities.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from scipy import ndimage

from medplib.api import MedPLIB
from medplib.data.boxes import mask_to_box
from medplib.data.builder import SEGMENT_QUESTION, BuildConfig, build_samples
from medplib.data.converters import build_source
from medplib.data.loading import LoadedSample, load_sample
from medplib.data.phantoms import phantom_items
from medplib.data.schema import IMAGE_TOKEN, Sample, read_jsonl, write_jsonl
from medplib.evaluation.boxes import bird_recall, grounding_summary, paired_box_iou
from medplib.evaluation.runner import text_boxes
from medplib.evaluation.stats import macro_average, mean_by_group
from medplib.evaluation.text import text_metrics
from medplib.evaluation.vqa import bird_containment
from medplib.inference import Predictor, Query
from medplib.training.loop import end_processes, train
from medplib.training.recipe import recipe_from_dict

# Kvasir-SEG has one label (polyp), so a region question about it would teach nothing: VG only there.
TASKS = {"kvasir": ("grounding", "box_grounding"), "lungs": ("grounding", "box_grounding", "region_vqa"),
         "phantoms": ("grounding", "box_grounding", "region_vqa")}
SOURCES = tuple(TASKS)
MIN_COMPONENT = 0.1  # a mask component below this share of the largest one's area is not a box


def build_data(work: Path, shared: Path, n_phantoms: int, box_format: str, seed: int) -> dict[str, Path]:
    """work/data/<source>/samples.jsonl for the three sources (built once)."""
    def cfg(name: str) -> BuildConfig:
        return BuildConfig(seed=seed, tasks=TASKS[name], region_kinds=("box",), box_format=box_format)

    out: dict[str, Path] = {}
    for name, source, src in (("kvasir", "kvasir", shared / "kvasir_seg"),
                              ("lungs", "covid-cxr", shared / "covid_cxr_lungs")):
        folder = work / "data" / name
        if not (folder / "samples.jsonl").is_file():
            write_jsonl(build_source(source, src, folder, cfg(name)), folder / "samples.jsonl")
        out[name] = folder
    folder = work / "data" / "phantoms"
    if not (folder / "samples.jsonl").is_file():
        # held-out phantoms from another seed: no test image is a training image
        train_items = [replace(it, split="train") for it in phantom_items(folder, n_phantoms, seed)]
        test_items = [replace(it, split="test") for it in phantom_items(folder / "test", max(n_phantoms // 3, 9),
                                                                        seed + 1000)]
        samples = [*build_samples(train_items, folder, cfg("phantoms")),
                   *(_rebase(s, "test") for s in build_samples(test_items, folder / "test", cfg("phantoms")))]
        write_jsonl(samples, folder / "samples.jsonl")
    out["phantoms"] = folder
    return out


def _rebase(s: Sample, sub: str) -> Sample:
    """A sample built under folder/sub with its paths made relative to folder."""
    return s.model_copy(update={
        "image": f"{sub}/{s.image}",
        "regions": [r.model_copy(update={"mask": f"{sub}/{r.mask}"}) if getattr(r, "mask", None) else r
                    for r in s.regions],
        "targets": [t.model_copy(update={"mask": f"{sub}/{t.mask}"}) if t.mask else t for t in s.targets]})


def recipe(args: argparse.Namespace, data: dict[str, Path], out: Path) -> dict[str, Any]:
    if args.preset == "lite":  # pretrained LLM and towers: LoRA, the new parts in full
        trainable = ["lora", "projector", "region_encoder", "pixel_encoder", "mask_decoder", "seg_proj",
                     "seg_token_out", "box_tokens_out", "norms"]
        lora = {"r": 16, "alpha": 16, "dropout": 0.0,
                "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
    else:  # random init: everything trains
        trainable, lora = ["llm", "projector", "vision", "region_encoder", "pixel_encoder", "mask_decoder",
                           "seg_proj"], {"r": 0}
    root = data["kvasir"].parent
    return {
        "name": "boxes", "output_dir": str(out),
        "model": {"preset": args.preset},
        "data": {"dir": str(root), "split": "train",
                 "sources": [{"file": f"{name}/samples.jsonl", "tasks": list(TASKS[name]), "ratio": ratio}
                             for name, ratio in zip(SOURCES, (0.4, 0.3, 0.3))]},
        "trainable": trainable, "lora": lora,
        "loss": {"ce": 1.0, "dice": 5.0, "bce": 1.0, "focal": 1.0},
        "optim": {"lr": args.lr, "warmup_ratio": 0.05},
        "train": {"steps": args.steps, "global_batch": args.batch, "micro_batch": args.batch, "seed": args.seed,
                  "mixed_precision": "fp32"},
        "checkpoint": {"every": 50, "keep_last": 1, "resume": True},
        "log": {"tensorboard": False, "progress": False},
    }


def mask_boxes(mask: np.ndarray) -> list[list[float]]:
    """(H, W) bool -> pixel boxes of its connected components, largest first, specks dropped."""
    labels, n = ndimage.label(mask)
    if n == 0:
        return []
    areas = ndimage.sum(mask, labels, index=range(1, n + 1))
    order = np.argsort(-areas)
    return [list(mask_to_box(labels == k + 1)) for k in order if areas[k] >= MIN_COMPONENT * areas[order[0]]]


def _question(s: Sample) -> str:
    return s.conversations[0].content.replace(IMAGE_TOKEN, "").strip()


def _ask(p: Predictor, queries: list[Query], batch: int) -> list[Any]:
    out: list[Any] = []
    for i in range(0, len(queries), batch):
        for q, a in zip(queries[i:i + batch], p.ask_batch(queries[i:i + batch])):
            if isinstance(a, Exception):
                raise RuntimeError(f"answering {q.question!r} failed") from a
            out.append(a)
    return out


def _pfmvg(pred: Sequence[list[list[float]]], gt: Sequence[list[list[float]]]) -> dict[str, Any]:
    ious = [float(paired_box_iou([p[0]], [g[0]])[0]) if p else 0.0 for p, g in zip(pred, gt)]
    summary = grounding_summary(ious)
    return {"miou": round(summary["miou"]["value"], 4), "acc@0.5": round(summary["acc@0.5"]["value"], 4)}


def _bird(pred: Sequence[list[list[float]]], gt: Sequence[list[list[float]]], mods: Sequence[str]) -> dict[str, Any]:
    r = bird_recall(pred, gt, mods)
    return {"recall@0.5_macro": round(r["macro"], 4),
            "per_modality": {m: round(e["value"], 4) for m, e in r["per_modality"].items()}}


def visual_grounding(p: Predictor, test: list[LoadedSample], batch: int) -> tuple[dict[str, Any], dict[str, list]]:
    """VG with text boxes and with boxes from [SEG] masks, for the same phrases on the same images."""
    vg = [s for s in test if s.sample.task == "box_grounding"]
    if not vg:
        return {}, {}
    fmt = vg[0].sample.meta.get("box_format", "med-grit")
    gt = [text_boxes(s.sample.conversations[1].content, fmt, s.image.shape[1], s.image.shape[0]) for s in vg]
    text_ans = _ask(p, [Query(s.image, _question(s.sample), box_format=fmt) for s in vg], batch)
    seg_ans = _ask(p, [Query(s.image, SEGMENT_QUESTION.format(target=s.sample.targets[0].label)) for s in vg], batch)
    text_pred = [text_boxes(a.text, fmt, s.image.shape[1], s.image.shape[0]) for s, a in zip(vg, text_ans)]
    mask_pred = [mask_boxes(np.logical_or.reduce(a.masks)) if a.masks else [] for a in seg_ans]
    mods = [s.sample.modality or "unknown" for s in vg]
    result = {
        "n_vg": len(vg), "box_format": fmt,
        "vg_text_boxes": {**_bird(text_pred, gt, mods), **_pfmvg(text_pred, gt),
                          "answers_without_box": sum(not b for b in text_pred)},
        "vg_mask_boxes": {**_bird(mask_pred, gt, mods), **_pfmvg(mask_pred, gt),
                          "answers_without_mask": sum(not a.masks for a in seg_ans)},
        "example": {"question": _question(vg[0].sample), "reference": vg[0].sample.conversations[1].content,
                    "text_answer": text_ans[0].text, "seg_answer": seg_ans[0].text},
    }
    raw = {"text": list(zip(text_pred, gt, mods)), "mask": list(zip(mask_pred, gt, mods))}
    return result, raw


def region_tasks(p: Predictor, test: list[LoadedSample], batch: int, meteor: str) -> dict[str, Any]:
    """RO (box -> label, containment) and GC (box -> description, text metrics per modality, macro)."""
    out: dict[str, Any] = {}
    ro = [s for s in test if s.sample.task == "region_vqa" and s.sample.meta.get("kind") == "label"]
    if ro:
        ans = _ask(p, [Query(s.image, _question(s.sample), s.regions, s.region_masks) for s in ro], batch)
        hits = [bird_containment(a.text, s.regions[0].label or "") for s, a in zip(ro, ans)]
        per = mean_by_group(hits, [s.sample.modality or "unknown" for s in ro])
        out["ro"] = {"n": len(ro), "accuracy_macro": round(macro_average(per), 4),
                     "per_modality": {m: round(e.value, 4) for m, e in per.items()},
                     "example": {"reference": ro[0].sample.conversations[1].content, "answer": ans[0].text}}
    gc = [s for s in test if s.sample.task == "region_vqa" and s.sample.meta.get("kind") == "description"]
    if gc:
        ans = _ask(p, [Query(s.image, _question(s.sample), s.regions, s.region_masks) for s in gc], batch)
        by_mod: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for s, a in zip(gc, ans):
            by_mod[s.sample.modality or "unknown"].append((a.text, s.sample.conversations[1].content))
        keys = ("corpus_bleu1", "corpus_bleu2", "corpus_bleu3", "corpus_bleu4", "rouge_l", "cider_d",
                "meteor" if meteor == "coco" else "meteor_nltk_no_synonyms")
        per_mod = {m: text_metrics([a for a, _ in pairs], [r for _, r in pairs], meteor_backend=meteor)
                   for m, pairs in sorted(by_mod.items())}
        out["gc"] = {"n": len(gc), "macro": {k: round(float(np.mean([v[k] for v in per_mod.values()])), 4)
                                             for k in keys},
                     "example": {"reference": gc[0].sample.conversations[1].content, "answer": ans[0].text}}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=("tiny", "lite"), default="lite")
    ap.add_argument("--data", type=Path, default=Path("../shared/data"), help="the shared data folder")
    ap.add_argument("--work", type=Path, required=True, help="built data, the run and its model")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--phantoms", type=int, default=180, help="training phantoms (a third as many held out)")
    ap.add_argument("--box-format", choices=("med-grit", "minigpt"), default="med-grit")
    ap.add_argument("--batch", type=int, default=8, help="global batch, and the evaluation batch")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--max-eval", type=int, default=120, help="held-out questions per task and source at most")
    ap.add_argument("--meteor", choices=("coco", "nltk"), default="coco", help="coco needs Java")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = build_data(args.work, args.data, args.phantoms, args.box_format, args.seed)
    folder = args.work / "run" / "model"
    began = time.perf_counter()
    try:
        if not (folder / "model.safetensors").is_file():
            train(recipe_from_dict(recipe(args, data, args.work / "run")), log=lambda s: None)
    finally:
        end_processes()
    train_s = time.perf_counter() - began
    p = Predictor(MedPLIB.from_pretrained(folder))
    pooled: dict[str, list] = {"text": [], "mask": []}
    for name in SOURCES:
        began = time.perf_counter()
        test = [s for s in read_jsonl(data[name] / "samples.jsonl") if s.split == "test"]
        picked: list[Sample] = []
        for task, kind in (("box_grounding", None), ("region_vqa", "label"), ("region_vqa", "description")):
            picked += [s for s in test if s.task == task and (kind is None or s.meta.get("kind") == kind)][
                :args.max_eval]
        loaded = [load_sample(s, data[name]) for s in picked]
        vg, raw = visual_grounding(p, loaded, args.batch)
        for k in pooled:
            pooled[k] += raw.get(k, [])
        row = {"bench": "boxes", "source": name, "preset": args.preset, "steps": args.steps,
               "train_s": round(train_s, 1), **vg, **region_tasks(p, loaded, args.batch, args.meteor),
               "eval_s": round(time.perf_counter() - began, 1)}
        print(json.dumps(row), flush=True)
    summary = {k: {**_bird([a for a, _, _ in v], [b for _, b, _ in v], [m for _, _, m in v]),
                   **_pfmvg([a for a, _, _ in v], [b for _, b, _ in v])} for k, v in pooled.items() if v}
    print(json.dumps({"bench": "boxes", "source": "all", "vg_text_boxes": summary.get("text"),
                      "vg_mask_boxes": summary.get("mask")}), flush=True)


if __name__ == "__main__":
    main()
