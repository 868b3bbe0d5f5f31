"""Real brain MRI for the demo: 2D slices of the MNI152 2009a T1 template that the `nilearn` package ships,
with white- and grey-matter masks from the template's tissue probability maps (probability > 0.5).

The MNI ICBM152 templates may be used and redistributed freely with their copyright notice (McConnell Brain
Imaging Centre, Montreal Neurological Institute); medplib ships no copy: the slices are cut at run time from
the installed package.

Slices are taken along two axes (axial and coronal) and grouped into slabs of `SLAB` neighbouring slices, so
the train/val/test split (drawn per group by the instruction builder) never puts neighbouring slices, which
look almost alike, on both sides of it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from medplib.data.builder import Instance, LabelledImage
from medplib.data.masks import write_mask_png
from medplib.data.nifti import read_nifti_volume
from medplib.errors import InputError

T1 = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
TISSUES = {"white matter": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
           "gray matter": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"}
SLAB = 6  # neighbouring slices per split group
MIN_TISSUE_PIXELS = 400  # slices with less of a tissue do not ask about it


def template_dir() -> Path:
    """The folder inside the installed nilearn package that holds the MNI152 files."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the MNI152 brain MRI comes from the 'nilearn' package: pip install nilearn")
    folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    missing = [f for f in (T1, *TISSUES.values()) if not (folder / f).is_file()]
    if missing:
        raise InputError(f"nilearn is installed but lacks {missing} (reinstall it)")
    return folder


def _view(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """One RAS+ slice as radiologists display it: anterior (axial) or superior (coronal) at the top, and the
    patient's right on the image's left (+x points to the patient's right, so columns run against it)."""
    plane = np.take(volume, index, axis=axis)  # axial (x, y), coronal (x, z)
    return np.ascontiguousarray(plane.T[::-1, ::-1])


def mni_items(out_dir: Path, step: int = 3, axes: tuple[int, ...] = (2, 1)) -> Iterator[LabelledImage]:
    """Write every `step`-th slice along `axes` (2 axial, 1 coronal) that shows brain, as images/<stem>.png and
    one mask PNG per tissue under masks/, and yield them as labelled images for the instruction builder."""
    folder = template_dir()
    t1 = read_nifti_volume(folder / T1).voxels
    tissues = {label: read_nifti_volume(folder / f).voxels for label, f in TISSUES.items()}
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "masks").mkdir(parents=True, exist_ok=True)
    scale = 255.0 / max(float(t1.max()), 1e-6)
    names = {2: "axial", 1: "coronal"}
    for axis in axes:
        for index in range(0, t1.shape[axis], step):
            masks = {label: _view(p, axis, index) > 0.5 * float(p.max()) for label, p in tissues.items()}
            present = {label: m for label, m in masks.items() if m.sum() >= MIN_TISSUE_PIXELS}
            if len(present) < len(TISSUES):
                continue  # the edge of the brain: too little tissue to ask about
            stem = f"mni152_{names[axis]}_{index:03d}"
            grey = np.clip(_view(t1, axis, index) * scale, 0, 255).astype(np.uint8)
            Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2)).save(out_dir / "images" / f"{stem}.png")
            instances = []
            for label, m in present.items():
                rel = f"masks/{stem}--{label.replace(' ', '_')}_0.png"
                write_mask_png(m, out_dir / rel)
                instances.append(Instance(label=label, mask=m, path=rel))
            yield LabelledImage(image=f"images/{stem}.png", modality="mr", instances=instances,
                                group=f"mni152_{names[axis]}_slab{index // (SLAB * step)}", source="mni152",
                                vocabulary=tuple(TISSUES))
