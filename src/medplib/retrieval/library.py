"""A library of annotated images read from a medplib data folder: one entry per (image, label) with a
mask, from the samples' mask targets and mask regions, each example checked before it is indexed."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from medplib.data.images import read_image
from medplib.data.masks import read_mask
from medplib.data.schema import MaskRegion, Sample, read_jsonl
from medplib.errors import MedplibError
from medplib.retrieval.embed import image_hash
from medplib.retrieval.examples import check_example

SAMPLES = "samples.jsonl"


@dataclass(frozen=True)
class LibraryItem:
    """One annotated structure. image/mask: references resolved against the folder the item was read
    from (`root`); mask is a path (with an optional `#selector`) or a COCO RLE dict."""

    image: str
    mask: str | dict[str, Any]
    label: str | None
    sample: str
    modality: str | None
    source: str
    split: str
    root: Path

    def relative_to(self, folder: Path) -> dict[str, Any]:
        """The item as a JSON record whose paths are relative to `folder` (an index folder)."""
        mask = self.mask if isinstance(self.mask, dict) else _rebase(self.mask, self.root, folder)
        return {"image": _rebase(self.image, self.root, folder), "mask": mask, "label": self.label,
                "sample": self.sample, "modality": self.modality, "source": self.source, "split": self.split}


def _rebase(ref: str, root: Path, folder: Path) -> str:
    """A reference relative to `root` -> the same file relative to `folder`, `#options` kept."""
    name, sep, frag = ref.partition("#")
    path = Path(name) if Path(name).is_absolute() else root / name
    rel = os.path.relpath(path.resolve(), folder.resolve())
    return rel + sep + frag


def samples_file(data: str | Path) -> Path:
    """A data folder (holding samples.jsonl) or a JSONL file -> the JSONL path."""
    data = Path(data)
    path = data / SAMPLES if data.is_dir() else data
    if not path.is_file():
        raise MedplibError(f"{data}: no {SAMPLES} here (make one with `medplib data build`)")
    return path


def _annotations(sample: Sample) -> Iterator[tuple[Any, str | None]]:
    for target in sample.targets:
        if target.mask is not None:
            yield target.mask, target.label
    for region in sample.regions:
        if isinstance(region, MaskRegion):
            yield region.mask, region.label


def read_library(data: str | Path, splits: Iterable[str] | None = None) -> Iterator[LibraryItem]:
    """Annotated (image, label, mask) triples of a data folder in file order, each once (builders repeat
    one mask over several tasks); `splits` keeps only those splits (index the training split to keep
    evaluation leak-free)."""
    path = samples_file(data)
    keep = set(splits) if splits else None
    seen: set[tuple[str, str | None, str]] = set()
    for sample in read_jsonl(path):
        if keep is not None and sample.split not in keep:
            continue
        for mask, label in _annotations(sample):
            key = (sample.image, label, mask if isinstance(mask, str) else mask.model_dump_json())
            if key in seen:
                continue
            seen.add(key)
            yield LibraryItem(image=sample.image, mask=mask if isinstance(mask, str) else mask.model_dump(),
                              label=label, sample=sample.id, modality=sample.modality, source=sample.source,
                              split=sample.split, root=path.parent)


def load_item(item: LibraryItem) -> tuple[np.ndarray, str]:
    """Read and check one item's image and mask -> ((H, W, 3) uint8 image, content hash). Raises
    medplib.errors.InputError for a missing file, a mask of another size or an empty mask."""
    rgb = read_image(item.image, item.root).rgb
    where = f"{item.root / item.image} (sample {item.sample}, label {item.label})"
    check_example(rgb, read_mask(item.mask, item.root), label=item.label, where=where)
    return rgb, image_hash(rgb)
