"""COVID-19 chest X-rays with named lung boxes -> labelled images: `lung_bounding_boxes.json` (COCO,
`bbox=[x, y, w, h]` in pixels, categories "Right Lung" / "Left Lung"), `images/<file_name>` and
`lung_masks/<stem>_mask.png` (both lungs in one mask).

"Right Lung" is the patient's right, which a frontal X-ray shows on the image's left. The labels
keep the patient's side ("right lung"); every image-side answer the builder writes ("On which side
of the image is the right lung?" -> "The left side.") follows from where the mask and box really
are, so the two conventions are never mixed. The one lung mask is split between the two boxes:
a pixel goes to the box holding it, or, in both or neither, to the box whose centre is nearer in x.
The group is the patient id, so a patient's images share a split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from medplib.data.builder import Instance, LabelledImage
from medplib.data.converters.common import load_json, rebase
from medplib.data.masks import read_mask_image
from medplib.errors import DataValidationError, InputError

BOX_FILE = "lung_bounding_boxes.json"
LABELS = ("right lung", "left lung")
PixelBox = tuple[float, float, float, float]


def coco_lung_boxes(coco: object, where: str) -> dict[int, dict[str, PixelBox]]:
    """COCO dict -> {image id: {"right lung" | "left lung": pixel box (x1, y1, x2, y2)}}."""
    keys = ("images", "annotations", "categories")
    if not isinstance(coco, dict) or not all(isinstance(coco.get(k), list) for k in keys):
        raise DataValidationError("a COCO file needs images, annotations and categories lists", path=where)
    try:
        names = {int(c["id"]): str(c["name"]).strip().lower() for c in coco["categories"]}
        out: dict[int, dict[str, PixelBox]] = {}
        for a in coco["annotations"]:
            label = names[int(a["category_id"])]
            if label not in LABELS:
                raise DataValidationError(f"unknown category {label!r}; expected Right Lung or Left Lung", path=where)
            x, y, w, h = (float(v) for v in a["bbox"])
            out.setdefault(int(a["image_id"]), {})[label] = (x, y, x + w, y + h)
    except (KeyError, TypeError, ValueError) as exc:
        raise DataValidationError(f"bad annotation ({exc})", path=where) from None
    return out


def split_lungs(mask: np.ndarray, right: PixelBox, left: PixelBox) -> tuple[np.ndarray, np.ndarray]:
    """(H, W) bool mask of both lungs -> (right lung, left lung) (H, W) bool masks, a partition of `mask`."""
    h, w = mask.shape
    cols, rows = np.arange(w) + 0.5, np.arange(h) + 0.5

    def inside(b: PixelBox) -> np.ndarray:
        return ((rows >= b[1]) & (rows < b[3]))[:, None] & ((cols >= b[0]) & (cols < b[2]))[None, :]

    in_right, in_left = inside(right), inside(left)
    nearer_right = np.abs(cols - (right[0] + right[2]) / 2) <= np.abs(cols - (left[0] + left[2]) / 2)  # (W,)
    # Pixels in exactly one box belong to it; the rest go to the nearer box centre.
    to_right = np.where(in_right != in_left, in_right, nearer_right[None, :])
    return mask & to_right, mask & ~to_right


def read_covid_cxr(src: str | Path, out_dir: str | Path, source: str = "covid-cxr") -> Iterator[LabelledImage]:
    """Labelled chest X-rays (right and left lung, official boxes) from the COVID-19 image data collection
    subset with lung boxes and masks. Images without both boxes or without a mask are an error."""
    src = Path(src)
    box_file = src / BOX_FILE
    if not box_file.is_file():
        raise InputError(f"{src}: no {BOX_FILE} (COVID-19 chest X-ray lung-box layout)")
    coco = load_json(box_file)
    boxes = coco_lung_boxes(coco, str(box_file))
    for entry in coco["images"]:
        where = f"{box_file}:{entry.get('file_name')}"
        named = boxes.get(int(entry["id"]), {})
        if set(named) != set(LABELS):
            raise DataValidationError(f"expected a Right Lung and a Left Lung box, got {sorted(named)}", path=where)
        image = src / "images" / str(entry["file_name"])
        mask_path = src / "lung_masks" / f"{image.stem}_mask.png"
        if not image.is_file() or not mask_path.is_file():
            raise InputError(f"{where}: image or lung mask not found ({image.name}, {mask_path.name})")
        mask = read_mask_image(mask_path, threshold=127)  # one mask has 40 grey levels: binarise at half
        if mask.shape != (int(entry["height"]), int(entry["width"])):
            raise DataValidationError(f"mask is {mask.shape[1]}x{mask.shape[0]}, image is "
                                      f"{entry['width']}x{entry['height']}", path=where)
        parts = dict(zip(LABELS, split_lungs(mask, named["right lung"], named["left lung"])))
        meta = entry.get("metadata") or {}
        yield LabelledImage(
            image=rebase(image.relative_to(src).as_posix(), src, Path(out_dir)), modality="xray",
            instances=[Instance(label=label, mask=parts[label], box=named[label])
                       for label in LABELS if parts[label].any()],
            group=f"patient-{meta.get('patientid', entry['id'])}", source=source, vocabulary=LABELS,
            meta={"finding": meta.get("finding"), "view": meta.get("view")})
