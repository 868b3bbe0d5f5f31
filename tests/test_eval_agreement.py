"""Agreement of score columns: hand-computed kappa, correlations with intervals, pair tables."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from medplib.errors import InputError
from medplib.evaluation.agreement import agreement_table, cohen_kappa, pair_agreement


def test_kappa_hand_computed():
    # observed agreement 3/4; chance 0.5*0.25 + 0.5*0.75 = 0.5 -> (0.75 - 0.5) / 0.5
    assert cohen_kappa([0, 0, 1, 1], [0, 1, 1, 1]) == pytest.approx(0.5)
    assert cohen_kappa([0, 1, 2, 3], [0, 1, 2, 3], "quadratic") == 1.0
    assert math.isnan(cohen_kappa([2, 2, 2], [2, 2, 2]))
    # linear weights: one-step disagreements cost less than two-step ones
    near = cohen_kappa([0, 1, 2, 3, 4], [1, 1, 2, 3, 4], "linear")
    far = cohen_kappa([0, 1, 2, 3, 4], [2, 1, 2, 3, 4], "linear")
    assert 1.0 > near > far


def test_kappa_matches_scikit_learn():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, 200)
    b = np.clip(a + rng.integers(-1, 2, 200), 0, 4)
    for w, skw in (("none", None), ("linear", "linear"), ("quadratic", "quadratic")):
        assert cohen_kappa(a, b, w) == pytest.approx(sk.cohen_kappa_score(a, b, weights=skw))


def test_pair_agreement_correlations_and_intervals():
    rng = np.random.default_rng(1)
    x = rng.normal(size=60)
    y = x + rng.normal(scale=0.5, size=60)
    out = pair_agreement(x, y, n_resamples=300)
    assert out["pearson"]["value"] == pytest.approx(stats.pearsonr(x, y).statistic)
    assert out["spearman"]["value"] == pytest.approx(stats.spearmanr(x, y).statistic)
    assert out["kendall"]["value"] == pytest.approx(stats.kendalltau(x, y).statistic)
    for key in ("pearson", "spearman", "kendall"):
        assert out[key]["low"] < out[key]["value"] < out[key]["high"] <= 1.0
    assert "kappa" not in out  # continuous scores have no kappa


def test_agreement_table_bleu_judge_human_with_missing_judge_reply():
    human = [4, 3, 3, 2, 1, 0, 4, 2, 1, 3]
    judge = [4, 3, 2, 2, 1, 0, 4, 2, float("nan"), 3]  # one unparsable reply
    bleu = [0.9, 0.2, 0.5, 0.4, 0.1, 0.3, 0.2, 0.6, 0.1, 0.4]
    rows = agreement_table({"bleu": bleu, "judge": judge, "human": human}, n_resamples=200)
    assert [(r["a"], r["b"]) for r in rows] == [("bleu", "judge"), ("bleu", "human"), ("judge", "human")]
    jh = rows[2]
    assert jh["n"] == 9 and jh["n_dropped"] == 1
    assert jh["kappa"]["weights"] == "quadratic" and jh["kappa"]["value"] > 0.9
    assert "kappa" not in rows[0]
    assert jh["spearman"]["value"] > rows[1]["spearman"]["value"]


def test_agreement_input_errors():
    with pytest.raises(InputError, match="two score columns"):
        agreement_table({"a": [1, 2]})
    with pytest.raises(InputError, match="differ in length"):
        agreement_table({"a": [1, 2], "b": [1]})
    with pytest.raises(InputError, match="weights"):
        cohen_kappa([1], [1], "cubic")  # type: ignore[arg-type]
