"""Box IoU, accuracy at IoU >= 0.5 (PFMVG) and BiRD's strict recall@0.5 macro-averaged over modalities."""

from __future__ import annotations

import numpy as np
import pytest

from medplib.errors import InputError
from medplib.evaluation.boxes import bird_hits, bird_recall, box_iou_matrix, grounding_summary, paired_box_iou


def test_iou_hand_computed_disjoint_touching_and_degenerate():
    assert paired_box_iou([[0, 0, 2, 2]], [[1, 0, 3, 2]])[0] == pytest.approx(2 / 6)
    assert paired_box_iou([[0, 0, 2, 2]], [[0, 0, 2, 2]])[0] == 1.0
    assert paired_box_iou([[0, 0, 1, 1]], [[5, 5, 6, 6]])[0] == 0.0  # disjoint
    assert paired_box_iou([[0, 0, 1, 1]], [[1, 0, 2, 1]])[0] == 0.0  # touching edge
    assert paired_box_iou([[3, 3, 3, 3]], [[3, 3, 3, 3]])[0] == 0.0  # two zero-area boxes
    m = box_iou_matrix([[0, 0, 2, 2], [10, 10, 12, 12]], [[1, 0, 3, 2], [0, 0, 2, 2], [11, 11, 12, 12]])
    np.testing.assert_allclose(m, [[1 / 3, 1.0, 0.0], [0.0, 0.0, 0.25]])


def test_accuracy_counts_iou_equal_to_half_but_bird_needs_more():
    iou = paired_box_iou([[0, 0, 4, 2]], [[0, 0, 2, 2]])[0]
    assert iou == pytest.approx(0.5)
    assert grounding_summary([iou])["acc@0.5"]["value"] == 1.0
    assert bird_hits([[0, 0, 4, 2]], [[0, 0, 2, 2]]).tolist() == [False]


def test_bird_recall_macro_over_modalities():
    preds = [[[0, 0, 10, 10]], [], [[0, 0, 10, 10], [50, 50, 60, 60]]]
    gts = [[[0, 0, 10, 10]], [[0, 0, 5, 5]], [[100, 100, 110, 110], [51, 51, 60, 60]]]
    out = bird_recall(preds, gts, ["ct", "mr", "mr"])
    # ct: 1 of 1 gt boxes hit; mr: 1 of 3 (none predicted, one far, one IoU 0.81)
    assert out["per_modality"]["ct"]["value"] == 1.0
    assert out["per_modality"]["mr"]["value"] == pytest.approx(1 / 3)
    assert out["macro"] == pytest.approx((1 + 1 / 3) / 2)
    assert out["micro"] == pytest.approx(2 / 4) and out["n_gt_boxes"] == 4


def test_grounding_summary_and_invalid_boxes():
    s = grounding_summary([0.9, 0.4, 0.0, 0.5])
    assert s["miou"]["value"] == pytest.approx(0.45)
    assert s["acc@0.5"]["value"] == pytest.approx(0.5)
    with pytest.raises(InputError, match="x1 <= x2"):
        paired_box_iou([[2, 0, 1, 1]], [[0, 0, 1, 1]])
    with pytest.raises(InputError, match="predicted boxes"):
        paired_box_iou([[0, 0, 1, 1]], [[0, 0, 1, 1], [0, 0, 2, 2]])
    with pytest.raises(InputError, match="lengths differ"):
        bird_recall([[]], [[], []], ["ct"])
