"""predictions.jsonl: an append-only, resumable store of prediction records.

One JSON object per line, written and flushed one at a time, so a crash loses at most the line
being written; a torn last line is ignored on reading and cut before the next append. Masks given as arrays are saved
as PNG files beside the store (`masks/<id>.<field>.png`, binarised as in `masks.binarize`: float > 0.5,
other dtypes non-zero) and the record keeps their path relative to the store's folder; paths
given for images and masks are stored absolute.

Processes of one multi-process evaluation write part stores beside it (`predictions.part-<rank>.jsonl`,
masks in the same `masks/` folder); `merge_parts` moves their records into the store once they are done.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image

from medplib.errors import DataValidationError, InputError
from medplib.evaluation.masks import binarize

MASK_FIELDS = ("pred_mask", "gt_mask")
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


class PredictionStore:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def read(self) -> Iterator[dict[str, Any]]:
        """Records in file order; a later record with the same id replaces an earlier one."""
        if not self.path.is_file():
            return iter(())
        lines = self.path.read_text(encoding="utf-8").splitlines()
        by_id: dict[str, dict[str, Any]] = {}
        for lineno, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError:
                if lineno == len(lines):
                    continue  # torn by an interrupted write; that prediction is redone
                raise DataValidationError("malformed JSON", path=str(self.path), line=lineno) from None
            by_id[str(rec["id"])] = rec
        return iter(by_id.values())

    def done_ids(self) -> set[str]:
        """Ids whose prediction is already stored: a resumed run skips them."""
        return {str(r["id"]) for r in self.read()}

    def append(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """Write one record (arrays in mask fields become PNG files); returns what was stored."""
        if "id" not in record or str(record["id"]) == "":
            raise InputError("a prediction record needs a non-empty 'id'")
        rec = dict(record)
        for key in MASK_FIELDS:
            value = rec.get(key)
            if value is not None and not isinstance(value, (str, Path)):
                rec[key] = self._save_mask(str(rec["id"]), key, value)
            elif value is not None:
                rec[key] = _absolute(value)
        if rec.get("image") is not None:
            rec["image"] = _absolute(rec["image"])
        self._write(rec)
        return rec

    def part(self, rank: int) -> "PredictionStore":
        """The store process `rank` of a multi-process run appends to (same folder, so mask paths hold)."""
        return PredictionStore(self.path.with_name(f"{self.path.stem}.part-{rank}{self.path.suffix}"))

    def parts(self) -> list[Path]:
        return sorted(self.path.parent.glob(f"{self.path.stem}.part-*{self.path.suffix}"))

    def merge_parts(self, order: Sequence[str] = ()) -> int:
        """Move every part store's records into this store, ids listed in `order` first and in that order
        (so the file reads as a one-process run's), the rest as found; then remove the parts. A merge cut
        short is redone by the next call: a record appended twice is read once. Returns how many moved."""
        parts = self.parts()
        records: dict[str, dict[str, Any]] = {}
        for path in parts:
            records.update({str(r["id"]): r for r in PredictionStore(path).read()})
        rank = {rid: k for k, rid in enumerate(order)}
        for rec in sorted(records.values(), key=lambda r: rank.get(str(r["id"]), len(rank))):
            self._write(rec)
        for path in parts:
            path.unlink()
        return len(records)

    def _write(self, rec: Mapping[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._drop_torn_tail()
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec, ensure_ascii=False, default=_jsonable) + "\n")
            fh.flush()

    def _drop_torn_tail(self) -> None:
        """Cut a last line left unterminated by a crash, so the next record starts a clean line."""
        if not self.path.is_file() or self.path.stat().st_size == 0:
            return
        with self.path.open("rb+") as fh:
            fh.seek(-1, 2)
            if fh.read(1) == b"\n":
                return
            fh.seek(0)
            data = fh.read()
            fh.truncate(data.rfind(b"\n") + 1)

    def _save_mask(self, rid: str, key: str, mask: Any) -> str:
        arr = np.asarray(mask)
        if arr.ndim != 2:
            raise InputError(f"record {rid}: {key} must be a 2-D (H, W) mask, got shape {arr.shape}")
        rel = Path("masks") / f"{_SAFE.sub('_', rid)}.{key}.png"
        out = self.path.parent / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(binarize(arr).astype(np.uint8) * 255).save(out)
        return rel.as_posix()


def _absolute(path: str | Path) -> str:
    """Data paths are stored absolute so the store can be read from any working folder."""
    return str(Path(path).expanduser().resolve())


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot store a {type(value).__name__} in predictions.jsonl")
