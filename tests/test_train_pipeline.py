"""Stages I-IV on the tiny preset through `medplib pipeline`, and stage IV upcycling at the MedPLIB
level: with the router forced to expert e, the upcycled model reproduces dense model e exactly
(expert 0 = stage III, the pixel-grounding expert; expert 1 = stage II)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from medplib.api import MedPLIB
from medplib.config import MoEConfig
from medplib.data.loading import load_sample
from medplib.data.phantoms import write_phantom_dataset
from medplib.data.schema import read_jsonl
from medplib.demo import STAGE_EXTRA
from medplib.model.moe import force_expert, moe_layers
from medplib.training.build import build_model
from medplib.training.data import GROUNDING_EXPERT, VL_EXPERT, route_targets, token_groups
from medplib.training.loop import train
from medplib.training.pipeline import default_recipes_dir, parse_stage_overrides
from medplib.training.recipe import RecipeError, load_recipe


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pipeline")
    jsonl = write_phantom_dataset(root / "data", 8, seed=0, size=64)
    common = ["train.global_batch=2", "train.micro_batch=2", "log.progress=false", "log.every=1",
              "log.tensorboard=false", "checkpoint.every=0"]
    # Through the real command line, with one-stage overrides: flips in stage III, and a tokenizer
    # fitted to the data when stage I builds the model.
    subprocess.run([sys.executable, "-m", "medplib.cli", "pipeline", "--preset", "tiny", "--data", str(jsonl.parent),
                    "--out", str(root / "run"), "--steps", "2,2,2,2", "--stage", "3:data.augment=[hflip,vflip]",
                    "--stage", f"1:model.overrides.tokenizer.corpus={jsonl.parent}", *common],
                   check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return jsonl, root / "run"


def test_one_stage_overrides_reach_only_their_stage(pipeline_run: tuple[Path, Path]) -> None:
    jsonl, run = pipeline_run
    augment = {
        k: yaml.safe_load((run / f"stage{k}" / "recipe.yaml").read_text())["data"]["augment"] for k in range(1, 5)
    }
    assert augment == {1: [], 2: [], 3: ["hflip", "vflip"], 4: []}
    fitted = MedPLIB.from_pretrained(run / "model").tokenizer
    plain = MedPLIB.from_preset("tiny").tokenizer
    text = " ".join(t.content for s in read_jsonl(jsonl) for t in s.conversations if s.split == "train")
    assert len(fitted(text)["input_ids"]) < len(plain(text)["input_ids"])
    with pytest.raises(RecipeError, match="expected N:key=value"):
        parse_stage_overrides(["5:train.steps=1"])
    with pytest.raises(RecipeError, match="expected N:key=value"):
        parse_stage_overrides(["data.augment=[hflip]"])


def _batch(m: MedPLIB, jsonl: Path, task: str) -> dict:
    s = next(s for s in read_jsonl(jsonl) if s.task == task)
    return m.collate([m.processor.encode_loaded(load_sample(s, jsonl.parent))])


def test_pipeline_leaves_an_moe_model_that_inference_loads(pipeline_run: tuple[Path, Path]) -> None:
    jsonl, run = pipeline_run
    m = MedPLIB.from_pretrained(run / "model")
    assert m.config.moe.num_experts == 2 and m.config.moe.top_k == 1
    assert len(moe_layers(m.model.llm)) == m.model.llm.config.num_hidden_layers
    image = np.asarray(load_sample(next(read_jsonl(jsonl)), jsonl.parent).image)
    cached = m.generate(image, "What modality is this?", max_new_tokens=6)
    uncached = m.generate(image, "What modality is this?", max_new_tokens=6, use_cache=False)
    assert cached.token_ids == uncached.token_ids
    rows = [json.loads(ln) for ln in (run / "stage4" / "metrics.jsonl").read_text().splitlines()]
    routing = [r["routing"] for r in rows if "routing" in r]
    assert routing, "stage IV logs routing statistics"
    for shares in routing[-1].values():
        assert len(shares) == 2 and sum(shares) == pytest.approx(1.0, abs=1e-3)
    for stage in ("stage1", "stage2", "stage3"):
        assert MedPLIB.from_pretrained(run / stage / "model").config.moe.num_experts == 0


def test_stage3_changes_only_mlps_and_pixel_parts(pipeline_run: tuple[Path, Path]) -> None:
    _, run = pipeline_run
    s2 = MedPLIB.from_pretrained(run / "stage2" / "model").model.state_dict()
    s3 = MedPLIB.from_pretrained(run / "stage3" / "model").model.state_dict()
    seg = MedPLIB.from_pretrained(run / "stage3" / "model").model.ids.seg
    embeddings = {k for k in s2 if k.endswith(("embed_tokens.weight", "lm_head.weight"))}
    changed = {k.split(".")[0] if not k.startswith("llm.") else ("llm.mlp" if ".mlp." in k else "llm.other")
               for k in s2 if k not in embeddings and not torch.equal(s2[k], s3[k])}
    assert changed == {"llm.mlp", "mask_decoder", "seg_proj", "pixel_encoder"}
    # The embeddings change only in their [SEG] rows (recipe group seg_token).
    for k in embeddings:
        rows = torch.nonzero((s2[k] != s3[k]).any(dim=1)).flatten().tolist()
        assert rows == [seg], k


def test_stage4_keeps_the_trained_towers(pipeline_run: tuple[Path, Path]) -> None:
    """From-scratch presets train the pixel encoder in stage III and the vision tower in I-II; stage IV keeps both."""
    _, run = pipeline_run
    s4 = MedPLIB.from_pretrained(run / "model").model.state_dict()
    for part, stage in (("pixel_encoder", "stage3"), ("vision", "stage2")):
        before = MedPLIB.from_pretrained(run / stage / "model").model.state_dict()
        keys = [k for k in before if k.startswith(part + ".")]
        assert keys and all(torch.equal(before[k], s4[k]) for k in keys), part


@pytest.mark.parametrize("expert,dense", [(0, "stage3"), (1, "stage2")])
def test_upcycled_model_with_forced_expert_reproduces_the_dense_model(
    pipeline_run: tuple[Path, Path], expert: int, dense: str
) -> None:
    jsonl, run = pipeline_run
    recipe = load_recipe(default_recipes_dir() / "stage4_moe.yaml", [
        f"model.path={run / 'stage2' / 'model'}",
        f"upcycle.experts=[{run / 'stage3' / 'model'},{run / 'stage2' / 'model'}]"])
    moe = build_model(recipe)  # the stage IV code path: upcycling, LoRA on experts and attention
    assert moe.config.moe.num_experts == 2
    moe.model.eval()
    ref = MedPLIB.from_pretrained(run / dense / "model")
    # Upcycling takes the [SEG] embedding rows from the grounding expert (stage III), whichever expert runs.
    stage3, seg = MedPLIB.from_pretrained(run / "stage3" / "model").model.llm, ref.model.ids.seg
    with torch.no_grad(), force_expert(moe.model.llm, expert):
        for get in ("get_input_embeddings", "get_output_embeddings"):
            getattr(ref.model.llm, get)().weight[seg] = getattr(stage3, get)().weight[seg]
        for task in ("vqa", "region_vqa", "grounding"):
            got, want = moe.model(**_batch(moe, jsonl, task)), ref.model(**_batch(ref, jsonl, task))
            assert torch.equal(got.logits, want.logits), task
            if task == "grounding" and expert == 0:  # the pixel parts come from the grounding expert
                assert torch.equal(got.mask_logits[0][0], want.mask_logits[0][0])
    with torch.no_grad():
        routed = moe.model(**_batch(moe, jsonl, "vqa")).logits
    assert not torch.equal(routed, want.logits)  # real routing mixes the experts


def test_route_targets_skip_the_prefix_and_padding(pipeline_run: tuple[Path, Path]) -> None:
    jsonl, run = pipeline_run
    m = MedPLIB.from_pretrained(run / "stage2" / "model")
    for task, expert in (("grounding", GROUNDING_EXPERT), ("vqa", VL_EXPERT), ("region_vqa", VL_EXPERT)):
        batch = _batch(m, jsonl, task)
        targets = route_targets(batch, token_groups(batch), m.model.ids.image)[0]
        ids = batch["input_ids"][0]
        first = int(torch.nonzero(ids == m.model.ids.image)[-1]) + 2  # the first token after the image
        assert (targets[:first] == -1).all(), task
        assert (targets[first:] == expert).all(), task
        # `upcycle.prefix_expert`: the prefix goes to one expert whatever the task; the rest is unchanged
        fixed = route_targets(batch, token_groups(batch), m.model.ids.image, prefix_expert=VL_EXPERT)[0]
        assert (fixed[:first] == VL_EXPERT).all() and torch.equal(fixed[first:], targets[first:]), task


def test_stage4_runner_supervises_routing_only_when_asked(pipeline_run: tuple[Path, Path], tmp_path: Path) -> None:
    """The runner hands each batch's route targets to the MoE layers: with loss.route > 0 the logged
    route loss is the routing cross-entropy (> 0), with 0 (published) no targets are made and it stays 0;
    the saved model's config holds no training setting."""
    jsonl, run = pipeline_run
    aux = {}
    for coef in (0.0, 1.0):
        recipe = load_recipe(default_recipes_dir() / "stage4_moe.yaml", [
            f"model.path={run / 'stage2' / 'model'}",
            f"upcycle.experts=[{run / 'stage3' / 'model'},{run / 'stage2' / 'model'}]",
            f"data.dir={jsonl.parent}", f"output_dir={tmp_path / str(coef)}", f"loss.route={coef}",
            "train.steps=2", "train.global_batch=4", "train.micro_batch=4", "train.mixed_precision=fp32",
            "checkpoint.every=0", "log.progress=false", "log.tensorboard=false"])
        result = train(recipe, log=lambda s: None)
        saved = json.loads((result.folder / "config.json").read_text(encoding="utf-8"))
        assert "loss" not in saved and set(saved["moe"]) == {f.name for f in dataclasses.fields(MoEConfig)}
        assert saved["moe"]["num_experts"] == 2
        aux[coef] = [row["route"] for row in result.history]
    assert aux[0.0] == [0.0, 0.0]
    # 2 MoE layers, each about ln 2 at upcycling (near-uniform router)
    assert all(0.5 < a < 3.0 for a in aux[1.0]), aux[1.0]


