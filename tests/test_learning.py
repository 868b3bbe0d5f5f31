"""Learning on real data: the model must fit real images, through generate(), not teacher forcing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from conftest import KVASIR_QUESTION, kvasir_images

from medplib.api import MedPLIB


def _dice(p: np.ndarray, g: np.ndarray) -> float:
    return float(2 * (p & g).sum() / max(1, p.sum() + g.sum()))


def test_tiny_grounds_kvasir_polyps_through_generate(kvasir_model: Path, shared_data: Path) -> None:
    m = MedPLIB.from_pretrained(kvasir_model)
    dices = []
    for _, img, gt in kvasir_images(shared_data, 4):
        ans = m.generate(img, KVASIR_QUESTION)
        assert ans.token_ids.count(m.processor.seg_id) == 1, ans.text  # the model itself emits [SEG]
        assert ans.masks[0].shape == gt.shape
        dices.append(_dice(ans.masks[0], gt))
    assert np.mean(dices) >= 0.90, dices
