"""The one Processor used by training and inference alike, so the two can never drift apart.

It owns: the chat template (Vicuna v1 or ChatML, one system prompt everywhere), tokenisation with the
`<image>` placeholder expanded to `<im_start> <image>*N <im_end>`, the in-context example prompt (k
example images before the query image, each pooled to fewer tokens), image transforms for both
branches (longest-side resize, normalise, pad bottom/right to a square), region rasterisation
(point -> square or disc, box -> filled rectangle, polygon/mask -> its shape) and target masks.

Geometry (`fit_longest_side`): both branches resize the longest side to their input size S and pad
at the bottom and right, so pixel (x, y) of the original maps to (x * s, y * s) with s = S / max(H, W)
in both.

Inference prompts go through `Processor.encode_prompt` only (MedPLIB, Predictor, server and volumes
alike): it appends `<region>` placeholders when none are written, places in-context examples,
encodes the chat and checks the region count (`Processor.rasterize_regions`, shared with training's
`encode`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from transformers import PreTrainedTokenizerBase

from medplib.config import MedPLIBConfig
from medplib.data.images import as_rgb
from medplib.data.loading import LoadedSample
from medplib.data.schema import BoxRegion, MaskRegion, PointRegion, PolygonRegion, Region, Turn, region_count_problem
from medplib.errors import ConfigError, InputError
from medplib.model.losses import IGNORE_INDEX
from medplib.tokenizer import IM_END, IM_START, IMAGE, REGION, SEG

if TYPE_CHECKING:
    from medplib.retrieval.examples import Example, ExampleInput


# The text that introduces one in-context example, per encoding (config.icl.encoding); the query image
# follows all examples. Training (data.builder's icl task) and inference share it through this module.
EXAMPLE_TEXT = {
    "overlay": f"Here is {IMAGE} with the structure marked.",
    "separate": f"Here is {IMAGE} and its mask {IMAGE}.",
}


@dataclass(frozen=True)
class ChatTemplate:
    """How a conversation becomes text. Only answers (and the end-of-answer token) carry loss."""

    bos: bool  # start with the tokenizer's BOS id
    system: str  # "{system}" is replaced by the system prompt
    user: str  # "{content}" is replaced by the user turn; ends where the assistant's answer begins
    answer_prefix: str  # text before an answer, tokenised with it
    after_answer: str  # text after an answer's end token (no loss)
    markers: tuple[str, ...] = ()  # tokens the tokenizer must hold as single ids


CHAT_TEMPLATES = {
    # LLaVA-1.5 / MedPLIB: "<s>SYSTEM USER: ... ASSISTANT: answer</s>USER: ..."
    "vicuna": ChatTemplate(bos=True, system="{system}", user=" USER: {content} ASSISTANT:",
                           answer_prefix=" ", after_answer=""),
    # SmolLM2 / Qwen2 instruct models were tuned on ChatML; keeping it keeps what they learned.
    "chatml": ChatTemplate(bos=False, system="<|im_start|>system\n{system}<|im_end|>\n",
                           user="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
                           answer_prefix="", after_answer="\n", markers=("<|im_start|>", "<|im_end|>")),
}


@dataclass
class ImageInputs:
    """One image prepared for both branches."""

    vision_pixels: torch.Tensor  # (3, Sv, Sv) normalised for the CLIP/SigLIP tower
    pixel_values: torch.Tensor  # (3, Sp, Sp) normalised for the SAM-style pixel encoder
    original_hw: tuple[int, int]
    pixel_valid_hw: tuple[int, int]  # un-padded (h, w) inside the Sp x Sp input


@dataclass
class Encoded:
    """One sample ready for collation."""

    input_ids: torch.Tensor  # (T,) long
    labels: torch.Tensor  # (T,) long, IGNORE_INDEX where no loss
    image: ImageInputs
    region_masks: list[torch.Tensor] = field(default_factory=list)  # each (Sv, Sv) bool
    target_masks: list[torch.Tensor] = field(default_factory=list)  # each (H, W) float in {0, 1}
    examples: list[torch.Tensor] = field(default_factory=list)  # each (3, Sv, Sv): the example prompt images


@dataclass
class Prompt:
    """One inference prompt, checked and encoded (`Processor.encode_prompt`)."""

    input_ids: torch.Tensor  # (T,) long, ending where the assistant's answer begins
    region_masks: list[torch.Tensor]  # one (Sv, Sv) bool per `<region>`, in order, in the vision input frame


def with_placeholders(question: str, n_regions: int, history: Sequence[Turn] = ()) -> str:
    """Append one `<region>` per region when the conversation names none, so a caller may pass
    regions without writing placeholders; otherwise the text is left as written."""
    written = question.count(REGION) + sum(t.content.count(REGION) for t in history if t.role == "user")
    if n_regions and not written:
        return question.rstrip() + " " + " ".join([REGION] * n_regions)
    return question


def fit_longest_side(hw: tuple[int, int], size: int) -> tuple[float, tuple[int, int]]:
    """The resize of both branches: an (H, W) image's longest side to `size`. Returns (s, (h, w)):
    pixel (x, y) maps to (x * s, y * s), and the resized image is the top-left (h, w) of the padded
    size x size input."""
    h, w = hw
    s = size / max(h, w)
    return s, (max(1, round(h * s)), max(1, round(w * s)))


def _resize_pad(img: torch.Tensor, size: int, mean: Sequence[float],
                std: Sequence[float]) -> tuple[torch.Tensor, tuple[int, int]]:
    """(3, H, W) float in [0, 1] -> normalised (3, size, size), zero (= mean colour) padding bottom/right."""
    _, (nh, nw) = fit_longest_side(tuple(img.shape[1:]), size)
    resized = F.interpolate(img[None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)[0]
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    out = torch.zeros(3, size, size)
    out[:, :nh, :nw] = (resized - m) / s
    return out, (nh, nw)


class Processor:
    def __init__(self, config: MedPLIBConfig, tokenizer: PreTrainedTokenizerBase):
        self.config = config
        self.tokenizer = tokenizer
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (IMAGE, IM_START, IM_END, REGION, SEG)}
        self.image_id, self.im_start_id, self.im_end_id = ids[IMAGE], ids[IM_START], ids[IM_END]
        self.region_id, self.seg_id = ids[REGION], ids[SEG]
        # The query image's `<image>` slots: its image tokens, and TISR's pseudo-words when on (config.py).
        self.num_image_tokens = config.num_query_tokens
        if config.chat_template not in CHAT_TEMPLATES:
            raise ConfigError(f"unknown chat_template '{config.chat_template}' "
                              f"(choose from {', '.join(CHAT_TEMPLATES)})")
        self.template = CHAT_TEMPLATES[config.chat_template]
        vocab = tokenizer.get_vocab()
        missing = [t for t in self.template.markers if t not in vocab]
        if missing:
            raise ConfigError(f"chat_template '{config.chat_template}' needs the tokens {missing}, which the "
                              "tokenizer lacks")

    # ---------------------------------------------------------------- images
    def prepare_image(self, image: Any) -> ImageInputs:
        rgb = as_rgb(image)
        t = torch.tensor(rgb).permute(2, 0, 1).float() / 255.0  # a copy: reader arrays may be read-only
        vision, _ = _resize_pad(t, self.config.vision.image_size, self.config.vision.mean, self.config.vision.std)
        pixel, valid = _resize_pad(t, self.config.pixel.image_size, self.config.pixel.mean, self.config.pixel.std)
        return ImageInputs(vision, pixel, (rgb.shape[0], rgb.shape[1]), valid)

    # ---------------------------------------------------------------- regions
    def rasterize_region(self, region: Region, original_hw: tuple[int, int],
                         mask: np.ndarray | None = None) -> torch.Tensor:
        """A region in original-image pixels -> (Sv, Sv) bool mask in the vision input frame.

        `mask` is the loaded array for a MaskRegion (the schema holds only its reference)."""
        h, w = original_hw
        size = self.config.vision.image_size
        s, (nh, nw) = fit_longest_side(original_hw, size)
        canvas = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(canvas)
        if isinstance(region, PointRegion):
            x, y = region.point
            self._check_inside([(x, y)], h, w, "point")
            r = self.config.region.point_size / 2
            cx, cy = x * s, y * s
            shape = draw.ellipse if self.config.region.point_shape == "disc" else draw.rectangle
            shape([cx - r, cy - r, cx + r, cy + r], fill=1)
        elif isinstance(region, BoxRegion):
            x1, y1, x2, y2 = region.box
            self._check_inside([(x1, y1), (x2, y2)], h, w, "box")
            draw.rectangle([x1 * s, y1 * s, max(x1 * s, x2 * s - 1), max(y1 * s, y2 * s - 1)], fill=1)
        elif isinstance(region, PolygonRegion):
            self._check_inside(region.polygon, h, w, "polygon")
            draw.polygon([(x * s, y * s) for x, y in region.polygon], fill=1)
        elif isinstance(region, MaskRegion):
            if mask is None:
                raise InputError("a mask region needs its loaded mask array")
            if mask.shape[:2] != (h, w):
                raise InputError(f"region mask is {mask.shape[1]}x{mask.shape[0]} but the image is {w}x{h}")
            if not mask.any():
                raise InputError("the free-form region mask is empty")
            small = Image.fromarray(mask.astype(np.uint8) * 255).resize((nw, nh), Image.NEAREST)
            if not np.asarray(small).any():  # a few-pixel shape can vanish when shrunk: keep its centre
                ys, xs = np.nonzero(mask)
                small = Image.new("L", (nw, nh), 0)
                small.putpixel((min(nw - 1, int(xs.mean() * s)), min(nh - 1, int(ys.mean() * s))), 255)
            canvas.paste(small.point(lambda v: 1 if v else 0), (0, 0))
        else:
            raise InputError(f"unknown region type {type(region).__name__}")
        out = torch.from_numpy(np.asarray(canvas, dtype=bool).copy())
        if not out.any():
            raise InputError(f"the {region.kind} region is empty after rasterisation")
        return out

    def rasterize_regions(self, ids: Sequence[int], regions: Sequence[Region],
                          region_arrays: Sequence[np.ndarray | None] | None, original_hw: tuple[int, int]
                          ) -> list[torch.Tensor]:
        """The regions of an encoded conversation `ids`, one per `<region>` in order, rasterised (each
        (Sv, Sv) bool). Every prompt's region count is checked here (`region_count_problem`)."""
        problem = region_count_problem(list(ids).count(self.region_id), len(regions))
        if problem:
            raise InputError(f"the conversation has {problem}")
        arrays = list(region_arrays) if region_arrays is not None else [None] * len(regions)
        return [self.rasterize_region(r, original_hw, a) for r, a in zip(regions, arrays)]

    def region_footprints(self, regions: Sequence[Region], region_arrays: Sequence[np.ndarray | None] | None,
                          original_hw: tuple[int, int]) -> list[np.ndarray]:
        """The regions as the model sees them, mapped back to (H, W) bool masks of the image (for
        drawing outlines). Raises InputError for a region outside the image."""
        h, w = original_hw
        _, (nh, nw) = fit_longest_side(original_hw, self.config.vision.image_size)
        arrays = list(region_arrays) if region_arrays is not None else [None] * len(regions)
        out = []
        for r, a in zip(regions, arrays):
            small = self.rasterize_region(r, original_hw, a).numpy()[:nh, :nw]
            out.append(np.asarray(Image.fromarray(small.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)) > 0)
        return out

    @staticmethod
    def _check_inside(points: Sequence[tuple[float, float]], h: int, w: int, what: str) -> None:
        for x, y in points:
            if not (0 <= x <= w and 0 <= y <= h):
                raise InputError(f"{what} ({x:g}, {y:g}) lies outside the {w}x{h} image")

    # ---------------------------------------------------------------- text
    def _tokens(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def _expand_images(self, ids: list[int], labels: list[int], examples: int) -> tuple[list[int], list[int]]:
        """Each `<image>` -> `<im_start> <image>*n <im_end>` (no loss on any of it): n = the query's token
        count (with TISR's pseudo-words) for the last placeholder, the pooled example count for the ones before it."""
        found = ids.count(self.image_id)
        need = examples * self.config.images_per_example + 1
        if found != need:
            if not examples:
                raise InputError(f"a sample needs exactly one {IMAGE} placeholder, found {found}")
            raise InputError(f"{examples} {self.config.icl.encoding} example(s) and the query need {need} {IMAGE} "
                             f"placeholders, found {found}")
        out_ids: list[int] = []
        out_labels: list[int] = []
        seen = 0
        for t, lab in zip(ids, labels):
            if t != self.image_id:
                out_ids.append(t)
                out_labels.append(lab)
                continue
            seen += 1
            n = self.num_image_tokens if seen == found else self.config.num_example_tokens
            out_ids += [self.im_start_id] + [self.image_id] * n + [self.im_end_id]
            out_labels += [IGNORE_INDEX] * (n + 2)
        return out_ids, out_labels

    def with_examples(self, turns: Sequence[Turn], examples: int) -> list[Turn]:
        """Put `examples` example placeholders into the first user turn, before the query image.

        A first turn that already holds one `<image>` per example image plus the query's is the user's
        own text and is kept; one with a single `<image>` (the query) or none gets `EXAMPLE_TEXT` per
        example in front (and the query's `<image>` when absent). Anything else is an InputError."""
        turns = list(turns)
        if not examples:
            return turns
        self._check_example_count(examples)
        first = turns[0].content
        found = first.count(IMAGE)
        need = examples * self.config.images_per_example + 1
        if found == need:
            return turns
        if found > 1:
            raise InputError(f"the first turn has {found} {IMAGE} placeholders; with {examples} "
                             f"{self.config.icl.encoding} example(s) write {need} (examples first, the query last) "
                             "or only the query's")
        query = first if found else f"{IMAGE}\n{first}"
        text = "\n".join([EXAMPLE_TEXT[self.config.icl.encoding]] * examples) + "\n" + query
        return [Turn(role=turns[0].role, content=text), *turns[1:]]

    def encode_conversation(self, turns: Sequence[Turn], *, add_generation_prompt: bool = False,
                            examples: int = 0) -> tuple[list[int], list[int]]:
        """The chat template -> (input_ids, labels); only assistant answers (and their end token) carry loss.

        With `add_generation_prompt` the conversation ends on a user turn and the ids end where the
        assistant's answer begins, so generation continues from there."""
        turns = list(turns)
        if not turns or turns[0].role != "user":
            raise InputError("a conversation starts with a user turn")
        turns = self.with_examples(turns, examples)
        if IMAGE not in turns[0].content:
            turns[0] = Turn(role="user", content=f"{IMAGE}\n{turns[0].content}")
        tpl = self.template
        bos = self.tokenizer.bos_token_id
        ids: list[int] = [bos] if tpl.bos and bos is not None else []
        labels: list[int] = [IGNORE_INDEX] * len(ids)
        # An empty system prompt drops the system turn: on a CPU every prompt token costs each training step.
        prompt = tpl.system.format(system=self.config.system_prompt) if self.config.system_prompt else ""
        for turn in turns:
            if turn.role == "user":
                prompt += tpl.user.format(content=turn.content)
            else:
                piece = self._tokens(prompt)
                ids += piece
                labels += [IGNORE_INDEX] * len(piece)
                answer = self._tokens(f"{tpl.answer_prefix}{turn.content}") + [self.tokenizer.eos_token_id]
                ids += answer
                labels += answer
                prompt = tpl.after_answer
        if add_generation_prompt:
            if turns[-1].role != "user":
                raise InputError("to generate, the conversation must end with a user turn")
            piece = self._tokens(prompt)
            ids += piece
            labels += [IGNORE_INDEX] * len(piece)
        elif turns[-1].role != "assistant":
            raise InputError("a training conversation must end with an assistant turn")
        expanded, labels = self._expand_images(ids, labels, examples)
        if len(expanded) > self.config.tokenizer.model_max_length:
            raise InputError(f"sequence of {len(expanded)} tokens exceeds the model's "
                             f"{self.config.tokenizer.model_max_length}")
        return expanded, labels

    def encode_prompt(
        self,
        question: str,
        original_hw: tuple[int, int],
        regions: Sequence[Region] = (),
        region_arrays: Sequence[np.ndarray | None] | None = None,
        history: Sequence[Turn] = (),
        *,
        examples: int = 0,
    ) -> Prompt:
        """A question about an (H, W) = `original_hw` image, after the (user, assistant) turns of
        `history`, checked and encoded for generation: the one path of every inference caller.

        Regions are in original pixels, one per `<region>` over the conversation (appended to the
        question when it has none, `with_placeholders`); `examples` in-context examples come before the
        image (`with_examples`). Raises InputError for an empty question, a region count that does not
        match the placeholders, a region outside the image, or a prompt past `model_max_length`."""
        if not question.strip():
            raise InputError("the question is empty")
        question = with_placeholders(question, len(regions), history)
        ids, _ = self.encode_conversation([*history, Turn(role="user", content=question)], add_generation_prompt=True,
                                          examples=examples)
        return Prompt(torch.tensor(ids), self.rasterize_regions(ids, regions, region_arrays, original_hw))

    # ---------------------------------------------------------------- samples
    def encode(
        self,
        image: Any,
        turns: Sequence[Turn],
        regions: Sequence[Region] = (),
        region_arrays: Sequence[np.ndarray | None] | None = None,
        target_masks: Sequence[np.ndarray] = (),
        *,
        add_generation_prompt: bool = False,
        examples: Sequence["Example"] = (),
    ) -> Encoded:
        """Everything the model needs for one image + conversation.

        `region_arrays[i]` is the loaded mask for a MaskRegion (None otherwise); `target_masks`
        are (H, W) arrays, nonzero = foreground, one per `[SEG]` in the answers, in order.
        `examples` are checked in-context (image, mask) pairs shown before the image, encoded per
        `config.icl.encoding`; regions, targets and `[SEG]` belong to the image (the query)."""
        img = self.prepare_image(image)
        ids, labels = self.encode_conversation(turns, add_generation_prompt=add_generation_prompt,
                                               examples=len(examples))
        example_pixels = [self.prepare_image(a).vision_pixels for a in self.example_images(examples)]
        region_masks = self.rasterize_regions(ids, regions, region_arrays, img.original_hw)
        targets = []
        for m in target_masks:
            if m.shape[:2] != img.original_hw:
                raise InputError(f"target mask is {m.shape[1]}x{m.shape[0]} "
                                 f"but the image is {img.original_hw[1]}x{img.original_hw[0]}")
            targets.append(torch.from_numpy((np.asarray(m) > 0).astype(np.float32)))
        n_seg = sum(1 for t, lab in zip(ids, labels) if t == self.seg_id and lab != IGNORE_INDEX)
        if not add_generation_prompt and n_seg != len(targets):
            raise InputError(f"the answers hold {n_seg} {SEG} tokens but {len(targets)} target masks were given")
        return Encoded(torch.tensor(ids), torch.tensor(labels), img, region_masks, targets, example_pixels)

    def example_images(self, examples: Sequence["ExampleInput"]) -> list[np.ndarray]:
        """The prompt images of in-context examples (Examples or (image, mask) pairs, checked; see
        `retrieval.examples.as_example`), in order: per example its overlay, or its image and then its
        mask image (config.icl.encoding); each (H, W, 3) uint8."""
        from medplib.retrieval.examples import as_example, encode_example

        self._check_example_count(len(examples))
        checked = [as_example(e, where=f"example {i + 1}") for i, e in enumerate(examples)]
        return [a for ex in checked for a in encode_example(ex, self.config.icl.encoding)]

    def _check_example_count(self, n: int) -> None:
        if n > self.config.icl.max_examples:
            raise InputError(f"{n} in-context examples given; this model takes at most "
                             f"{self.config.icl.max_examples} (icl.max_examples)")

    def encode_loaded(self, loaded: LoadedSample) -> Encoded:
        """A sample from `medplib.data.loading` (the training Dataset's item) -> Encoded."""
        masks = [t for t in loaded.target_masks if t is not None]
        return self.encode(loaded.image, loaded.sample.conversations, loaded.regions, loaded.region_masks, masks,
                           examples=loaded.examples)

    def collate(self, items: Sequence[Encoded]) -> dict[str, Any]:
        """Right-pad token sequences; images stack; regions and targets stay per-sample lists."""
        if not items:
            raise InputError("cannot collate an empty batch")
        longest = max(len(e.input_ids) for e in items)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(items), longest), pad, dtype=torch.long)
        labels = torch.full((len(items), longest), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((len(items), longest), dtype=torch.long)
        for i, e in enumerate(items):
            n = len(e.input_ids)
            input_ids[i, :n], labels[i, :n], attention[i, :n] = e.input_ids, e.labels, 1
        return {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": attention,
            "vision_pixels": torch.stack([e.image.vision_pixels for e in items]),
            "pixel_values": torch.stack([e.image.pixel_values for e in items]),
            "region_masks": [e.region_masks for e in items],
            "target_masks": [e.target_masks for e in items],
            "original_hw": [e.image.original_hw for e in items],
            "pixel_valid_hw": [e.image.pixel_valid_hw for e in items],
            # per sample (k_b, 3, Sv, Sv): its in-context example images, k_b = 0 without any
            "example_pixels": [torch.stack(e.examples) if e.examples else e.image.vision_pixels.new_zeros(
                (0, *e.image.vision_pixels.shape)) for e in items],
        }

    @staticmethod
    def to_device(batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
        """A `collate` batch with every tensor on `device` (the per-sample lists too); a new dict."""
        out = dict(batch)
        for key in ("input_ids", "labels", "attention_mask", "vision_pixels", "pixel_values"):
            out[key] = batch[key].to(device)
        for key in ("region_masks", "target_masks"):
            out[key] = [[m.to(device) for m in ms] for ms in batch[key]]
        out["example_pixels"] = [p.to(device) for p in batch["example_pixels"]]
        return out

    def decode(self, ids: Sequence[int]) -> str:
        """Answer text; `[SEG]` is kept (it marks where a mask was produced), `</s>` and padding dropped."""
        keep = [i for i in ids if i not in (self.tokenizer.eos_token_id, self.tokenizer.pad_token_id)]
        return self.tokenizer.decode(keep, skip_special_tokens=False).strip()
