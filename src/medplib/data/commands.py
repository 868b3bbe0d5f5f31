"""`medplib data ...`: build, validate, stats and export sample files. Thin: calls the data modules.

Every medplib error is printed as one line (no traceback) and exits with status 1.
"""

from __future__ import annotations

import json
import warnings
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from medplib.data.builder import ALL_TASKS, TASKS, BuildConfig
from medplib.data.converters import SOURCE_READERS, build_source
from medplib.data.schema import read_jsonl, write_jsonl
from medplib.data.stats import format_stats, sample_stats
from medplib.errors import MedplibError

data_app = typer.Typer(help="Build, check and convert instruction data.", no_args_is_help=True)

# --source choices, one per entry of the converters' table ("sa-med2d" -> Source.sa_med2d)
Source = Enum("Source", {name.replace("-", "_"): name for name in SOURCE_READERS}, type=str)


class ExportFormat(str, Enum):
    mecovqa = "mecovqa"
    med_grit = "med-grit"


def _fail(exc: Exception) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(1)


@data_app.command()
def build(
    src: Optional[Path] = typer.Argument(None, help="dataset folder or file (not needed for phantoms)"),
    source: Source = typer.Option(..., "--source", help="layout of SRC"),
    out: Path = typer.Option(..., "--out", help="output folder: samples.jsonl and any written masks"),
    tasks: str = typer.Option(
        ",".join(TASKS), help=f"comma-separated builder tasks (mask sources); all: {','.join(ALL_TASKS)}"
    ),
    seed: int = typer.Option(0, help="seed for phrasings, region prompts and splits"),
    modality: Optional[str] = typer.Option(
        None, help="modality when the source does not say (sa-med2d, lvit, volumes)"
    ),
    target: Optional[str] = typer.Option(None, help="what the LViT masks segment (default from the dataset name)"),
    image_dir: Optional[Path] = typer.Option(None, help="image folder for VQA, MeCoVQA and Med-GRIT files"),
    n: int = typer.Option(90, help="number of phantoms"),
    size: int = typer.Option(256, help="phantom size in pixels"),
    axis: int = typer.Option(2, help="volumes: the voxel axis to slice along (all slices of a volume share a split)"),
    step: int = typer.Option(1, help="volumes: take every STEP-th slice"),
    val_fraction: float = typer.Option(0.1, help="share of groups drawn into val (sources without a split)"),
    test_fraction: float = typer.Option(0.1, help="share of groups drawn into test"),
    box_format: str = typer.Option("med-grit", help="boxes in answer text: med-grit (0-1000) or minigpt (0-100)"),
    paraphrase_url: Optional[str] = typer.Option(None, help="OpenAI-compatible base URL to paraphrase questions"),
    paraphrase_model: str = typer.Option("gpt-4o-mini", help="model name for the paraphrase endpoint"),
) -> None:
    """Convert SRC into OUT/samples.jsonl, validate it and print its stats."""
    if src is None and source is not Source.phantoms:
        raise _fail(MedplibError(f"--source {source.value} needs SRC"))
    paraphrase = None
    try:
        if paraphrase_url:
            from medplib.data.paraphrase import Paraphraser

            paraphrase = Paraphraser(paraphrase_url, paraphrase_model, out / "paraphrase_cache.json")
        if box_format not in ("med-grit", "minigpt"):
            raise MedplibError(f"--box-format must be med-grit or minigpt, not {box_format!r}")
        cfg = BuildConfig(seed=seed, tasks=[t.strip() for t in tasks.split(",") if t.strip()],
                          val_fraction=val_fraction, test_fraction=test_fraction, box_format=box_format,
                          paraphrase=paraphrase)
        out.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            samples = build_source(source.value, src if src is not None else out, out, cfg, modality=modality,
                                   target=target, image_dir=image_dir, n=n, size=size, axis=axis, step=step)
            path = out / "samples.jsonl"
            count = write_jsonl(samples, path)
        for w in caught:
            typer.echo(f"warning: {w.message}", err=True)
        stats = sample_stats(read_jsonl(path))  # re-reading validates what was written
    except MedplibError as exc:
        raise _fail(exc) from None
    typer.echo(f"wrote {count} samples to {path}")
    typer.echo(format_stats(stats))


@data_app.command()
def validate(
    file: Path = typer.Argument(..., help="sample JSONL file"),
    check_files: bool = typer.Option(False, "--check-files", help="also read every image and mask"),
) -> None:
    """Check FILE against the schema (and, with --check-files, that its images and masks load)."""
    from medplib.data.loading import load_sample

    try:
        samples = list(read_jsonl(file))
    except MedplibError as exc:
        raise _fail(exc) from None
    bad = 0
    if check_files:
        for s in samples:
            try:
                load_sample(s, file.parent)
            except MedplibError as exc:
                bad += 1
                typer.echo(f"error: {exc}", err=True)
    if bad:
        typer.echo(f"{file}: {len(samples)} samples valid, {bad} with unreadable or inconsistent files", err=True)
        raise typer.Exit(1)
    typer.echo(f"{file}: {len(samples)} samples valid" + (", all files load" if check_files else ""))


@data_app.command()
def stats(
    file: Path = typer.Argument(..., help="sample JSONL file"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of text"),
) -> None:
    """Counts per task, modality, label, split, answer type, source and region kind."""
    try:
        result = sample_stats(read_jsonl(file))
    except MedplibError as exc:
        raise _fail(exc) from None
    typer.echo(json.dumps(result, indent=2) if as_json else format_stats(result))


@data_app.command()
def export(
    file: Path = typer.Argument(..., help="sample JSONL file"),
    to: ExportFormat = typer.Option(..., "--to", help="target format"),
    out: Path = typer.Option(..., "--out", help="output folder"),
) -> None:
    """Write FILE as MeCoVQA (OUT/mecovqa.json) or Med-GRIT (OUT/med_grit.json); paths are rewritten
    relative to OUT. Samples the format cannot express are skipped and listed."""
    try:
        samples = list(read_jsonl(file))
        if to is ExportFormat.mecovqa:
            from medplib.data.converters.mecovqa import write_mecovqa

            target = out / "mecovqa.json"
            written, skipped = write_mecovqa(samples, file.parent, target)
        else:
            from medplib.data.converters.med_grit import write_med_grit

            target = out / "med_grit.json"
            written, skipped = write_med_grit(samples, file.parent, target)
    except MedplibError as exc:
        raise _fail(exc) from None
    for reason in skipped[:10]:
        typer.echo(f"skipped: {reason}", err=True)
    more = " (first 10 reasons shown)" if len(skipped) > 10 else ""
    typer.echo(f"wrote {written} records to {target}; skipped {len(skipped)}{more}")
