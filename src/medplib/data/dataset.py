"""Training input: a lazy torch Dataset over sample JSONL files, a ratio mixer for several
sources, and a collate that hands loaded samples to the Processor.

A bad sample (unreadable image, mask of the wrong size, region outside the image) never stops
an epoch: it is counted, warned about, and replaced by the next good sample of the same source.
"""

from __future__ import annotations

import multiprocessing as mp
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from medplib.data.loading import LoadedSample, load_sample
from medplib.data.schema import Sample, read_jsonl
from medplib.errors import ConfigError, MedplibError

Processor = Callable[[list[LoadedSample]], dict]

MAX_REPLACEMENTS = 16  # a run of this many bad samples in a row yields None instead of looping on


class SampleDataset(Dataset):
    """Samples of one JSONL file (validated up front, which is cheap); images and masks are read
    lazily in `__getitem__`. Paths resolve against the file's folder unless `root` is given."""

    def __init__(self, jsonl: str | Path, root: str | Path | None = None) -> None:
        self.path = Path(jsonl)
        self.root = Path(root) if root is not None else self.path.parent
        self.samples: list[Sample] = list(read_jsonl(self.path))
        # shared with DataLoader workers (inherited at start), so the main process sees their counts
        self._skipped = mp.get_context().Value("i", 0)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def skipped(self) -> int:
        """How many bad samples were skipped so far (all workers together)."""
        return int(self._skipped.value)

    def load(self, index: int) -> LoadedSample:
        """Load sample `index`; raises a MedplibError for a bad one."""
        return load_sample(self.samples[index], self.root)

    def __getitem__(self, index: int) -> LoadedSample | None:
        n = len(self.samples)
        for step in range(min(MAX_REPLACEMENTS, n)):
            i = (index + step) % n
            try:
                return self.load(i)
            except (MedplibError, OSError, ValueError, MemoryError) as exc:
                with self._skipped.get_lock():
                    self._skipped.value += 1
                warnings.warn(f"skipping bad sample {self.samples[i].id}: {exc}", stacklevel=2)
        return None


class MixedDataset(Dataset):
    """Several datasets mixed with ratios (the stage recipes mix sources). Item j of epoch e comes
    from a plan drawn from (seed, e): which source by the ratios, and which of its samples by a
    per-source permutation, so the mix is deterministic and every source is walked evenly."""

    def __init__(self, datasets: Sequence[Dataset], ratios: Sequence[float], length: int | None = None,
                 seed: int = 0) -> None:
        if len(datasets) != len(ratios) or not datasets:
            raise ConfigError("give one ratio per dataset (and at least one dataset)")
        r = np.asarray(ratios, dtype=np.float64)
        if not np.all(np.isfinite(r)) or (r < 0).any() or r.sum() <= 0:
            raise ConfigError(f"ratios {list(ratios)} must be non-negative with a positive sum")
        if any(len(d) == 0 for d, w in zip(datasets, r) if w > 0):  # type: ignore[arg-type]
            raise ConfigError("a dataset with a positive ratio is empty")
        self.datasets, self.p = list(datasets), r / r.sum()
        self.length = int(length) if length is not None else sum(len(d) for d in datasets)  # type: ignore[arg-type]
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Redraw the plan for `epoch` (call it before each epoch, as with DistributedSampler)."""
        rng = np.random.default_rng([self.seed, epoch])
        self.source = rng.choice(len(self.datasets), size=self.length, p=self.p)
        self.index = np.zeros(self.length, dtype=np.int64)
        for k, ds in enumerate(self.datasets):
            slots = np.flatnonzero(self.source == k)
            n = len(ds)  # type: ignore[arg-type]
            if slots.size:
                reps = -(-slots.size // n)
                order = np.concatenate([rng.permutation(n) for _ in range(reps)])[: slots.size]
                self.index[slots] = order

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, j: int) -> Any:
        return self.datasets[int(self.source[j])][int(self.index[j])]

    @property
    def skipped(self) -> int:
        return sum(int(getattr(d, "skipped", 0)) for d in self.datasets)


def collate(batch: list[LoadedSample | None], processor: Processor | None = None) -> list[LoadedSample] | dict | None:
    """Drop the None left by runs of bad samples, then hand the rest to `processor` (or return the
    list). A batch with nothing left is None: the training loop skips it."""
    kept = [b for b in batch if b is not None]
    if not kept:
        return None
    return processor(kept) if processor is not None else kept


class _Collate:
    """A picklable collate bound to a processor (lambdas cannot cross to spawned workers)."""

    def __init__(self, processor: Processor | None) -> None:
        self.processor = processor

    def __call__(self, batch: list[LoadedSample | None]) -> list[LoadedSample] | dict | None:
        return collate(batch, self.processor)


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)


def make_loader(dataset: Dataset, batch_size: int = 8, num_workers: int = 0, shuffle: bool = True, seed: int = 0,
                processor: Processor | None = None, drop_last: bool = False) -> DataLoader:
    """A DataLoader with a seeded shuffle and seeded workers: the same seed gives the same batches
    whatever the number of workers."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers, generator=generator,
                      collate_fn=_Collate(processor), worker_init_fn=_seed_worker if num_workers else None,
                      drop_last=drop_last, persistent_workers=False)
