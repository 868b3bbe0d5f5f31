"""Mask metrics on hand-computed cases, empty-mask rules, published convention, bootstrap."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medplib.errors import InputError
from medplib.evaluation.masks import MEDPLIB_PUBLISHED, MaskConvention, binarize, ciou, mask_overlap, summarize_masks
from medplib.evaluation.stats import bootstrap_ci, macro_average, mean_by_group


def _box(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def test_dice_iou_hand_computed():
    pred = _box(4, 4, 0, 2, 0, 2)  # 4 pixels
    gt = _box(4, 4, 0, 2, 1, 4)  # 6 pixels, 2 shared
    s = mask_overlap(pred, gt)
    assert s.intersection[0] == 2 and s.union[0] == 8
    assert s.iou[0] == pytest.approx(2 / 8)
    assert s.dice[0] == pytest.approx(2 * 2 / (4 + 6))


def test_empty_masks_on_either_or_both_sides():
    full = _box(5, 5, 1, 3, 1, 3)
    empty = np.zeros((5, 5), dtype=bool)
    preds = np.stack([empty, full, empty])
    gts = np.stack([full, empty, empty])
    for rule, both in (("one", 1.0), ("zero", 0.0)):
        s = mask_overlap(preds, gts, MaskConvention(both_empty=rule))
        assert s.dice.tolist() == [0.0, 0.0, both]
        assert s.iou.tolist() == [0.0, 0.0, both]
    s = mask_overlap(preds, gts, MaskConvention(both_empty="exclude"))
    assert s.iou[:2].tolist() == [0.0, 0.0] and math.isnan(s.iou[2]) and math.isnan(s.dice[2])
    summary = summarize_masks(s, n_resamples=200)["overall"]
    assert summary["n"] == 3 and summary["n_excluded"] == 1
    assert summary["dice"]["value"] == 0.0 and summary["dice"]["n"] == 2


def test_published_dice_from_iou_equals_pixel_dice_except_both_empty():
    rng = np.random.default_rng(0)
    gts = rng.random((50, 16, 16)) > 0.6
    preds = rng.random((50, 16, 16)) > 0.5
    preds[0] = False
    gts[0] = False
    pix = mask_overlap(preds, gts, MaskConvention(dice="pixels"))
    pub = mask_overlap(preds, gts, MaskConvention(dice="from_iou", both_empty="zero"))
    np.testing.assert_allclose(pub.dice[1:], pix.dice[1:], rtol=1e-12)
    np.testing.assert_allclose(pub.dice, 2 * pub.iou / (1 + pub.iou))
    assert pix.dice[0] == 1.0 and pub.dice[0] == 0.0


def test_threshold_and_logits():
    probs = np.array([[[0.05, 0.3], [0.6, 0.9]]])
    assert binarize(probs, 0.5).tolist() == [[[False, False], [True, True]]]
    assert binarize(probs, 0.1).tolist() == [[[False, True], [True, True]]]
    logits = torch.tensor([[[-3.0, 0.0], [-2.0, 4.0]]])  # sigmoid: 0.047, 0.5, 0.119, 0.982
    assert binarize(logits, MEDPLIB_PUBLISHED.threshold, logits=True).tolist() == [[[False, True], [True, True]]]
    gt = np.array([[[0, 1], [1, 1]]], dtype=np.uint8)
    assert mask_overlap(logits, gt, MEDPLIB_PUBLISHED).iou[0] == 1.0
    # strict ">": sigmoid(0) = 0.5 is background at threshold 0.5, so only one of three gt pixels is hit
    assert mask_overlap(logits, gt, MaskConvention(threshold=0.5, logits=True)).iou[0] == pytest.approx(1 / 3)


def test_giou_ciou_and_per_modality():
    a_pred, a_gt = _box(4, 4, 0, 1, 0, 1), _box(4, 4, 0, 1, 0, 2)  # I=1, U=2
    b = _box(4, 4, 0, 2, 0, 4)  # I=U=8
    s = mask_overlap(np.stack([a_pred, b]), np.stack([a_gt, b]))
    out = summarize_masks(s, ["ct", "mr"], n_resamples=200)
    assert out["overall"]["giou"]["value"] == pytest.approx(0.75)
    assert out["overall"]["ciou"] == pytest.approx(9 / 10)
    assert ciou(s) == pytest.approx(0.9)
    assert out["per_modality"]["ct"]["giou"]["value"] == pytest.approx(0.5)
    assert out["per_modality"]["mr"]["dice"]["value"] == 1.0


def test_torch_and_numpy_inputs_agree_and_bad_shapes_fail():
    rng = np.random.default_rng(1)
    p, g = rng.random((3, 8, 8)) > 0.5, rng.random((3, 8, 8)) > 0.5
    np.testing.assert_allclose(mask_overlap(p, g).dice, mask_overlap(torch.from_numpy(p), torch.from_numpy(g)).dice)
    with pytest.raises(InputError, match="does not match"):
        mask_overlap(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)))
    with pytest.raises(InputError, match="shape"):
        mask_overlap(np.zeros(4), np.zeros(4))
    with pytest.raises(InputError, match="both_empty"):
        MaskConvention(both_empty="maybe")  # type: ignore[arg-type]


def test_bootstrap_is_seeded_and_brackets_the_mean():
    vals = np.linspace(0, 1, 101)
    a, b = bootstrap_ci(vals, seed=3), bootstrap_ci(vals, seed=3)
    assert a == b
    assert a.value == pytest.approx(0.5) and a.low < a.value < a.high
    assert a.high - a.low == pytest.approx(2 * 1.96 * vals.std() / np.sqrt(101), rel=0.15)
    const = bootstrap_ci([0.7] * 10)
    assert const.low == const.high == pytest.approx(0.7)
    assert math.isnan(bootstrap_ci([0.4]).low) and bootstrap_ci([]).n == 0


def test_macro_average_weights_groups_equally():
    groups = mean_by_group([1, 1, 1, 0], ["a", "a", "a", "b"], n_resamples=50)
    assert groups["a"].value == 1.0 and groups["b"].value == 0.0
    assert macro_average(groups) == 0.5
