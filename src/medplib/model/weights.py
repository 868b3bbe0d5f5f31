"""A model folder's weights on disk, and loading them without a second copy in memory.

Layouts (both read by `load_lean` and `load_eager`):

    model.safetensors                                   one file (models up to `DEFAULT_MAX_SHARD_BYTES`)
    model-00001-of-0000N.safetensors ... + model.safetensors.index.json   HF-style shards

The index is the one transformers writes: `{"metadata": {"total_size": bytes}, "weight_map": {key: file}}`.
A tied tensor (e.g. SmolLM2's input and output embeddings) is stored once, under its first name.

`load_lean` builds the model with its parameters on the meta device (accelerate's `init_empty_weights`;
buffers such as rotary `inv_freq` and BatchNorm statistics are built for real, as in an eager build) and
then sets each parameter from the file, one tensor at a time, already in the target dtype and on the target
device. Peak memory is the weights plus one tensor, instead of a random fp32 model plus the whole file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from accelerate import init_empty_weights
from accelerate.utils import find_tied_parameters, set_module_tensor_to_device
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import PreTrainedModel

from medplib.errors import CheckpointError
from medplib.model.convert import CheckpointReader, write_safetensors

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
SHARD_GLOB = "model-*-of-*.safetensors"
# transformers' own default shard size: one shard stays well under a filesystem's or a hub's file limit.
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
_SHOWN = 8  # offending keys an error lists


def has_weights(folder: str | Path) -> bool:
    folder = Path(folder)
    return (folder / INDEX).is_file() or (folder / WEIGHTS).is_file()


def _reader(folder: Path) -> CheckpointReader:
    """Only the safetensors layouts: a medplib folder never holds pickles."""
    if not has_weights(folder):
        raise CheckpointError(f"{folder} has no weights (needs {WEIGHTS} or {INDEX})")
    return CheckpointReader(folder)


# ---------------------------------------------------------------------------------------------- saving
def _unique_state(model: nn.Module) -> dict[str, Tensor]:
    """The state dict with one name per shared tensor (safetensors refuses aliases), first name kept."""
    seen: set[tuple[int, int, tuple[int, ...], tuple[int, ...]]] = set()
    out: dict[str, Tensor] = {}
    for name, t in model.state_dict().items():
        if t.device.type == "meta":
            raise CheckpointError(f"cannot save {name}: it has no data (meta tensor)")
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if t.numel() and ident in seen:
            continue
        seen.add(ident)
        out[name] = t.detach()
    return out


def _split(state: dict[str, Tensor], max_shard_bytes: int) -> list[list[str]]:
    """Consecutive keys in groups of at most `max_shard_bytes` (a larger tensor gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in state.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def save_weights(model: nn.Module, folder: str | Path, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[Path]:
    """Write the model's tensors as `model.safetensors`, or as shards plus an index when they exceed
    `max_shard_bytes`. Written tensor by tensor (at most one extra tensor in memory); files of the other
    layout left from an earlier save are removed, so the folder holds exactly one. Returns the files."""
    if max_shard_bytes <= 0:
        raise CheckpointError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    folder = Path(folder)
    state = _unique_state(model)
    groups = _split(state, max_shard_bytes)

    def write(path: Path, keys: list[str]) -> None:
        entries = [(k, state[k].dtype, tuple(state[k].shape)) for k in keys]
        write_safetensors(path, entries, ((k, state[k].cpu()) for k in keys), metadata={"format": "pt"})

    if len(groups) == 1:
        write(folder / WEIGHTS, groups[0])
        (folder / INDEX).unlink(missing_ok=True)
        for stale in folder.glob(SHARD_GLOB):
            stale.unlink()
        return [folder / WEIGHTS]
    names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    for name, keys in zip(names, groups):
        write(folder / name, keys)
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
             "weight_map": {k: name for name, keys in zip(names, groups) for k in keys}}
    tmp = folder / (INDEX + ".tmp")
    tmp.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    tmp.replace(folder / INDEX)  # the index last: a save killed mid-way leaves no index naming missing shards
    (folder / WEIGHTS).unlink(missing_ok=True)
    for stale in folder.glob(SHARD_GLOB):
        if stale.name not in names:
            stale.unlink()
    return [folder / n for n in names]


# ---------------------------------------------------------------------------------------------- loading
def _check_keys(model: nn.Module, stored: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                tied: list[list[str]], folder: Path) -> None:
    """Every tensor of the model is in the files (a tied group once), nothing else is, shapes agree."""
    own = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    covered = {name for group in tied if any(n in stored for n in group) for name in group}
    missing = [k for k in own if k not in stored and k not in covered]
    unexpected = [k for k in stored if k not in own]
    shapes = [
        f"{k}: file {list(stored[k][1])}, model {list(own[k])}"
        for k in stored
        if k in own and stored[k][1] != own[k]
    ]
    if missing or unexpected or shapes:
        raise CheckpointError(f"weights in {folder} do not match its config: missing {missing[:_SHOWN]}, "
                              f"unexpected {unexpected[:_SHOWN]}, wrong shapes {shapes[:_SHOWN]}")


def _retie(model: nn.Module, tied: list[list[str]]) -> None:
    """Point every name of a tied group at the one parameter that was loaded (setting a parameter from a
    file replaces the object, which unties it)."""
    for group in tied:
        loaded = [n for n in group if model.get_parameter(n).device.type != "meta"]
        if not loaded:
            continue
        param = model.get_parameter(loaded[0])
        for name in group:
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner)._parameters[leaf] = param


