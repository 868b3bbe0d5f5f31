"""The `medplib` command. Thin: each subcommand calls a module; errors print a message, not a traceback."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from medplib.errors import MedplibError
from medplib.evaluation.commands import eval_command
from medplib.training.commands import pipeline_command, train_command

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Pixel-level biomedical multimodal LLMs.")


@app.command()
def info(
    preset: str = typer.Option("paper", help="tiny, small, lite or paper"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
) -> None:
    """Parameter counts and feature shapes of a preset, built on the meta device (no weights needed)."""
    from medplib.config import preset as get_preset
    from medplib.model.summary import PAPER_BASE_VOCAB, build_on_meta, summarize
    from medplib.tokenizer import EXTRA_SPECIAL

    cfg = get_preset(preset)
    if preset == "paper":
        vocab = PAPER_BASE_VOCAB + len(EXTRA_SPECIAL)
    else:  # an LLM's own tokenizer (lite) gains medplib's special tokens; the trained BPE holds them
        vocab = cfg.tokenizer.vocab_size + (len(EXTRA_SPECIAL) if cfg.tokenizer.path else 0)
    s = summarize(build_on_meta(cfg, vocab))
    if as_json:
        typer.echo(json.dumps(s.__dict__, indent=2))
        return
    typer.echo(f"preset {preset}: {s.total / 1e9:.2f}B parameters in total, {s.active / 1e9:.2f}B active per token")
    for name, n in s.parts.items():
        typer.echo(f"  {name:16s} {n / 1e6:10.1f}M")
    typer.echo(f"  image tokens {s.image_tokens} x {s.vision_width} -> LLM {s.llm_layers} layers x {s.llm_hidden}; "
               f"pixel embedding {'x'.join(map(str, s.pixel_embedding))}")


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"),
                             help="folder for the data, the stage runs, the model, overlays and demo.json"),
    preset: str = typer.Option("lite", help="model preset to train (lite: pretrained; small: random init)"),
    steps: Optional[str] = typer.Option(None, help="optimizer steps for stages I-IV, e.g. 15,50,90,25 "
                                        "(default: the demo's for the preset)"),
    n_phantoms: int = typer.Option(270, help="phantom images to build, besides the MNI152 brain slices "
                                   "(split into train/val/test)"),
    retrain: bool = typer.Option(False, help="train again even if OUT/run/model exists"),
    seed: int = typer.Option(0),
) -> None:
    """Build phantoms, train stages I-IV, evaluate, answer a VQA, a region and a grounding question, write overlays."""
    from medplib.demo import run_demo

    try:
        counts = None if steps is None else [int(x) for x in steps.split(",")]
    except ValueError:
        raise MedplibError(f"--steps must be 4 comma-separated integers, got {steps!r}") from None
    run_demo(out, preset=preset, steps=counts, n_phantoms=n_phantoms, retrain=retrain, seed=seed, log=typer.echo)


@app.command()
def convert(
    src: Path = typer.Argument(..., help="the folder to convert"),
    out: Path = typer.Argument(..., help="the folder to write"),
    to: str = typer.Option("medplib", help="medplib: a published MedPLIB folder (e.g. MedPLIB-7b-2e) -> a medplib "
                           "model folder; published: a medplib model folder -> the published layout"),
    config: Optional[Path] = typer.Option(None, help="medplib config.json for what the published config.json does "
                                          "not record (vision, SAM-Med2D, decoder widths; default: the paper preset)"),
    vision: Optional[Path] = typer.Option(None, help="HF CLIP folder, for checkpoints saved without the vision tower"),
    sam: Optional[Path] = typer.Option(None, help="SAM-Med2D checkpoint: the SAM part of a LLaVA-1.5 / LLaVA-Med "
                                       "folder (stage I start), or, --to published, the SAM parts medplib does not "
                                       "keep (default: zeros)"),
    shard_gb: float = typer.Option(10.0, help="--to published: largest shard, GB"),
) -> None:
    """Convert weights between the published MedPLIB layout and a medplib model folder, streaming shard by shard."""
    from medplib.config import MedPLIBConfig
    from medplib.model.convert import medplib_to_published, published_to_medplib

    if to == "medplib":
        base = MedPLIBConfig.load(config) if config else None
        published_to_medplib(src, out, base=base, vision=vision, sam=sam, log=typer.echo)
    elif to == "published":
        medplib_to_published(src, out, sam=sam, max_shard_bytes=int(shard_gb * 2**30), log=typer.echo)
    else:
        raise MedplibError(f"--to must be medplib or published, got {to!r}")


app.command("eval")(eval_command)
app.command("train")(train_command)
app.command("pipeline")(pipeline_command)


def _register_optional() -> None:
    """Sub-apps live beside the code they drive."""
    from medplib.data.commands import data_app

    app.add_typer(data_app, name="data", help="Build, validate, inspect and export instruction data.")
    from medplib.retrieval.commands import index_app

    app.add_typer(index_app, name="index", help="Index annotated images and retrieve in-context examples.")
    from medplib.serving.commands import ask, serve

    app.command()(ask)
    app.command()(serve)


def main() -> None:
    _register_optional()
    try:
        app()
    except MedplibError as exc:
        # One line however many the message has: a library's own message (transformers') may have several.
        typer.echo("error: " + " ".join(line.strip() for line in str(exc).splitlines() if line.strip()), err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
