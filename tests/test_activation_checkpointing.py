"""Activation checkpointing must not change what an MoE model learns: the backward pass recomputes
each LLM layer, and the recompute must route the same tokens as the forward (padding excluded,
the same capacity, the same route targets)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import KVASIR_ANSWER, KVASIR_QUESTION, kvasir_images

from medplib.api import MedPLIB
from medplib.data.schema import Turn
from medplib.training.data import route_targets, token_groups
from medplib.training.recipe import LossSection


def _stage4_grads(images: list, checkpointing: bool) -> dict[str, torch.Tensor]:
    # Capacity factor 1.0: with 2 experts each takes at most half the real tokens, so a recompute that
    # counted padding as tokens (or saw no route targets) would route differently.
    m = MedPLIB.from_preset("tiny", seed=0, **{"moe.num_experts": 2, "moe.capacity_factor_train": 1.0})
    m.model.train()
    if checkpointing:
        m.model.enable_activation_checkpointing()
    (_, img0, mask0), (_, img1, _) = images
    ground = m.processor.encode(img0, [Turn(role="user", content=KVASIR_QUESTION),
                                       Turn(role="assistant", content=KVASIR_ANSWER)], target_masks=[mask0])
    vqa = m.processor.encode(img1, [Turn(role="user", content="What kind of image is this, and which organ?"),
                                    Turn(role="assistant", content="An endoscopy of the colon with a polyp.")])
    batch = m.collate([ground, vqa])
    assert not batch["attention_mask"].all()  # the shorter sample is padded
    groups = token_groups(batch)
    out = m.model(**batch, token_groups=groups, route_targets=route_targets(batch, groups, m.model.ids.image))
    LossSection(balance=0.1, z=0.01, route=0.5).combine(out.parts).backward()
    return {n: p.grad.clone() for n, p in m.model.named_parameters() if p.grad is not None}


def test_stage4_gradients_are_the_same_with_activation_checkpointing(shared_data: Path) -> None:
    images = kvasir_images(shared_data, 2)
    plain = _stage4_grads(images, checkpointing=False)
    checkpointed = _stage4_grads(images, checkpointing=True)
    assert plain.keys() == checkpointed.keys()
    assert any("router" in n for n in plain)  # the routing losses reached the routers
    for name, g in plain.items():
        torch.testing.assert_close(checkpointed[name], g, rtol=1e-4, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_routing_inputs_are_gone_after_a_forward_that_raised() -> None:
    m = MedPLIB.from_preset("tiny", seed=0, **{"moe.num_experts": 2})
    from medplib.model.moe import NO_INPUTS, RoutingInputs, moe_layers, routing

    with pytest.raises(RuntimeError, match="boom"):
        with routing(m.model.llm, RoutingInputs(token_mask=torch.ones(1, 3, dtype=torch.bool))):
            raise RuntimeError("boom")
    assert all(layer.inputs is NO_INPUTS for layer in moe_layers(m.model.llm))
