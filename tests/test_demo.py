"""`medplib demo` end to end on the tiny preset: it trains stages I-IV on phantoms and MNI152 slices, scores the
held-out questions, and writes what the README says it writes; a second run reuses the model."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from medplib.demo import STAGE_EXTRA, run_demo
from medplib.training.pipeline import default_recipes_dir, preset_settings
from medplib.training.recipe import load_recipe


def test_demo_trains_scores_and_writes_its_outputs(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    logs: list[str] = []
    result = run_demo(out, preset="tiny", n_phantoms=18, steps=(1, 1, 2, 1), size=64, log=logs.append)
    assert result.trained and result.model_dir == out / "run" / "model"
    assert (out / "run" / "model" / "config.json").is_file()
    m = result.metrics
    assert m["n_vqa"] > 0 and m["n_region"] > 0 and m["n_grounding"] > 0
    for k in ("modality_accuracy", "region_label_accuracy", "grounding_mdice"):
        assert 0.0 <= m[k] <= 1.0
    saved = json.loads((out / "demo.json").read_text())
    assert saved["metrics"] == m and saved["steps"] == [1, 1, 2, 1]
    assert result.answers
    for row in result.answers:
        png = Image.open(row["overlay"])
        assert png.size[0] == 2 * png.size[1]  # the image and its overlay side by side
        assert {"vqa", "region", "grounding"} <= set(row)
    again = run_demo(out, preset="tiny", n_phantoms=18, steps=(1, 1, 2, 1), size=64, log=logs.append)
    def scores(metrics: dict) -> dict:
        return {k: v for k, v in metrics.items() if k != "eval_seconds"}

    assert not again.trained and scores(again.metrics) == scores(m)  # the model is reused, greedy answers repeat
    assert any("reusing the trained model" in line for line in logs)


def test_lite_stage_settings_load_into_the_recipes_as_documented() -> None:
    """`STAGE_EXTRA["lite"]` parses into the stage recipes on top of the preset's settings: stage I trains the region
    encoder on region questions too, stage II draws three region questions to one modality question (the router-only
    stage IV is trained in tests/test_train_pipeline.py)."""
    recipes = {stage: load_recipe(default_recipes_dir() / f"{stage}.yaml", [*preset_settings("lite", stage), *extra])
               for stage, extra in STAGE_EXTRA["lite"].items()}
    assert recipes["stage1_alignment"].trainable == ["projector", "region_encoder"]
    assert recipes["stage1_alignment"].data.sources[0].tasks == ["caption", "vqa", "region_vqa"]
    assert [(s.tasks, s.ratio) for s in recipes["stage2_vl_expert"].data.sources] == [
        (["region_vqa"], 0.75), (["vqa"], 0.25)]
    assert recipes["stage4_moe"].trainable == ["router"] and recipes["stage4_moe"].loss.ce == 0
