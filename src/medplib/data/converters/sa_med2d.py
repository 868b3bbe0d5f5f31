"""The SA-Med2D-20M layout -> labelled images for the instruction builder.

`image2label_*.json` maps an image to its instance masks, `label2image_*.json` a mask to its
image; paths start with the release folder (e.g. `data_demo/`), resolved against the dataset
folder. The modality is the file-name prefix (`ct_00--...`), the label comes from the mask name
(`<image stem>--<class>_<k>.png`, or `<image stem>_<class>_<k>.png` in the demo), and the group
(volume) is the image name without its slice part.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

from medplib.data.builder import Instance, LabelledImage
from medplib.data.converters.common import load_json, modality_from_name, rebase
from medplib.data.masks import read_mask_image
from medplib.errors import DataValidationError, InputError

_SIDES = ("left", "right")


def label_from_mask_name(mask_stem: str, image_stem: str) -> str:
    """'amos_0006_90_inferior_vena_cava_000' with image 'amos_0006_90' -> 'inferior vena cava';
    a trailing side moves to the front ('kidney_left' -> 'left kidney')."""
    rest = mask_stem[len(image_stem):] if mask_stem.startswith(image_stem) else mask_stem.rsplit("--", 1)[-1]
    rest = re.sub(r"_\d+$", "", rest.lstrip("-_"))
    words = [w for w in rest.replace("-", " ").split("_") if w]
    if len(words) > 1 and words[-1].lower() in _SIDES:
        words = [words[-1]] + words[:-1]
    return " ".join(words).strip() or rest


def group_of(image_stem: str) -> str:
    """The volume an SA-Med2D slice comes from: drop the slice part after the last '--', or a
    trailing '_<number>' (demo names such as amos_0006_90)."""
    if "--" in image_stem:
        return image_stem.rsplit("--", 1)[0]
    return re.sub(r"_\d+$", "", image_stem)


def _resolve(src: Path, ref: str) -> Path:
    """Paths in the JSON start with the release folder name; try as given, then without it."""
    p = Path(ref)
    if (src / p).is_file():
        return src / p
    if len(p.parts) > 1 and (src / Path(*p.parts[1:])).is_file():
        return src / Path(*p.parts[1:])
    raise InputError(f"{src / p}: file referenced by the SA-Med2D JSON not found")


def read_sa_med2d(src: str | Path, out_dir: str | Path, modality: str | None = None,
                  source: str = "sa-med2d") -> Iterator[LabelledImage]:
    """Labelled images from an SA-Med2D folder (all image2label_*.json and label2image_*.json;
    the split is the file name's suffix: train, val or test)."""
    src = Path(src)
    files = sorted(src.glob("image2label_*.json")) + sorted(src.glob("label2image_*.json"))
    if not files:
        raise InputError(f"{src}: no image2label_*.json or label2image_*.json (SA-Med2D layout)")
    for f in files:
        split = f.stem.split("_", 1)[1]
        split = {"validation": "val", "valid": "val"}.get(split, split)
        data = load_json(f)
        if not isinstance(data, dict):
            raise DataValidationError("an SA-Med2D index must be a JSON object", path=str(f))
        by_image: dict[str, list[str]] = {}
        for key, value in data.items():
            if f.name.startswith("image2label"):
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise DataValidationError("each image must map to a list of mask paths", path=str(f), field=key)
                by_image.setdefault(key, []).extend(value)
            else:
                if not isinstance(value, str):
                    raise DataValidationError("each mask must map to an image path", path=str(f), field=key)
                by_image.setdefault(value, []).append(key)
        for image_ref, mask_refs in by_image.items():
            image = _resolve(src, image_ref)
            instances = []
            for ref in sorted(mask_refs):
                mask_path = _resolve(src, ref)
                label = label_from_mask_name(mask_path.stem, image.stem)
                instances.append(Instance(label=label, mask=read_mask_image(mask_path),
                                          path=rebase(mask_path.relative_to(src).as_posix(), src, Path(out_dir))))
            yield LabelledImage(image=rebase(image.relative_to(src).as_posix(), src, Path(out_dir)),
                                modality=modality or modality_from_name(image.name), instances=instances,
                                group=group_of(image.stem), source=source,
                                split=split if split in ("train", "val", "test") else None)
