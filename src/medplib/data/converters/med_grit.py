"""Med-GRIT (BiRD) <-> samples.

Med-GRIT record: {"id": "<image stem>", "conversations": [[question, answer], ...]}, boxes in the
text as `<box>(x1,y1),(x2,y2)</box>` on a 0..1000 grid; the modality is the file-name prefix.
Importing keeps the text verbatim (boxes stay in the text, as BiRD reads them) and adds a pixel
box target per answer box when the image can be found. Exporting our samples turns `<region>`
and `[SEG]` into boxes on the grid.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Iterator

from medplib.data.boxes import MED_GRIT_GRID, box_to_grid, format_med_grit, grid_to_box, mask_to_box, parse_med_grit
from medplib.data.converters.common import load_json, modality_from_name, rebase, require_exportable
from medplib.data.images import image_size
from medplib.data.masks import read_mask
from medplib.data.schema import (
    IMAGE_TOKEN,
    REGION_TOKEN,
    SEG_TOKEN,
    BoxRegion,
    MaskRegion,
    PolygonRegion,
    Sample,
    parse_sample,
)
from medplib.errors import DataValidationError, InputError

_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def _find_image(image_dir: Path, stem: str) -> Path | None:
    for ext in _EXTS:
        if (image_dir / f"{stem}{ext}").is_file():
            return image_dir / f"{stem}{ext}"
    return None


def record_to_sample(rec: Any, index: int, image_dir: Path, out_dir: Path, source: str = "med-grit",
                     path: str | None = None) -> Sample:
    """One Med-GRIT record -> Sample (multi-turn)."""
    where = f"[{index}]"
    if not isinstance(rec, dict) or not isinstance(rec.get("id"), str) or not rec["id"]:
        raise DataValidationError(f"record {index} needs a non-empty string 'id'", path=path, field=f"{where}.id")
    convs = rec.get("conversations")
    if not isinstance(convs, list) or not convs or not all(
            isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in convs):
        raise DataValidationError(f"record {index}: 'conversations' must be a non-empty list of [question, answer]",
                                  path=path, field=f"{where}.conversations")
    stem = rec["id"]
    found = _find_image(image_dir, stem)
    image = found if found is not None else image_dir / f"{stem}.png"
    turns, targets = [], []
    size = image_size(found.name, found.parent) if found is not None else None
    for q, a in convs:
        turns += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        if size is not None:
            h, w = size
            targets += [{"box": grid_to_box(g, w, h, MED_GRIT_GRID)} for g in parse_med_grit(a)]
    extra = {k: v for k, v in rec.items() if k not in ("id", "conversations")}
    meta: dict[str, Any] = {"med_grit_id": stem, "med_grit_keys": list(rec.keys())}
    if extra:
        meta["med_grit_extra"] = extra
    obj = {"id": f"{source}:{index}:{stem}",
           "image": rebase(image.relative_to(image_dir).as_posix(), image_dir, out_dir),
           "conversations": turns, "targets": targets, "modality": modality_from_name(stem),
           "task": "box_grounding" if any(parse_med_grit(a) for _, a in convs) else "vqa",
           "source": source, "group": stem, "meta": meta}
    return parse_sample(obj, path=path)


def read_med_grit(path: str | Path, out_dir: str | Path, image_dir: str | Path | None = None,
                  source: str = "med-grit") -> Iterator[Sample]:
    """Samples from a Med-GRIT JSON list; images are `<image_dir>/<id>.<ext>` (default: the JSON's
    folder) and come out relative to `out_dir`."""
    path = Path(path)
    data = load_json(path)
    if not isinstance(data, list):
        raise DataValidationError("a Med-GRIT file must hold a JSON list of records", path=str(path))
    img_dir = Path(image_dir) if image_dir is not None else path.parent
    for i, rec in enumerate(data):
        yield record_to_sample(rec, i, img_dir, Path(out_dir), source, str(path))


def _region_box(region: Any, sample: Sample, root: Path) -> tuple[float, float, float, float]:
    if isinstance(region, BoxRegion):
        return region.box
    if isinstance(region, PolygonRegion):
        xs, ys = [p[0] for p in region.polygon], [p[1] for p in region.polygon]
        return (min(xs), min(ys), max(xs), max(ys))
    if isinstance(region, MaskRegion):
        return mask_to_box(read_mask(region.mask, root))
    raise InputError(f"sample {sample.id}: a {region.kind} region has no box for Med-GRIT")


def sample_to_record(sample: Sample, root: Path) -> dict[str, Any]:
    """Sample -> Med-GRIT record; `root` is the folder the sample's paths are relative to."""
    require_exportable(sample, "Med-GRIT")
    if "med_grit_id" in sample.meta:  # imported: the text already is Med-GRIT text
        convs = [[u.content, a.content] for u, a in zip(sample.conversations[::2], sample.conversations[1::2])]
        rec = {"id": sample.meta["med_grit_id"], "conversations": convs, **sample.meta.get("med_grit_extra", {})}
        order = sample.meta.get("med_grit_keys", [])
        return {**{k: rec[k] for k in order if k in rec}, **{k: v for k, v in rec.items() if k not in order}}
    h, w = image_size(sample.image, root)
    regions = iter(sample.regions)
    targets = iter([t for t in sample.targets if t.mask is not None])
    convs: list[list[str]] = []
    for turn in sample.conversations:
        text = turn.content.replace(IMAGE_TOKEN + "\n", "").replace(IMAGE_TOKEN, "")
        if turn.role == "user":
            parts = text.split(REGION_TOKEN)
            text = parts[0] + "".join(format_med_grit(box_to_grid(_region_box(next(regions), sample, root), w, h,
                                                                  MED_GRIT_GRID)) + p for p in parts[1:])
            convs.append([text])
        else:
            parts = text.split(SEG_TOKEN)
            out = parts[0]
            for p in parts[1:]:
                t = next(targets)
                box = t.box if t.box is not None else mask_to_box(read_mask(t.mask, root))  # type: ignore[arg-type]
                out += format_med_grit(box_to_grid(box, w, h, MED_GRIT_GRID)) + p
            convs[-1].append(out)
    return {"id": Path(sample.image.partition("#")[0]).stem, "conversations": convs}


def write_med_grit(samples: Iterable[Sample], root: str | Path, out_path: str | Path) -> tuple[int, list[str]]:
    """Write samples as a Med-GRIT JSON list; returns (written, reasons for the skipped samples)."""
    out_path = Path(out_path)
    records, skipped = [], []
    for s in samples:
        try:
            records.append(sample_to_record(s, Path(root)))
        except InputError as exc:
            skipped.append(str(exc))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(records, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return len(records), skipped
