"""Shared fixtures. Real data is read from ../shared/data (override with MEDPLIB_DATA).

Under CI (CI=true) a missing data folder is an error, never a skip."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parents[1]


def _data_root() -> Path:
    env = os.environ.get("MEDPLIB_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    root = _data_root()
    if not root.is_dir():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"real data folder not found at {root} (set MEDPLIB_DATA)")
        pytest.skip(f"real data folder not found at {root} (set MEDPLIB_DATA)")
    return root
