"""`medplib eval`: a benchmark's test samples -> the model's answers -> prediction records ->
`run_report` (metrics.json, predictions.jsonl, report.md, per_modality.png, gallery.png).

A benchmark is a reader (`medplib.evaluation.benchmarks`) of the dataset at `data`, a
choice of test samples (`select_samples`) and one record per sample (`predict`). Only the first
exchange of a sample is asked: its question (with its regions) goes to `MedPLIB.generate` and
the answer is scored against the first reference answer, by task:
- grounding: the union of the answer's `[SEG]` masks against the union of the targets of the
  reference's `[SEG]`s; an answer without `[SEG]` is an empty mask (it scores 0, it is not
  skipped), a reference without `[SEG]` ("there is no X") an empty ground truth;
- box grounding: `<box>` boxes (or `{<x1><y1><x2><y2>}` for samples built in that format) parsed
  from the answer and from the reference, in pixels; boxes off the grid are ignored;
- VQA and region VQA: the answer text (a sample without an answer type counts as open);
- caption / report: the answer text against the reference.
A sample that cannot be read or answered is reported and counted as failed, never fatal.
Re-running with the same OUT skips the samples already in predictions.jsonl.

Launched with several processes (`torchrun --nproc_per_node N -m medplib.cli eval ...` or
`accelerate launch`; gloo on CPUs, NCCL on GPUs), process r of N answers samples r, r+N, ... of the
ones not yet stored, into its own part store; once all are done the first process merges the parts
into predictions.jsonl in sample order and writes the report, so the metrics are those of a
one-process run. Parts left by a killed run are merged first, so resuming works with any N.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from tqdm import tqdm

from medplib.data.boxes import BOX_FORMATS, BoxFormat, box_grid, grid_to_box, parse_boxes
from medplib.data.loading import LoadedSample, load_sample
from medplib.data.schema import IMAGE_TOKEN, REGION_TOKEN, SEG_TOKEN, Sample
from medplib.errors import InputError, MedplibError
from medplib.evaluation.benchmarks import read_benchmark
from medplib.evaluation.predictions import PredictionStore
from medplib.evaluation.report import run_report

SPLITS = ("test", "val", "train", "all")
# benchmarks whose --data is one file that already is the evaluation set (no split field to filter)
_FILE_IS_SPLIT = ("mecovqa", "med-grit")
_PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_RUN_KEYS = ("benchmark", "model_path", "data", "split")


@dataclass
class EvalSet:
    samples: list[Sample]
    root: Path  # the samples' image and mask paths are relative to it


def select_samples(benchmark: str, data: str | Path, *, split: str = "test", limit: int | None = None,
                 modality: str | None = None, image_dir: str | Path | None = None) -> EvalSet:
    """The first `limit` samples of `split` (`all`: every split), in the converter's order (name
    order for Kvasir-SEG and SA-Med2D). MeCoVQA and Med-GRIT files are taken whole."""
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be at least 1, got {limit}")
    data = Path(data)
    if not data.exists():
        raise InputError(f"{data}: data path not found")
    samples, root = read_benchmark(benchmark, data, modality, Path(image_dir) if image_dir is not None else None)
    keep = benchmark in _FILE_IS_SPLIT or split == "all"
    chosen: list[Sample] = []
    for s in samples:
        if keep or s.split == split:
            chosen.append(s)
            if limit is not None and len(chosen) == limit:
                break
    if not chosen:
        raise InputError(f"{data}: no {split} samples for benchmark {benchmark} (--split all takes every sample)")
    return EvalSet(chosen, root)


def exchange_task(sample: Sample) -> str:
    """The task of the sample's first exchange (a multi-turn sample's task may describe a later one)."""
    question, reference = sample.conversations[0].content, sample.conversations[1].content
    if sample.task in ("caption", "report"):
        return sample.task
    if SEG_TOKEN in reference or sample.task == "grounding":
        return "grounding"
    if parse_boxes(reference, _box_format(sample)):
        return "box_grounding"
    return "region_vqa" if REGION_TOKEN in question else "vqa"


def _box_format(sample: Sample) -> BoxFormat:
    fmt = sample.meta.get("box_format", "med-grit")
    return fmt if fmt in BOX_FORMATS else "med-grit"


def text_boxes(text: str, fmt: BoxFormat, width: int, height: int) -> list[list[float]]:
    """Pixel boxes written in `text`; boxes off the grid or with swapped corners are ignored."""
    grid = box_grid(fmt)
    out = []
    for g in parse_boxes(text, fmt):
        if max(g) <= grid and g[0] <= g[2] and g[1] <= g[3]:
            out.append(list(grid_to_box(g, width, height, grid)))
    return out


def _modality(sample: Sample) -> str:
    # VQA-RAD names no modality; its organ (head, chest, abd) is the grouping it offers
    return sample.modality or str(sample.meta.get("image_organ") or "").strip().lower() or "unknown"


def _image_path(sample: Sample, root: Path) -> str | None:
    """The image file for the gallery, when PIL can open it (DICOM, NIfTI and frame selectors: none)."""
    if "#" in sample.image or Path(sample.image).suffix.lower() not in _PIL_SUFFIXES:
        return None
    return str(Path(sample.image) if Path(sample.image).is_absolute() else root / sample.image)


def _union(masks: Sequence[np.ndarray], hw: tuple[int, int]) -> np.ndarray:
    return np.logical_or.reduce(list(masks)) if masks else np.zeros(hw, dtype=bool)


def grounding_masks(loaded: LoadedSample, answer_masks: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(ground truth, prediction) of a grounding answer to the sample's first question: the union of the targets
    of the first reference's `[SEG]`s and the union of the answer's masks, each all False when there is none."""
    hw = (int(loaded.image.shape[0]), int(loaded.image.shape[1]))
    n_seg = loaded.sample.conversations[1].content.count(SEG_TOKEN)
    targets = [m for m in loaded.target_masks if m is not None][:n_seg]
    return _union(targets, hw), _union(answer_masks, hw)


