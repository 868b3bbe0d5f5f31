"""`medplib convert` on checkpoints written with exactly the published MedPLIB key names, sharding and index
formats (transformers 4.31 `.bin` shards, safetensors shards), at reduced widths.

The fixture is assembled from independent parts, not from medplib's converter: the LLM from two transformers
`LlamaForCausalLM` models (expert 0 and everything outside the MLPs from A, expert 1 from B), the vision tower
a transformers `CLIPVisionModel`, the SAM-Med2D part a SAM-layout dict that medplib's SAM loader reads. The
converted model is checked against those references numerically."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from medplib.api import MedPLIB
from medplib.config import MedPLIBConfig, preset
from medplib.errors import CheckpointError
from medplib.model.convert import medplib_to_published, published_to_medplib
from medplib.model.mask_decoder import MaskDecoder
from medplib.model.moe import force_expert, moe_layers
from medplib.model.pixel_encoder import PixelEncoder
from medplib.model.sam_checkpoint import load_sam_checkpoint
from medplib.tokenizer import IMAGE, SEG, load_tokenizer

H, DV, C, LAYERS = 64, 32, 32, 2
# Added to the LLaMA tokenizer by the published code, in this order.
PUBLISHED_TOKENS = (["<SEG>", "<ref>", "</ref>", "<region>", "</region>", "<sr>", "</sr>", "<mask>", "</mask>"]
                    + [f"<gen_{i}>" for i in range(1, 257)] + ["<im_start>", "<im_end>"])
CLIP = dict(hidden_size=DV, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=56,
            patch_size=14, projection_dim=DV, hidden_act="quick_gelu")
LLAMA = dict(hidden_size=H, intermediate_size=96, num_hidden_layers=LAYERS, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=640, rms_norm_eps=1e-5)


def reduced_paper() -> MedPLIBConfig:
    """The `paper` preset (CLIP, LLaMA, SAM-Med2D with adapters, 2-expert top-1 MoE) at reduced widths."""
    return preset("paper", **{
        "vision.hf": CLIP, "llm.hf": LLAMA, "pixel.image_size": 64, "pixel.embed_dim": 32, "pixel.depth": 2,
        "pixel.num_heads": 2, "pixel.window_size": 2, "pixel.global_attn_indexes": (1,), "pixel.out_chans": C,
        "decoder.transformer_dim": C, "decoder.num_heads": 2, "decoder.mlp_dim": 64,
        "decoder.iou_head_hidden_dim": 32, "region.max_points": 64, "max_new_tokens": 4,
    })


def llama_tokenizer(folder: Path, added: list[str] = PUBLISHED_TOKENS) -> int:
    """A small LLaMA-style tokenizer plus the published added tokens; returns its length."""
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace()
    words = "the polyp liver lesion segment please sure it is a yes no left right what modality image".split()
    bpe.train_from_iterator([" ".join(words)] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok.add_tokens(added, special_tokens=True)
    tok.save_pretrained(str(folder))
    return len(tok)


def sam_med2d_dict(cfg: MedPLIBConfig, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A SAM-Med2D checkpoint dict (image_encoder with adapters, full prompt encoder, 4-output mask decoder)."""
    enc, dec = PixelEncoder(cfg.pixel), MaskDecoder(cfg.decoder)
    def rnd(*s: int) -> torch.Tensor:
        return torch.randn(*s, generator=gen) * 0.1

    sd = {f"image_encoder.{k}": rnd(*v.shape) for k, v in enc.state_dict().items()}
    for k, v in dec.state_dict().items():
        if k.startswith(("pe_layer.", "no_mask_embed.")):
            sd[f"prompt_encoder.{k}"] = rnd(*v.shape)
        elif k.startswith("output_hypernetworks_mlps.0."):
            for j in range(4):
                sd[f"mask_decoder.output_hypernetworks_mlps.{j}." + k.split(".", 2)[2]] = rnd(*v.shape)
        elif k.startswith(f"iou_prediction_head.layers.{cfg.decoder.iou_head_depth - 1}."):
            sd[f"mask_decoder.{k}"] = rnd(4, *v.shape[1:])
        else:
            sd[f"mask_decoder.{k}"] = rnd(*v.shape)
    for j in range(4):
        sd[f"prompt_encoder.point_embeddings.{j}.weight"] = rnd(1, C)
    sd["prompt_encoder.not_a_point_embed.weight"] = rnd(1, C)
    for i, (w, b) in {0: ((4, 1, 2, 2), (4,)), 1: ((4,), (4,)), 3: ((16, 4, 2, 2), (16,)), 4: ((16,), (16,)),
                      6: ((C, 16, 1, 1), (C,))}.items():
        sd[f"prompt_encoder.mask_downscaling.{i}.weight"] = rnd(*w)
        sd[f"prompt_encoder.mask_downscaling.{i}.bias"] = rnd(*b)
    return sd


