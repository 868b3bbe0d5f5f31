"""`MedPLIB`: the model, its tokenizer and its Processor as one object that saves to and loads
from a folder (`config.json`, `model.safetensors`, tokenizer files). Loading never unpickles.

    m = MedPLIB.from_preset("tiny")                # random init, for tests and demos
    m = MedPLIB.from_pretrained("runs/demo/model")  # a trained folder
    ans = m.generate(image, "Please segment the polyp.")
    ans.text, ans.masks
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_model

from medplib.config import MedPLIBConfig, preset
from medplib.data.schema import Region, Turn
from medplib.errors import CheckpointError, InputError
from medplib.model.medplib import GenerationOutput, ImageFeatures, MedPLIBModel, SpecialIds
from medplib.processing import Encoded, Processor
from medplib.tokenizer import IMAGE, REGION, SEG, build_tokenizer, load_tokenizer

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


@dataclass
class Answer:
    text: str
    masks: list[np.ndarray] = field(default_factory=list)  # (H, W) bool, one per [SEG], original image size
    scores: list[float] = field(default_factory=list)  # predicted IoU per mask
    token_ids: list[int] = field(default_factory=list)
    mask_logits: list[torch.Tensor] = field(default_factory=list)  # (H, W) float


def _special_ids(tok: Any) -> SpecialIds:
    get = tok.convert_tokens_to_ids
    return SpecialIds(image=get(IMAGE), region=get(REGION), seg=get(SEG), eos=tok.eos_token_id, pad=tok.pad_token_id)


class MedPLIB:
    def __init__(self, config: MedPLIBConfig, tokenizer: Any, model: MedPLIBModel):
        self.config, self.tokenizer, self.model = config, tokenizer, model
        self.processor = Processor(config, tokenizer)

    # ------------------------------------------------------------------ building
    @classmethod
    def from_config(cls, config: MedPLIBConfig, *, tokenizer: Any = None, seed: int | None = 0) -> "MedPLIB":
        """Random init (or the local pretrained parts named in the config)."""
        tok = tokenizer or build_tokenizer(config.tokenizer)
        if seed is not None:
            torch.manual_seed(seed)
        model = MedPLIBModel(config, len(tok), _special_ids(tok))
        return cls(config, tok, model)

    @classmethod
    def from_preset(cls, name: str, seed: int | None = 0, **overrides: Any) -> "MedPLIB":
        return cls.from_config(preset(name, **overrides), seed=seed)

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write config.json, model.safetensors and the tokenizer; the folder is self-contained."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        cfg = self.config.to_dict()
        # Weights now live in this folder: drop the paths to the parts they came from.
        cfg["vision"]["pretrained"] = cfg["llm"]["pretrained"] = cfg["pixel"]["checkpoint"] = None
        cfg["tokenizer"]["path"] = cfg["tokenizer"]["corpus"] = None  # the trained tokenizer is saved below
        cfg["llm"]["hf"] = _architecture(self.model.llm.config)
        if hasattr(self.model.vision.model, "config"):  # a transformers tower; the CNN's config is its kind
            cfg["vision"]["hf"] = _architecture(self.model.vision.model.config)
        tmp = folder / (WEIGHTS + ".tmp")
        save_model(self.model, str(tmp))
        tmp.replace(folder / WEIGHTS)
        (folder / CONFIG).write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        self.tokenizer.save_pretrained(str(folder))
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> "MedPLIB":
        folder = Path(folder)
        if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
            raise CheckpointError(f"{folder} is not a medplib model folder (needs {CONFIG} and {WEIGHTS})")
        config = MedPLIBConfig.load(folder / CONFIG)
        tok = load_tokenizer(folder)
        model = MedPLIBModel(config, len(tok), _special_ids(tok))
        try:
            state = load_file(str(folder / WEIGHTS))
        except Exception as exc:  # safetensors raises its own error types for truncated/foreign files
            raise CheckpointError(f"{folder / WEIGHTS} is not a readable safetensors file: {exc}") from None
        own = model.state_dict()
        # safetensors stores a tied tensor once; the model's other name for it is filled by tying.
        missing = [k for k in own if k not in state and not _is_tied(model, k)]
        unexpected = [k for k in state if k not in own]
        if missing or unexpected:
            raise CheckpointError(f"weights in {folder} do not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
        model.load_state_dict(state, strict=False)
        model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
        model.eval()
        return cls(config, tok, model)

    # ------------------------------------------------------------------ use
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def collate(self, items: Sequence[Encoded]) -> dict[str, Any]:
        """A training batch on the model's device."""
        batch = self.processor.collate(items)
        dev = self.device
        for key in ("input_ids", "labels", "attention_mask", "vision_pixels", "pixel_values"):
            batch[key] = batch[key].to(dev)
        batch["region_masks"] = [[m.to(dev) for m in ms] for ms in batch["region_masks"]]
        batch["target_masks"] = [[m.to(dev) for m in ms] for ms in batch["target_masks"]]
        return batch

    def image_features(self, image: Any) -> tuple[Any, ImageFeatures]:
        """Prepare an image and compute its vision features (the pixel embedding comes lazily)."""
        img = self.processor.prepare_image(image)
        dtype = next(self.model.parameters()).dtype
        with torch.no_grad():
            feats = self.model.encode_vision(img.vision_pixels[None].to(self.device, dtype))
        return img, ImageFeatures(vision=feats)

    def generate(
        self,
        image: Any,
        question: str,
        regions: Sequence[Region] = (),
        region_arrays: Sequence[np.ndarray | None] | None = None,
        history: Sequence[Turn] = (),
        *,
        features: tuple[Any, ImageFeatures] | None = None,
        max_new_tokens: int | None = None,
        use_cache: bool = True,
        temperature: float = 0.0,
        on_token: Any = None,
    ) -> Answer:
        """Answer one question about one image; every `[SEG]` in the answer yields a mask.

        `history` is earlier (user, assistant) turns; `features` lets a caller reuse an image's
        features across questions (see `image_features`)."""
        if not question.strip():
            raise InputError("the question is empty")
        turns = [*history, Turn(role="user", content=question)]
        img, feats = features if features is not None else self.image_features(image)
        ids, _ = self.processor.encode_conversation(turns, add_generation_prompt=True)
        n_tags = ids.count(self.processor.region_id)
        if n_tags != len(regions):
            raise InputError(f"the question has {n_tags} {REGION} placeholders but {len(regions)} regions were given")
        arrays = list(region_arrays) if region_arrays is not None else [None] * len(regions)
        region_masks = [self.processor.rasterize_region(r, img.original_hw, a).to(self.device) for r, a in zip(regions, arrays)]
        was_training = self.model.training
        self.model.eval()
        try:
            out: GenerationOutput = self.model.generate(
                torch.tensor([ids], device=self.device), feats,
                img.pixel_values[None].to(self.device), region_masks, img.original_hw, img.pixel_valid_hw,
                max_new_tokens=max_new_tokens, use_cache=use_cache, temperature=temperature, on_token=on_token,
            )
        finally:
            self.model.train(was_training)
        thr = self.config.mask_threshold
        return Answer(
            text=self.processor.decode(out.token_ids),
            masks=[(m > thr).cpu().numpy() for m in out.mask_logits],
            scores=out.scores,
            token_ids=out.token_ids,
            mask_logits=out.mask_logits,
        )


# Keys of a transformers config that describe where weights came from or how they were stored, not the network.
_NOT_ARCHITECTURE = ("architectures", "transformers_version", "model_type", "dtype", "torch_dtype",
                     "quantization_config", "_name_or_path", "_model_name_or_path")


def _architecture(hf_config: Any) -> dict[str, Any]:
    return {k: v for k, v in hf_config.to_diff_dict().items() if k not in _NOT_ARCHITECTURE}


def _is_tied(model: torch.nn.Module, key: str) -> bool:
    # safetensors keeps one name of a tied pair, which may be either the input or the output embedding.
    tied = bool(getattr(model.llm.config, "tie_word_embeddings", False))
    return tied and key.endswith(("lm_head.weight", "embed_tokens.weight"))
