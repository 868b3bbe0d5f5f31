"""`medplib index ...`: build, grow, query and describe an index of annotated images. Thin: calls
medplib.retrieval. Every medplib error is printed as one `error:` line and exits with status 1."""

from __future__ import annotations

import json
from collections import Counter
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from medplib.errors import MedplibError

if TYPE_CHECKING:
    from medplib.retrieval.embed import ImageEmbedder
    from medplib.retrieval.index import AddReport, ExampleIndex

index_app = typer.Typer(help="Index annotated images and retrieve in-context examples.", no_args_is_help=True)


class KindOption(str, Enum):
    flat = "flat"
    hnsw = "hnsw"


def _fail(exc: Exception) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(1)


def _splits(split: Optional[str]) -> list[str] | None:
    return [s.strip() for s in split.split(",") if s.strip()] if split else None


def _embedder(model: Path, batch_size: int) -> "ImageEmbedder":
    from medplib.api import MedPLIB
    from medplib.retrieval.embed import ImageEmbedder

    return ImageEmbedder(MedPLIB.from_pretrained(model), batch_size=batch_size)


def _model_of(index: "ExampleIndex", model: Optional[Path]) -> Path:
    path = model or index.model_path
    if path is None:
        raise MedplibError(f"{index.folder} does not record its model: pass --model")
    return path


def _report(report: "AddReport", index: "ExampleIndex") -> None:
    for message in report.skipped:
        typer.echo(f"warning: skipped {message}", err=True)
    typer.echo(f"added {report.added} examples ({report.duplicates} already indexed, {len(report.skipped)} skipped); "
               f"{len(index)} in {index.folder}")


@index_app.command()
def build(
    data: Path = typer.Argument(..., help="data folder with samples.jsonl (or the JSONL file)"),
    out: Path = typer.Option(..., "--out", help="index folder to write"),
    model: Path = typer.Option(..., "--model", help="medplib model folder whose vision tower embeds the images"),
    kind: KindOption = typer.Option(KindOption.flat, help="flat: exact search; hnsw: approximate, for millions"),
    split: Optional[str] = typer.Option(None, help="comma-separated splits to index (default: all)"),
    batch_size: int = typer.Option(16, help="images per vision-tower batch"),
    hnsw_m: int = typer.Option(32, help="HNSW graph degree"),
    ef_construction: int = typer.Option(200, help="HNSW candidate list when adding"),
    ef_search: int = typer.Option(128, help="HNSW candidate list when searching"),
    overwrite: bool = typer.Option(False, help="replace an index already in --out"),
) -> None:
    """Embed every annotated (image, label) of DATA with the model's vision tower into a new index."""
    try:
        from medplib.retrieval.index import ExampleIndex, HNSWParams, add_library

        embedder = _embedder(model, batch_size)
        index = ExampleIndex.create(out, dim=embedder.dim, fingerprint=embedder.fingerprint, model=model,
                                    kind=kind.value, hnsw=HNSWParams(hnsw_m, ef_construction, ef_search),
                                    overwrite=overwrite)
        report = add_library(index, embedder, data, splits=_splits(split), log=lambda m: typer.echo(m, err=True))
        index.save()
    except MedplibError as exc:
        raise _fail(exc) from None
    _report(report, index)


@index_app.command()
def add(
    index_dir: Path = typer.Argument(..., metavar="INDEX", help="index folder"),
    data: Path = typer.Argument(..., help="data folder with samples.jsonl (or the JSONL file)"),
    model: Optional[Path] = typer.Option(None, help="model folder (default: the one the index was built with)"),
    split: Optional[str] = typer.Option(None, help="comma-separated splits to index (default: all)"),
    batch_size: int = typer.Option(16, help="images per vision-tower batch"),
) -> None:
    """Add DATA's annotated images that INDEX lacks (same model; duplicates are skipped)."""
    try:
        from medplib.retrieval.index import ExampleIndex, add_library

        index = ExampleIndex.load(index_dir)
        embedder = _embedder(_model_of(index, model), batch_size)
        report = add_library(index, embedder, data, splits=_splits(split), log=lambda m: typer.echo(m, err=True))
        index.save()
    except MedplibError as exc:
        raise _fail(exc) from None
    _report(report, index)


@index_app.command()
def query(
    index_dir: Path = typer.Argument(..., metavar="INDEX", help="index folder"),
    image: Path = typer.Argument(..., help="query image (PNG/JPG/TIFF/DICOM/NIfTI, with #options)"),
    k: int = typer.Option(3, "--k", help="examples to return"),
    label: Optional[str] = typer.Option(None, help="only examples of this label"),
    model: Optional[Path] = typer.Option(None, help="model folder (default: the one the index was built with)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of text"),
) -> None:
    """The K examples most similar to IMAGE (cosine of vision-tower embeddings), never IMAGE itself."""
    from medplib.data.images import read_image

    try:
        from medplib.retrieval.index import ExampleIndex
        from medplib.retrieval.index import query as run_query

        index = ExampleIndex.load(index_dir)
        embedder = _embedder(_model_of(index, model), 1)
        hits = run_query(index, embedder, read_image(image).rgb, k, label=label)
    except MedplibError as exc:
        raise _fail(exc) from None
    if as_json:
        typer.echo(json.dumps([h.__dict__ for h in hits], indent=2))
        return
    for rank, h in enumerate(hits, start=1):
        mask = h.mask if isinstance(h.mask, str) else "RLE"
        typer.echo(f"{rank}. {h.score:.4f} {h.label or '-'} {h.image} {mask}")


@index_app.command()
def info(
    index_dir: Path = typer.Argument(..., metavar="INDEX", help="index folder"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of text"),
) -> None:
    """Kind, size, dimension, model and examples per label of INDEX."""
    try:
        from medplib.retrieval.index import ExampleIndex

        index = ExampleIndex.load(index_dir)
    except MedplibError as exc:
        raise _fail(exc) from None
    labels = Counter(e.label or "-" for e in index.entries)
    summary = {"kind": index.kind, "count": len(index), "dim": index.dim, "model": str(index.model_path),
               "labels": dict(labels.most_common())}
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    typer.echo(f"{index.folder}: {summary['count']} examples, {index.kind}, {index.dim}-d, model {summary['model']}")
    for name, n in labels.most_common():
        typer.echo(f"  {name}: {n}")