def test_stage4_routers_alone_leave_every_other_weight_as_upcycled(
    pipeline_run: tuple[Path, Path], tmp_path: Path
) -> None:
    """The demo's lite stage IV (`medplib.demo.STAGE_EXTRA`: routers trained alone by the route loss, the image's
    tokens sent to the vision-language expert): the route loss falls, and only router weights differ from the
    upcycled model the stage starts from."""
    jsonl, run = pipeline_run
    place = [f"model.path={run / 'stage2' / 'model'}",
             f"upcycle.experts=[{run / 'stage3' / 'model'},{run / 'stage2' / 'model'}]", f"data.dir={jsonl.parent}",
             "train.global_batch=4", "train.micro_batch=4", "train.mixed_precision=fp32", "checkpoint.every=0",
             "log.progress=false", "log.tensorboard=false", "log.every=1"]
    recipe = load_recipe(default_recipes_dir() / "stage4_moe.yaml",
                         [*place, f"output_dir={tmp_path / 's4'}", "train.steps=6", *STAGE_EXTRA["lite"]["stage4_moe"]])
    assert recipe.upcycle.prefix_expert == VL_EXPERT and recipe.trainable == ["router"]
    start = build_model(recipe).model.state_dict()
    result = train(recipe, log=lambda s: None)
    route = [row["route"] for row in result.history]
    assert route[-1] < route[0], route
    trained = MedPLIB.from_pretrained(result.folder).model.state_dict()
    changed = {k for k in start if not torch.equal(start[k], trained[k])}
    assert changed and all(".router." in k for k in changed), sorted(changed)[:5]


def test_every_stage_writes_a_recipe_that_loads_back(pipeline_run: tuple[Path, Path]) -> None:
    """`RUN/stageN/recipe.yaml` is the resolved recipe: `medplib train --recipe` must accept it as written,
    stage IV's upcycling included, and it must resolve to the same recipe."""
    _, run = pipeline_run
    for k in range(1, 5):
        path = run / f"stage{k}" / "recipe.yaml"
        assert load_recipe(path, []).to_dict() == yaml.safe_load(path.read_text())
    assert load_recipe(run / "stage4" / "recipe.yaml", []).upcycle.num_experts == 2
