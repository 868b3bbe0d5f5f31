"""`MedPLIB`: the model, its tokenizer and its Processor as one object that saves to and loads
from a folder (`config.json`, `model.safetensors`, tokenizer files). Loading never unpickles.

    m = MedPLIB.from_preset("tiny")                # random init, for tests and demos
    m = MedPLIB.from_pretrained("runs/demo/model")  # a trained folder
    ans = m.generate(image, "Please segment the polyp.")
    ans.text, ans.masks
    ans = m.generate(image, "Segment the same structure.", examples=[(ex_image, ex_mask)])  # in-context
    ans = m.generate(image, "Where is the polyp?", box_format="minigpt")  # boxes decoded under a grammar
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from medplib.config import MedPLIBConfig, preset
from medplib.data.boxes import Box, BoxFormat, box_grid, check_box_format, grid_to_box, mask_to_box, parse_boxes
from medplib.data.schema import BOX_END_TOKEN, BOX_START_TOKEN, Region, Turn
from medplib.errors import CheckpointError, ConfigError, InputError
from medplib.model.box_grammar import BoxGrammar
from medplib.model.decoding import DecodeRequest
from medplib.model.medplib import GenerationOutput, ImageFeatures, MedPLIBModel, SpecialIds
from medplib.model.weights import (
    DEFAULT_MAX_SHARD_BYTES,
    INDEX,
    WEIGHTS,
    has_weights,
    load_eager,
    load_lean,
    save_weights,
)
from medplib.processing import Encoded, Processor
from medplib.tokenizer import IMAGE, REGION, SEG, build_tokenizer, load_tokenizer, special_token_spellings

CONFIG = "config.json"


@dataclass
class Answer:
    """One answer about one image. Masks are (H, W) bool at the original image size, one per `[SEG]`;
    `boxes[i]` is the pixel-edge (x1, y1, x2, y2) box of `masks[i]` (None for an empty mask) and
    `scores[i]` its predicted IoU; `text_boxes` are the boxes written in the text, scaled from their
    grid to original pixels: `<box>(x1,y1),(x2,y2)</box>` on 0..1000, or `{<x1><y1><x2><y2>}` on 0..100
    when the question was asked with `box_format="minigpt"` (boxes off the grid are left out)."""

    text: str
    masks: list[np.ndarray] = field(default_factory=list)
    boxes: list[Box | None] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    text_boxes: list[Box] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)  # the answer's tokens, its end token included
    prompt_tokens: int = 0  # image and in-context example tokens included
    finish_reason: str = "stop"  # "stop" (end of answer) or "length" (hit max_new_tokens)


def parse_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device; a malformed name is a ConfigError."""
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {str(device)!r} (cpu, cuda, cuda:1, mps, ...)") from None


def check_device(device: torch.device) -> None:
    """Refuse (ConfigError), before any weights are read, a device this torch build or machine lacks."""
    if device.type in ("cpu", "meta"):
        return
    backend = getattr(torch, device.type, None)  # torch.cuda, torch.mps, torch.xpu, ...
    if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
        raise ConfigError(f"device '{device}' is not available: "
                          f"this torch build or machine has no {device.type} device")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if device.index is not None and device.index >= count:
        raise ConfigError(f"device '{device}' is not available: there are {count} {device.type} device(s)")


def _special_ids(tok: Any) -> SpecialIds:
    get = tok.convert_tokens_to_ids
    box = tuple(i for i in (get(BOX_START_TOKEN), get(BOX_END_TOKEN)) if i is not None and i != tok.unk_token_id)
    return SpecialIds(image=get(IMAGE), region=get(REGION), seg=get(SEG), eos=tok.eos_token_id, pad=tok.pad_token_id,
                      box=box)


