"""Load segment-anything, SAM-Med2D and MedSAM weights into `PixelEncoder` and `MaskDecoder`.

The modules mirror SAM's parameter names, so the map is mostly a prefix strip:
- `image_encoder.*` -> encoder (SAM-Med2D's `blocks.N.Adapter.*` included);
- `prompt_encoder.pe_layer.*`, `prompt_encoder.no_mask_embed.*` -> decoder; the point/box/mask prompt parts of
  SAM's prompt encoder are not used by the `[SEG]` path and are dropped;
- `mask_decoder.*` -> decoder, keeping only single-mask output 0 (hypernetwork 0 and IoU row 0).
Checkpoints trained at another resolution get pos_embed (bicubic) and rel_pos (linear) resized, as SAM-Med2D
does to run SAM's 1024 px weights at 256 px.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from medplib.config import PixelEncoderConfig
from medplib.errors import CheckpointError
from medplib.model.mask_decoder import MaskDecoder
from medplib.model.pixel_encoder import PixelEncoder

_KEPT_PROMPT_ENCODER = ("pe_layer.", "no_mask_embed.")
_UNUSED_HYPERNET = re.compile(r"output_hypernetworks_mlps\.[1-9]\d*\.")
_REL_POS = re.compile(r"blocks\.(\d+)\.attn\.rel_pos_[hw]$")
_UNSAFE_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
_SHOWN = 5  # how many offending keys an error message lists


def sam_state_dict_to_medplib(
    sd: dict[str, Tensor], pixel: PixelEncoderConfig | None = None
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Split a SAM-layout state dict into (pixel_encoder_sd, mask_decoder_sd).

    `sd` may be nested under a "model" key (SAM-Med2D). With `pixel` given, pos_embed and rel_pos tables are
    resized to that config's grid and window; without it they are returned as stored.
    """
    if "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]
    encoder: dict[str, Tensor] = {}
    decoder: dict[str, Tensor] = {}
    for key, value in sd.items():
        if not isinstance(value, Tensor):
            continue
        if key.startswith("image_encoder."):
            encoder[key.removeprefix("image_encoder.")] = value
        elif key.startswith("prompt_encoder."):
            name = key.removeprefix("prompt_encoder.")
            if name.startswith(_KEPT_PROMPT_ENCODER):
                decoder[name] = value
        elif key.startswith("mask_decoder."):
            name = key.removeprefix("mask_decoder.")
            if _UNUSED_HYPERNET.match(name):
                continue
            decoder[name] = value
    _keep_first_iou_output(decoder)
    if pixel is not None:
        _resize_positions(encoder, pixel)
    return encoder, decoder


def _keep_first_iou_output(decoder: dict[str, Tensor]) -> None:
    """SAM's IoU head predicts one score per mask token; keep the single-mask one (row 0) of its last layer."""
    layers = [k for k in decoder if k.startswith("iou_prediction_head.layers.")]
    if not layers:
        return
    last = max(int(k.split(".")[2]) for k in layers)
    for suffix in ("weight", "bias"):
        key = f"iou_prediction_head.layers.{last}.{suffix}"
        if key in decoder:
            decoder[key] = decoder[key][:1]


def _resize_positions(encoder: dict[str, Tensor], cfg: PixelEncoderConfig) -> None:
    pos = encoder.get("pos_embed")
    if pos is not None and pos.shape[1:3] != (cfg.grid, cfg.grid):
        # (1, H, W, C) -> (1, C, H, W) for interpolation; computed in fp32 (bicubic is not in every half kernel).
        resized = F.interpolate(
            pos.float().permute(0, 3, 1, 2), size=(cfg.grid, cfg.grid), mode="bicubic", align_corners=False
        )
        encoder["pos_embed"] = resized.permute(0, 2, 3, 1).to(pos.dtype)
    for key, table in list(encoder.items()):
        match = _REL_POS.match(key)
        if match is None:
            continue
        size = cfg.grid if int(match.group(1)) in cfg.global_attn_indexes else cfg.window_size
        length = 2 * size - 1
        if table.shape[0] != length:
            # (L, head_dim) -> (1, head_dim, L): linear interpolation along the relative distance.
            resized = F.interpolate(table.float().T.unsqueeze(0), size=length, mode="linear", align_corners=False)
            encoder[key] = resized[0].T.to(table.dtype)


def read_state_dict(path: str | Path) -> dict[str, Any]:
    """The dict in a `.safetensors` file, or in a `.pth`/`.pt` file read with `torch.load(weights_only=True)`.

    Full unpickling is never used: a pickle that needs it is refused with a CheckpointError.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as exc:  # what safetensors raises for corrupt headers or data
            raise CheckpointError(f"cannot read {path} as safetensors: {exc}") from None
    if path.suffix in (".pth", ".pt"):
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
            # Only name the offending class: torch's own advice (allow-listing, weights_only=False) unpickles it.
            found = _UNSAFE_GLOBAL.search(str(exc))
            detail = f" (it references {found.group(1)})" if found else ""
            raise CheckpointError(
                f"{path} cannot be loaded safely: it holds objects other than tensors or is not a PyTorch file"
                f"{detail}. Convert it to safetensors in an environment you trust, e.g. "
                "`safetensors.torch.save_file(state_dict, 'sam.safetensors')`, and load that file."
            ) from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{path} holds a {type(data).__name__}, not a state dict")
        return data
    raise CheckpointError(f"unsupported checkpoint type '{path.suffix}' for {path} (use .safetensors, .pth or .pt)")


def _check_keys(module: nn.Module, sd: dict[str, Tensor], what: str, path: Path) -> None:
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape
    ]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if keys:
            more = f" (+{len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else ""
            problems.append(f"{len(keys)} {label}: {', '.join(keys[:_SHOWN])}{more}")
    if problems:
        hint = ""
        if any(".Adapter." in k for k in missing):
            hint = " The checkpoint has no SAM-Med2D adapters: set pixel.adapter=false for plain SAM / MedSAM weights."
        elif any(".Adapter." in k for k in unexpected):
            hint = " The checkpoint has SAM-Med2D adapters: set pixel.adapter=true."
        raise CheckpointError(f"{path} does not match the {what}: {'; '.join(problems)}.{hint}")


def load_sam_checkpoint(path: str | Path, encoder: PixelEncoder, decoder: MaskDecoder) -> None:
    """Load a SAM / SAM-Med2D / MedSAM checkpoint into `encoder` and `decoder` in place.

    Every parameter of both modules must be in the file, and every encoder/decoder tensor the file has must be
    used; otherwise a CheckpointError lists the first offending keys.
    """
    path = Path(path)
    enc_sd, dec_sd = sam_state_dict_to_medplib(read_state_dict(path), encoder.cfg)
    _check_keys(encoder, enc_sd, "pixel encoder", path)
    _check_keys(decoder, dec_sd, "mask decoder", path)
    encoder.load_state_dict(enc_sd)
    decoder.load_state_dict(dec_sd)
