"""Helpers shared by the converters: path rebasing and JSON loading with clear errors."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from medplib.data.schema import Sample
from medplib.errors import DataValidationError, InputError

MODALITY_ALIASES = {
    "ct": "ct", "mr": "mr", "mri": "mr", "x-ray": "xray", "xray": "xray", "cr": "xray", "dx": "xray", "pet": "pet",
    "endoscopy": "endoscopy", "dermoscopy": "dermoscopy", "fundus": "fundus",
    "ultrasound": "ultrasound", "us": "ultrasound",
    "histopathology": "histopathology", "pathology": "histopathology",
}


def require_exportable(sample: Sample, fmt: str) -> None:
    """Exports skip what their format cannot say instead of writing a record that means something else:
    an in-context sample without its examples would ask about "the same structure" with none shown."""
    if sample.examples:
        raise InputError(f"sample {sample.id}: {fmt} has no in-context examples ({len(sample.examples)} here)")


def rebase(path: str, from_dir: Path, to_dir: Path) -> str:
    """A path relative to `from_dir` -> the same file relative to `to_dir` (POSIX separators).
    Absolute paths and same-folder moves are returned unchanged."""
    if os.path.isabs(path) or Path(from_dir).resolve() == Path(to_dir).resolve():
        return path
    target = os.path.normpath(os.path.join(Path(from_dir).resolve(), path))
    return Path(os.path.relpath(target, Path(to_dir).resolve())).as_posix()


def load_json(path: Path) -> Any:
    """Decode a JSON file; a missing or malformed file raises a medplib error naming it."""
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        with path.open("r", encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise DataValidationError(f"malformed JSON: {exc.msg}", path=str(path), line=exc.lineno) from None
    except UnicodeDecodeError as exc:
        raise DataValidationError(f"not UTF-8 text ({exc.reason})", path=str(path)) from None


def modality_from_name(name: str) -> str | None:
    """SA-Med2D convention: the text before the first '_' of the file name, when it is a modality."""
    prefix = Path(name).name.split("_", 1)[0].lower()
    return MODALITY_ALIASES.get(prefix)