def _target_dtype(current: Tensor, dtype: torch.dtype | None) -> torch.dtype:
    # What `Module.to(dtype)` would give: floating tensors take `dtype`, integer ones keep theirs.
    return dtype if dtype is not None and current.is_floating_point() else current.dtype


def load_lean(build: Callable[[], nn.Module], folder: str | Path, *, device: str | torch.device = "cpu",
              dtype: torch.dtype | None = None) -> nn.Module:
    """`build()` under `init_empty_weights` (parameters on meta, buffers real), then each stored tensor
    set in place, cast to `dtype` (floating tensors; None keeps the model's own) on `device`.

    Gives the same tensors as building eagerly, loading and calling `.to(device, dtype)`; raises
    CheckpointError naming the keys that do not match, or the file that cannot be read."""
    folder = Path(folder)
    reader = _reader(folder)
    stored = {k: (dt, shape) for k, dt, shape in reader.entries()}
    with init_empty_weights(include_buffers=False):
        model = build()
    # init_empty_weights re-registers every assigned parameter as a new meta tensor, which undoes the ties
    # transformers makes at init (SmolLM2's lm_head is its embedding): make them again, outside the context.
    for sub in model.modules():
        if isinstance(sub, PreTrainedModel):
            sub.tie_weights()
    tied = find_tied_parameters(model)
    _check_keys(model, stored, tied, folder)
    device = torch.device(device)
    for key, value in reader.tensors():
        current = model.get_parameter(key) if _is_parameter(model, key) else model.get_buffer(key)
        set_module_tensor_to_device(
            model, key, device, value=value, dtype=_target_dtype(current, dtype), clear_cache=False
        )
        del value  # the file's bytes go now, not at the end of the loop
    _retie(model, tied)
    left = [
        n
        for n, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]
        if t.device.type == "meta"
    ]
    if left:
        raise CheckpointError(f"weights in {folder} left tensors unset: {left[:_SHOWN]}")
    # Parameters are already in place (no copy); this moves and casts the buffers built at init.
    model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return model


def _is_parameter(model: nn.Module, key: str) -> bool:
    owner, _, leaf = key.rpartition(".")
    return leaf in model.get_submodule(owner)._parameters


def load_eager(model: nn.Module, folder: str | Path) -> None:
    """The loader before `load_lean`: each file read whole with safetensors' `load_file`, then copied into
    an already built model (kept for comparison, and for models built by other means)."""
    folder = Path(folder)
    files = _reader(folder).files
    state: dict[str, Tensor] = {}
    for path in files:
        try:
            state.update(load_file(str(path)))
        except (SafetensorError, OSError) as exc:  # what safetensors raises for truncated/foreign files
            raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from None
    stored = {k: (t.dtype, tuple(t.shape)) for k, t in state.items()}
    _check_keys(model, stored, find_tied_parameters(model), folder)
    model.load_state_dict(state, strict=False)
