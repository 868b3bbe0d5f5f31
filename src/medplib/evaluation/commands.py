"""`medplib eval`: run a model on a benchmark and write its report. Thin: calls `runner.run_benchmark`.

Bad arguments and medplib errors print one line and exit with status 2 (as `medplib` does), no traceback.
"""

from __future__ import annotations

import warnings
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from medplib.errors import MedplibError


class Benchmark(str, Enum):
    vqa_rad = "vqa-rad"
    kvasir_seg = "kvasir-seg"
    monuseg_text = "monuseg-text"
    sa_med2d = "sa-med2d"
    mecovqa = "mecovqa"
    med_grit = "med-grit"
    jsonl = "jsonl"


class Meteor(str, Enum):
    coco = "coco"
    nltk = "nltk"


class Split(str, Enum):
    test = "test"
    val = "val"
    train = "train"
    all = "all"


def eval_command(
    model: Path = typer.Option(..., "--model", exists=True, file_okay=False, help="saved medplib model folder"),
    benchmark: Benchmark = typer.Option(..., "--benchmark", help="dataset layout and task of --data"),
    data: Path = typer.Option(..., "--data", exists=True, help="dataset folder, or the file for mecovqa, med-grit, jsonl"),
    out: Path = typer.Option(..., "--out", help="output folder; re-running with it resumes"),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="only the first N test samples"),
    split: Split = typer.Option(Split.test, "--split", help="split to evaluate (all: every sample)"),
    modality: Optional[str] = typer.Option(None, help="modality where the files do not say (sa-med2d, monuseg-text)"),
    image_dir: Optional[Path] = typer.Option(None, help="image folder for vqa-rad, mecovqa and med-grit files"),
    device: str = typer.Option("auto", help="auto (GPU if there is one), cpu, cuda, cuda:1, ..."),
    meteor: Meteor = typer.Option(Meteor.coco, help="METEOR for generated text: coco (needs Java) or nltk"),
) -> None:
    """Answer every test sample of a benchmark, then write metrics.json, predictions.jsonl and report.md (with PNGs)."""
    from medplib.evaluation.runner import run_benchmark

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run_benchmark(model, benchmark.value, data, out, limit=limit, split=split.value, modality=modality,
                          image_dir=image_dir, device=device, meteor_backend=meteor.value, log=typer.echo)
    except MedplibError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    finally:
        from medplib.training.loop import end_processes

        end_processes()  # a multi-process launch: every process passes one barrier before the group ends
        for w in caught:
            typer.echo(f"warning: {w.message}", err=True)
