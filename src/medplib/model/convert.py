"""Convert between the published MedPLIB checkpoint layout and a medplib model folder, both ways.

The published layout is what `ShawnHuang497/MedPLIB` writes with HF `save_pretrained` (keys rooted at
`MedPLIBForCausalLM`; `model.` is its `MedPLIBModel`):

    model.embed_tokens / model.layers.{i}.* / model.norm / lm_head          LLaMA
    model.layers.{i}.mlp.deepspeed_moe.gate.wg.weight                         router (E, H), no bias
    model.layers.{i}.mlp.deepspeed_moe.experts.deepspeed_experts.{e}.*       expert e (dense: model.layers.{i}.mlp.*)
    model.vision_tower.vision_tower.vision_model.*                           HF CLIP (may be absent: --vision)
    model.mm_projector.{0,2}.*   model.region_fea_adapter.*                   projector, region encoder
    model.text_hidden_fcs.0.{0,2}.*                                           [SEG] projection
    model.visual_model.{image_encoder,prompt_encoder,mask_decoder}.*          SAM-Med2D
    model.layers.{i}.self_attn.rotary_emb.inv_freq                            transformers 4.31 buffers

Shards (`*.safetensors` or `pytorch_model-*.bin`, with or without an index JSON) are read one tensor at a
time (safetensors by plain reads, `.bin` shards memory-mapped with `weights_only=True`), and medplib's
single `model.safetensors` is written as a stream, so a 7B conversion never holds the model in memory. Every key
is either mapped or in a fixed list of parts the `[SEG]` path does not use (SAM's point/box/mask prompt parts and
multimask outputs 1-3, CLIP's text half, the rotary buffers, which are checked against the config); anything else,
a missing key or a wrong shape is a CheckpointError that names the keys.

The published tokenizer's `<SEG>` is medplib's `[SEG]` (same id, renamed); medplib's `<image>`, `<box>` and
`</box>` are appended when missing, with the mean embedding as their rows.
"""

from __future__ import annotations

import itertools
import json
import pickle
import re
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from medplib.config import MedPLIBConfig, preset
from medplib.errors import CheckpointError
from medplib.model.sam_checkpoint import (
    _KEPT_PROMPT_ENCODER,
    _UNUSED_HYPERNET,
    read_state_dict,
    sam_state_dict_to_medplib,
)
from medplib.model.summary import build_on_meta
from medplib.tokenizer import SEG, load_tokenizer

PUBLISHED_SEG = "<SEG>"
# LlamaConfig fields that define the LLM's tensors and numerics; the rest of the published config.json
# is LLaVA/MedPLIB training state.
_LLAMA_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "hidden_act", "rope_theta",
                 "rope_scaling", "attention_bias", "initializer_range", "bos_token_id")
_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLE = ("model.safetensors", "pytorch_model.bin")
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_SHOWN = 8  # offending keys an error lists


@dataclass
class Conversion:
    """What a conversion wrote: the output folder, tensors written, and the source keys left out by design
    (or, towards the published layout, the published-only tensors filled in) with the reason."""

    folder: Path
    written: int
    left_out: dict[str, int] = field(default_factory=dict)  # reason -> count


