"""`medplib pipeline`: stages I to IV from the stage recipes, chained through their model folders.

    RUN/stage1/model -> RUN/stage2/model -> RUN/stage3/model -> RUN/stage4/model -> RUN/model

Each stage is the unchanged recipe file plus overrides: data folder, run folders, and for a preset
without pretrained weights (tiny, small) the CPU settings below. The published trainable sets
assume pretrained CLIP / LLaVA / SAM-Med2D parts; a randomly initialised tower trained through a
projector alone learns nothing, so such presets also train in full (`unfreeze`) the parts a stage
exercises that would otherwise stay random (none by stage IV). Stage III never unfreezes the LLM:
its attention, embeddings and lm_head must stay those of stage II (but for the `[SEG]` rows, which
upcycling takes from stage III), so that stage IV can put stage III's MLPs beside stage II's as
experts of one model.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Sequence

import torch

import medplib
from medplib.config import MedPLIBConfig
from medplib.config import preset as get_preset
from medplib.model.weights import has_weights
from medplib.training.loop import MODEL_DIR, train
from medplib.training.recipe import RecipeError, load_recipe

STAGES = ("stage1_alignment", "stage2_vl_expert", "stage3_pg_expert", "stage4_moe")

# Parts trained in full per stage when the preset has no pretrained weights.
SCRATCH_UNFREEZE = {
    "stage1_alignment": ["vision", "llm"],
    "stage2_vl_expert": ["vision", "llm", "region_encoder"],
    "stage3_pg_expert": ["pixel_encoder"],
    # Nothing: by stage IV both towers are trained (I-II, III). Training them again on the mixed-task
    # batch, where grounding is a third of the samples, cost Kvasir-SEG grounding 0.04 mDice (docs/BENCHMARKS.md).
    "stage4_moe": [],
}


def unfreeze_for(stage: str, cfg: MedPLIBConfig) -> list[str]:
    """Parts a stage trains beyond its recipe's published set: those that start at random and that the
    stage exercises. A part with pretrained weights keeps the published choice (frozen, or LoRA)."""
    random_part = {
        "vision": not cfg.vision.pretrained,
        "llm": not cfg.llm.pretrained,
        # Published: first trained in stage IV, though stage II already asks region questions.
        "region_encoder": True,
        # The CNN pixel encoder's FPN neck is new even when its backbone is pretrained.
        "pixel_encoder": not cfg.pixel.checkpoint or cfg.pixel.kind == "efficientnet",
    }
    return [p for p in SCRATCH_UNFREEZE[stage] if random_part[p]]


# Laptop settings of the CPU presets, on top of the stage recipes (which keep the published values) and below
# the caller's overrides. Global batch 8 fits a 2-core CPU.
_CPU_COMMON = ("train.global_batch=8", "train.micro_batch=8", "checkpoint.every=50", "checkpoint.keep_last=1",
               "log.every=10")
PRESET_SETTINGS: dict[str, dict[str, tuple[str, ...]]] = {
    # Random init: every stage at lr 1e-3 (published: 1e-3, 1e-4, 3e-4, 3e-4, for pretrained parts). Stage IV
    # keeps stage III's mask-loss weights (the published bce 2 / dice 0.5 pulls masks of a decoder trained
    # for a few hundred steps to empty background) and starts at the experts' full scale (straight-through gate).
    "small": {
        "*": (*_CPU_COMMON, "optim.lr=1e-3"),
        "stage4_moe": ("upcycle.gate=straight_through", "loss.dice=5.0", "loss.bce=1.0", "loss.focal=1.0"),
    },
    # Pretrained LLM and towers: the published learning rates, but stage II-IV runs of tens of steps instead
    # of epochs over 100k+ samples take lr 1e-3. Stage IV otherwise as for `small`, plus
    # task-supervised routing (model/moe.py), which keeps grounding on the grounding expert when stage IV is
    # short (0.3: its loss is summed over the 30 layers).
    "lite": {
        # No LoRA dropout: its random masks took 0.47 s of a 5.3 s stage III step on a 2-core CPU.
        "*": (*_CPU_COMMON, "lora.dropout=0"),
        "stage2_vl_expert": ("optim.lr=1e-3",),
        # LoRA on the top 6 of 30 layers and the [SEG] row trained through the head only: the backward pass stops
        # at layer 24 instead of crossing the LLM, so a step costs ~0.7x (docs/BENCHMARKS.md) at the same mDice
        # for the same steps; the steps saved go to more grounding samples.
        "stage3_pg_expert": ("optim.lr=1e-3", "lora.last_layers=6",
                             "trainable=[lora,mask_decoder,seg_proj,seg_token_out]"),
        # Capacity factor 2 with 2 experts drops no token: task-supervised routing sends a VQA batch's tokens to
        # one expert, which the published 1.5 cuts by a quarter (measured: text loss 0.4 -> 5 in 25 steps).
        # lr 1e-3 as in stages II-III: at 1e-4 the fresh routers stay at chance over a 20-step stage IV (measured:
        # VQA tokens 0.54 / 0.46 over the experts, the task loss at 0.69 per layer).
        "stage4_moe": ("optim.lr=1e-3", "upcycle.gate=straight_through", "loss.route=0.3",
                       "upcycle.capacity_factor_train=2.0",
                       "loss.dice=5.0", "loss.bce=1.0", "loss.focal=1.0"),
    },
}


def preset_settings(preset: str, stage: str) -> list[str]:
    table = PRESET_SETTINGS.get(preset, {})
    return [*table.get("*", ()), *table.get(stage, ())]


def default_recipes_dir() -> Path:
    """The stage recipes shipped inside the package (`medplib/recipes/`, package data; the checkout's
    top-level `recipes` is a link to it), so an installed wheel finds them as an editable install does."""
    return Path(medplib.__file__).resolve().parent / "recipes"


def parse_stage_overrides(items: Sequence[str]) -> dict[str, list[str]]:
    """`["3:data.augment=[hflip]", ...]` (stage number 1-4, a colon, key=value) -> {stage name: overrides}."""
    out: dict[str, list[str]] = {}
    for item in items:
        num, sep, override = item.partition(":")
        if not sep or not num.strip().isdigit() or not 1 <= int(num) <= len(STAGES) or "=" not in override:
            raise RecipeError(f"bad stage override '{item}': expected N:key=value with N in 1..{len(STAGES)}, "
                              "e.g. 3:data.augment=[hflip,vflip]")
        out.setdefault(STAGES[int(num) - 1], []).append(override)
    return out


def stage_overrides(stage: str, preset: str, data: Path, run: Path, cfg: MedPLIBConfig) -> list[str]:
    """The overrides that place one stage of a pipeline run."""
    def d(i: int) -> str:
        return str(run / f"stage{i}" / MODEL_DIR)

    out = [f"data.dir={data}", f"output_dir={run / stage.split('_')[0]}"]
    if stage == "stage1_alignment":
        out += [f"model.preset={preset}"]
    elif stage in ("stage2_vl_expert",):
        out += [f"model.path={d(1)}"]
    elif stage == "stage3_pg_expert":
        out += [f"model.path={d(2)}"]
    else:
        out += [f"model.path={d(2)}", f"upcycle.experts=[{d(3)},{d(2)}]"]
    out.append(f"unfreeze=[{','.join(unfreeze_for(stage, cfg))}]")
    if not torch.cuda.is_available():
        out.append("train.mixed_precision=fp32")  # bf16 autocast on a CPU is slower and loses precision
    return out


def run_pipeline(
    preset: str, data: Path, run: Path, *, steps: Sequence[int] | None = None, overrides: Sequence[str] = (),
    stage_extra: dict[str, Sequence[str]] | None = None, recipes: Path | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Train stages I-IV; returns RUN/model (a copy of stage IV's model folder). A stage whose model
    folder exists is skipped; an interrupted stage resumes from its newest checkpoint.

    steps: optimizer steps per stage (4 values), else each recipe's epochs. overrides: applied to
    every stage (after the placement overrides and the preset's PRESET_SETTINGS). stage_extra: more
    overrides for one stage."""
    from accelerate import PartialState

    recipes = recipes or default_recipes_dir()
    if steps is not None and len(steps) != len(STAGES):
        raise RecipeError(f"give {len(STAGES)} step counts (one per stage), got {len(steps)}")
    cfg = get_preset(preset)
    run = Path(run)
    for k, stage in enumerate(STAGES):
        path = recipes / f"{stage}.yaml"
        if not path.is_file():
            raise RecipeError(f"recipe {path} not found (pass the recipes folder)")
        extra = [*stage_overrides(stage, preset, Path(data), run, cfg), *preset_settings(preset, stage), *overrides,
                 *(stage_extra or {}).get(stage, ())]
        if steps is not None:
            extra.append(f"train.steps={steps[k]}")
        recipe = load_recipe(path, extra)
        done = Path(recipe.output_dir) / MODEL_DIR
        if has_weights(done):  # one file or HF-style shards
            log(f"[{stage}] already trained: {done}")
            continue
        train(recipe, log=log)
    final = run / MODEL_DIR
    state = PartialState()  # already set up by train()
    if state.is_main_process:
        tmp = run / (MODEL_DIR + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(run / "stage4" / MODEL_DIR, tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        log(f"pipeline done: {final}")
    state.wait_for_everyone()
    return final
