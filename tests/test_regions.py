"""Regions matter: on real SA-Med2D CT slices, the answer must follow the prompted region."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from medplib.api import MedPLIB
from medplib.data.schema import BoxRegion, MaskRegion, PointRegion, Turn
from medplib.training.fit import fit

KINDS = ("point", "box", "mask")


def _structures(root: Path) -> list[tuple[str, np.ndarray, np.ndarray, str]]:
    """(image stem, RGB image, bool mask, label) for every mask; the label comes from the file name."""
    folder = root / "sam_med2d_demo"
    stems = sorted(p.stem for p in (folder / "images").glob("*.png"))
    images: dict[str, np.ndarray] = {}
    out = []
    for mp in sorted((folder / "masks").glob("*.png")):
        stem = next(s for s in stems if mp.stem.startswith(s + "_"))
        label = re.sub(r"_\d+$", "", mp.stem[len(stem) + 1 :]).replace("_", " ")
        if stem not in images:
            images[stem] = np.asarray(Image.open(folder / "images" / f"{stem}.png").convert("RGB")).copy()
        out.append((stem, images[stem], np.asarray(Image.open(mp).convert("L")) > 127, label))
    return out


def _prompt(mask: np.ndarray, kind: str) -> tuple[object, np.ndarray | None]:
    if kind == "point":  # the most interior pixel: a click inside the structure
        y, x = np.unravel_index(ndimage.distance_transform_edt(mask).argmax(), mask.shape)
        return PointRegion(point=(x + 0.5, y + 0.5)), None
    if kind == "box":
        ys, xs = np.nonzero(mask)
        return BoxRegion(box=(xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)), None
    return MaskRegion(mask="drawn"), mask


def _pairs(structs: list) -> list[tuple[int, int]]:
    """Consecutive structures of the same image: (a, b) pairs for two-region questions."""
    pairs = []
    for stem in dict.fromkeys(s[0] for s in structs):
        idx = [i for i, s in enumerate(structs) if s[0] == stem]
        pairs += [(idx[k], idx[(k + 1) % len(idx)]) for k in range(len(idx)) if len(idx) > 1]
    return pairs


@pytest.fixture(scope="module")
def region_model(shared_data: Path) -> tuple[MedPLIB, list, list]:
    structs = _structures(shared_data)
    pairs = _pairs(structs)
    m = MedPLIB.from_preset("tiny", seed=0)
    one = [Turn(role="user", content="What is in <region>?")]
    two = [Turn(role="user", content="What are <region> and <region>?")]
    items = []
    for _, img, mask, label in structs:
        for kind in KINDS:
            r, a = _prompt(mask, kind)
            items.append(m.processor.encode(img, [*one, Turn(role="assistant", content=label)], [r], [a]))
    for k, (i, j) in enumerate(pairs):
        kind = KINDS[k % 3]
        (r1, a1), (r2, a2) = _prompt(structs[i][2], kind), _prompt(structs[j][2], kind)
        answer = f"{structs[i][3]} and {structs[j][3]}"
        items.append(m.processor.encode(structs[i][1], [*two, Turn(role="assistant", content=answer)],
                                        [r1, r2], [a1, a2]))
    fit(m, items, steps=600, batch_size=8, lr=1e-3, seed=0)
    return m, structs, pairs


@pytest.mark.parametrize("kind", KINDS)
def test_answer_follows_the_region(region_model, kind: str) -> None:
    m, structs, _ = region_model
    answers = [m.generate(img, "What is in <region>?", *map(lambda x: [x], _prompt(mask, kind))).text
               for _, img, mask, _ in structs]
    labels = [s[3] for s in structs]
    correct = sum(a == lab for a, lab in zip(answers, labels))
    # Same image, different regions, different answers: the image alone cannot give these labels.
    assert correct >= 0.9 * len(structs), list(zip(labels, answers))
    liver_img = next(s for s in structs if s[3] == "liver" and s[0] == "amos_0006_90")
    spleen = next(s for s in structs if s[3] == "spleen")
    liver = m.generate(liver_img[1], "What is in <region>?", *map(lambda x: [x], _prompt(liver_img[2], kind)))
    assert liver.text == "liver"
    assert m.generate(spleen[1], "What is in <region>?", *map(lambda x: [x], _prompt(spleen[2], kind))).text == "spleen"


def test_two_regions_in_one_question(region_model) -> None:
    m, structs, pairs = region_model
    correct = 0
    for k, (i, j) in enumerate(pairs):
        kind = KINDS[(k + 1) % 3]  # a different prompt type from the one trained for this pair
        (r1, a1), (r2, a2) = _prompt(structs[i][2], kind), _prompt(structs[j][2], kind)
        ans = m.generate(structs[i][1], "What are <region> and <region>?", [r1, r2], [a1, a2]).text
        correct += ans == f"{structs[i][3]} and {structs[j][3]}"
    assert correct >= 0.8 * len(pairs), f"{correct}/{len(pairs)}"
