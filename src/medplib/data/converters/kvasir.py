"""Kvasir-SEG -> labelled images: images/<id>.jpg, masks/<id>.jpg and kavsir_bboxes.json.

The box file gives boxes in the original resolution with that resolution's height and width;
the boxes are scaled to the image as stored (e.g. the common 256x256 resize). JPEG masks are
binarised at > 127 (compression artefacts).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterator

import numpy as np

from medplib.data.boxes import scale_box
from medplib.data.builder import Instance, LabelledImage
from medplib.data.converters.common import load_json, rebase
from medplib.data.images import image_size
from medplib.data.masks import read_mask_image
from medplib.errors import DataValidationError, InputError

BOX_FILES = ("kavsir_bboxes.json", "kvasir_bboxes.json")


def kvasir_boxes(
    entry: object, image_hw: tuple[int, int], where: str
) -> list[tuple[str, tuple[float, float, float, float]]]:
    """One entry of the box file -> [(label, pixel box in the stored image)]."""
    if not isinstance(entry, dict) or not isinstance(entry.get("bbox"), list):
        raise DataValidationError("entry needs height, width and a bbox list", path=where)
    try:
        orig = (int(entry["width"]), int(entry["height"]))
        out = []
        for b in entry["bbox"]:
            box = (float(b["xmin"]), float(b["ymin"]), float(b["xmax"]), float(b["ymax"]))
            out.append((str(b.get("label", "polyp")), scale_box(box, orig, (image_hw[1], image_hw[0]))))
    except (KeyError, TypeError, ValueError) as exc:
        raise DataValidationError(f"bad box entry ({exc})", path=where) from None
    return out


def read_kvasir(src: str | Path, out_dir: str | Path, source: str = "kvasir-seg") -> Iterator[LabelledImage]:
    """Labelled images (label 'polyp', official boxes) from a Kvasir-SEG folder. Ids in the box
    file whose image or mask is missing are skipped with a warning."""
    src = Path(src)
    box_file = next((src / n for n in BOX_FILES if (src / n).is_file()), None)
    if box_file is None:
        raise InputError(f"{src}: no {BOX_FILES[0]} (Kvasir-SEG layout)")
    table = load_json(box_file)
    if not isinstance(table, dict):
        raise DataValidationError("the box file must map ids to entries", path=str(box_file))
    missing = []
    for image_id, entry in table.items():
        image = next((p for p in (src / "images" / f"{image_id}.jpg", src / "images" / f"{image_id}.png")
                      if p.is_file()), None)
        mask = next((p for p in (src / "masks" / f"{image_id}.jpg", src / "masks" / f"{image_id}.png")
                     if p.is_file()), None)
        if image is None or mask is None:
            missing.append(image_id)
            continue
        hw = image_size(image.name, image.parent)
        boxes = kvasir_boxes(entry, hw, f"{box_file}:{image_id}")
        m = read_mask_image(mask)
        rel_mask = rebase(mask.relative_to(src).as_posix(), src, Path(out_dir))
        if len(boxes) <= 1:
            instances = [Instance(label="polyp", mask=m, path=rel_mask, box=boxes[0][1] if boxes else None)]
        else:  # one mask file holds every polyp: each official box cuts out its instance
            instances = []
            for label, (x1, y1, x2, y2) in boxes:
                part = np.zeros_like(m)
                rows, cols = slice(int(np.floor(y1)), int(np.ceil(y2))), slice(int(np.floor(x1)), int(np.ceil(x2)))
                part[rows, cols] = m[rows, cols]
                if part.any():
                    instances.append(Instance(label=label, mask=part, box=(x1, y1, x2, y2)))
        yield LabelledImage(image=rebase(image.relative_to(src).as_posix(), src, Path(out_dir)), modality="endoscopy",
                            instances=instances, group=image_id, source=source, vocabulary=("polyp",),
                            meta={"kvasir_boxes": [list(b) for _, b in boxes]})
    if missing:
        warnings.warn(f"{src}: {len(missing)} id(s) in {box_file.name} have no image or mask: {', '.join(missing[:5])}",
                      stacklevel=2)