def predict(model: Any, sample: Sample, root: Path) -> dict[str, Any]:
    """Ask the sample's first question and return its prediction record for `run_report`."""
    loaded = load_sample(sample, root)
    question, reference = sample.conversations[0].content, sample.conversations[1].content
    n_regions = question.count(REGION_TOKEN)
    task = exchange_task(sample)
    # a box question is decoded under its format's grammar, so every answer is a well-formed box on the grid
    answer = model.generate(loaded.image, question, regions=loaded.regions[:n_regions],
                            region_arrays=loaded.region_masks[:n_regions],
                            examples=loaded.examples,  # icl samples' examples
                            box_format=_box_format(sample) if task == "box_grounding" else None)
    hw = (int(loaded.image.shape[0]), int(loaded.image.shape[1]))
    rec: dict[str, Any] = {
        "id": sample.id, "task": task, "modality": _modality(sample),
        "question": question.replace(IMAGE_TOKEN, "").strip(), "prediction": answer.text, "reference": reference,
    }
    if task == "grounding":
        gt, pred = grounding_masks(loaded, answer.masks)
        rec.update(gt_mask=gt, pred_mask=pred, n_pred_masks=len(answer.masks), image=_image_path(sample, root))
    elif task == "box_grounding":
        fmt = _box_format(sample)
        rec.update(gt_boxes=text_boxes(reference, fmt, hw[1], hw[0]),
                   pred_boxes=text_boxes(answer.text, fmt, hw[1], hw[0]))
    elif task in ("vqa", "region_vqa"):
        rec["answer_type"] = sample.answer_type or "open"
        if sample.meta.get("question_type"):
            rec["question_type"] = str(sample.meta["question_type"])
    return rec


def _check_same_run(out: Path, run: dict[str, Any]) -> None:
    """Resuming into a folder that holds another model's or benchmark's predictions would mix them."""
    path = out / "metrics.json"
    if not path.is_file():
        return
    old = json.loads(path.read_text(encoding="utf-8"))
    for key in _RUN_KEYS:
        if key in old and old[key] != run[key]:
            raise InputError(f"{out} holds results for {key} {old[key]!r}, not {run[key]!r}; choose another --out")


def _add_run_info(out: Path, info: dict[str, Any], failures: Sequence[dict[str, str]]) -> dict[str, Any]:
    """Write the run's provenance and counts into metrics.json and report.md."""
    path = out / "metrics.json"
    metrics = {**json.loads(path.read_text(encoding="utf-8")), **info, "failures": list(failures)}
    path.write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    lines = ["## Run\n", f"- data: `{info['data']}` (split: {info['split']})",
             f"- this run: {info['generated']} generated, {info['reused']} reused from predictions.jsonl, "
             f"{info['failed']} failed"]
    lines += [f"- failed `{f['id']}`: {f['error']}" for f in failures]
    with (out / "report.md").open("a", encoding="utf-8") as fh:
        fh.write("\n" + "\n".join(lines) + "\n")
    return metrics


