"""Recipes: every shipped YAML parses with the published values; overrides and their errors;
trainable groups; LoRA injection keeps outputs and merging is exact; the stream sampler."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medplib.api import MedPLIB
from medplib.training.data import Stream, StreamSampler
from medplib.training.pipeline import STAGES, default_recipes_dir
from medplib.training.recipe import LossSection, RecipeError, load_recipe
from medplib.training.trainable import add_lora, merge_lora, set_trainable

RECIPES = default_recipes_dir()


def test_every_shipped_recipe_parses() -> None:
    names = sorted(p.stem for p in RECIPES.glob("*.yaml"))
    assert set(STAGES) | {"pefomed_lora", "box_grounding"} <= set(names)
    for name in names:
        assert load_recipe(RECIPES / f"{name}.yaml").name == name


def test_published_stage_values() -> None:
    r = {s: load_recipe(RECIPES / f"{s}.yaml") for s in STAGES}
    assert r["stage1_alignment"].trainable == ["projector"] and r["stage1_alignment"].lora.r == 0
    s2, s3, s4 = r["stage2_vl_expert"], r["stage3_pg_expert"], r["stage4_moe"]
    assert (s2.lora.r, s2.lora.alpha, s2.optim.lr) == (16, 16, 1e-4)
    assert set(s2.lora.targets) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert (s3.lora.r, s3.lora.alpha, s3.optim.lr) == (8, 16, 3e-4)
    assert s3.loss == LossSection(ce=1.0, dice=5.0, bce=1.0, focal=1.0, iou=0.0)
    assert set(s4.lora.targets) == {"gate_proj", "up_proj", "down_proj", "q_proj", "v_proj"}
    assert s4.loss == LossSection(ce=1.0, dice=0.5, bce=2.0) and s4.loss.balance == 0.0  # published: no aux loss
    assert s4.upcycle.top_k == 1 and len(s4.upcycle.experts) == 2 and s4.upcycle.capacity_factor_train == 1.5
    assert all(x.train.global_batch == 128 and x.optim.betas == [0.9, 0.95] for x in r.values())
    pef = load_recipe(RECIPES / "pefomed_lora.yaml")
    assert (pef.lora.r, pef.lora.alpha, pef.lora.dropout, pef.lora.targets) == (64, 16, 0.05, ["q_proj", "v_proj"])
    assert pef.trainable == ["lora", "projector"]


def test_overrides_and_their_errors() -> None:
    path = RECIPES / "stage2_vl_expert.yaml"
    r = load_recipe(path, ["train.steps=7", "lora.targets=[q_proj,v_proj]", "optim.lr=2e-4",
                           "model.overrides.moe.top_k=2", "model.preset=tiny", "model.path=null", "loss.dice=0"])
    assert (r.train.steps, r.lora.targets, r.optim.lr, r.model.overrides) == (
        7, ["q_proj", "v_proj"], 2e-4, {"moe.top_k": 2})
    assert r.loss.dice == 0.0
    with pytest.raises(RecipeError, match="unknown recipe key 'train.stepz'"):
        load_recipe(path, ["train.stepz=3"])
    with pytest.raises(RecipeError, match="unknown recipe key 'colour'"):
        load_recipe(path, ["colour=red"])
    with pytest.raises(RecipeError, match="expected an integer"):
        load_recipe(path, ["train.steps=ten"])
    with pytest.raises(RecipeError, match="bad override"):
        load_recipe(path, ["train.steps"])
    with pytest.raises(RecipeError, match="choose from"):
        load_recipe(path, ["train.mixed_precision=fp8"])
    with pytest.raises(RecipeError, match="exactly one of"):
        load_recipe(path, ["model.preset=tiny"])
    with pytest.raises(RecipeError, match="unknown recipe key 'loss.dise'"):
        load_recipe(path, ["loss.dise=1"])
    with pytest.raises(RecipeError, match="cannot read recipe"):
        load_recipe(RECIPES / "nope.yaml")
    stage4 = RECIPES / "stage4_moe.yaml"
    assert load_recipe(stage4, ["upcycle.prefix_expert=1"]).upcycle.prefix_expert == 1
    with pytest.raises(RecipeError, match=r"prefix_expert=2: expected -1 \(unsupervised\) or an expert index 0..1"):
        load_recipe(stage4, ["upcycle.prefix_expert=2"])


def test_trainable_groups_and_lora_merge_is_exact() -> None:
    m = MedPLIB.from_preset("tiny", seed=0)
    ids = torch.randint(5, 200, (2, 12))
    with torch.no_grad():
        before = m.model.llm(input_ids=ids).logits
    add_lora(m.model, 4, 8, 0.0, ["q_proj", "v_proj", "gate_proj"])
    with torch.no_grad():
        assert torch.equal(m.model.llm(input_ids=ids).logits, before)  # B starts at zero
    n = set_trainable(m.model, ["lora", "projector"])
    train = {k for k, p in m.model.named_parameters() if p.requires_grad}
    assert train and all(".lora_" in k or k.startswith("projector.") for k in train)
    assert n == sum(p.numel() for p in m.model.parameters() if p.requires_grad)
    for k, p in m.model.named_parameters():
        if ".lora_B." in k:
            torch.nn.init.normal_(p, std=0.05)  # as if trained
    m.model.eval()
    with torch.no_grad():
        adapted = m.model.llm(input_ids=ids).logits
        assert not torch.allclose(adapted, before)
        assert merge_lora(m.model) == 3 * m.model.llm.config.num_hidden_layers
        merged = m.model.llm(input_ids=ids).logits
    assert not any(".lora_" in k or "base_layer" in k for k in m.model.state_dict())
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)
    with pytest.raises(RecipeError, match="unknown trainable group"):
        set_trainable(m.model, ["projectr"])
    with pytest.raises(RecipeError, match="name no module"):
        add_lora(m.model, 4, 8, 0.0, ["qkv"])


def test_stream_sampler_shards_the_global_batch_and_resumes() -> None:
    kw = dict(global_batch=8, micro_batch=2, total_steps=5)
    one = list(StreamSampler(rank=0, world=1, start_step=0, **kw))  # type: ignore[arg-type]
    r0 = list(StreamSampler(rank=0, world=2, start_step=0, **kw))  # type: ignore[arg-type]
    r1 = list(StreamSampler(rank=1, world=2, start_step=0, **kw))  # type: ignore[arg-type]
    for step in range(5):  # each global batch is the same set of positions for 1 or 2 processes
        g = one[step * 8:(step + 1) * 8]
        assert sorted(r0[step * 4:(step + 1) * 4] + r1[step * 4:(step + 1) * 4]) == sorted(g)
    assert list(StreamSampler(rank=0, world=1, start_step=2, **kw)) == one[16:]  # type: ignore[arg-type]
    stream = Stream(10, seed=3)
    idx = [stream.index_at(p) for p in one]
    assert sorted(idx[:10]) == list(range(10)) and idx[:10] != idx[10:20]  # an epoch is a permutation, reshuffled
    with pytest.raises(RecipeError, match="multiple"):
        StreamSampler(global_batch=6, micro_batch=4, rank=0, world=1, start_step=0, total_steps=1)


def test_missing_model_folder_and_data_are_clear_errors(tmp_path: Path) -> None:
    from medplib.training.build import build_model
    from medplib.training.data import build_dataset

    r = load_recipe(RECIPES / "stage2_vl_expert.yaml", [f"model.path={tmp_path / 'none'}", f"data.dir={tmp_path}"])
    with pytest.raises(RecipeError, match="model.path"):
        build_model(r)
    with pytest.raises(RecipeError, match="no file matches"):
        build_dataset(r.data, 0)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # layer 2's inputs need no gradient: expected
def test_pixel_neck_trains_the_fpn_and_leaves_the_cnn_backbone_frozen() -> None:
    m = MedPLIB.from_preset("tiny", seed=0, **{"pixel.kind": "efficientnet", "pixel.patch_size": 8,
                                               "pixel.out_chans": 64, "decoder.transformer_dim": 64})
    set_trainable(m.model, ["pixel_neck"])
    on = {k for k, p in m.model.named_parameters() if p.requires_grad}
    fpn = {k for k, _ in m.model.named_parameters() if k.startswith(("pixel_encoder.lateral.", "pixel_encoder.neck."))}
    assert on == fpn and fpn
    assert not any(p.requires_grad for p in m.model.pixel_encoder.backbone.parameters())


def test_lora_on_the_last_layers_with_the_seg_row_trained_on_the_output_side() -> None:
    """`lora.last_layers` adapts only the top layers, and `seg_token_out` trains the `[SEG]` row through the
    (tied) head alone: the backward pass then never reaches below the adapted layers."""
    m = MedPLIB.from_preset("tiny", seed=0, **{"llm.hf.tie_word_embeddings": True, "llm.hf.num_hidden_layers": 3})
    add_lora(m.model, 4, 8, 0.0, ["gate_proj", "down_proj"], last_layers=1)
    adapted = {k.split(".layers.")[1].split(".")[0] for k, _ in m.model.named_parameters() if ".lora_" in k}
    assert adapted == {"2"}
    n = set_trainable(m.model, ["lora", "seg_token_out"])
    emb = m.model.llm.get_input_embeddings()
    assert emb.weight is m.model.llm.get_output_embeddings().weight
    assert n == sum(p.numel() for k, p in m.model.named_parameters() if ".lora_" in k) + emb.weight.shape[1]
    seg = m.model.ids.seg
    ids = torch.tensor([[5, 17, 40, seg, 9]])
    assert not emb(ids).requires_grad  # the input side is cut: no gradient crosses layers 0-1
    reached: list[int] = []
    m.model.llm.model.layers[1].register_full_backward_hook(lambda *a: reached.append(1))
    m.model.llm.model.layers[2].register_full_backward_hook(lambda *a: reached.append(2))
    logits = m.model.llm(input_ids=ids).logits
    torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).backward()
    assert reached == [2]
    grad = emb.weight.grad
    assert grad[seg].abs().sum() > 0 and grad[torch.arange(len(grad)) != seg].abs().sum() == 0
    with pytest.raises(RecipeError, match="has 3 layers"):
        add_lora(MedPLIB.from_preset("tiny", seed=0, **{"llm.hf.num_hidden_layers": 3}).model, 4, 8, 0.0,
                 ["gate_proj"], last_layers=4)
