"""Dataset, mixing and collate: lazy loading, bad samples skipped and counted (also in workers),
deterministic for a seed whatever the number of workers."""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest

from medplib.data.dataset import MixedDataset, SampleDataset, collate, make_loader
from medplib.data.loading import load_sample
from medplib.data.phantoms import write_phantom_dataset
from medplib.data.schema import read_jsonl
from medplib.errors import ConfigError, InputError


@pytest.fixture(scope="module")
def phantom_jsonl(tmp_path_factory) -> Path:
    return write_phantom_dataset(tmp_path_factory.mktemp("ph"), n=9, seed=0, size=64)


def test_load_sample_resolves_regions_and_targets(phantom_jsonl: Path) -> None:
    samples = list(read_jsonl(phantom_jsonl))
    for s in samples:
        ls = load_sample(s, phantom_jsonl.parent)
        assert ls.image.shape == (64, 64, 3) and ls.image.dtype == np.uint8
        assert len(ls.region_masks) == len(s.regions) and len(ls.target_masks) == len(s.targets)
        for region, mask in zip(ls.regions, ls.region_masks):
            assert (mask is not None) == (region.kind == "mask")
            if region.kind == "point":
                assert 0 <= region.point[0] <= 64 and 0 <= region.point[1] <= 64
        for target, mask in zip(s.targets, ls.target_masks):
            assert (mask is None) == (target.mask is None)
            assert mask is None or (mask.shape == (64, 64) and mask.any())


def _with_bad_lines(src: Path, dst: Path) -> int:
    """Copy src and append samples that fail at load time: missing image, wrong-size mask, region outside."""
    lines = src.read_text().splitlines()
    good = json.loads(next(line for line in lines if '"grounding"' in line))
    small = dst.parent / "small.png"
    from PIL import Image

    Image.fromarray(np.ones((8, 8), np.uint8) * 255).save(small)
    bad = [
        {**good, "id": "bad-missing", "image": "nope.png"},
        {**good, "id": "bad-size", "targets": [{**good["targets"][0], "mask": "small.png"}]},
        {**good, "id": "bad-region", "conversations": [{"role": "user", "content": "<image>\nWhat is <region>?"},
                                                       {"role": "assistant", "content": "x"}],
         "regions": [{"kind": "point", "point": [500.0, 3.0]}], "targets": []},
    ]
    dst.write_text("\n".join(lines + [json.dumps(b) for b in bad]) + "\n")
    return len(lines)


def test_bad_samples_are_skipped_and_counted(phantom_jsonl: Path, tmp_path: Path) -> None:
    path = phantom_jsonl.parent / "with_bad.jsonl"
    n_good = _with_bad_lines(phantom_jsonl, path)
    ds = SampleDataset(path)
    with pytest.raises(InputError, match="nope.png"):
        ds.load(n_good)
    with pytest.raises(InputError, match="small.png"):
        ds.load(n_good + 1)
    with pytest.raises(InputError, match="outside the 64x64 image"):
        ds.load(n_good + 2)
    for workers in (0, 2):
        ds = SampleDataset(path)
        with pytest.warns(UserWarning, match="skipping bad sample") if workers == 0 else nullcontext():
            seen = [s for batch in make_loader(ds, batch_size=16, num_workers=workers, shuffle=False) for s in batch]
        assert len(seen) == len(ds) and not any(s.sample.id.startswith("bad") for s in seen)
        assert ds.skipped == 3 + 2 + 1  # each bad sample at its own index plus the retries that walk past it


def test_mixing_ratios_and_determinism(phantom_jsonl: Path) -> None:
    a = SampleDataset(phantom_jsonl)
    b = SampleDataset(phantom_jsonl)
    mix = MixedDataset([a, b], [3, 1], length=400, seed=5)
    share = float((mix.source == 0).mean())
    assert 0.68 < share < 0.82

    def ids(workers: int) -> list[list[str]]:
        return [[s.sample.id for s in batch] for batch in make_loader(mix, 16, workers, seed=1)]

    first = ids(0)
    assert first == ids(0) == ids(2)
    mix.set_epoch(1)
    assert ids(0) != first
    with pytest.raises(ConfigError):
        MixedDataset([a], [0.0])


def test_collate_hands_the_list_to_the_processor(phantom_jsonl: Path) -> None:
    ds = SampleDataset(phantom_jsonl)
    items = [ds[0], None, ds[1]]
    assert [x.sample.id for x in collate(items)] == [ds.samples[0].id, ds.samples[1].id]
    out = collate(items, processor=lambda batch: {"n": len(batch), "h": batch[0].image.shape[0]})
    assert out == {"n": 2, "h": 64}
    assert collate([None, None]) is None
