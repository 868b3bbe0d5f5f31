"""The stage runner in its parts (setup, one step, checkpoint, finish), the optimizer's schedule,
and the model/recipe split: a saved model folder holds no training setting."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import KVASIR_ANSWER, KVASIR_QUESTION

from medplib.config import MedPLIBConfig, preset
from medplib.data.schema import Sample, Target, Turn, write_jsonl
from medplib.errors import ConfigError
from medplib.training.checkpoint import checkpoint_dir, latest_checkpoint
from medplib.training.loop import PARTS, StageRunner
from medplib.training.optim import build_optimizer
from medplib.training.pipeline import default_recipes_dir
from medplib.training.recipe import OptimSection, load_recipe


def _kvasir_data(shared_data: Path, out: Path, n: int = 4) -> Path:
    """A data folder of n real Kvasir-SEG grounding samples (images and masks copied from the data set)."""
    src = shared_data / "kvasir_seg"
    samples = []
    for i, image in enumerate(sorted((src / "images").glob("*.jpg"))[:n]):
        (out / "images").mkdir(parents=True, exist_ok=True)
        (out / "masks").mkdir(parents=True, exist_ok=True)
        shutil.copy(image, out / "images" / image.name)
        shutil.copy(src / "masks" / image.name, out / "masks" / image.name)
        samples.append(Sample(id=f"kvasir-{i}", image=f"images/{image.name}", task="grounding", source="kvasir",
                              conversations=[Turn(role="user", content=KVASIR_QUESTION),
                                             Turn(role="assistant", content=KVASIR_ANSWER)],
                              targets=[Target(mask=f"masks/{image.name}", label="polyp")]))
    write_jsonl(samples, out / "kvasir.jsonl")
    return out


def test_runner_parts_step_checkpoint_and_finish(shared_data: Path, tmp_path: Path) -> None:
    data = _kvasir_data(shared_data, tmp_path / "data")
    recipe = load_recipe(default_recipes_dir() / "stage3_pg_expert.yaml", [
        "model.path=null", "model.preset=tiny", f"data.dir={data}", f"output_dir={tmp_path / 'run'}",
        "data.sources=[{file: '*.jsonl', tasks: [grounding], ratio: 1.0}]", "lora.r=0",
        "trainable=[mask_decoder,seg_proj,lm_head]", "train.steps=3", "train.global_batch=2", "train.micro_batch=2",
        "train.mixed_precision=fp32", "checkpoint.every=2", "log.progress=false", "log.tensorboard=false",
        "loss.dice=5.0", "loss.bce=1.0", "loss.focal=0.0", "optim.lr=1e-3"])
    runner = StageRunner(recipe, log=lambda s: None)
    runner.setup()
    assert (runner.start, runner.steps, runner.accum) == (0, 3, 1)
    before = runner.m.model.seg_proj[0].weight.detach().clone()

    row = runner.train_step(0)
    assert set(PARTS) <= set(row) and row["step"] == 1 and row["lr"] > 0
    # The logged loss is the recipe's weighting of the parts (focal computed but weighted 0).
    assert row["loss"] == pytest.approx(row["ce"] + 1.0 * row["bce"] + 5.0 * row["dice"], rel=1e-5)
    assert row["dice"] > 0 and row["focal"] > 0
    assert not torch.equal(before, runner.m.model.seg_proj[0].weight)  # the step trained the grounding parts
    runner.record(row)
    assert [runner.checkpoint_due(k) for k in (1, 2, 3)] == [False, True, False]  # the last step writes the model
    runner.save_checkpoint(2)
    assert latest_checkpoint(tmp_path / "run") == checkpoint_dir(tmp_path / "run", 2)

    result = runner.finish()
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1
    saved = json.loads((result.folder / "config.json").read_text(encoding="utf-8"))
    assert "loss" not in saved  # the stage's loss weights stay in its recipe
    assert MedPLIBConfig.from_dict(saved).moe.num_experts == 0


def test_schedule_warms_up_then_decays_to_zero() -> None:
    p = torch.nn.Parameter(torch.zeros(1))
    opt, sched = build_optimizer([p], OptimSection(lr=1.0, warmup_ratio=0.25), steps=8)
    lrs = []
    for _ in range(8):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[:2] == [0.5, 1.0]  # ceil(0.25 * 8) = 2 warmup steps
    assert lrs[2:] == pytest.approx([1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6])
    assert opt.param_groups[0]["betas"] == (0.9, 0.95)


def test_model_config_is_type_checked_and_old_training_keys_are_dropped() -> None:
    with pytest.raises(ConfigError, match="moe.gate.*choose from prob, straight_through"):
        preset("tiny", **{"moe.gate": "typo"})
    with pytest.raises(ConfigError, match="'pixel.depth': expected an integer"):
        preset("tiny", **{"pixel.depth": "two"})
    with pytest.raises(ConfigError, match="unknown config key 'moe.gates'"):
        MedPLIBConfig.from_dict({"moe": {"gates": "prob"}})
    old = preset("tiny").to_dict()
    old["loss"] = {"ce": 1.0, "bce": 2.0, "dice": 0.5, "focal": 0.0, "iou": 0.0}  # a folder from before the split
    old["moe"].update(aux_loss_coef=0.0, z_loss_coef=0.0, router_task_coef=0.3)
    assert MedPLIBConfig.from_dict(old) == preset("tiny")
