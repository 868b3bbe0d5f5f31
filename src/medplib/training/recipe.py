"""Training recipes: one YAML file per stage, plus `key=value` overrides on the command line.

A recipe is plain data (the dataclasses below); `medplib.training.loop.train` reads it from top to
bottom. Unknown keys and values of the wrong type are errors that name the key, so a typo can never
silently fall back to a default.

    recipe = load_recipe("recipes/stage2_vl_expert.yaml", ["train.steps=20", "lora.r=8"])

Override values are parsed as YAML (`train.steps=20` is an int, `lora.targets=[q_proj,v_proj]` a
list, `model.path=null` None). Keys under `model.overrides.` are model-config keys (dotted, as in
`medplib.config.apply_override`) and are kept whole: `model.overrides.moe.top_k=2`.

Training settings (loss weights, routing-loss weights, optimizer, schedule) live here only; the
model folder a stage writes describes the model alone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
import yaml

from medplib.coerce import build, plain
from medplib.config import ICLConfig, MoEConfig
from medplib.errors import ConfigError


class RecipeError(ConfigError):
    """A recipe file or override that is unknown, malformed or inconsistent."""


@dataclass
class ModelSection:
    """Where the model comes from: a preset (random init, or the local pretrained parts its config
    names) or a trained model folder (an earlier stage). Exactly one of the two."""

    preset: str | None = None
    path: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted model-config keys, preset only


@dataclass
class SourceSection:
    file: str = "*.jsonl"  # glob inside data.dir
    tasks: list[str] = field(default_factory=list)  # keep these tasks only; empty = all
    ratio: float = 1.0  # share of the mix (split over the files the glob matches, by size)


@dataclass
class DataSection:
    dir: str = "data"
    sources: list[SourceSection] = field(default_factory=lambda: [SourceSection()])
    split: Literal["train", "val", "test"] = "train"
    num_workers: int = 0
    # random flips (medplib.data.augment)
    augment: list[Literal["hflip", "vflip", "transpose"]] = field(default_factory=list)


@dataclass
class LoraSection:
    r: int = 0  # 0 = no LoRA
    alpha: int = 16
    dropout: float = 0.05
    targets: list[str] = field(default_factory=list)  # module names, e.g. q_proj, gate_proj
    # Adapt only the last N decoder layers (0 = all). With nothing trainable below them, the backward pass
    # stops there: on a CPU the LLM's backward is most of a stage III step.
    last_layers: int = 0


@dataclass
class UpcycleSection(MoEConfig):
    """Stage IV: every LLM MLP becomes an MoE whose expert e copies that MLP of `experts[e]` (model
    folders). The pixel parts (pixel encoder, mask decoder, [SEG] projection) come from expert 0's
    model, the pixel-grounding expert; everything else from `model.path`. Empty = dense model.
    The other keys are the upcycled model's `MoEConfig` (top_k, capacity factors, gate); its
    `num_experts` is the number of `experts`."""

    experts: list[str] = field(default_factory=list)
    # The expert the `route` loss asks for on the tokens up to the image's end (system prompt, image), which
    # come before the question and cannot know the task; -1 leaves them unsupervised (training/data.py).
    prefix_expert: int = -1
    num_experts: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.num_experts = len(self.experts)
        if self.experts and not -1 <= self.prefix_expert < self.num_experts:
            raise RecipeError(f"upcycle.prefix_expert={self.prefix_expert}: expected -1 (unsupervised) or an expert "
                              f"index 0..{self.num_experts - 1}")

    def moe_config(self) -> MoEConfig:
        return MoEConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(MoEConfig)})


# The loss parts `MedPLIBModel.forward` returns, in the order the runner logs them.
LOSS_PARTS = ("ce", "bce", "dice", "focal", "iou", "balance", "z", "route", "contrastive")


@dataclass
class LossSection:
    """The stage's loss weights. Defaults: the published stage IV (ce 1, dice 0.5, bce 2, no routing
    loss). The routing losses are summed over the MoE layers (model/moe.py): `balance` is the
    Switch balance loss (published `router_aux_loss_coef`, 0 in stage IV), `z` the ST-MoE z-loss,
    `route` task-supervised routing (not published). `contrastive` is TISR's image-report InfoNCE
    (model/tisr.py; 0 for a model without TISR): train it on report samples only, since every answered
    row of a batch counts as that image's text."""

    ce: float = 1.0
    bce: float = 2.0
    dice: float = 0.5
    focal: float = 0.0
    iou: float = 0.0
    balance: float = 0.0
    z: float = 0.0
    route: float = 0.0
    contrastive: float = 0.0

    def combine(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training loss: the weighted sum of the parts (parts with weight 0 are left out, so a part
        that is undefined for this batch cannot turn the sum into NaN)."""
        terms = [getattr(self, k) * parts[k] for k in LOSS_PARTS if getattr(self, k)]
        return torch.stack(terms).sum() if terms else parts["ce"] * 0.0


@dataclass
class OptimSection:
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    warmup_ratio: float = 0.01  # linear warmup over this share of the steps, then linear decay to 0
    fused: bool = True  # AdamW's fused kernel where every parameter allows it (floating point, CPU or CUDA)


@dataclass
class TrainSection:
    steps: int = 0  # optimizer steps; 0 = derive from epochs
    epochs: float = 1.0
    global_batch: int = 128  # samples per optimizer step over all processes
    micro_batch: int = 4  # samples per forward on one process; accumulation fills the rest
    mixed_precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    gradient_checkpointing: bool = False
    seed: int = 0


@dataclass
class CheckpointSection:
    every: int = 500  # optimizer steps between checkpoints; 0 = none (the final model is always written)
    keep_last: int = 2
    resume: bool = True  # continue from the newest checkpoint in output_dir if there is one


@dataclass
class LogSection:
    every: int = 10
    tensorboard: bool = True
    progress: bool = True


@dataclass
class Recipe:
    name: str = "custom"
    description: str = ""
    output_dir: str = "runs/custom"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    trainable: list[str] = field(default_factory=list)  # parameter groups, see training/trainable.py
    unfreeze: list[str] = field(default_factory=list)  # more groups, for parts without pretrained weights
    lora: LoraSection = field(default_factory=LoraSection)
    upcycle: UpcycleSection = field(default_factory=UpcycleSection)
    loss: LossSection = field(default_factory=LossSection)
    icl: dict[str, Any] = field(default_factory=dict)  # ICLConfig fields set for this stage (saved with the model)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)

    def __post_init__(self) -> None:
        if (self.model.preset is None) == (self.model.path is None):
            raise RecipeError("model: give exactly one of model.preset and model.path")
        if self.model.overrides and self.model.preset is None:
            raise RecipeError("model.overrides apply to a preset; a model folder keeps its own config")
        known = {f.name for f in dataclasses.fields(ICLConfig)}
        if set(self.icl) - known:
            raise RecipeError(f"icl: unknown keys {sorted(set(self.icl) - known)} (known: {', '.join(sorted(known))})")
        t = self.train
        if t.global_batch < 1 or t.micro_batch < 1:
            raise RecipeError("train.global_batch and train.micro_batch must be >= 1")
        if t.steps < 0 or t.epochs <= 0 and t.steps == 0:
            raise RecipeError("give train.steps > 0 or train.epochs > 0")
        if self.lora.r < 0:
            raise RecipeError("lora.r must be >= 0")
        if self.lora.r and not self.lora.targets:
            raise RecipeError("lora.r > 0 needs lora.targets")
        if self.checkpoint.keep_last < 1:
            raise RecipeError("checkpoint.keep_last must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        """The recipe as the YAML a run writes to `recipe.yaml`, which loads back into the same recipe."""
        return plain(self)


def parse_override(text: str) -> tuple[str, Any]:
    """`"a.b=value"` -> ("a.b", YAML-parsed value)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not p for p in key.split(".")):
        raise RecipeError(f"bad override '{text}': expected key=value, e.g. train.steps=100")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise RecipeError(f"bad override '{text}': the value is not valid YAML ({exc.__class__.__name__})") from None
    return key, value


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Set each dotted key in the nested dict `raw` (in place; returns it). Unknown sections fail
    later, in `recipe_from_dict`, with the full key."""
    for text in overrides:
        key, value = parse_override(text)
        if key.startswith("model.overrides."):
            raw.setdefault("model", {}).setdefault("overrides", {})[key[len("model.overrides."):]] = value
            continue
        node = raw
        parts = key.split(".")
        for p in parts[:-1]:
            if not isinstance(node.setdefault(p, {}), dict):
                raise RecipeError(f"bad override '{text}': '{p}' is not a section")
            node = node[p]
        node[parts[-1]] = value
    return raw


def recipe_from_dict(raw: dict[str, Any]) -> Recipe:
    return build(Recipe, raw, "recipe", RecipeError, "recipe")


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read a YAML recipe and apply `key=value` overrides."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe {path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {path} must be a mapping of sections")
    return recipe_from_dict(apply_overrides(raw, overrides))
