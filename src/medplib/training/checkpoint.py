"""Training checkpoints: written atomically, the newest K kept, loaded without unpickling objects.

    <run>/checkpoints/step_00000100/
        model.safetensors   every model tensor (LoRA adapters included), safetensors
        optimizer.pt        optimizer state_dict: tensors, numbers and lists only
        scheduler.pt        scheduler state_dict: numbers only
        rng_rank<r>.pt      each process's torch / numpy / python RNG state, as tensors and ints
        state.json          {"step": optimizer steps done; also the data position}

A checkpoint folder is written under a temporary name and renamed when complete, so a run killed
at any moment leaves either the whole checkpoint or none. The .pt files are read with
`torch.load(weights_only=True)`, which refuses anything but tensors and plain containers.

Under DeepSpeed and FSDP the parameters and optimizer state are sharded over the processes, so the
engine writes them: `accelerator.save_state` (each process its shards, the RNG states, the
scheduler), plus the same `state.json`, with `"engine": true`. Those files are the engine's own
format, which DeepSpeed reads with pickle: they are resumed only from the run's own output folder,
never loaded as published weights (the final `model/` folder is safetensors in every case).
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_model, save_model
from torch import nn

from medplib.errors import CheckpointError

_NAME = re.compile(r"^step_(\d{8})$")


def checkpoint_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:08d}"


def latest_checkpoint(run: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    folder = run / "checkpoints"
    if not folder.is_dir():
        return None
    done = [p for p in folder.iterdir() if _NAME.match(p.name) and (p / "state.json").is_file()]
    return max(done, key=lambda p: p.name) if done else None


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_rest": [int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": list(random.getstate()[1]),
        "python_gauss": random.getstate()[2],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    pos, has_gauss, gauss = state["numpy_rest"]
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, int(pos), int(has_gauss), float(gauss)))
    random.setstate((3, tuple(state["python"]), state["python_gauss"]))


def save_checkpoint(
    run: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, *,
    rank: int, world: int, barrier: Callable[[], None], keep_last: int,
) -> Path:
    """Every process calls this (each writes its RNG state); process 0 writes the rest."""
    final = checkpoint_dir(run, step)
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while writing
        tmp.mkdir(parents=True)
    barrier()
    torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
    if rank == 0:
        save_model(model, str(tmp / "model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "world": world}) + "\n", encoding="utf-8")
    barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        old = sorted(p for p in final.parent.iterdir() if _NAME.match(p.name))[:-keep_last]
        for p in old:
            shutil.rmtree(p, ignore_errors=True)
    barrier()
    return final


def save_engine_checkpoint(run: Path, step: int, accelerator: Any, *, world: int, keep_last: int) -> Path:
    """DeepSpeed / FSDP: every process calls this; the engine writes the shards, process 0 the rest."""
    final = checkpoint_dir(run, step)
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "state.json").write_text(json.dumps({"step": step, "world": world, "engine": True}) + "\n",
                                        encoding="utf-8")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in sorted(p for p in final.parent.iterdir() if _NAME.match(p.name))[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_engine_checkpoint(folder: Path, accelerator: Any, *, world: int) -> int:
    """Restore what `save_engine_checkpoint` wrote; returns the step to continue from."""
    state = _read_state(folder, world)
    if not state.get("engine"):
        raise CheckpointError(f"{folder} was written without DeepSpeed/FSDP; resume it with the same launch setup")
    try:
        accelerator.load_state(str(folder))
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot resume from {folder}: {exc}") from None
    return int(state["step"])


def _read_state(folder: Path, world: int) -> dict[str, Any]:
    try:
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot resume from {folder}: {exc}") from None
    if state.get("world") != world:
        raise CheckpointError(f"{folder} was written by {state.get('world')} processes, this run has {world}; "
                              "exact resume needs the same number")
    return state


def load_checkpoint(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, *,
                    rank: int, world: int) -> int:
    """Restore everything saved by `save_checkpoint`; returns the step to continue from."""
    state = _read_state(folder, world)
    if state.get("engine"):
        raise CheckpointError(f"{folder} was written by DeepSpeed/FSDP; resume it with the same launch setup")
    try:
        missing, unexpected = load_model(model, str(folder / "model.safetensors"), strict=False)
        if missing or unexpected:
            raise CheckpointError(f"{folder}: weights do not match the model (missing {missing[:3]}, "
                                  f"unexpected {unexpected[:3]}); was the recipe changed?")
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
        scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
        set_rng_state(torch.load(folder / f"rng_rank{rank}.pt", weights_only=True))
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot resume from {folder}: {exc}") from None
    return int(state["step"])