class MedPLIB:
    def __init__(self, config: MedPLIBConfig, tokenizer: Any, model: MedPLIBModel):
        self.config, self.tokenizer, self.model = config, tokenizer, model
        self.processor = Processor(config, tokenizer)
        self.quantize: str | None = None  # "int8" / "nf4" when from_pretrained quantised the LLM
        self._box_grammars: dict[str, BoxGrammar] = {}  # one per format: building one reads the whole vocabulary

    # ------------------------------------------------------------------ building
    @classmethod
    def from_config(cls, config: MedPLIBConfig, *, tokenizer: Any = None, seed: int | None = 0) -> "MedPLIB":
        """Random init (or the local pretrained parts named in the config)."""
        tok = tokenizer or build_tokenizer(config.tokenizer)
        if seed is not None:
            torch.manual_seed(seed)
        spellings = special_token_spellings(tok) if config.llm.pretrained else None
        model = MedPLIBModel(config, len(tok), _special_ids(tok), spellings)
        return cls(config, tok, model)

    @classmethod
    def from_preset(cls, name: str, seed: int | None = 0, **overrides: Any) -> "MedPLIB":
        return cls.from_config(preset(name, **overrides), seed=seed)

    def save_pretrained(self, folder: str | Path, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
        """Write config.json, the weights and the tokenizer; the folder is self-contained. Weights over
        `max_shard_bytes` are written as HF-style shards with `model.safetensors.index.json`."""
        if self.quantize is not None:
            raise CheckpointError(f"a model quantised to {self.quantize} for inference cannot be saved: save the "
                                  "full-precision model it was loaded from")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        cfg = self.config.to_dict()
        # Weights now live in this folder: drop the paths to the parts they came from.
        cfg["vision"]["pretrained"] = cfg["llm"]["pretrained"] = cfg["pixel"]["checkpoint"] = None
        cfg["tokenizer"]["path"] = cfg["tokenizer"]["corpus"] = None  # the trained tokenizer is saved below
        cfg["llm"]["hf"] = _architecture(self.model.llm.config)
        if hasattr(self.model.vision.model, "config"):  # a transformers tower; the CNN's config is its kind
            cfg["vision"]["hf"] = _architecture(self.model.vision.model.config)
        save_weights(self.model, folder, max_shard_bytes=max_shard_bytes)
        (folder / CONFIG).write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        self.tokenizer.save_pretrained(str(folder))
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None, quantize: str | None = None,
                        lean: bool = True) -> "MedPLIB":
        """Load a model folder (one `model.safetensors` or sharded with an index).

        `lean` (default) builds the model on the meta device and reads each tensor straight into `dtype` on
        `device`: peak memory is about the weights, not a random fp32 model plus the file. `lean=False` is
        the eager path (build at random in fp32, load, cast), kept for comparison.
        `quantize` ("int8", or "nf4" on CUDA) quantises the LLM's Linear layers for inference; the vision
        tower, pixel encoder, mask decoder and [SEG] projection stay in full precision (see
        `medplib.model.quantize`)."""
        from medplib.model.quantize import check_quantize, quantize_llm

        folder = Path(folder)
        if not (folder / CONFIG).is_file() or not has_weights(folder):
            raise CheckpointError(f"{folder} is not a medplib model folder (needs {CONFIG} and {WEIGHTS} or {INDEX})")
        device = parse_device(device)
        load_device, dtype = check_quantize(quantize, device, dtype)
        check_device(device)
        config = MedPLIBConfig.load(folder / CONFIG)
        tok = load_tokenizer(folder)
        ids = _special_ids(tok)
        if lean:
            model = load_lean(lambda: MedPLIBModel(config, len(tok), ids), folder, device=load_device, dtype=dtype)
        else:
            model = MedPLIBModel(config, len(tok), ids)
            load_eager(model, folder)
            model.to(device=load_device, dtype=dtype) if dtype is not None else model.to(load_device)
        if quantize is not None:
            quantize_llm(model, quantize, device)
        model.eval()
        out = cls(config, tok, model)
        out.quantize = quantize
        return out

    # ------------------------------------------------------------------ use
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def collate(self, items: Sequence[Encoded]) -> dict[str, Any]:
        """A training batch on the model's device."""
        return self.processor.to_device(self.processor.collate(items), self.device)

    def image_features(self, image: Any) -> tuple[Any, ImageFeatures]:
        """Prepare an image and compute its vision features (the pixel embedding comes lazily)."""
        img = self.processor.prepare_image(image)
        dtype = next(self.model.parameters()).dtype
        with torch.no_grad():
            feats = self.model.encode_vision(img.vision_pixels[None].to(self.device, dtype))
        return img, ImageFeatures(vision=feats)

    def example_features(self, examples: Sequence[Any]) -> list[torch.Tensor]:
        """In-context examples (`medplib.retrieval.examples.Example` or (image, mask) pairs, checked) ->
        the vision features (1, N, Dv) of their prompt images, in prompt order (one per example with the
        overlay encoding, two with `separate`)."""
        return [self.image_features(a)[1].vision for a in self.processor.example_images(examples)]

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
        examples: Sequence[Any] = (),
        example_features: Sequence[torch.Tensor] | None = None,
        box_format: BoxFormat | None = None,
    ) -> Answer:
        """Answer one question about one image; every `[SEG]` in the answer yields a mask. Regions are
        in original pixels, one per `<region>` (appended when the conversation has none).

        `history` is earlier (user, assistant) turns; `features` lets a caller reuse an image's
        features across questions (see `image_features`). `examples`: in-context (image, mask) pairs
        shown before the image (`example_features`); `example_features` passes them precomputed. The
        masks are the image's (the query's); regions are on it too. `box_format` ("med-grit" or
        "minigpt"): boxes in the answer are decoded under that format's grammar (well formed, on the
        grid, closed within the token limit) and read into `text_boxes`; None: unconstrained."""
        if example_features is None:
            example_features = self.example_features(examples)
        req = self.decode_request(question, regions, region_arrays, history,
                                  features=features if features is not None else self.image_features(image),
                                  max_new_tokens=max_new_tokens, temperature=temperature, on_token=on_token,
                                  examples=example_features, box_format=box_format)
        was_training = self.model.training
        self.model.eval()
        try:
            out: GenerationOutput = self.model.generate(
                req.input_ids[None], req.features, req.pixel_values, req.region_masks, req.original_hw,
                req.pixel_valid_hw, max_new_tokens=max_new_tokens, use_cache=use_cache, temperature=temperature,
                on_token=on_token, examples=req.examples, box_grammar=req.box_grammar,
            )
        finally:
            self.model.train(was_training)
        return self.answer(out, req)

    def decode_request(
        self,
        question: str,
        regions: Sequence[Region] = (),
        region_arrays: Sequence[np.ndarray | None] | None = None,
        history: Sequence[Turn] = (),
        *,
        features: tuple[Any, ImageFeatures],
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        on_token: Any = None,
        examples: Sequence[torch.Tensor] = (),
        box_format: BoxFormat | None = None,
    ) -> DecodeRequest:
        """One question about an image whose (ImageInputs, ImageFeatures) are given, encoded for the LLM
        (`Processor.encode_prompt`, which raises InputError for a bad question or regions). `examples`:
        the in-context example images' vision features (`example_features`), placed before the image.
        `box_format`: decode the answer's boxes under that format's grammar (`box_grammar`)."""
        grammar = self.box_grammar(box_format) if box_format is not None else None
        img, feats = features
        prompt = self.processor.encode_prompt(question, img.original_hw, regions, region_arrays, history,
                                              examples=self.count_examples(examples))
        dev = self.device
        return DecodeRequest(prompt.input_ids.to(dev), feats, img.pixel_values[None].to(dev),
                             [m.to(dev) for m in prompt.region_masks], img.original_hw, img.pixel_valid_hw,
                             max_new_tokens, temperature, None, on_token, examples=list(examples), box_grammar=grammar)

    def box_grammar(self, box_format: BoxFormat) -> BoxGrammar:
        """The grammar of `box_format` for this model's tokenizer, built once and shared by every request
        (each decoded row walks it with its own state; `medplib.model.box_grammar`)."""
        box_format = check_box_format(box_format)
        if box_format not in self._box_grammars:
            self._box_grammars[box_format] = BoxGrammar(self.tokenizer, box_format)
        return self._box_grammars[box_format]

    def count_examples(self, example_features: Sequence[torch.Tensor]) -> int:
        """How many examples a list of example prompt-image features holds (1 or 2 images each)."""
        per = self.config.images_per_example
        if len(example_features) % per:
            raise InputError(f"{len(example_features)} example images do not make whole {self.config.icl.encoding} "
                             f"examples ({per} images each)")
        return len(example_features) // per

    def generate_batch(self, requests: Sequence[DecodeRequest]) -> list[Answer | Exception]:
        """Answer several requests (`decode_request`) decoded together, padded: per request its
        Answer or the exception it alone raised. Greedy answers equal one-at-a-time answers."""
        was_training = self.model.training
        self.model.eval()
        try:
            outs = self.model.generate_batch(list(requests))
        finally:
            self.model.train(was_training)
        return [o if isinstance(o, Exception) else self.answer(o, r) for o, r in zip(outs, requests)]

    def answer(self, out: GenerationOutput, request: DecodeRequest) -> Answer:
        """The model's output for `request` as text, (H, W) bool masks and boxes in original pixels."""
        h, w = request.original_hw
        text = self.processor.decode(out.token_ids)
        masks = [(m > self.config.mask_threshold).cpu().numpy() for m in out.mask_logits]
        finished = bool(out.token_ids) and out.token_ids[-1] == self.tokenizer.eos_token_id
        # The request's own box format, so a PFMVG answer's boxes are read as PFMVG's; med-grit otherwise.
        fmt: BoxFormat = request.box_grammar.box_format if request.box_grammar is not None else "med-grit"
        grid = box_grid(fmt)
        return Answer(
            text=text,
            masks=masks,
            boxes=[mask_to_box(m) if m.any() else None for m in masks],
            scores=out.scores,
            text_boxes=[grid_to_box(g, w, h, grid) for g in parse_boxes(text, fmt) if max(g) <= grid],
            token_ids=out.token_ids,
            prompt_tokens=int(request.input_ids.numel()),
            finish_reason="stop" if finished else "length",
        )


# Keys of a transformers config that describe where weights came from or how they were stored, not the network.
_NOT_ARCHITECTURE = ("architectures", "transformers_version", "model_type", "dtype", "torch_dtype",
                     "quantization_config", "_name_or_path", "_model_name_or_path")


def _architecture(hf_config: Any) -> dict[str, Any]:
    return {k: v for k, v in hf_config.to_diff_dict().items() if k not in _NOT_ARCHITECTURE}

