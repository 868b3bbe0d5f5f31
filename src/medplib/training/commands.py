"""`medplib train` and `medplib pipeline` (registered in medplib.cli)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from medplib.errors import MedplibError


def train_command(
    recipe: Path = typer.Option(..., "--recipe", help="a recipe YAML, e.g. recipes/stage2_vl_expert.yaml"),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides, e.g. train.steps=100 lora.r=8"),
) -> None:
    """Train one stage from a recipe. Resumes from the newest checkpoint in its output_dir."""
    from medplib.training.loop import run_recipe

    run_recipe(recipe, list(overrides or []), log=typer.echo)


def pipeline_command(
    data: Path = typer.Option(..., "--data", help="folder with sample JSONL files (see `medplib data build`)"),
    out: Path = typer.Option(..., "--out", help="run folder: stage1..stage4 and the final model/"),
    preset: str = typer.Option("small", help="model preset that stage I starts from"),
    steps: Optional[str] = typer.Option(None, help="optimizer steps per stage, e.g. 100,100,60,60 (default: epochs)"),
    recipes: Optional[Path] = typer.Option(None, help="folder with the stage recipes (default: the package's own)"),
    stage: Optional[List[str]] = typer.Option(None, "--stage", help="an override for one stage, N:key=value "
                                              "(repeatable), e.g. --stage 3:data.augment=[hflip,vflip]"),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides for every stage"),
) -> None:
    """Run stages I to IV; OUT/model is the trained MoE model that inference loads."""
    from medplib.training.loop import end_processes
    from medplib.training.pipeline import parse_stage_overrides, run_pipeline

    try:
        counts = [int(s) for s in steps.split(",")] if steps else None
    except ValueError:
        raise MedplibError(f"--steps must be comma-separated integers, got {steps!r}") from None
    try:
        run_pipeline(preset, data, out, steps=counts, overrides=list(overrides or []),
                     stage_extra=parse_stage_overrides(stage or []), recipes=recipes, log=typer.echo)
    finally:
        end_processes()