# ---------------------------------------------------------------------------------------------- reading
class CheckpointReader:
    """The tensors of an HF checkpoint folder: an index JSON over shards, or one weights file.

    `entries()` lists (name, dtype, shape) without reading data; `tensors()` yields one tensor at a time,
    shard by shard, in the order of `entries()`."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"checkpoint folder not found: {self.folder}")
        index = next((self.folder / n for n in _INDEXES if (self.folder / n).is_file()), None)
        if index is not None:
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index} is not an HF weight index ({exc})") from None
            self.files = list(dict.fromkeys(self.folder / f for f in weight_map.values()))
            missing = [f.name for f in self.files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{index.name} names shards that are not in {self.folder}: {missing[:_SHOWN]}")
            self._indexed = weight_map
        else:
            single = next((self.folder / n for n in _SINGLE if (self.folder / n).is_file()), None)
            if single is None:
                raise CheckpointError(f"{self.folder} has no weights: expected one of {_INDEXES + _SINGLE}")
            self.files, self._indexed = [single], None

    def _open(self, path: Path) -> Any:
        """A lazily read shard: safetensors tensor by tensor, `.bin` memory-mapped, never unpickling objects."""
        if path.suffix == ".safetensors":
            return _SafetensorsFile(path)
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            # Legacy (non-zip) pickles cannot be memory-mapped: read whole, still refusing non-tensor objects.
            sd = _read_bin(path)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(f"{path} cannot be loaded safely (it holds objects other than tensors): {exc}") \
                from None
        if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
            raise CheckpointError(f"{path} is not a state dict of tensors")
        return _Loaded(sd)

    def entries(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        out = []
        for path in self.files:
            shard = self._open(path)
            out += [(k, *shard.meta(k)) for k in self._keys_of(path, shard.keys())]
        return out

    def tensors(self) -> Iterator[tuple[str, Tensor]]:
        for path in self.files:
            shard = self._open(path)
            for k in self._keys_of(path, shard.keys()):
                yield k, shard[k]
            del shard

    def _keys_of(self, path: Path, keys: list[str]) -> list[str]:
        if self._indexed is None:
            return keys
        listed = [k for k, f in self._indexed.items() if self.folder / f == path]
        if set(listed) - set(keys):
            raise CheckpointError(f"{path.name} lacks keys its index lists: {sorted(set(listed) - set(keys))[:_SHOWN]}")
        return listed


class _SafetensorsFile:
    """A safetensors file read one tensor at a time with plain reads. (safe_open memory-maps the whole
    file, and every page it touches stays resident until the file is closed: converting a single-file
    model would hold all of it.)"""

    def __init__(self, path: Path):
        self.path = path
        try:
            with open(path, "rb") as f:
                n = struct.unpack("<Q", f.read(8))[0]
                if n > path.stat().st_size - 8:  # not safetensors (e.g. a pickle): no header of that length
                    raise ValueError(f"header length {n} exceeds the file")
                header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            self.header = {k: (_ST_DTYPES[v["dtype"]], tuple(v["shape"]), tuple(v["data_offsets"]))
                           for k, v in header.items()}
        except (OSError, struct.error, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{path} is not a readable safetensors file: {exc!r}") from None
        self.start = 8 + n
        # A truncated file is caught here, before any tensor of it is used, not at the first short read.
        end = self.start + max((off[1] for _, _, off in self.header.values()), default=0)
        size = path.stat().st_size
        if size < end:
            raise CheckpointError(f"{path} is truncated: its header needs {end} bytes, the file has {size}")

    def keys(self) -> list[str]:
        return list(self.header)

    def meta(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        return self.header[key][:2]

    def __getitem__(self, key: str) -> Tensor:
        dtype, shape, (a, b) = self.header[key]
        buf = bytearray(b - a)
        with open(self.path, "rb") as f:
            f.seek(self.start + a)
            got = f.readinto(buf)
        if got != b - a or b - a != torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size():
            raise CheckpointError(f"{self.path}: the bytes of {key} do not match its shape {shape} (truncated file?)")
        return torch.frombuffer(buf, dtype=dtype).reshape(shape) if buf else torch.empty(shape, dtype=dtype)


class _Loaded:
    """A `.bin` state dict with the same interface."""

    def __init__(self, sd: dict[str, Tensor]):
        self.sd = sd

    def keys(self) -> list[str]:
        return list(self.sd)

    def meta(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        return self.sd[key].dtype, tuple(self.sd[key].shape)

    def __getitem__(self, key: str) -> Tensor:
        return self.sd[key]


def _read_bin(path: Path) -> dict[str, Any]:
    """A legacy `.bin` pickle read whole with weights_only."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise CheckpointError(f"{path} cannot be loaded safely or is not a PyTorch file: {exc}") from None