def published_dict(vocab: int, cfg: MedPLIBConfig, with_vision: bool) -> tuple[dict[str, torch.Tensor], dict]:
    """The published state dict and its reference parts. Expert 0 (stage III) is model A's MLP, expert 1
    (stage II) model B's; attention, norms, embeddings and lm_head are A's."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    llama_cfg = LlamaConfig(**LLAMA, vocab_size=vocab, tie_word_embeddings=False)
    a, b = LlamaForCausalLM(llama_cfg).eval(), LlamaForCausalLM(llama_cfg).eval()
    clip = CLIPVisionModel(CLIPVisionConfig(**CLIP)).eval()
    sd: dict[str, torch.Tensor] = {}
    for k, v in a.state_dict().items():
        m = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.(.+)", k)
        if m is None:
            sd[k] = v.clone()
            continue
        moe = f"model.layers.{m.group(1)}.mlp.deepspeed_moe."
        sd[moe + f"experts.deepspeed_experts.0.{m.group(2)}"] = v.clone()
        sd[moe + f"experts.deepspeed_experts.1.{m.group(2)}"] = b.state_dict()[k].clone()
    dim = H // LLAMA["num_attention_heads"]
    for i in range(LAYERS):
        sd[f"model.layers.{i}.mlp.deepspeed_moe.gate.wg.weight"] = torch.randn(2, H, generator=gen)
        sd[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    if with_vision:
        tower = "model.vision_tower.vision_tower.vision_model."
        sd.update({tower + k: v.clone() for k, v in clip.state_dict().items()})

    def rnd(*s: int) -> torch.Tensor:
        return torch.randn(*s, generator=gen) * 0.1

    parts = {"mm_projector.0.weight": rnd(H, DV), "mm_projector.0.bias": rnd(H), "mm_projector.2.weight": rnd(H, H),
             "mm_projector.2.bias": rnd(H), "region_fea_adapter.weight": rnd(H, DV), "region_fea_adapter.bias": rnd(H),
             "text_hidden_fcs.0.0.weight": rnd(H, H), "text_hidden_fcs.0.0.bias": rnd(H),
             "text_hidden_fcs.0.2.weight": rnd(C, H), "text_hidden_fcs.0.2.bias": rnd(C)}
    sd.update({f"model.{k}": v for k, v in parts.items()})
    sam = sam_med2d_dict(cfg, gen)
    sd.update({f"model.visual_model.{k}": v for k, v in sam.items()})
    return sd, {"a": a, "b": b, "clip": clip, "sam": sam, **parts}


def published_config(vocab: int) -> dict:
    return {"architectures": ["MedPLIBForCausalLM"], "model_type": "medplib_moe_llama", **LLAMA, "vocab_size": vocab,
            "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "float32", "pad_token_id": 0,
            "mm_hidden_size": DV, "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
            "mm_vision_tower": "clip-vit-large-patch14-336", "mm_use_im_start_end": True,
            "image_aspect_ratio": "square",
            "out_dim": C, "max_sample_point": 64, "train_mask_decoder": True,
            "moe": {"num_experts": [2] * LAYERS, "top_k_experts": 1, "capacity_factor": 1.5,
                    "eval_capacity_factor": 2.0,
                    "use_residual": False, "router_aux_loss_coef": 0.0, "moe_layers_idx": list(range(LAYERS)),
                    "min_capacity": 0, "ep_size": 1}}


def write_published(folder: Path, sd: dict[str, torch.Tensor], vocab: int, fmt: str, n_shards: int = 3,
                    config: dict | None = None, tokens: list[str] = PUBLISHED_TOKENS) -> None:
    """HF `save_pretrained` files: `pytorch_model-0000k-of-0000n.bin` + `pytorch_model.bin.index.json`
    (transformers 4.31's default) or `model-0000k-of-0000n.safetensors` + `model.safetensors.index.json`."""
    folder.mkdir(parents=True, exist_ok=True)
    llama_tokenizer(folder, tokens)
    (folder / "config.json").write_text(json.dumps(config or published_config(vocab)))
    keys = list(sd)
    chunks = [keys[i::n_shards] for i in range(n_shards)]
    weight_map = {}
    for j, chunk in enumerate(chunks, 1):
        if fmt == "bin":
            name = f"pytorch_model-{j:05d}-of-{n_shards:05d}.bin"
            torch.save({k: sd[k] for k in chunk}, folder / name)
        else:
            name = f"model-{j:05d}-of-{n_shards:05d}.safetensors"
            save_file({k: sd[k].contiguous() for k in chunk}, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in chunk})
    index = "pytorch_model.bin.index.json" if fmt == "bin" else "model.safetensors.index.json"
    total = sum(v.numel() * v.element_size() for v in sd.values())
    (folder / index).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))


