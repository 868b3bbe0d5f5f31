"""Training data for a recipe: the sources of `data:` mixed into one dataset, and a sampler that
walks a fixed sample stream so that a run is deterministic whatever the number of processes,
and resumes at an exact position.

The stream is the concatenation of seeded permutations of the dataset (one per epoch). Optimizer
step k consumes positions [k*G, (k+1)*G) with G = global batch; within it, micro-batch i of
process r holds positions k*G + (i*world + r)*micro + [0, micro). So the global batch of a step is
the same set of samples for 1 process or many, and the data position of a checkpoint is just k.
The loader reads `StreamView` items by stream position; with augmentation, each position's random
flips are drawn from (seed, position), so a resumed run sees the same augmented samples.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from medplib.data.augment import augment
from medplib.data.dataset import MixedDataset, SampleDataset, collate
from medplib.data.loading import LoadedSample
from medplib.processing import Processor
from medplib.training.recipe import DataSection, RecipeError


def build_dataset(spec: DataSection, seed: int) -> Dataset:
    """One dataset from every source file, filtered by split and tasks, mixed by ratio."""
    datasets: list[SampleDataset] = []
    ratios: list[float] = []
    root = Path(spec.dir)
    for k, src in enumerate(spec.sources):
        files = sorted(root.glob(src.file))
        if not files:
            raise RecipeError(f"data.sources[{k}]: no file matches '{src.file}' in {root}")
        found = []
        for f in files:
            ds = SampleDataset(f)
            # A view of one split and some tasks: the JSONL files hold every split and task.
            ds.samples = [s for s in ds.samples if s.split == spec.split and (not src.tasks or s.task in src.tasks)]
            if ds.samples:
                found.append(ds)
        if not found:
            raise RecipeError(f"data.sources[{k}]: no '{spec.split}' sample with tasks {src.tasks or 'any'} "
                              f"in {', '.join(str(f) for f in files)}")
        total = sum(len(d) for d in found)
        datasets += found
        ratios += [src.ratio * len(d) / total for d in found]
    if len(datasets) == 1:
        return datasets[0]
    return MixedDataset(datasets, ratios, seed=seed)


class Stream:
    """The sample index at each stream position: seeded permutations of range(n), one per epoch."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self._perm: dict[int, np.ndarray] = {}

    def index_at(self, position: int) -> int:
        epoch, offset = divmod(position, self.n)
        if epoch not in self._perm:
            self._perm = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return int(self._perm[epoch][offset])


class StreamSampler(Sampler[int]):
    """The stream positions this process reads from optimizer step `start_step` on (see the module
    docstring); `StreamView` turns a position into a sample."""

    def __init__(self, *, global_batch: int, micro_batch: int, rank: int, world: int, start_step: int,
                 total_steps: int) -> None:
        if global_batch % (micro_batch * world):
            raise RecipeError(f"train.global_batch ({global_batch}) must be a multiple of train.micro_batch "
                              f"({micro_batch}) x processes ({world})")
        self.G, self.micro, self.rank, self.world = global_batch, micro_batch, rank, world
        self.start, self.total = start_step, total_steps
        self.accum = global_batch // (micro_batch * world)

    def __iter__(self) -> Iterator[int]:
        for step in range(self.start, self.total):
            for i in range(self.accum):
                first = step * self.G + (i * self.world + self.rank) * self.micro
                yield from range(first, first + self.micro)

    def __len__(self) -> int:
        return (self.total - self.start) * self.accum * self.micro


class StreamView(Dataset):
    """Items by stream position: the dataset's sample at that position (`Stream`), augmented
    (`medplib.data.augment`, none by default) with an RNG drawn from (seed, position)."""

    def __init__(self, dataset: Dataset, seed: int, augmentations: list[str] | None = None) -> None:
        self.dataset, self.augmentations, self.seed = dataset, list(augmentations or []), seed
        self.stream = Stream(len(dataset), seed)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, position: int) -> LoadedSample | None:
        loaded = self.dataset[self.stream.index_at(position)]
        if loaded is None or not self.augmentations:
            return loaded
        return augment(loaded, self.augmentations, np.random.default_rng([self.seed, 1, position]))


class EncodeCollate:
    """Loaded samples -> a model batch on the CPU (picklable, for DataLoader workers). Returns None
    when every sample of the micro-batch was bad."""

    def __init__(self, processor: Processor) -> None:
        self.processor = processor

    def _encode(self, loaded: list[LoadedSample]) -> dict[str, Any]:
        return self.processor.collate([self.processor.encode_loaded(s) for s in loaded])

    def __call__(self, batch: list[LoadedSample | None]) -> dict[str, Any] | None:
        return collate(batch, self._encode)  # type: ignore[arg-type]


GROUP_NAMES = ("vqa", "region", "grounding")


def token_groups(batch: dict[str, Any]) -> torch.Tensor:
    """(B, T) routing-statistics group of every token, from its sample's content: 2 = grounding
    (has target masks), 1 = region VQA (has regions), 0 = VQA and other text answers."""
    g = [2 if t else 1 if r else 0 for t, r in zip(batch["target_masks"], batch["region_masks"])]
    return torch.tensor(g, dtype=torch.long)[:, None].expand_as(batch["input_ids"]).contiguous()


# Stage IV experts (the upcycling order of recipes/stage4_moe.yaml): expert 0 copies stage III's MLPs.
GROUNDING_EXPERT, VL_EXPERT = 0, 1


def route_targets(batch: dict[str, Any], groups: torch.Tensor, image_id: int, prefix_expert: int = -1
                  ) -> torch.Tensor:
    """(B, T) expert per token for task-supervised routing (the recipe's `loss.route`): tokens of a
    grounding sample -> GROUNDING_EXPERT, of any other task -> VL_EXPERT; -1 (no target) for padding.
    Everything up to the image's closing token comes before the question and so cannot know the task:
    it gets `prefix_expert`, one expert for every task, or -1 (unsupervised). groups: (B, T) from
    `token_groups`."""
    ids = batch["input_ids"]
    pos = torch.arange(ids.shape[1], device=ids.device)
    last_image = torch.where(ids == image_id, pos, -1).max(dim=1).values  # (B,), -1 = no image
    start = torch.where(last_image >= 0, last_image + 2, 0)  # +2 skips the image's closing token
    target = torch.where(groups.to(ids.device) == GROUP_NAMES.index("grounding"), GROUNDING_EXPERT, VL_EXPERT)
    target = target.masked_fill(pos[None, :] < start[:, None], prefix_expert)
    return target.masked_fill(~batch["attention_mask"].bool(), -1)