# ---------------------------------------------------------------------------------------------- writing
def write_safetensors(path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                      tensors: Iterator[tuple[str, Tensor]], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file tensor by tensor (the library's writers need every tensor in memory at once).

    The header comes first and fixes the order: `tensors` must yield exactly `entries`, in order."""
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, dtype, shape in entries:
        n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns the data to 8 bytes
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for (name, dtype, shape), (got, t) in zip(entries, tensors, strict=True):
                if got != name or t.dtype != dtype or tuple(t.shape) != shape:
                    raise CheckpointError(f"internal order mismatch writing {path.name}: {got} for {name}")
                f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-d too
    except BaseException:
        tmp.unlink(missing_ok=True)  # a source that fails mid-way leaves no partial file
        raise
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------- key maps
_LAYER = r"model\.layers\.(\d+)\."
# Published -> medplib, first match wins.
_TO_MEDPLIB: list[tuple[str, str]] = [
    (r"lm_head\.(.+)", r"llm.lm_head.\1"),
    (r"model\.embed_tokens\.(.+)", r"llm.model.embed_tokens.\1"),
    (r"model\.norm\.(.+)", r"llm.model.norm.\1"),
    (_LAYER + r"mlp\.deepspeed_moe\.gate\.wg\.(.+)", r"llm.model.layers.\1.mlp.router.\2"),
    (_LAYER + r"mlp\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.(.+)", r"llm.model.layers.\1.mlp.experts.\2.\3"),
    (_LAYER + r"((?:self_attn\.[qkvo]_proj|input_layernorm|post_attention_layernorm|mlp\.(?:gate|up|down)_proj)\..+)",
     r"llm.model.layers.\1.\2"),
    (r"model\.vision_tower\.vision_tower\.vision_model\.(.+)", r"vision.model.\1"),
    (r"model\.mm_projector\.(.+)", r"projector.\1"),
    (r"model\.region_fea_adapter\.(.+)", r"region_encoder.proj.\1"),
    (r"model\.text_hidden_fcs\.0\.([02]\..+)", r"seg_proj.\1"),
    (r"model\.visual_model\.image_encoder\.(.+)", r"pixel_encoder.\1"),
    (r"model\.visual_model\.prompt_encoder\.((?:pe_layer|no_mask_embed)\..+)", r"mask_decoder.\1"),
    (r"model\.visual_model\.mask_decoder\.(.+)", r"mask_decoder.\1"),
]
# Medplib -> published, first match wins.
_TO_PUBLISHED: list[tuple[str, str]] = [
    (r"llm\.lm_head\.(.+)", r"lm_head.\1"),
    (r"llm\.model\.embed_tokens\.(.+)", r"model.embed_tokens.\1"),
    (r"llm\.model\.norm\.(.+)", r"model.norm.\1"),
    (r"llm\.model\.layers\.(\d+)\.mlp\.router\.(.+)", r"model.layers.\1.mlp.deepspeed_moe.gate.wg.\2"),
    (r"llm\.model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(.+)",
     r"model.layers.\1.mlp.deepspeed_moe.experts.deepspeed_experts.\2.\3"),
    (r"llm\.model\.layers\.(\d+)\.(.+)", r"model.layers.\1.\2"),
    (r"vision\.model\.(.+)", r"model.vision_tower.vision_tower.vision_model.\1"),
    (r"projector\.(.+)", r"model.mm_projector.\1"),
    (r"region_encoder\.proj\.(.+)", r"model.region_fea_adapter.\1"),
    (r"seg_proj\.(.+)", r"model.text_hidden_fcs.0.\1"),
    (r"pixel_encoder\.(.+)", r"model.visual_model.image_encoder.\1"),
    (r"mask_decoder\.((?:pe_layer|no_mask_embed)\..+)", r"model.visual_model.prompt_encoder.\1"),
    (r"mask_decoder\.(.+)", r"model.visual_model.mask_decoder.\1"),
]
_ROTARY = re.compile(_LAYER + r"self_attn\.rotary_emb\.inv_freq")
_CLIP_TEXT = re.compile(r"(?:text_model\.|text_projection\.|visual_projection\.|logit_scale$)")
_IOU_LAYER = re.compile(r"mask_decoder\.iou_prediction_head\.layers\.(\d+)\.(weight|bias)")
_EMBEDDINGS = ("llm.model.embed_tokens.weight", "llm.lm_head.weight")
# SAM-Med2D's mask-prompt branch (mask_in_chans 16): the published layout keeps it, the [SEG] path never runs it.
_MASK_IN_CHANS = 16
_LLAVA_TYPES = ("llava", "llava_llama")
_MEDPLIB_ONLY = ("model.visual_model.", "model.text_hidden_fcs.", "model.region_fea_adapter.")


def _rename(key: str, table: list[tuple[str, str]]) -> str | None:
    for pattern, template in table:
        m = re.fullmatch(pattern, key)
        if m:
            return m.expand(template)
    return None


def _published_only(key: str) -> str | None:
    """Why a published key has no medplib tensor (None: it must map)."""
    if _ROTARY.fullmatch(key):
        return "rotary inv_freq buffers (checked against the config)"
    if key.startswith("model.visual_model.prompt_encoder.") and not key.removeprefix(
            "model.visual_model.prompt_encoder.").startswith(_KEPT_PROMPT_ENCODER):
        return "SAM point/box/mask prompt parts (the [SEG] path uses none)"
    if key.startswith("model.visual_model.mask_decoder.") and _UNUSED_HYPERNET.match(
            key.removeprefix("model.visual_model.mask_decoder.")):
        return "SAM multimask outputs 1-3 (MedPLIB decodes the single mask)"
    return None


def _problems(expected: dict[str, tuple[int, ...]], got: dict[str, tuple[int, ...]], unknown: list[str]) -> str:
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    mismatched = [f"{k} {got[k]} vs {expected[k]}" for k in expected if k in got and got[k] != expected[k]]
    parts = []
    for label, keys in (("unknown", unknown), ("missing", missing), ("unexpected", unexpected),
                        ("shape mismatch (file vs config)", mismatched)):
        if keys:
            more = f" (+{len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else ""
            parts.append(f"{len(keys)} {label}: {', '.join(keys[:_SHOWN])}{more}")
    return "; ".join(parts)


def _inv_freq(llm_hf: dict[str, Any]) -> Tensor:
    """LLaMA's rotary frequencies, (head_dim / 2,) fp32, as transformers 4.31 stores them."""
    dim = int(llm_hf.get("head_dim") or llm_hf["hidden_size"] // llm_hf["num_attention_heads"])
    return 1.0 / (_rope_theta(llm_hf) ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _rope_theta(llm_hf: dict[str, Any]) -> float:
    """transformers 5 keeps it in `rope_parameters`, 4.x as `rope_theta`; LLaMA-2's default is 10000."""
    return float((llm_hf.get("rope_parameters") or {}).get("rope_theta") or llm_hf.get("rope_theta") or 10000.0)


# ---------------------------------------------------------------------------------------------- configs
def _config_from_published(pub: dict[str, Any], base: MedPLIBConfig) -> MedPLIBConfig:
    """The medplib config of a published checkpoint: the LLM, projector, region and MoE settings from its
    config.json; the vision tower, SAM-Med2D and decoder widths (which config.json does not record) from
    `base` (the `paper` preset for the released 7B model), checked against the tensors afterwards."""
    d = base.to_dict()
    hf = {k: pub[k] for k in _LLAMA_FIELDS if k in pub and pub[k] is not None}
    if pub.get("tie_word_embeddings"):
        raise CheckpointError("tied input/output embeddings are not part of the published layout")
    d["name"] = d["name"] if "medplib" in pub else "published"
    d["llm"].update(kind="llama", hf={**hf, "tie_word_embeddings": False}, pretrained=None)
    d["vision"]["pretrained"] = d["pixel"]["checkpoint"] = None
    d["tokenizer"].update(path=None, corpus=None)
    if "mm_vision_select_layer" in pub:
        d["vision"]["select_layer"] = int(pub["mm_vision_select_layer"])
    if pub.get("mm_projector_type") in ("mlp2x_gelu", "linear"):
        d["projector"] = pub["mm_projector_type"]
    if "max_sample_point" in pub:
        d["region"]["max_points"] = int(pub["max_sample_point"])
    d["region"]["spatial"] = False
    moe = pub.get("moe") or {}
    counts = moe.get("num_experts")
    if counts:
        layers = list(moe.get("moe_layers_idx") or range(len(counts)))
        if layers != list(range(int(pub["num_hidden_layers"]))) or len(set(counts)) != 1 or moe.get("use_residual"):
            raise CheckpointError("medplib's MoE has the same experts in every layer and no residual MoE; this "
                                  f"checkpoint has num_experts={counts}, layers={layers}, "
                                  f"use_residual={moe.get('use_residual')}")
        d["moe"].update(num_experts=int(counts[0]), top_k=int(moe.get("top_k_experts") or 1), gate="prob",
                        capacity_factor_train=float(moe.get("capacity_factor") or 1.5),
                        capacity_factor_eval=float(moe.get("eval_capacity_factor") or 2.0))
        # router_aux_loss_coef is a training setting: a recipe's loss.balance, not part of the model.
    else:
        d["moe"]["num_experts"] = 0
    cfg = MedPLIBConfig.from_dict(d)
    if "out_dim" in pub and int(pub["out_dim"]) != cfg.decoder.transformer_dim:
        raise CheckpointError(f"the checkpoint's out_dim {pub['out_dim']} differs from the base config's "
                              f"decoder.transformer_dim {cfg.decoder.transformer_dim}: pass a matching --config")
    return cfg


def _published_config(cfg: MedPLIBConfig, vocab: int, dtype: torch.dtype) -> dict[str, Any]:
    """config.json for the published code (transformers 4.31 LlamaConfig + LLaVA-1.5 + MedPLIB fields); the
    medplib config rides along under "medplib" so that converting back needs no --config."""
    hf = {k: cfg.llm.hf[k] for k in _LLAMA_FIELDS if cfg.llm.hf.get(k) is not None}
    hf["rope_theta"] = _rope_theta(cfg.llm.hf)
    n_layers = int(hf["num_hidden_layers"])
    out: dict[str, Any] = {
        "architectures": ["MedPLIBForCausalLM"],
        "model_type": "medplib_moe_llama" if cfg.moe.num_experts else "llava_llama",
        **hf, "vocab_size": vocab, "tie_word_embeddings": False, "torch_dtype": str(dtype).removeprefix("torch."),
        "mm_hidden_size": int(cfg.vision.hf["hidden_size"]), "mm_projector_type": cfg.projector,
        "mm_vision_select_layer": cfg.vision.select_layer, "mm_vision_select_feature": "patch",
        "mm_vision_tower": "clip-vit-large-patch14-336", "mm_use_im_start_end": True, "mm_use_im_patch_token": False,
        "image_aspect_ratio": "square", "use_mm_proj": True, "out_dim": cfg.decoder.transformer_dim,
        "max_sample_point": cfg.region.max_points, "train_mask_decoder": True,
    }
    if cfg.moe.num_experts:
        out["moe"] = {"num_experts": [cfg.moe.num_experts] * n_layers, "top_k_experts": cfg.moe.top_k,
                      "capacity_factor": cfg.moe.capacity_factor_train,
                      "eval_capacity_factor": cfg.moe.capacity_factor_eval, "use_residual": False,
                      # 0.0 as in the published stage IV: a medplib model carries no training setting
                      "router_aux_loss_coef": 0.0, "moe_layers_idx": list(range(n_layers)),
                      "min_capacity": 0, "ep_size": 1}
    out["medplib"] = cfg.to_dict()
    return out


def _save_config(cfg: MedPLIBConfig, folder: Path) -> None:
    """config.json as `MedPLIB.save_pretrained` writes it (weights in the folder, no paths to parts)."""
    d = cfg.to_dict()
    d["vision"]["pretrained"] = d["llm"]["pretrained"] = d["pixel"]["checkpoint"] = None
    d["tokenizer"]["path"] = d["tokenizer"]["corpus"] = None
    (folder / "config.json").write_text(json.dumps(d, indent=2) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------- tokenizer
def _rename_token(folder: Path, old: str, new: str) -> None:
    """Rename one added token in a saved tokenizer's JSON files (same id, new text)."""
    def walk(x: Any) -> Any:
        if isinstance(x, dict):
            return {(new if k == old else k): walk(v) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        return new if x == old else x

    for path in folder.glob("*.json"):
        if path.name in ("config.json", "model.safetensors.index.json"):
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        path.write_text(json.dumps(walk(data), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _copy_tokenizer(src: Path, out: Path, old: str, new: str) -> int:
    """Save `src`'s tokenizer into `out` with token `old` renamed `new`; towards medplib (new == [SEG]) its
    other special tokens are ensured (added at the end when missing). Returns the tokenizer's length."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot load the tokenizer in {src}: {exc}") from None
    vocab = tok.get_vocab()
    if new in vocab and old in vocab:
        raise CheckpointError(f"the tokenizer in {src} has both {old} and {new}")
    tok.save_pretrained(str(out))
    if old in vocab:
        _rename_token(out, old, new)
    if new != SEG:
        return len(tok)
    tok = load_tokenizer(out)
    tok.save_pretrained(str(out))
    return len(tok)


# ---------------------------------------------------------------------------------------------- converters
def _meta_shapes(cfg: MedPLIBConfig, vocab: int) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in build_on_meta(cfg, vocab).state_dict().items()}


class _Fresh:
    """Tensors made here (a reader with the same interface): the parts a LLaVA folder lacks."""

    def __init__(self, tensors: dict[str, Tensor]):
        self.sd = tensors

    def entries(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        return [(k, v.dtype, tuple(v.shape)) for k, v in self.sd.items()]

    def tensors(self) -> Iterator[tuple[str, Tensor]]:
        return iter(self.sd.items())


def _llava_missing_parts(cfg: MedPLIBConfig, vocab: int, sam: str | Path | None, dtype: torch.dtype) -> _Fresh:
    """What a LLaVA-1.5 / LLaVA-Med folder (LLaMA, projector, maybe CLIP) lacks to be a stage I start:
    SAM-Med2D from `sam` (through medplib's SAM loader map, positions resized to the config), and the
    `[SEG]` projection and region encoder freshly initialised as the model initialises them."""
    if sam is None:
        raise CheckpointError("a LLaVA folder has no SAM part: pass the SAM-Med2D checkpoint with --sam")
    enc, dec = sam_state_dict_to_medplib(read_state_dict(sam), cfg.pixel)
    meta = build_on_meta(cfg, vocab)
    torch.manual_seed(0)
    fresh: dict[str, Tensor] = {}
    for prefix in ("seg_proj", "region_encoder"):
        module = getattr(meta, prefix).to_empty(device="cpu")
        for m in module.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()  # nn.Linear's own init, as at construction
        fresh.update({f"{prefix}.{k}": v for k, v in module.state_dict().items()})
    fresh.update({f"pixel_encoder.{k}": v for k, v in enc.items()})
    fresh.update({f"mask_decoder.{k}": v for k, v in dec.items()})
    return _Fresh({k: v.to(dtype) for k, v in fresh.items()})


def published_to_medplib(src: str | Path, out: str | Path, *, base: MedPLIBConfig | None = None,
                         vision: str | Path | None = None, sam: str | Path | None = None,
                         log: Callable[[str], None] = print) -> Conversion:
    """A published MedPLIB folder (config.json, tokenizer, sharded weights) -> a medplib model folder.

    `base` gives what config.json does not record (vision tower, SAM-Med2D and decoder widths; default: the
    config stored by `medplib_to_published`, else the `paper` preset); `vision` is an HF CLIP folder for
    checkpoints saved without their vision tower (e.g. clip-vit-large-patch14-336).

    A LLaVA-1.5 or (LLaMA-based) LLaVA-Med folder, the published stage I/II starting point, is the same
    layout without the MedPLIB parts: it converts with `sam` (the SAM-Med2D checkpoint), and the `[SEG]`
    projection and region encoder start fresh."""
    src, out = Path(src), Path(out)
    try:
        pub = json.loads((src / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {src / 'config.json'}: {exc}") from None
    if base is None:
        base = MedPLIBConfig.from_dict(pub["medplib"]) if "medplib" in pub else preset("paper")
    cfg = _config_from_published(pub, base)
    readers = [(CheckpointReader(src), "")]
    # The tokenizer is staged aside: a checkpoint that fails the checks below leaves no partial folder.
    with tempfile.TemporaryDirectory(prefix="medplib-tokenizer-") as tmp:
        staged = Path(tmp)
        vocab = _copy_tokenizer(src, staged, PUBLISHED_SEG, SEG)
        expected = _meta_shapes(cfg, vocab)
        entries_src = readers[0][0].entries()
        llava = pub.get("model_type") in _LLAVA_TYPES and not any(
            k.startswith(_MEDPLIB_ONLY) for k, _, _ in entries_src)
        if llava:
            dtype = next((dt for k, dt, _ in entries_src if k == "model.embed_tokens.weight"), torch.float32)
            readers.append((_llava_missing_parts(cfg, vocab, sam, dtype), "fresh"))
        elif sam is not None:
            raise CheckpointError(f"{src} has its own SAM part; --sam is for LLaVA folders")
        if vision is not None:
            if any(k.startswith("model.vision_tower.") for k, _, _ in entries_src):
                raise CheckpointError(f"{src} has its own vision tower; --vision would replace it")
            readers.append((CheckpointReader(vision), "vision"))
        inv_freq = _inv_freq(cfg.llm.hf)
        left_out: dict[str, int] = {}

        def mapped(key: str, t: Tensor, origin: str) -> tuple[str | None, Tensor | str]:
            """(medplib name, tensor) or (None, why it is left out); (None, "") = unknown key."""
            if origin == "fresh":
                return key, t
            if origin == "vision":
                if _CLIP_TEXT.match(key):
                    return None, "CLIP text half (--vision folder)"
                return "vision.model." + key.removeprefix("vision_model."), t
            why = _published_only(key)
            if why is not None:
                if why.startswith("rotary") and t.device.type != "meta" and not torch.allclose(
                        t.float(), inv_freq.to(t.dtype).float(), rtol=1e-3):
                    raise CheckpointError(f"{key} does not match rope_theta/head size of config.json")
                return None, why
            name = _rename(key, _TO_MEDPLIB)
            if name is None:
                return None, ""
            m = _IOU_LAYER.fullmatch(name)
            if m and int(m.group(1)) == cfg.decoder.iou_head_depth - 1:
                t = t[:1]  # the single-mask IoU row
            if name in _EMBEDDINGS and t.shape[0] < vocab:
                # Rows for tokens medplib adds (<image>, <box>, </box>): the mean row, as transformers' resizing does.
                t = torch.cat([t, t.float().mean(dim=0, keepdim=True).to(t.dtype).expand(vocab - t.shape[0], -1)])
            return name, t

        entries: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
        unknown: list[str] = []
        for reader, origin in readers:
            for key, dtype, shape in (entries_src if origin == "" else reader.entries()):
                name, t = mapped(key, torch.empty(shape, dtype=dtype, device="meta"), origin)
                if name is None:
                    if t:
                        left_out[t] = left_out.get(t, 0) + 1
                    else:
                        unknown.append(key)
                    continue
                entries.append((name, t.dtype, tuple(t.shape)))
        got = {n: s for n, _, s in entries}
        problems = _problems(expected, got, unknown)
        if problems:
            hint = "" if vision is not None or any(k.startswith("vision.") for k in got) else \
                " (no vision tower in the checkpoint: pass the CLIP folder with --vision)"
            raise CheckpointError(f"{src} does not match a medplib model of its config: {problems}{hint}")

        def stream() -> Iterator[tuple[str, Tensor]]:
            for reader, origin in readers:
                for key, t in reader.tensors():
                    name, value = mapped(key, t, origin)
                    if name is not None:
                        yield name, value

        out.mkdir(parents=True, exist_ok=True)
        write_safetensors(out / "model.safetensors", entries, stream())
        for f in staged.iterdir():
            shutil.move(str(f), out / f.name)
        _save_config(cfg, out)
        log(f"wrote {len(entries)} tensors to {out / 'model.safetensors'}"
            + "".join(f"; left out {n} {why}" for why, n in left_out.items()))
        return Conversion(out, len(entries), left_out)


def medplib_to_published(src: str | Path, out: str | Path, *, sam: str | Path | None = None,
                         max_shard_bytes: int = 10 * 2**30, log: Callable[[str], None] = print) -> Conversion:
    """A medplib model folder -> the published layout (safetensors shards + model.safetensors.index.json,
    config.json, tokenizer with `<SEG>`), loadable by the published code.

    The published layout also holds SAM parts the `[SEG]` path never uses (point/box/mask prompt parts,
    multimask outputs 1-3). They are copied from `sam` (the SAM-Med2D checkpoint the model started from)
    when given, else written as zeros; either way the log says how many."""
    src, out = Path(src), Path(out)
    cfg = MedPLIBConfig.load(src / "config.json")
    if cfg.region.spatial:
        raise CheckpointError("the published layout has no region geometry term: this model has region.spatial=true")
    if cfg.llm.kind != "llama":
        raise CheckpointError(f"the published layout is LLaMA-based; this model's LLM is {cfg.llm.kind}")
    reader = CheckpointReader(src)
    src_entries = reader.entries()
    sam_sd = _sam_parts(sam) if sam is not None else {}
    dtype = next(dt for k, dt, _ in src_entries if k == "llm.model.embed_tokens.weight")
    extras = _published_extras(cfg, {k: s for k, _, s in src_entries}, dtype)
    left_out: dict[str, int] = {}

    def mapped(key: str, t: Tensor) -> tuple[str, Tensor]:
        name = _rename(key, _TO_PUBLISHED)
        if name is None:
            raise CheckpointError(f"{src}: no published name for {key}")
        m = _IOU_LAYER.fullmatch(key)
        if m and int(m.group(1)) == cfg.decoder.iou_head_depth - 1:
            # Rows 1-3 score the multimask outputs: from --sam, else zeros.
            rest = sam_sd[name][1:].to(t.dtype) if name in sam_sd else t.new_zeros((3,) + tuple(t.shape[1:]))
            t = torch.cat([t, rest.to(t.device)])
        return name, t

    names: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
    for key, dt, shape in src_entries:
        name, t = mapped(key, torch.empty(shape, dtype=dt, device="meta"))
        names.append((name, t.dtype, tuple(t.shape)))
    for name, (dt, shape) in extras.items():
        names.append((name, dt, shape))
        why = ("rotary inv_freq buffers, from the config" if _ROTARY.fullmatch(name) else
               f"SAM parts the [SEG] path never uses, {'from --sam' if name in sam_sd else 'as zeros'}")
        left_out[why] = left_out.get(why, 0) + 1
    wrong = [f"{n} {tuple(sam_sd[n].shape)} vs {s}" for n, (_, s) in extras.items()
             if n in sam_sd and tuple(sam_sd[n].shape) != s]
    if wrong:
        raise CheckpointError(f"{sam} does not fit this model's SAM parts: {', '.join(wrong[:_SHOWN])}")
    inv_freq = _inv_freq(cfg.llm.hf)

    def stream() -> Iterator[tuple[str, Tensor]]:
        for key, t in reader.tensors():
            yield mapped(key, t)
        for name, (dt, shape) in extras.items():
            if _ROTARY.fullmatch(name):
                yield name, inv_freq
            else:
                yield name, sam_sd[name].to(dt) if name in sam_sd else torch.zeros(shape, dtype=dt)

    out.mkdir(parents=True, exist_ok=True)
    _write_shards(out, names, stream(), max_shard_bytes)
    n_tokens = _copy_tokenizer(src, out, SEG, PUBLISHED_SEG)
    vocab = next(s[0] for k, _, s in src_entries if k == "llm.model.embed_tokens.weight")
    if n_tokens != vocab:
        raise CheckpointError(f"{src}: the tokenizer has {n_tokens} tokens but the embedding {vocab} rows")
    (out / "config.json").write_text(json.dumps(_published_config(cfg, vocab, dtype), indent=2) + "\n",
                                     encoding="utf-8")
    log(f"wrote {len(names)} tensors to {out}" + "".join(f"; {n} {why}" for why, n in left_out.items()))
    return Conversion(out, len(names), left_out)


def _published_extras(cfg: MedPLIBConfig, shapes: dict[str, tuple[int, ...]],
                      dtype: torch.dtype) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Published tensors medplib does not keep: rotary buffers, SAM's point/box/mask prompt parts and
    hypernetworks 1-3 (name -> (dtype, shape))."""
    hf = cfg.llm.hf
    out: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    half = tuple(_inv_freq(hf).shape)
    for i in range(int(hf["num_hidden_layers"])):
        out[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = (torch.float32, half)
    c, m = cfg.decoder.transformer_dim, _MASK_IN_CHANS
    pe = "model.visual_model.prompt_encoder."
    for k in range(4):
        out[f"{pe}point_embeddings.{k}.weight"] = (dtype, (1, c))
    out[f"{pe}not_a_point_embed.weight"] = (dtype, (1, c))
    for idx, w, b in ((0, (m // 4, 1, 2, 2), (m // 4,)), (1, (m // 4,), (m // 4,)), (3, (m, m // 4, 2, 2), (m,)),
                      (4, (m,), (m,)), (6, (c, m, 1, 1), (c,))):
        out[f"{pe}mask_downscaling.{idx}.weight"] = (dtype, w)
        out[f"{pe}mask_downscaling.{idx}.bias"] = (dtype, b)
    first = "mask_decoder.output_hypernetworks_mlps.0."
    for k in range(1, 4):
        for key, shape in shapes.items():
            if key.startswith(first):
                out[f"model.visual_model.mask_decoder.output_hypernetworks_mlps.{k}." + key.removeprefix(first)] = \
                    (dtype, shape)
    return out


def _sam_parts(path: str | Path) -> dict[str, Tensor]:
    """A SAM-Med2D checkpoint's prompt-encoder and mask-decoder tensors under their published names."""
    sd = read_state_dict(path)
    if "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]
    return {"model.visual_model." + k: v for k, v in sd.items()
            if isinstance(v, Tensor) and k.startswith(("prompt_encoder.", "mask_decoder."))}


def _write_shards(out: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                  tensors: Iterator[tuple[str, Tensor]], max_bytes: int) -> None:
    """HF-style safetensors shards (`model-0000k-of-0000n.safetensors`) and `model.safetensors.index.json`."""
    def nbytes(e: tuple[str, torch.dtype, tuple[int, ...]]) -> int:
        return torch.Size(e[2]).numel() * torch.empty((), dtype=e[1]).element_size()

    shards: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + nbytes(e) > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += nbytes(e)
    weight_map = {}
    for k, shard in enumerate(shards, 1):
        name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(out / name, shard, itertools.islice(tensors, len(shard)))
        weight_map.update({e[0]: name for e in shard})
    index = {"metadata": {"total_size": sum(nbytes(e) for e in entries)}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