def _device(name: str, state: Any = None) -> str:
    """`auto`: the GPU if there is one (this process's own under a multi-process launch), else the CPU."""
    import torch

    if state is not None and name in ("auto", "cuda"):
        return str(state.device) if name == "auto" else f"cuda:{state.local_process_index}"
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def _launch_state() -> Any:
    """accelerate's process state under a multi-process launch (WORLD_SIZE > 1), else None."""
    import os

    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    from accelerate import PartialState

    # Without a GPU accelerate sets up gloo only when asked (cpu=True), as in training.
    state = PartialState(cpu=not torch.cuda.is_available())
    if state.num_processes != world:
        raise InputError(f"launched as {world} processes but accelerate set up {state.num_processes}")
    return state


def run_benchmark(
    model_path: str | Path,
    benchmark: str,
    data: str | Path,
    out: str | Path,
    *,
    limit: int | None = None,
    split: str = "test",
    modality: str | None = None,
    image_dir: str | Path | None = None,
    device: str = "auto",
    meteor_backend: str = "coco",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Predict every chosen test sample not yet in OUT/predictions.jsonl, then score all stored
    predictions. Returns the metrics.json content (on every process of a multi-process launch)."""
    from medplib.api import MedPLIB

    state = _launch_state()
    main = state is None or state.is_main_process
    wait = state.wait_for_everyone if state is not None else (lambda: None)
    out = Path(out)
    # `model` names it in titles as the user wrote it; the resolved paths tell runs apart
    run = {"benchmark": benchmark, "model": str(model_path), "model_path": str(Path(model_path).resolve()),
           "data": str(Path(data).resolve()), "split": "file" if benchmark in _FILE_IS_SPLIT else split}
    _check_same_run(out, run)
    chosen = select_samples(benchmark, data, split=split, limit=limit, modality=modality, image_dir=image_dir)
    store = PredictionStore(out / "predictions.jsonl")
    if main:
        store.merge_parts()  # what a killed multi-process run had answered
    wait()
    done = store.done_ids()
    todo = [s for s in chosen.samples if s.id not in done]
    wait()  # every process has read the store before any writes
    mine, shard = (todo, store) if state is None else \
        (todo[state.process_index::state.num_processes], store.part(state.process_index))
    failures: list[dict[str, str]] = []
    if mine:
        model = MedPLIB.from_pretrained(model_path, device=_device(device, state))
        for sample in tqdm(mine, desc=benchmark, unit="sample", file=sys.stderr, dynamic_ncols=True, disable=not main):
            start = time.perf_counter()
            try:
                rec = predict(model, sample, chosen.root)
            except MedplibError as exc:
                failures.append({"id": sample.id, "error": str(exc)})
                tqdm.write(f"failed {sample.id}: {exc}", file=sys.stderr)
                continue
            rec["seconds"] = time.perf_counter() - start  # reading + answering this sample
            shard.append(rec)
    if state is not None:
        from accelerate.utils import gather_object

        position = {s.id: k for k, s in enumerate(todo)}
        failures = sorted(gather_object(failures), key=lambda f: position[f["id"]])
        wait()
        if main:
            store.merge_parts([s.id for s in todo])
    info = {**run, "selected": len(chosen.samples), "generated": len(todo) - len(failures),
            "reused": len(chosen.samples) - len(todo), "failed": len(failures)}
    if not main:
        wait()  # the first process writes the report
        return json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    metrics = _report(out, store, benchmark, run, info, failures, meteor_backend)
    wait()
    log(f"{benchmark}: {metrics['n']} predictions scored ({info['generated']} generated, {info['reused']} reused, "
        f"{info['failed']} failed); wrote metrics.json, predictions.jsonl and report.md to {out}")
    return metrics


def _report(out: Path, store: PredictionStore, benchmark: str, run: dict[str, Any], info: dict[str, Any],
            failures: list[dict[str, str]], meteor_backend: str) -> dict[str, Any]:
    """Score every stored prediction and write the report with the run's provenance."""
    stored = list(store.read())
    seconds = sum(float(r.get("seconds") or 0.0) for r in stored)
    # throughput over the samples that were generated (in this run or an earlier one), not reused ones
    sps = len(stored) / seconds if seconds > 0 else None
    run_report([], out, benchmark, run["model"], samples_per_s=sps, meteor_backend=meteor_backend)  # type: ignore[arg-type]
    return _add_run_info(out, info, failures)
