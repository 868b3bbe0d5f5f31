"""The model a stage starts from: a preset or an earlier stage's folder, MoE upcycling (stage IV),
the stage's in-context prompt settings, LoRA adapters and trainable groups. The stage's loss
weights stay in the recipe (the runner applies them): a model's config describes the model only."""

from __future__ import annotations

import dataclasses

import torch

from medplib.api import MedPLIB
from medplib.config import MedPLIBConfig
from medplib.errors import CheckpointError, ConfigError
from medplib.model.moe import replace_mlps_with_moe
from medplib.training.recipe import Recipe, RecipeError, UpcycleSection
from medplib.training.trainable import add_lora, set_trainable

PIXEL_PARTS = ("pixel_encoder", "mask_decoder", "seg_proj")


def _with_config(m: MedPLIB, cfg: MedPLIBConfig) -> MedPLIB:
    """`m`'s network and tokenizer under a new config (the network reads its config too)."""
    m.model.cfg = cfg
    return MedPLIB(cfg, m.tokenizer, m.model)


def upcycle(base: MedPLIB, experts: list[MedPLIB], spec: UpcycleSection) -> MedPLIB:
    """`base` (dense) as an MoE model: expert e of every LLM MLP is a copy of that MLP in `experts[e]`;
    the pixel parts and the `[SEG]` embedding rows come from `experts[0]` (the pixel-grounding
    expert). `base`'s network is changed in place; the returned model carries the MoE config."""
    if base.config.moe.num_experts:
        raise RecipeError("upcycle.experts is set but the base model is already an MoE model")
    for i, e in enumerate(experts):
        if e.config.moe.num_experts:
            raise RecipeError(f"upcycle.experts[{i}] is an MoE model; experts come from dense models")
        if len(e.tokenizer) != len(base.tokenizer) or e.tokenizer.get_vocab() != base.tokenizer.get_vocab():
            raise RecipeError(f"upcycle.experts[{i}] has a different tokenizer than the base model")
    # the models given, whatever spec.experts names
    moe = dataclasses.replace(spec.moe_config(), num_experts=len(experts))
    replace_mlps_with_moe(base.model.llm, moe, expert_sources=[e.model.llm for e in experts])
    for part in PIXEL_PARTS:
        getattr(base.model, part).load_state_dict(getattr(experts[0].model, part).state_dict())
    # The [SEG] rows too: the pixel-grounding stage is where the model learns to emit [SEG] (recipe group
    # `seg_token`); the base's other rows stay stage II's.
    seg = base.model.ids.seg
    with torch.no_grad():
        for get in ("get_input_embeddings", "get_output_embeddings"):
            getattr(base.model.llm, get)().weight[seg] = getattr(experts[0].model.llm, get)().weight[seg]
    return _with_config(base, dataclasses.replace(base.config, moe=moe))


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
        m = upcycle(m, experts, recipe.upcycle)
    if recipe.icl:
        # The in-context prompt this stage trains, a model setting (the saved model keeps it).
        try:
            cfg = MedPLIBConfig.from_dict({**m.config.to_dict(), "icl": {**m.config.to_dict()["icl"], **recipe.icl}})
        except ConfigError as exc:
            raise RecipeError(f"icl: {exc}") from None
        m = _with_config(m, cfg)
    if recipe.lora.r:
        add_lora(m.model, recipe.lora.r, recipe.lora.alpha, recipe.lora.dropout, recipe.lora.targets,
                 last_layers=recipe.lora.last_layers)
    set_trainable(m.model, [*recipe.trainable, *recipe.unfreeze])
    return m


def _load(path: str | None, key: str) -> MedPLIB:
    try:
        return MedPLIB.from_pretrained(path)  # type: ignore[arg-type]
    except CheckpointError as exc:
        raise RecipeError(f"{key}: {exc}") from None
