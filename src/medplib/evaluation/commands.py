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
from medplib.evaluation.benchmarks import BENCHMARK_READERS

# --benchmark choices: the runner's readers' table ("kvasir-seg" -> Benchmark.kvasir_seg), then volumes, which
# medplib.evaluation.volume_eval scores in 3-D
Benchmark = Enum("Benchmark", {name.replace("-", "_"): name for name in (*BENCHMARK_READERS, "volumes")}, type=str)


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
    data: Path = typer.Option(..., "--data", exists=True,
                              help="dataset folder, or the file for mecovqa, med-grit, jsonl; "
                              "volumes: a folder of volume cases (image, labels.nii.gz, labels.json)"),
    out: Path = typer.Option(..., "--out", help="output folder; re-running with it resumes"),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="only the first N test samples"),
    split: Split = typer.Option(Split.test, "--split", help="split to evaluate (all: every sample)"),
    modality: Optional[str] = typer.Option(None, help="modality where the files do not say (sa-med2d, monuseg-text)"),
    image_dir: Optional[Path] = typer.Option(None, help="image folder for vqa-rad, mecovqa and med-grit files"),
    device: str = typer.Option("auto", help="auto (GPU if there is one), cpu, cuda, cuda:1, ..."),
    meteor: Meteor = typer.Option(Meteor.coco, help="METEOR for generated text: coco (needs Java) or nltk"),
    axis: int = typer.Option(2, help="volumes: the voxel axis to slice along"),
    postprocess: list[str] = typer.Option([], "--postprocess", help="volumes: 3-D post-processing of each mask: "
                                          "largest_component, consistency (repeatable, in order)"),
) -> None:
    """Answer every test sample of a benchmark, then write metrics.json, predictions.jsonl and report.md (with PNGs).
    Volumes are scored with 3-D Dice and HD95 in mm (medplib.evaluation.volume_eval)."""
    from medplib.evaluation.runner import run_benchmark

    if benchmark is Benchmark.volumes:
        from medplib.evaluation.volume_eval import run_volume_benchmark

        try:
            from medplib.evaluation.runner import _device

            steps = [p.strip() for item in postprocess for p in item.split(",") if p.strip()]
            run_volume_benchmark(model, data, out, split=split.value, limit=limit, axis=axis, postprocess=steps,
                                 device=_device(device), log=typer.echo)
        except MedplibError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        return

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
