"""Format converters: each published layout in, and MeCoVQA / Med-GRIT out. `build_source` is the
one entry point the CLI uses: a source folder or file in, validated samples out."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from medplib.data.builder import BuildConfig, build_samples
from medplib.data.schema import Sample
from medplib.errors import InputError

# reader(src, out_dir, cfg, options) -> samples; each imports its converter only when used
SourceReader = Callable[[Path, Path, BuildConfig, Mapping[str, Any]], Iterator[Sample]]


def _sa_med2d(src: Path, out_dir: Path, cfg: BuildConfig, options: Mapping[str, Any]) -> Iterator[Sample]:
    from medplib.data.converters.sa_med2d import read_sa_med2d

    return build_samples(read_sa_med2d(src, out_dir, modality=options.get("modality")), out_dir, cfg)


def _kvasir(src: Path, out_dir: Path, cfg: BuildConfig, options: Mapping[str, Any]) -> Iterator[Sample]:
    from medplib.data.converters.kvasir import read_kvasir

    return build_samples(read_kvasir(src, out_dir), out_dir, cfg)


def _covid_cxr(src: Path, out_dir: Path, cfg: BuildConfig, options: Mapping[str, Any]) -> Iterator[Sample]:
    from medplib.data.converters.covid_cxr import read_covid_cxr

    return build_samples(read_covid_cxr(src, out_dir), out_dir, cfg)


def _lvit(src: Path, out_dir: Path, cfg: BuildConfig, options: Mapping[str, Any]) -> Iterator[Sample]:
    from medplib.data.converters.lvit import read_lvit

    return read_lvit(src, out_dir, target=options.get("target"), modality=options.get("modality"))


def _vqa(src: Path, out_dir: Path, cfg: BuildConfig, options: Mapping[str, Any], *, flavor: str) -> Iterator[Sample]:
    from medplib.data.converters.vqa import read_vqa

    return read_vqa(src, out_dir, flavor=flavor, image_dir=options.get("image_dir"))


def _mecovqa(src: Path, out_dir: Path, cfg: BuildConfig, options: Mapping[str, Any]) -> Iterator[Sample]:
    from medplib.data.converters.mecovqa import read_mecovqa

    return read_mecovqa(src, out_dir, image_dir=options.get("image_dir"))


def _med_grit(src: Path, out_dir: Path, cfg: BuildConfig, options: Mapping[str, Any]) -> Iterator[Sample]:
    from medplib.data.converters.med_grit import read_med_grit

    return read_med_grit(src, out_dir, image_dir=options.get("image_dir"))


def _phantoms(src: Path, out_dir: Path, cfg: BuildConfig, options: Mapping[str, Any]) -> Iterator[Sample]:
    from medplib.data.phantoms import phantom_items

    n = int(options.get("n") or 90)
    items = phantom_items(out_dir, n=n, seed=cfg.seed, size=options.get("size") or 256)
    return build_samples(items, out_dir, cfg)


def _volumes(src: Path, out_dir: Path, cfg: BuildConfig, options: Mapping[str, Any]) -> Iterator[Sample]:
    from medplib.data.volume_cases import read_cases, volume_slices

    cases = read_cases(src, modality=options.get("modality"))
    axis = options.get("axis")
    items = volume_slices(cases, out_dir, axis=2 if axis is None else int(axis), step=int(options.get("step") or 1))
    return build_samples(items, out_dir, cfg)


# The sources `medplib data build --source` offers, in the order its help lists them.
SOURCE_READERS: dict[str, SourceReader] = {
    "sa-med2d": _sa_med2d,
    "kvasir": _kvasir,
    "covid-cxr": _covid_cxr,
    "lvit": _lvit,
    "vqa-rad": partial(_vqa, flavor="vqa-rad"),
    "slake": partial(_vqa, flavor="slake"),
    "pathvqa": partial(_vqa, flavor="pathvqa"),
    "mecovqa": _mecovqa,
    "med-grit": _med_grit,
    "phantoms": _phantoms,
    "volumes": _volumes,
}


def build_source(name: str, src: str | Path, out_dir: str | Path, cfg: BuildConfig | None = None,
                 **options: Any) -> Iterator[Sample]:
    """Samples from source `name` at `src`, with paths relative to `out_dir` (where merged masks and
    phantoms are written). Options: modality (sa-med2d, lvit), target (lvit), image_dir (vqa,
    mecovqa, med-grit), n and size (phantoms), axis and step (volumes: the voxel axis to slice along and
    every how many slices; see medplib.data.volume_cases)."""
    reader = SOURCE_READERS.get(name)
    if reader is None:
        raise InputError(f"unknown source {name!r}; choose from {', '.join(SOURCE_READERS)}")
    return reader(Path(src), Path(out_dir), cfg or BuildConfig(), options)
