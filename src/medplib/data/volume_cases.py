"""Volumes with label volumes for training and evaluation.

A case folder holds `image.nii.gz` (or `image.nii`, or a DICOM series in `dicom/`), `labels.nii.gz`
(an integer label map on the image's grid; any orientation, it is reordered to the image's voxel
order and must occupy the same world coordinates) and `labels.json` ({"1": "liver", ...}). This is
the layout `medplib.data.phantoms3d.write_phantom_volume` writes. A dataset folder is one case or
a folder of case folders.

`volume_slices` cuts cases into 2-D labelled images for the instruction builder, shown exactly as
the model is shown volume slices at inference (medplib.volume_inference.VolumeSlices). Every slice
of a case carries the case's group, so the builder's per-group split puts all slices of one
volume in one split: neighbouring slices, nearly identical, never straddle train and test.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from medplib.data.builder import BuildConfig, Instance, LabelledImage, split_of
from medplib.data.masks import write_mask_png
from medplib.data.volume import Volume
from medplib.errors import InputError

MODALITY_CODES = {"CT": "ct", "MR": "mr", "PT": "pet", "US": "ultrasound", "CR": "xray", "DX": "xray"}


@dataclass
class LabelledVolume:
    """A volume and its structures: labels maps label -> (I, J, K) bool on the volume's grid."""

    name: str  # the case id; with `source` it is the split group of every slice
    volume: Volume
    labels: dict[str, np.ndarray]
    modality: str | None = None
    source: str = "volumes"
    vocabulary: Sequence[str] = ()  # labels this source can have: absent ones become negatives
    meta: dict = field(default_factory=dict)

    @property
    def group(self) -> str:
        return f"{self.source}:{self.name}"


def case_folders(data: str | Path) -> list[Path]:
    """`data` itself when it is a case, else its case subfolders in name order."""
    data = Path(data)
    if not data.is_dir():
        raise InputError(f"{data}: not a folder of volume cases")
    if (data / "labels.json").is_file():
        return [data]
    cases = sorted(p for p in data.iterdir() if p.is_dir() and (p / "labels.json").is_file())
    if not cases:
        raise InputError(
            f"{data}: no volume cases (folders with image.nii.gz or dicom/, labels.nii.gz and labels.json)"
        )
    return cases


def read_case(folder: str | Path, modality: str | None = None, source: str = "volumes") -> LabelledVolume:
    """One case folder -> LabelledVolume (labels absent from the label map are left out)."""
    from medplib.data.volume import read_volume
    from medplib.data.volume_io import read_nifti_mask

    folder = Path(folder)
    image = next((folder / n for n in ("image.nii.gz", "image.nii", "dicom") if (folder / n).exists()), None)
    if image is None:
        raise InputError(f"{folder}: no image.nii.gz, image.nii or dicom/ folder")
    try:
        table = {int(k): str(v) for k, v in json.loads((folder / "labels.json").read_text(encoding="utf-8")).items()}
    except (OSError, ValueError, AttributeError) as exc:
        raise InputError(f"{folder / 'labels.json'}: not a {{value: label}} table ({exc})") from None
    vol = read_volume(image)
    label_map = read_nifti_mask(folder / "labels.nii.gz", like=vol).voxels
    unknown = sorted(set(np.unique(label_map).tolist()) - set(table) - {0})
    if unknown:
        raise InputError(f"{folder}: label values {unknown} are not in labels.json")
    labels = {name: label_map == value for value, name in table.items() if np.any(label_map == value)}
    dicom_modality = MODALITY_CODES.get(str(vol.meta.get("modality") or "").upper())
    return LabelledVolume(name=folder.name, volume=vol, labels=labels, modality=modality or dicom_modality,
                          source=source, vocabulary=tuple(table.values()))


def read_cases(data: str | Path, modality: str | None = None, source: str = "volumes") -> Iterator[LabelledVolume]:
    for folder in case_folders(data):
        yield read_case(folder, modality, source)


def case_split(case: LabelledVolume, cfg: BuildConfig | None = None) -> str:
    """The split the builder gives every slice of `case` (so evaluation can pick the same cases)."""
    cfg = cfg or BuildConfig()
    return split_of(case.group, cfg.seed, cfg.val_fraction, cfg.test_fraction)


def volume_slices(cases: Iterable[LabelledVolume], root: str | Path, *, axis: int = 2, step: int = 1,
                  min_pixels: int = 1, keep_empty: bool = False) -> Iterator[LabelledImage]:
    """Each case cut along voxel axis `axis` (every `step`-th slice) into images/<case>_a<axis>_<k>.png
    and one mask PNG per structure, yielded as labelled images grouped by case. A structure with
    fewer than `min_pixels` pixels on a slice is absent there; slices without any structure are
    skipped unless `keep_empty` (they then teach "there is no X")."""
    from medplib.volume_inference import VolumeSlices

    if step < 1 or min_pixels < 1:
        raise InputError(f"step and min_pixels must be at least 1, got {step} and {min_pixels}")
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for case in cases:
        vs = VolumeSlices(case.volume, axis)
        for k in range(0, vs.n, step):
            views = {label: vs.view(m, k) for label, m in case.labels.items()}
            present = {label: v for label, v in views.items() if int(v.sum()) >= min_pixels}
            if not present and not keep_empty:
                continue
            stem = f"{case.name}_a{axis}_{k:04d}"
            Image.fromarray(vs.image(k)).save(root / "images" / f"{stem}.png")
            instances = []
            for label, view in present.items():
                rel = f"masks/{stem}--{label.replace(' ', '_')}.png"
                write_mask_png(view, root / rel)
                instances.append(Instance(label=label, mask=view, path=rel))
            yield LabelledImage(image=f"images/{stem}.png", modality=case.modality, instances=instances,
                                group=case.group, source=case.source, vocabulary=case.vocabulary or tuple(case.labels),
                                meta={"volume": case.name, "axis": axis, "slice": k})
