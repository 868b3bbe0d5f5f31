"""medplib: pixel-level biomedical multimodal LLMs (VQA, region prompts, [SEG] mask grounding).

    from medplib import MedPLIB, Predictor, preset
    m = MedPLIB.from_config(preset("tiny", **{"moe.num_experts": 2}))  # or MedPLIB.from_preset("tiny")
    p = Predictor.from_pretrained("runs/demo/model")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from medplib.errors import MedplibError

if TYPE_CHECKING:
    from medplib.api import MedPLIB
    from medplib.config import preset
    from medplib.inference import Predictor

__version__ = "0.1.0"
__all__ = ["MedPLIB", "MedplibError", "Predictor", "__version__", "preset"]

# Imported on first use: the model classes pull in torch and transformers (seconds), which the
# `medplib` command must not pay before it has parsed its arguments.
_LAZY = {"MedPLIB": "medplib.api", "Predictor": "medplib.inference", "preset": "medplib.config"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'medplib' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