@pytest.fixture(scope="module")
def fixture(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("convert")
    vocab = llama_tokenizer(root / "tok")
    cfg = reduced_paper()
    sd, ref = published_dict(vocab, cfg, with_vision=True)
    write_published(root / "published_bin", sd, vocab, "bin")
    (root / "base.json").write_text(json.dumps(cfg.to_dict()))
    conv = published_to_medplib(root / "published_bin", root / "ours", base=cfg, log=lambda s: None)
    return {"root": root, "vocab": vocab, "cfg": cfg, "sd": sd, "ref": ref, "conv": conv}


def test_every_published_key_is_mapped_or_named(fixture: dict) -> None:
    conv, sd = fixture["conv"], fixture["sd"]
    assert conv.left_out == {"rotary inv_freq buffers (checked against the config)": LAYERS,
                             "SAM point/box/mask prompt parts (the [SEG] path uses none)": 4 + 1 + 10,
                             "SAM multimask outputs 1-3 (MedPLIB decodes the single mask)": 3 * 6}
    assert conv.written + sum(conv.left_out.values()) == len(sd)
    m = MedPLIB.from_pretrained(fixture["root"] / "ours")
    assert m.config.moe.num_experts == 2 and len(moe_layers(m.model.llm)) == LAYERS
    # <SEG> became [SEG] at the same id; medplib's own tokens come after the published vocabulary.
    published_tok = PreTrainedTokenizerFast.from_pretrained(str(fixture["root"] / "published_bin"))
    assert m.tokenizer.convert_tokens_to_ids(SEG) == published_tok.convert_tokens_to_ids("<SEG>")
    assert m.tokenizer.convert_tokens_to_ids(IMAGE) >= fixture["vocab"]
    assert "<SEG>" not in m.tokenizer.get_vocab()


def test_llm_equals_llama_for_causal_lm_with_the_router_forced(fixture: dict) -> None:
    m, ref, vocab = MedPLIB.from_pretrained(fixture["root"] / "ours"), fixture["ref"], fixture["vocab"]
    ids = torch.randint(3, vocab, (2, 12), generator=torch.Generator().manual_seed(1))
    mixed = LlamaForCausalLM(ref["a"].config).eval()  # A's attention with B's MLPs: what expert 1 sees
    mixed.load_state_dict({k: (ref["b"] if ".mlp." in k else ref["a"]).state_dict()[k] for k in ref["a"].state_dict()})
    with torch.no_grad():
        for expert, dense in ((0, ref["a"]), (1, mixed)):
            with force_expert(m.model.llm, expert):
                ours = m.model.llm(input_ids=ids).logits[..., :vocab]
            torch.testing.assert_close(ours, dense(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    for i, layer in enumerate(moe_layers(m.model.llm)):
        assert torch.equal(layer.router.weight, fixture["sd"][f"model.layers.{i}.mlp.deepspeed_moe.gate.wg.weight"])


def test_vision_projector_region_and_seg_parts_equal_their_references(fixture: dict) -> None:
    m, ref = MedPLIB.from_pretrained(fixture["root"] / "ours"), fixture["ref"]
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(2))
    x = torch.randn(5, DV, generator=torch.Generator().manual_seed(3))
    h = torch.randn(5, H, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        clip = ref["clip"](pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        torch.testing.assert_close(m.model.vision(pixels), clip)
        proj = F.linear(F.gelu(F.linear(x, ref["mm_projector.0.weight"], ref["mm_projector.0.bias"])),
                        ref["mm_projector.2.weight"], ref["mm_projector.2.bias"])
        torch.testing.assert_close(m.model.projector(x), proj)
        seg = F.linear(F.relu(F.linear(h, ref["text_hidden_fcs.0.0.weight"], ref["text_hidden_fcs.0.0.bias"])),
                       ref["text_hidden_fcs.0.2.weight"], ref["text_hidden_fcs.0.2.bias"])
        torch.testing.assert_close(m.model.seg_proj(h), seg)
        torch.testing.assert_close(m.model.region_encoder.proj(x), F.linear(x, ref["region_fea_adapter.weight"],
                                                                              ref["region_fea_adapter.bias"]))


def test_sam_part_equals_the_sam_med2d_loader(fixture: dict, tmp_path: Path) -> None:
    m, cfg = MedPLIB.from_pretrained(fixture["root"] / "ours"), fixture["cfg"]
    torch.save({"model": fixture["ref"]["sam"]}, tmp_path / "sam-med2d_b.pth")  # SAM-Med2D nests under "model"
    enc, dec = PixelEncoder(cfg.pixel).eval(), MaskDecoder(cfg.decoder).eval()
    load_sam_checkpoint(tmp_path / "sam-med2d_b.pth", enc, dec)
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    prompt = torch.randn(1, 1, C, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        emb = enc(pixels)
        torch.testing.assert_close(m.model.pixel_encoder(pixels), emb)
        for got, want in zip(m.model.mask_decoder(emb, prompt), dec(emb, prompt)):
            torch.testing.assert_close(got, want)


def test_converted_model_answers_a_real_image(fixture: dict, shared_data: Path) -> None:
    m = MedPLIB.from_pretrained(fixture["root"] / "ours")
    image = np.asarray(Image.open(sorted((shared_data / "kvasir_seg" / "images").glob("*.jpg"))[0]).convert("RGB"))
    cached = m.generate(image, "Please segment the polyp.", max_new_tokens=4)
    uncached = m.generate(image, "Please segment the polyp.", max_new_tokens=4, use_cache=False)
    assert cached.token_ids == uncached.token_ids
    assert all(0 <= t < len(m.tokenizer) for t in cached.token_ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_ours_published_ours_is_bit_identical(fixture: dict, tmp_path: Path, dtype: torch.dtype) -> None:
    tok = load_tokenizer(fixture["root"] / "ours")  # the converted LLaMA-style tokenizer: [SEG] at <SEG>'s id
    ours = MedPLIB.from_config(fixture["cfg"], tokenizer=tok, seed=7)
    ours.model.to(dtype)
    ours.save_pretrained(tmp_path / "a")
    medplib_to_published(tmp_path / "a", tmp_path / "pub", max_shard_bytes=200_000, log=lambda s: None)
    index = json.loads((tmp_path / "pub" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1, "several shards"
    # Exactly the published key set: the fixture's names (written from the published layout) and no others.
    assert set(index["weight_map"]) == set(fixture["sd"])
    assert (tmp_path / "pub" / "config.json").is_file()
    published_to_medplib(tmp_path / "pub", tmp_path / "b", log=lambda s: None)  # base config rides in config.json
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype == dtype and torch.equal(a[k], b[k]), k
    assert load_tokenizer(tmp_path / "b").get_vocab() == ours.tokenizer.get_vocab()
    assert MedPLIBConfig.load(tmp_path / "b" / "config.json").moe == ours.config.moe


@pytest.fixture()
def safetensors_published(fixture: dict, tmp_path: Path) -> Path:
    """The published layout as safetensors shards, saved without the vision tower (as LISA-style saves are)."""
    sd, _ = published_dict(fixture["vocab"], fixture["cfg"], with_vision=False)
    write_published(tmp_path / "pub", sd, fixture["vocab"], "safetensors")
    return tmp_path / "pub"


def test_cli_converts_safetensors_shards_with_the_vision_tower_from_a_clip_folder(
        fixture: dict, safetensors_published: Path, tmp_path: Path) -> None:
    fixture["ref"]["clip"].save_pretrained(str(tmp_path / "clip"))

    def run(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "medplib.cli", "convert", str(safetensors_published), str(tmp_path / "ours"),
             "--config", str(fixture["root"] / "base.json"), *extra], capture_output=True, text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"})

    missing = run()
    last = missing.stderr.strip().splitlines()[-1]
    assert missing.returncode == 2 and last.startswith("error: ") and "--vision" in last
    assert "vision.model.embeddings.patch_embedding.weight" in missing.stderr
    done = run("--vision", str(tmp_path / "clip"))
    assert done.returncode == 0, done.stderr
    a = load_file(str(fixture["root"] / "ours" / "model.safetensors"))
    b = load_file(str(tmp_path / "ours" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _edit_shard(folder: Path, edit) -> None:
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = folder / index["weight_map"]["model.norm.weight"]
    sd = load_file(str(shard))
    edit(sd, index["weight_map"], shard.name)
    save_file(sd, str(shard), metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))


@pytest.mark.parametrize("tamper, message", [
    ("missing", r"1 missing: llm\.model\.norm\.weight"),
    ("shape", r"shape mismatch \(file vs config\): llm\.model\.norm\.weight \(63,\) vs \(64,\)"),
    ("extra", r"1 unknown: model\.layers\.0\.mlp\.deepspeed_moe\.experts\.residual\.weight"),
])
def test_tampered_checkpoint_names_the_key(fixture: dict, safetensors_published: Path, tmp_path: Path,
                                           tamper: str, message: str) -> None:
    def edit(sd: dict, weight_map: dict, shard: str) -> None:
        if tamper == "missing":
            del sd["model.norm.weight"], weight_map["model.norm.weight"]
        elif tamper == "shape":
            sd["model.norm.weight"] = sd["model.norm.weight"][:63].clone()
        else:
            sd["model.layers.0.mlp.deepspeed_moe.experts.residual.weight"] = torch.zeros(2)
            weight_map["model.layers.0.mlp.deepspeed_moe.experts.residual.weight"] = shard

    _edit_shard(safetensors_published, edit)
    fixture["ref"]["clip"].save_pretrained(str(tmp_path / "clip"))
    with pytest.raises(CheckpointError, match=message):
        published_to_medplib(safetensors_published, tmp_path / "out", base=fixture["cfg"], vision=tmp_path / "clip",
                             log=lambda s: None)
    assert not (tmp_path / "out").exists(), "nothing half-written"


def test_unsafe_bin_shard_is_refused(fixture: dict, tmp_path: Path) -> None:
    folder = tmp_path / "pub"
    shutil.copytree(fixture["root"] / "published_bin", folder)
    index = json.loads((folder / "pytorch_model.bin.index.json").read_text())
    shard = folder / next(iter(index["weight_map"].values()))
    torch.save({"model.norm.weight": torch.ones(H), "evil": Path("x")}, shard)  # a pickled object, not a tensor
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        published_to_medplib(folder, tmp_path / "out", base=fixture["cfg"], log=lambda s: None)


def test_llava_folder_converts_as_a_stage_one_start(fixture: dict, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """LLaVA-1.5's layout (LLaMA + `model.mm_projector`, CLIP loaded separately, a plain LLaMA tokenizer) with
    SAM-Med2D from its own checkpoint: the published stage I starting point."""
    cfg, ref = fixture["cfg"], fixture["ref"]
    vocab = llama_tokenizer(tmp_path / "tok", [])
    torch.manual_seed(3)
    llama = LlamaForCausalLM(LlamaConfig(**LLAMA, vocab_size=vocab, tie_word_embeddings=False)).eval()
    sd = {**llama.state_dict(), **{f"model.{k}": v for k, v in ref.items() if k.startswith("mm_projector.")}}
    config = {"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama", **LLAMA, "vocab_size": vocab,
              "mm_hidden_size": DV, "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
              "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_use_im_start_end": False}
    write_published(tmp_path / "llava", sd, vocab, "bin", n_shards=2, config=config, tokens=[])
    # The CLIP folder LLaVA names holds the whole CLIPModel (vision_model.*, text_model.*, projections).
    clip = CLIPModel(CLIPConfig(vision_config=CLIP, text_config=dict(hidden_size=16, intermediate_size=32,
                                num_hidden_layers=1, num_attention_heads=2, vocab_size=99), projection_dim=8))
    clip.vision_model.load_state_dict(ref["clip"].state_dict())
    clip.save_pretrained(str(tmp_path / "clip"))
    torch.save({"model": ref["sam"]}, tmp_path / "sam-med2d_b.pth")
    staging = tmp_path / "staging"
    staging.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(staging))
    with pytest.raises(CheckpointError, match="--sam"):
        published_to_medplib(tmp_path / "llava", tmp_path / "x", base=cfg, vision=tmp_path / "clip", log=lambda s: None)
    assert not any(staging.iterdir()), "a refused conversion leaves no staged tokenizer behind"
    conv = published_to_medplib(tmp_path / "llava", tmp_path / "ours", base=cfg, vision=tmp_path / "clip",
                                sam=tmp_path / "sam-med2d_b.pth", log=lambda s: None)
    text_half = sum(1 for k in clip.state_dict() if not k.startswith("vision_model."))
    assert conv.left_out == {"CLIP text half (--vision folder)": text_half}

    m = MedPLIB.from_pretrained(tmp_path / "ours")
    assert m.config.moe.num_experts == 0 and not m.config.region.spatial
    assert min(m.tokenizer.convert_tokens_to_ids([SEG, IMAGE])) >= vocab  # medplib's tokens come after LLaMA's
    ids = torch.randint(3, vocab, (1, 10), generator=torch.Generator().manual_seed(8))
    enc, dec = PixelEncoder(cfg.pixel).eval(), MaskDecoder(cfg.decoder).eval()
    load_sam_checkpoint(tmp_path / "sam-med2d_b.pth", enc, dec)
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        torch.testing.assert_close(m.model.llm(input_ids=ids).logits[..., :vocab], llama(input_ids=ids).logits)
        torch.testing.assert_close(m.model.pixel_encoder(pixels), enc(pixels))
        image = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(10))
        want = clip.vision_model(pixel_values=image, output_hidden_states=True).hidden_states[-2][:, 1:]
        torch.testing.assert_close(m.model.vision(image), want)
    emb = m.model.llm.get_input_embeddings().weight
    torch.testing.assert_close(emb[vocab:], llama.model.embed_tokens.weight.mean(0).expand(len(emb) - vocab, -1))


def test_truncated_shard_is_a_clear_error(fixture: dict, safetensors_published: Path, tmp_path: Path) -> None:
    index = json.loads((safetensors_published / "model.safetensors.index.json").read_text())
    shard = safetensors_published / index["weight_map"]["model.norm.weight"]
    shard.write_bytes(shard.read_bytes()[:-64])  # a download cut short
    fixture["ref"]["clip"].save_pretrained(str(tmp_path / "clip"))
    with pytest.raises(CheckpointError, match="do not match its shape|truncated"):
        published_to_medplib(safetensors_published, tmp_path / "out", base=fixture["cfg"], vision=tmp_path / "clip",
                             log=lambda s: None)
    assert not list((tmp_path / "out").glob("model.safetensors*")), "no partial weights file"
