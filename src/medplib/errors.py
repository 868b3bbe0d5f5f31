"""The errors medplib raises on bad input. The CLI prints their message, never a traceback."""

from __future__ import annotations


class MedplibError(Exception):
    """Base class: every user-facing failure is one of these, with a message that says what to fix."""


class InputError(MedplibError):
    """An image, mask, region or question that cannot be used (corrupt, wrong size, outside the image)."""


class ConfigError(MedplibError):
    """A config, preset or recipe that is unknown or inconsistent."""


class CheckpointError(MedplibError):
    """A model folder or weights file that is missing, unsafe or does not match the config."""


class DataValidationError(MedplibError):
    """A data file that breaks the sample schema; the message names the file, line and field."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None, field: str | None = None):
        where = ":".join(str(p) for p in (path, line) if p is not None)
        prefix = f"{where}: " if where else ""
        field_part = f" (field '{field}')" if field else ""
        super().__init__(f"{prefix}{message}{field_part}")
        self.path, self.line, self.field = path, line, field
