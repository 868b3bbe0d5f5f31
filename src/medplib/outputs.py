"""Files a command is asked to write, checked before any model work, so that an answer is never
computed only to be lost at the end, and a bad path is one clear error naming its option."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Optional

from medplib.errors import InputError


def prepare_outputs(outputs: Mapping[str, Optional[Path]]) -> None:
    """{option: path or None}: each given path's folder is created and must be writable; a path
    that is an existing folder is refused."""
    for option, path in outputs.items():
        if path is None:
            continue
        if path.is_dir():
            raise InputError(f"{option} {path}: is a folder; give a file name")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a file where a folder should be, no permission, read-only disk
            raise InputError(f"{option} {path}: cannot create its folder ({exc.strerror or exc})") from None
        if not os.access(path.parent, os.W_OK):
            raise InputError(f"{option} {path}: its folder is not writable")
