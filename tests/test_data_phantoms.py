"""Phantoms: deterministic, exact non-empty masks, distinct structures, jittered, any size."""

from __future__ import annotations

import numpy as np
import pytest

from medplib.data.builder import plural
from medplib.data.phantoms import LABELS, MODALITIES, make_phantom, write_phantom_dataset
from medplib.data.schema import read_jsonl
from medplib.errors import InputError


@pytest.mark.parametrize("modality", MODALITIES)
def test_phantom_is_deterministic_with_exact_masks(modality: str) -> None:
    a, b = make_phantom(modality, seed=7, size=(96, 128)), make_phantom(modality, seed=7, size=(96, 128))
    assert a.image.shape == (96, 128, 3) and a.image.dtype == np.uint8
    assert np.array_equal(a.image, b.image)
    assert a.masks.keys() == b.masks.keys() and a.masks
    for label, mask in a.masks.items():
        assert label in LABELS[modality]
        assert mask.shape == (96, 128) and mask.dtype == bool and mask.any()
        assert np.array_equal(mask, b.masks[label])
        assert np.array_equal(mask, np.logical_or.reduce(a.instances[label]))


def test_structures_differ_in_intensity_and_move_with_the_seed() -> None:
    ph = make_phantom("ct", seed=1)
    grey = ph.image[..., 0].astype(float)
    means = {label: grey[m].mean() for label, m in ph.masks.items()}
    assert abs(means["liver"] - means["spleen"]) > 5 and abs(means["vertebra"] - means["liver"]) > 40
    centroids = [np.argwhere(make_phantom("endoscopy", seed=s).masks["polyp"]).mean(0) for s in range(6)]
    assert np.ptp(np.array(centroids), axis=0).max() > 30  # the polyp is not always in the same place


def test_phantom_rejects_bad_requests() -> None:
    with pytest.raises(InputError, match="unknown phantom modality"):
        make_phantom("ecg", seed=0)
    with pytest.raises(InputError, match="too small"):
        make_phantom("ct", seed=0, size=8)


def test_write_phantom_dataset_builds_valid_samples(tmp_path) -> None:
    path = write_phantom_dataset(tmp_path, n=9, seed=2, size=96)
    samples = list(read_jsonl(path))
    assert {s.modality for s in samples} == set(MODALITIES)
    assert {s.task for s in samples} == {"vqa", "region_vqa", "grounding", "box_grounding", "caption"}
    for c in (s for s in samples if s.task == "caption"):  # modality and every structure of that image
        labels = {t.label for s in samples if s.image == c.image and s.task == "grounding" for t in s.targets}
        answer = c.conversations[1].content
        assert answer.startswith(("A ", "An ")), answer
        assert all(f"the {lab}" in answer or plural(lab) in answer for lab in labels), answer
    for s in samples:
        assert (tmp_path / s.image).is_file()
        for t in s.targets:
            assert t.mask is None or (tmp_path / t.mask).is_file()
    again = tmp_path / "again"
    assert write_phantom_dataset(again, n=9, seed=2, size=96).read_text() == path.read_text()


def test_multi_structure_grounding_questions(tmp_path) -> None:
    """`multi_grounding`: one extra question per image naming 2..k structures, one [SEG] per structure in the
    order named, the masks those structures' own; every other sample of the build is unchanged."""
    from medplib.data.builder import BuildConfig, build_samples
    from medplib.data.loading import load_sample
    from medplib.data.phantoms import phantom_items

    items = list(phantom_items(tmp_path, 9, seed=1, size=96))
    plain = list(build_samples(items, tmp_path, BuildConfig(seed=1)))
    both = list(build_samples(items, tmp_path, BuildConfig(seed=1, multi_grounding=3)))
    multi = [s for s in both if s.meta.get("kind") == "multi"]
    assert [s for s in both if s.meta.get("kind") != "multi"] == plain
    assert len(multi) == sum(1 for i in items if len({x.label for x in i.instances}) >= 2)
    for s in multi:
        question, answer = (t.content for t in s.conversations)
        labels = [t.label for t in s.targets]
        assert s.task == "grounding" and 2 <= len(labels) <= 3 and len(set(labels)) == len(labels)
        assert answer.count("[SEG]") == len(labels)
        assert [answer.lower().index(f"the {lab} is [seg]") for lab in labels] == sorted(
            answer.lower().index(f"the {lab} is [seg]") for lab in labels)
        assert all(f"the {lab}" in question for lab in labels)
        single = {t.targets[0].label: t.targets[0].mask for t in plain
                  if t.image == s.image and t.task == "grounding" and t.targets}
        assert [t.mask for t in s.targets] == [single[lab] for lab in labels]
        loaded = load_sample(s, tmp_path)
        assert len(loaded.target_masks) == len(labels) and all(m.any() for m in loaded.target_masks)
