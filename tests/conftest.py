"""Shared fixtures. Real data is read from ../shared/data (override with MEDPLIB_DATA).

Under CI (CI=true) a missing data folder is an error, never a skip."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

if TYPE_CHECKING:  # annotations only: the fixtures import these where they run
    import numpy as np
    import typer

    from medplib.api import MedPLIB

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


KVASIR_QUESTION = "Please segment the polyp."
KVASIR_ANSWER = "Sure, it is [SEG]."


def kvasir_images(root: Path, n: int) -> list[tuple[str, "np.ndarray", "np.ndarray"]]:
    """The first n Kvasir-SEG (id, RGB image, bool mask) pairs, read with PIL as any user would."""
    import numpy as np
    from PIL import Image

    folder = root / "kvasir_seg"
    ids = sorted(p.stem for p in (folder / "images").glob("*.jpg"))[:n]
    out = []
    for i in ids:
        img = np.asarray(Image.open(folder / "images" / f"{i}.jpg").convert("RGB")).copy()
        mask = np.asarray(Image.open(folder / "masks" / f"{i}.jpg").convert("L")) > 127  # JPEG masks: binarise
        out.append((i, img, mask))
    return out


@pytest.fixture(scope="session")
def kvasir_model(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `tiny` model trained once per session to ground the polyp on 4 real Kvasir-SEG images.

    Returns the saved model folder; tests that need a trained model load it from there."""
    from medplib.api import MedPLIB
    from medplib.data.schema import Turn
    from medplib.training.fit import fit

    m = MedPLIB.from_preset("tiny", seed=0)
    items = [
        m.processor.encode(img, [Turn(role="user", content=KVASIR_QUESTION),
                                 Turn(role="assistant", content=KVASIR_ANSWER)],
                           target_masks=[mask])
        for _, img, mask in kvasir_images(shared_data, 4)
    ]
    fit(m, items, steps=160, batch_size=4, lr=1e-3, seed=0)
    return m.save_pretrained(tmp_path_factory.mktemp("kvasir") / "model")


@pytest.fixture(scope="session")
def lite_model() -> "MedPLIB":
    """The lite model as `MedPLIB.from_preset` builds it: pretrained parts from the installed packages. Built once
    per session (reading the GGUF file takes most of a minute); tests must not change its weights."""
    from medplib.api import MedPLIB

    return MedPLIB.from_preset("lite")


@pytest.fixture(scope="module")
def runner_app() -> "typer.Typer":
    """`medplib ask` as a typer app for CliRunner (a second command keeps the subcommand name)."""
    import typer

    from medplib.serving.commands import ask

    app = typer.Typer()
    app.command()(ask)
    app.command("noop")(lambda: None)
    return app
