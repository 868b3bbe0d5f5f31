"""The LViT text-segmentation layout (MoNuSeg, QaTa-COV19, MosMedData+) -> grounding samples.

Layout: `<Split>_Folder/img/<name>`, `<Split>_Folder/labelcol/<name>` (binary mask) and
`<Split>_Folder/<Split>_text.csv` with columns Image, Description (one sentence per image).
Each row becomes one text -> `[SEG]` sample whose question carries the sentence.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterator

import numpy as np

from medplib.data.boxes import mask_to_box
from medplib.data.converters.common import rebase
from medplib.data.masks import read_mask_image
from medplib.data.schema import IMAGE_TOKEN, SEG_TOKEN, Sample, parse_sample
from medplib.errors import DataValidationError, InputError

_SPLITS = {"Train": "train", "Val": "val", "Test": "test"}
# what the masks of each known LViT dataset segment, and its modality
KNOWN = {"monuseg": ("nuclei", "histopathology"), "qata": ("infected area", "xray"), "mosmed": ("infected area", "ct")}
_QUESTIONS = [
    "{d} Please segment the {t}.", "Segment the {t} described here: {d}", "{d} Where are the {t}? Output the mask.",
]


def _dataset_defaults(src: Path) -> tuple[str, str | None]:
    name = src.resolve().name.lower().replace("_", "").replace("-", "")
    for key, (target, modality) in KNOWN.items():
        if key in name:
            return target, modality
    return "target", None


def read_lvit(src: str | Path, out_dir: str | Path, target: str | None = None, modality: str | None = None,
              source: str = "lvit") -> Iterator[Sample]:
    """Samples from an LViT-layout folder (holding Train_Folder, Val_Folder, Test_Folder)."""
    src = Path(src)
    default_target, default_modality = _dataset_defaults(src)
    target = target or default_target
    modality = modality or default_modality
    folders = [(src / f"{s}_Folder", s) for s in _SPLITS if (src / f"{s}_Folder").is_dir()]
    if not folders:
        raise InputError(f"{src}: no Train_Folder / Val_Folder / Test_Folder (LViT layout)")
    for folder, split_name in folders:
        table = folder / f"{split_name}_text.csv"
        if not table.is_file():
            raise InputError(f"{table}: text table not found (export the xlsx to CSV with columns Image, Description)")
        with table.open("r", encoding="utf-8-sig", newline="") as fh:
            rows = list(csv.DictReader(fh))
        for lineno, row in enumerate(rows, start=2):
            name, text = (row.get("Image") or "").strip(), (row.get("Description") or "").strip()
            if not name or not text:
                raise DataValidationError("row needs Image and Description", path=str(table), line=lineno)
            mask_file = folder / "labelcol" / name
            mask = read_mask_image(mask_file)
            k = lineno % len(_QUESTIONS)  # phrasing varies but is fixed per row
            obj = {
                "id": f"{source}:{_SPLITS[split_name]}:{Path(name).stem}",
                "image": rebase(f"img/{name}", folder, Path(out_dir)),
                "conversations": [
                    {"role": "user", "content": f"{IMAGE_TOKEN}\n" + _QUESTIONS[k].format(d=text, t=target)},
                    {"role": "assistant", "content": f"Sure, {SEG_TOKEN}."},
                ],
                "targets": [{"mask": rebase(f"labelcol/{name}", folder, Path(out_dir)),
                             "box": mask_to_box(mask) if np.any(mask) else None, "label": target}]
                if np.any(mask) else [],
                "modality": modality, "task": "grounding", "answer_type": "open", "source": source,
                "split": _SPLITS[split_name], "group": Path(name).stem, "meta": {"description": text},
            }
            if not obj["targets"]:
                obj["conversations"][1]["content"] = f"There are no {target} in this image."
            yield parse_sample(obj, path=str(table), line=lineno)
