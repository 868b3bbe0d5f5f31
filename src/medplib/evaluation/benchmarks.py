"""The benchmarks `medplib eval --benchmark` reads: one reader per name, `(data, modality, image_dir)` ->
(every sample of the dataset at `data`, in every split; the folder their paths are relative to).

Apart from the runner so that the CLI lists the names without importing torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from medplib.data.builder import SEGMENT_QUESTION, BuildConfig, Instance, LabelledImage, split_of
from medplib.data.masks import rle_encode
from medplib.data.schema import SEG_TOKEN, Sample, Target, Turn, read_jsonl
from medplib.errors import InputError

SEGMENT_ANSWER = f"Sure, it is {SEG_TOKEN}."

BenchmarkReader = Callable[[Path, str | None, Path | None], tuple[Iterable[Sample], Path]]


def _grounding_samples(items: Iterable[LabelledImage]) -> Iterator[Sample]:
    """One `SEGMENT_QUESTION` sample per label of each image. The split is the
    source's, else the group hash that `medplib data build` uses (same seed and fractions), so a
    model trained on a built file is tested on the images it never saw."""
    cfg = BuildConfig()
    for item in items:
        by_label: dict[str, list[Instance]] = {}
        for inst in item.instances:
            if inst.mask.any():
                by_label.setdefault(inst.label, []).append(inst)
        stem = Path(item.image).stem
        group = item.group or stem
        split = item.split or split_of(group, cfg.seed, cfg.val_fraction, cfg.test_fraction)
        for label, insts in by_label.items():
            single = len(insts) == 1 and insts[0].path is not None
            # several instances of a label are one target: their union, kept in memory as RLE
            mask = insts[0].path if single else rle_encode(np.logical_or.reduce([i.mask for i in insts]))
            yield Sample(
                id=f"{stem}:{label}", image=item.image,
                conversations=[Turn(role="user", content=SEGMENT_QUESTION.format(target=label)),
                               Turn(role="assistant", content=SEGMENT_ANSWER)],
                targets=[Target(mask=mask, label=label)], modality=item.modality, task="grounding",
                answer_type="open", source=item.source, split=split, group=group,  # type: ignore[arg-type]
            )


def _folder(data: Path) -> Path:
    return data if data.is_dir() else data.parent


def _vqa_rad(data: Path, modality: str | None, image_dir: Path | None) -> tuple[Iterable[Sample], Path]:
    from medplib.data.converters.vqa import read_vqa

    root = _folder(data)
    return read_vqa(data, root, flavor="vqa-rad", image_dir=image_dir), root


def _kvasir_seg(data: Path, modality: str | None, image_dir: Path | None) -> tuple[Iterable[Sample], Path]:
    from medplib.data.converters.kvasir import read_kvasir

    # the box file is not in name order; name order makes --limit pick the same images everywhere
    return sorted(_grounding_samples(read_kvasir(data, data)), key=lambda s: s.id), data


def _monuseg_text(data: Path, modality: str | None, image_dir: Path | None) -> tuple[Iterable[Sample], Path]:
    from medplib.data.converters.lvit import read_lvit

    return read_lvit(data, data, target="nuclei", modality=modality or "histopathology"), data


def _sa_med2d(data: Path, modality: str | None, image_dir: Path | None) -> tuple[Iterable[Sample], Path]:
    from medplib.data.converters.sa_med2d import read_sa_med2d

    return sorted(_grounding_samples(read_sa_med2d(data, data, modality=modality)), key=lambda s: s.id), data


def _mecovqa(data: Path, modality: str | None, image_dir: Path | None) -> tuple[Iterable[Sample], Path]:
    from medplib.data.converters.mecovqa import read_mecovqa

    return read_mecovqa(data, data.parent, image_dir=image_dir), data.parent


def _med_grit(data: Path, modality: str | None, image_dir: Path | None) -> tuple[Iterable[Sample], Path]:
    from medplib.data.converters.med_grit import read_med_grit

    return read_med_grit(data, data.parent, image_dir=image_dir), data.parent


def _jsonl(data: Path, modality: str | None, image_dir: Path | None) -> tuple[Iterable[Sample], Path]:
    return read_jsonl(data), data.parent


# The benchmarks `medplib eval --benchmark` offers (besides volumes, scored in 3-D), in the order its help lists them.
BENCHMARK_READERS: dict[str, BenchmarkReader] = {
    "vqa-rad": _vqa_rad,
    "kvasir-seg": _kvasir_seg,
    "monuseg-text": _monuseg_text,
    "sa-med2d": _sa_med2d,
    "mecovqa": _mecovqa,
    "med-grit": _med_grit,
    "jsonl": _jsonl,
}


def read_benchmark(benchmark: str, data: Path, modality: str | None,
                   image_dir: Path | None) -> tuple[Iterable[Sample], Path]:
    """All samples of the dataset at `data` (every split) and the folder their paths are relative to."""
    reader = BENCHMARK_READERS.get(benchmark)
    if reader is None:
        raise InputError(f"unknown benchmark {benchmark!r}; choose from {', '.join(BENCHMARK_READERS)}")
    return reader(data, modality, image_dir)
