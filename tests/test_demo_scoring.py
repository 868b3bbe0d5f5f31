"""The demo scores grounding as `medplib eval` does: the same questions (absent structures too) give the same mDice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medplib.api import Answer
from medplib.data.builder import BuildConfig, build_samples
from medplib.data.loading import load_sample
from medplib.data.phantoms import phantom_items
from medplib.data.schema import IMAGE_TOKEN
from medplib.demo import evaluate
from medplib.evaluation.report import run_report
from medplib.evaluation.runner import predict
from medplib.inference import Query


class _Alternating:
    """Two masks (a corner and the centre) for every other question, none for the rest."""

    def generate(self, image, question, regions=(), region_arrays=None, examples=(), box_format=None) -> Answer:
        if len(question.replace(IMAGE_TOKEN, "").strip()) % 2:
            return Answer(text="There is none.")
        h, w = image.shape[:2]
        corner, centre = np.zeros((h, w), bool), np.zeros((h, w), bool)
        corner[: h // 4, : w // 4] = True
        centre[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = True
        return Answer(text="Sure, it is [SEG] and [SEG].", masks=[corner, centre])

    def ask_batch(self, queries: list[Query]) -> list[Answer]:  # what the demo's evaluate calls
        return [self.generate(q.image, q.question, q.regions, q.region_arrays) for q in queries]


def test_demo_grounding_mdice_is_medplib_evals(tmp_path: Path) -> None:
    samples = list(build_samples(phantom_items(tmp_path, n=6, seed=1, size=64), tmp_path,
                                 BuildConfig(seed=1, tasks=["grounding"])))
    loaded = [load_sample(s, tmp_path) for s in samples]
    assert any(not s.target_masks for s in loaded)  # questions about absent structures are among them
    demo = evaluate(_Alternating(), loaded)
    report = run_report([predict(_Alternating(), s, tmp_path) for s in samples], tmp_path / "eval", "jsonl", "stub")
    assert demo["n_grounding"] == report["metrics"]["grounding"]["n"] == len(samples)
    assert demo["grounding_mdice"] == pytest.approx(report["metrics"]["grounding"]["dice"]["value"])
