"""Which parameters train in a stage (named groups), and LoRA on the LLM: inject, then merge.

Groups, as the published stage table names them:
    projector, vision, pixel_encoder, mask_decoder, seg_proj, region_encoder: those modules
    pixel_neck: the CNN pixel encoder's FPN (lateral convs and neck) alone, its pretrained backbone frozen
    lora: the LoRA A/B matrices injected by `add_lora`
    lm_head, embed_tokens: the LLM's output / input embeddings
    seg_token: only the `[SEG]` rows of those embeddings (the other rows get no gradient)
    seg_token_out: only the `[SEG]` row of the output embedding; with tied embeddings the input lookup is
        detached, so the row learns to be emitted without a gradient crossing the LLM
    box_tokens_out: the same for the `<box>` and `</box>` rows (a pretrained LLM learns to open and close a
        box in text without moving its vocabulary)
    norms: the LLM's RMSNorm / LayerNorm weights
    router: the MoE routers
    tisr: TISR's textual-inversion module (model/tisr.py), on models with `tisr.enabled`
    llm: every LLM parameter (full fine-tuning)
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from medplib.model.medplib import MedPLIBModel
from medplib.training.recipe import RecipeError


def _prefix(name: str) -> Callable[[MedPLIBModel, str], bool]:
    return lambda model, p: p.startswith(name + ".")


def _same_tensor(get: Callable[[MedPLIBModel], nn.Module]) -> Callable[[MedPLIBModel, str], bool]:
    def match(model: MedPLIBModel, p: str) -> bool:
        ids = {id(t) for t in get(model).parameters()}
        return id(model.get_parameter(p)) in ids
    return match


GROUPS: dict[str, Callable[[MedPLIBModel, str], bool]] = {
    "projector": _prefix("projector"),
    "vision": _prefix("vision"),
    "pixel_encoder": _prefix("pixel_encoder"),
    "pixel_neck": lambda model, p: p.startswith(("pixel_encoder.lateral.", "pixel_encoder.neck.")),
    "mask_decoder": _prefix("mask_decoder"),
    "seg_proj": _prefix("seg_proj"),
    "region_encoder": _prefix("region_encoder"),
    "lora": lambda model, p: ".lora_" in p,
    "lm_head": _same_tensor(lambda m: m.llm.get_output_embeddings()),
    "embed_tokens": _same_tensor(lambda m: m.llm.get_input_embeddings()),
    "seg_token": lambda model, p: GROUPS["lm_head"](model, p) or GROUPS["embed_tokens"](model, p),
    "seg_token_out": lambda model, p: GROUPS["lm_head"](model, p),
    "box_tokens_out": lambda model, p: GROUPS["lm_head"](model, p),
    "norms": lambda model, p: p.startswith("llm.") and "norm" in p.rsplit(".", 2)[-2],
    "router": lambda model, p: ".router." in p,
    "tisr": _prefix("tisr"),
    "llm": _prefix("llm"),
}


def set_trainable(model: MedPLIBModel, groups: Sequence[str]) -> int:
    """Freeze everything, then unfreeze the named groups; returns the number of trainable values."""
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise RecipeError(f"unknown trainable group {unknown[0]!r} (known: {', '.join(GROUPS)})")
    model.requires_grad_(False)
    n = 0
    for name, p in model.named_parameters():
        if any(GROUPS[g](model, name) for g in groups):
            p.requires_grad_(True)
            n += p.numel()
    if n == 0:
        raise RecipeError(f"the trainable groups {list(groups)} select no parameter of this model")
    whole = {"lm_head", "embed_tokens", "llm"} & set(groups)
    rows = ([model.ids.seg] if {"seg_token", "seg_token_out"} & set(groups) else []) + (
        list(model.ids.box) if "box_tokens_out" in groups else [])
    if "box_tokens_out" in groups and not model.ids.box:
        raise RecipeError("trainable group 'box_tokens_out': this model's vocabulary has no <box> / </box> tokens")
    if rows and not whole:
        _train_rows_only(model, rows)
        n -= sum(p.numel() - len(rows) * p.shape[1] for p in _embedding_weights(model) if p.requires_grad)
    if {"seg_token_out", "box_tokens_out"} & set(groups) and not (whole or "seg_token" in groups):
        # A forward hook, not a model setting: it lives on this training instance only and changes no value.
        model.llm.get_input_embeddings().register_forward_hook(lambda module, args, out: out.detach())
    return n


def _embedding_weights(model: MedPLIBModel) -> list[nn.Parameter]:
    weights = [model.llm.get_input_embeddings().weight, model.llm.get_output_embeddings().weight]
    return list({id(w): w for w in weights}.values())  # one tensor when tied


def _train_rows_only(model: MedPLIBModel, rows: Sequence[int]) -> None:
    """Zero the gradient of every embedding row but `rows`: tokens the model must learn to emit (stage III's
    `[SEG]`, a box's delimiters) train without moving the pretrained vocabulary. With zero gradients, AdamW
    (weight decay 0 in the recipes) leaves those rows exactly as they were."""
    for w in (w for w in _embedding_weights(model) if w.requires_grad):
        keep = torch.zeros(w.shape[0], 1, dtype=w.dtype, device=w.device)
        keep[list(rows)] = 1
        w.register_hook(lambda grad, keep=keep: grad * keep)


def add_lora(model: MedPLIBModel, r: int, alpha: int, dropout: float, targets: Sequence[str],
             last_layers: int = 0) -> None:
    """Inject LoRA adapters into the LLM's `targets` modules, in place (names stay the same plus
    `.base_layer` / `.lora_A` / `.lora_B`), in every decoder layer or the `last_layers` top ones.
    B starts at zero, so the model's outputs do not change."""
    names = {n.rsplit(".", 1)[-1] for n, _ in model.llm.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        raise RecipeError(f"lora.targets {missing} name no module of the LLM")
    depth = model.llm.config.num_hidden_layers
    if not 0 <= last_layers <= depth:
        raise RecipeError(f"lora.last_layers={last_layers}: the LLM has {depth} layers")
    layers = list(range(depth - last_layers, depth)) if last_layers else None
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none",
                     layers_to_transform=layers, layers_pattern="layers" if layers else None)
    inject_adapter_in_model(cfg, model.llm)


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA adapter into its base weight and put the plain base layer back (between
    stages, as published). Returns the number of merged layers."""
    merged = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
            merged += 1
    return merged
