"""The model a stage starts from: a preset or an earlier stage's folder, MoE upcycling (stage IV),
LoRA adapters, the stage's loss weights and trainable groups."""

from __future__ import annotations

import dataclasses

import torch

from medplib.api import MedPLIB
from medplib.config import MedPLIBConfig, MoEConfig
from medplib.errors import CheckpointError, ConfigError
from medplib.model.moe import replace_mlps_with_moe
from medplib.training.recipe import Recipe, RecipeError, UpcycleSection
from medplib.training.trainable import add_lora, set_trainable

PIXEL_PARTS = ("pixel_encoder", "mask_decoder", "seg_proj")


def upcycle(base: MedPLIB, experts: list[MedPLIB], spec: UpcycleSection) -> MedPLIB:
    """Turn `base` (dense) into an MoE model in place: expert e of every LLM MLP is a copy of that
    MLP in `experts[e]`; the pixel parts and the `[SEG]` embedding rows come from `experts[0]` (the
    pixel-grounding expert)."""
    if base.config.moe.num_experts:
        raise RecipeError("upcycle.experts is set but the base model is already an MoE model")
    for i, e in enumerate(experts):
        if e.config.moe.num_experts:
            raise RecipeError(f"upcycle.experts[{i}] is an MoE model; experts come from dense models")
        if len(e.tokenizer) != len(base.tokenizer) or e.tokenizer.get_vocab() != base.tokenizer.get_vocab():
            raise RecipeError(f"upcycle.experts[{i}] has a different tokenizer than the base model")
    moe = MoEConfig(num_experts=len(experts), top_k=spec.top_k, capacity_factor_train=spec.capacity_factor_train,
                    capacity_factor_eval=spec.capacity_factor_eval, aux_loss_coef=spec.aux_loss_coef,
                    gate=spec.gate, router_task_coef=spec.router_task_coef)
    replace_mlps_with_moe(base.model.llm, moe, expert_sources=[e.model.llm for e in experts])
    base.config.moe = moe  # the model reads its MoE settings from this (shared) config object
    for part in PIXEL_PARTS:
        getattr(base.model, part).load_state_dict(getattr(experts[0].model, part).state_dict())
    # The [SEG] rows too: the pixel-grounding stage is where the model learns to emit [SEG] (recipe group
    # `seg_token`); the base's other rows stay stage II's.
    seg = base.model.ids.seg
    with torch.no_grad():
        for get in ("get_input_embeddings", "get_output_embeddings"):
            getattr(base.model.llm, get)().weight[seg] = getattr(experts[0].model.llm, get)().weight[seg]
    return base


def build_model(recipe: Recipe) -> MedPLIB:
    """The stage's model, ready to train (seeded by `recipe.train.seed` for reproducible init)."""
    torch.manual_seed(recipe.train.seed)
    spec = recipe.model
    if spec.preset is not None:
        m = MedPLIB.from_preset(spec.preset, seed=recipe.train.seed, **spec.overrides)
    else:
        m = _load(spec.path, "model.path")
    if recipe.upcycle.experts:
        experts = [_load(p, f"upcycle.experts[{i}]") for i, p in enumerate(recipe.upcycle.experts)]
        upcycle(m, experts, recipe.upcycle)
    if recipe.lora.r:
        add_lora(m.model, recipe.lora.r, recipe.lora.alpha, recipe.lora.dropout, recipe.lora.targets)
    m.config.loss = dataclasses.replace(m.config.loss, **recipe.loss)  # the model reads it from this shared config
    if recipe.icl:
        # The in-context prompt this stage trains (and the saved model keeps): model and Processor share this config.
        m.config.icl = dataclasses.replace(m.config.icl, **recipe.icl)
        try:
            MedPLIBConfig.from_dict(m.config.to_dict())  # the config's own checks
        except ConfigError as exc:
            raise RecipeError(f"icl: {exc}") from None
    set_trainable(m.model, [*recipe.trainable, *recipe.unfreeze])
    return m


def _load(path: str | None, key: str) -> MedPLIB:
    try:
        return MedPLIB.from_pretrained(path)  # type: ignore[arg-type]
    except CheckpointError as exc:
        raise RecipeError(f"{key}: {exc}") from None
