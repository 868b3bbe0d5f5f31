"""The composed MedPLIB model: vision tower -> projector -> LLM (optionally MoE MLPs) -> text, with
region tokens from the region encoder, and `[SEG]` hidden states -> projection -> SAM-style mask decoder.

This module knows nothing about training recipes or data formats: `forward` takes a collated
batch from `medplib.processing.Processor` and returns the unweighted loss parts (the recipe weights
them, `medplib.training.recipe.LossSection`); `generate` decodes one sample
(`generate_batch` several, padded; see `medplib.model.decoding`) with the KV cache and turns every
emitted `[SEG]` into a mask at the original image size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from medplib.config import MedPLIBConfig
from medplib.data.schema import region_count_problem
from medplib.errors import CheckpointError, InputError
from medplib.model import packaged
from medplib.model.decoding import DecodeRequest, choose_token, generate_batch
from medplib.model.decoding import masks as decoding_masks
from medplib.model.efficientnet import load_imagenet
from medplib.model.losses import IGNORE_INDEX, bce_loss, dice_loss, focal_loss, soft_iou
from medplib.model.mask_decoder import MaskDecoder, postprocess_masks
from medplib.model.moe import LOSS_NAMES, RoutingInputs, moe_layers, recompute_context, replace_mlps_with_moe, routing
from medplib.model.pixel_cnn import CNNPixelEncoder
from medplib.model.pixel_encoder import PixelEncoder
from medplib.model.regions import RegionEncoder
from medplib.model.sam_checkpoint import load_sam_checkpoint
from medplib.model.tisr import TextualInversion, answer_words, contrastive_loss
from medplib.model.vision import VisionTower, build_projector

if TYPE_CHECKING:
    from medplib.model.box_grammar import BoxGrammar


@dataclass(frozen=True)
class SpecialIds:
    image: int
    region: int
    seg: int
    eos: int
    pad: int
    box: tuple[int, ...] = ()  # `<box>`, `</box>` (Med-GRIT's box delimiters) when the vocabulary has them


@dataclass
class ImageFeatures:
    """What an image costs once: vision patch features, and lazily the pixel-encoder embedding and
    the LLM's key/value cache of the prompt prefix (system prompt + image tokens), which every
    question about the image shares."""

    vision: torch.Tensor  # (1, grid*grid, Dv)
    pixel: torch.Tensor | None = None  # (1, C, h, w)
    prefix_ids: torch.Tensor | None = None  # (P,) the token ids the prefix cache was computed for
    prefix_cache: Any = None  # a transformers Cache over those P positions
    # The in-context example features (the very tensors, compared by identity) that prefix held: example
    # image tokens all share the `<image>` id, so the ids alone cannot tell two example sets apart.
    prefix_examples: tuple[torch.Tensor, ...] = ()

    def nbytes(self) -> int:
        tensors = [self.vision] + ([self.pixel] if self.pixel is not None else [])
        if self.prefix_cache is not None:
            tensors += [t for layer in self.prefix_cache.layers for t in (layer.keys, layer.values)]
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class MedPLIBOutput:
    logits: torch.Tensor  # (B, T, V) without labels; with labels (N, V) at the N positions that predict one
    # Unweighted scalar losses: ce, bce, dice, focal, iou (means over the batch's masks), the MoE
    # routing losses balance, z, route (sums over the MoE layers; 0 for a dense model) and TISR's
    # image-report contrastive loss (0 without TISR or labels; model/tisr.py).
    parts: dict[str, torch.Tensor] = field(default_factory=dict)
    mask_logits: list[list[torch.Tensor]] = field(default_factory=list)  # [b][k] (H, W)


@dataclass
class GenerationOutput:
    token_ids: list[int]
    mask_logits: list[torch.Tensor]  # one (H, W) float per emitted [SEG], original image size
    scores: list[float]  # the decoder's predicted IoU per mask


def _load_pretrained_llm(spec: str) -> nn.Module:
    """A transformers causal-LM folder or a GGUF file (dequantised to float32 by transformers)."""
    path = packaged.resolve(spec)
    try:
        if path.suffix == ".gguf":
            return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
        return AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, ImportError) as exc:
        raise CheckpointError(f"cannot load the LLM from {spec}: {exc}") from None


def _grow_embeddings(llm: nn.Module, vocab_size: int, spellings: Mapping[int, Sequence[int]]) -> None:
    """Add rows for medplib's special tokens. A new row starts at the mean of the pretrained rows of its own
    spelling (`<box>` -> `<`, `box`, `>`; `spellings`, from `tokenizer.special_token_spellings`), else at the
    mean of all pretrained rows. Every new token then sits where ordinary words sit, neither dominating the
    logits nor vanishing, and no two start equal: with one shared starting row, a model that may not train
    those rows cannot tell `[SEG]` from `<box>` when it writes them (measured: text boxes came out as
    `[SEG](x,y),(x,y)[SEG]`)."""
    old = llm.get_input_embeddings().num_embeddings
    if old >= vocab_size:
        return
    llm.resize_token_embeddings(vocab_size, mean_resizing=False)
    with torch.no_grad():
        for emb in {id(m): m for m in (llm.get_input_embeddings(), llm.get_output_embeddings())}.values():
            mean = emb.weight[:old].mean(dim=0)
            for i in range(old, vocab_size):
                pieces = [j for j in spellings.get(i, ()) if j < old]
                emb.weight[i] = emb.weight[pieces].mean(dim=0) if pieces else mean


def _build_llm(cfg: MedPLIBConfig, vocab_size: int, ids: SpecialIds,
               spellings: Mapping[int, Sequence[int]]) -> nn.Module:
    if cfg.llm.pretrained:
        llm = _load_pretrained_llm(cfg.llm.pretrained)
        _grow_embeddings(llm, vocab_size, spellings)
        # The pad id is medplib's (the collator pads with it); GGUF configs may carry quantisation notes.
        llm.config.pad_token_id = ids.pad
        llm.config.quantization_config = None
    else:
        hf = dict(cfg.llm.hf, vocab_size=vocab_size, pad_token_id=ids.pad, eos_token_id=ids.eos)
        llm = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.llm.kind, **hf))
    if cfg.llm.freeze:
        llm.requires_grad_(False)
    return llm


def _build_pixel_parts(cfg: MedPLIBConfig) -> tuple[nn.Module, MaskDecoder]:
    """The pixel encoder and the mask decoder, with `pixel.checkpoint` loaded into them when set."""
    decoder = MaskDecoder(cfg.decoder)
    if cfg.pixel.kind == "efficientnet":
        encoder: nn.Module = CNNPixelEncoder(cfg.pixel)
        if cfg.pixel.checkpoint:
            load_imagenet(encoder.backbone, packaged.resolve(cfg.pixel.checkpoint))
    else:
        encoder = PixelEncoder(cfg.pixel)
        if cfg.pixel.checkpoint:
            load_sam_checkpoint(packaged.resolve(cfg.pixel.checkpoint), encoder, decoder)
    if cfg.pixel.freeze:
        encoder.requires_grad_(False)
    return encoder, decoder


class MedPLIBModel(nn.Module):
    def __init__(self, cfg: MedPLIBConfig, vocab_size: int, ids: SpecialIds,
                 spellings: Mapping[int, Sequence[int]] | None = None):
        """spellings: token id -> the ids of its text in the LLM's own vocabulary, where the new rows of a
        pretrained LLM start (`_grow_embeddings`); ignored for a random-init LLM and for loaded weights."""
        super().__init__()
        self.cfg, self.ids = cfg, ids
        self.vision = VisionTower(cfg.vision)
        self.llm = _build_llm(cfg, vocab_size, ids, spellings or {})
        hidden = self.llm.config.hidden_size
        self.projector = build_projector(cfg.projector, self.vision.hidden_size, hidden)
        self.region_encoder = RegionEncoder(self.vision.hidden_size, hidden, cfg.region.max_points, cfg.region.spatial)
        self.pixel_encoder, self.mask_decoder = _build_pixel_parts(cfg)
        # Published: Linear(H, H), ReLU, Linear(H, 256) on the hidden state that predicts [SEG].
        self.seg_proj = nn.Sequential(
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, cfg.decoder.transformer_dim)
        )
        if cfg.moe.num_experts:
            replace_mlps_with_moe(self.llm, cfg.moe)
        # Built last, and only when on: the other parts draw the same random init with or without it, and a
        # model without TISR has no extra module, key or random draw.
        self.tisr = (TextualInversion(cfg.tisr, self.vision.hidden_size, hidden,
                                      blocked=(ids.image, ids.region, ids.seg, ids.pad))
                     if cfg.tisr.enabled else None)
        # How cached decoding runs its steps: "eager" (the reference), "static" or "compiled" (decoding.py).
        self.decode_mode = "eager"

    # ------------------------------------------------------------------ parts
    def _moe_layers(self) -> list[nn.Module]:
        return moe_layers(self.llm) if self.cfg.moe.num_experts else []

    def encode_vision(self, vision_pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, Sv, Sv) -> (B, grid*grid, Dv); no graph is kept when the tower is frozen."""
        trainable = any(p.requires_grad for p in self.vision.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and trainable):
            return self.vision(vision_pixels)

    def encode_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, Sp, Sp) -> (B, C, Sp/p, Sp/p) pixel-encoder embeddings."""
        trainable = any(p.requires_grad for p in self.pixel_encoder.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and trainable):
            return self.pixel_encoder(pixel_values.to(next(self.pixel_encoder.parameters()).dtype))

    def _pool_tokens(self, vision_feats: torch.Tensor, side: int | None = None) -> torch.Tensor:
        """(B, g*g, Dv) -> (B, t*t, Dv), average-pooled to the token grid t: `side`, else the config's
        (query) token grid."""
        t = side or self.cfg.vision.token_grid
        if not t or (side is not None and side**2 == vision_feats.shape[1]):
            return vision_feats
        b, n, d = vision_feats.shape
        g = int(round(n**0.5))
        grid = vision_feats.transpose(1, 2).reshape(b, d, g, g)
        return F.adaptive_avg_pool2d(grid, t).flatten(2).transpose(1, 2)

    def pseudo_words(self, vision_feats: torch.Tensor) -> torch.Tensor:
        """TISR's pseudo-words of the query images: vision_feats (B, N, Dv) -> (B, K, H) (model/tisr.py)."""
        if self.tisr is None:
            raise InputError("this model has no TISR pseudo-words (tisr.enabled is false)")
        return self.tisr(vision_feats, self.llm.get_input_embeddings().weight)

    def embed(self, input_ids: torch.Tensor, vision_feats: torch.Tensor, region_masks: list[list[torch.Tensor]],
              example_feats: list[list[torch.Tensor]] | None = None,
              pseudo_words: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with image features at `<image>` ids and region tokens at `<region>` ids.

        input_ids (B, T); vision_feats (B, N, Dv), the query images -> (B, T, H). `example_feats[b]`:
        sample b's in-context example images in prompt order, tensors (n_i, N, Dv) concatenated along
        dim 0; their tokens (pooled to `cfg.example_grid`) fill the `<image>` ids before the query's.
        With TISR the query's last K `<image>` ids take its pseudo-words (B, K, H): `pseudo_words` when
        given (`forward` reuses them for its loss), else computed here. Regions are read from the query's
        features."""
        emb = self.llm.get_input_embeddings()(input_ids)
        is_img = input_ids == self.ids.image
        n_img = is_img.sum(dim=1)
        examples = ([torch.cat(f) if f else None for f in example_feats] if example_feats is not None
                    else [None] * len(n_img))
        if len(examples) != input_ids.shape[0]:
            raise InputError(f"{len(examples)} example lists for {input_ids.shape[0]} sequences")
        n_ex = [0 if f is None else int(f.shape[0]) for f in examples]
        want = [self.cfg.num_query_tokens + k * self.cfg.num_example_tokens for k in n_ex]
        if n_img.tolist() != want:
            if not any(n_ex):
                raise InputError(f"each sequence needs {self.cfg.num_query_tokens} image tokens, "
                                 f"found {n_img.tolist()}")
            raise InputError(f"with {n_ex} example images the sequences need {want} image tokens, "
                             f"found {n_img.tolist()}")
        img = self.projector(self._pool_tokens(vision_feats)).to(emb.dtype)  # (B, n, H)
        if self.tisr is not None:
            words = pseudo_words if pseudo_words is not None else self.pseudo_words(vision_feats)
            img = torch.cat([img, words.to(emb.dtype)], dim=1)  # (B, n + K, H): beside the image tokens
        if any(n_ex):
            # Examples precede the query in every prompt; masked_scatter fills row by row, in order.
            ex = self.projector(self._pool_tokens(torch.cat([f for f in examples if f is not None]),
                                                  self.cfg.example_grid)).to(emb.dtype)  # (sum k, Ne, H)
            per_row = list(ex.split([k for k in n_ex if k]))
            rows = [torch.cat([per_row.pop(0).flatten(0, 1), img[b]]) if k else img[b] for b, k in enumerate(n_ex)]
            img = torch.cat(rows)
        emb = emb.masked_scatter(is_img.unsqueeze(-1), img)
        is_reg = input_ids == self.ids.region
        if is_reg.any() or any(region_masks):
            tokens = self.region_encoder(vision_feats, region_masks)
            emb = emb.clone()
            for b, t in enumerate(tokens):
                pos = torch.nonzero(is_reg[b], as_tuple=True)[0]
                problem = region_count_problem(pos.numel(), t.shape[0])
                if problem:
                    raise InputError(f"sample {b}: {problem}")
                emb[b, pos] = t.to(emb.dtype)
        return emb

    def decode_masks(
        self, pixel_embeddings: torch.Tensor, seg_hidden: torch.Tensor,
        original_hw: list[tuple[int, int]], valid_hw: list[tuple[int, int]],
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """One mask per [SEG]: pixel_embeddings (n, C, h, w), seg_hidden (n, H) -> n logits (H_i, W_i), iou (n,)."""
        prompts = self.seg_proj(seg_hidden.to(next(self.seg_proj.parameters()).dtype)).unsqueeze(1)
        low_res, iou = self.mask_decoder(pixel_embeddings.to(prompts.dtype), prompts)
        size = self.cfg.pixel.image_size
        masks = [postprocess_masks(low_res[i : i + 1], size, valid_hw[i], original_hw[i])[0, 0]
                 for i in range(len(original_hw))]
        return masks, iou.view(-1)

    def enable_activation_checkpointing(self) -> None:
        """Recompute the LLM's layer activations in the backward pass instead of keeping them
        (non-reentrant), with the MoE layers' per-batch routing inputs restored for the recompute
        (`medplib.model.moe.recompute_context`), so checkpointing never changes which tokens route where."""
        self.llm.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False, "context_fn": recompute_context(self.llm)})

    # ------------------------------------------------------------------ training
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        vision_pixels: torch.Tensor,
        pixel_values: torch.Tensor,
        region_masks: list[list[torch.Tensor]],
        target_masks: list[list[torch.Tensor]],
        original_hw: list[tuple[int, int]],
        pixel_valid_hw: list[tuple[int, int]],
        labels: torch.Tensor | None = None,
        example_pixels: list[torch.Tensor] | None = None,
        token_groups: torch.Tensor | None = None,
        route_targets: torch.Tensor | None = None,
    ) -> MedPLIBOutput:
        """Teacher-forced loss parts. input_ids/labels/attention_mask (B, T); pixels (B, 3, S, S);
        example_pixels: per sample its in-context example images (k_b, 3, Sv, Sv), k_b may be 0.
        MoE models only: token_groups (B, T) for routing statistics, route_targets (B, T) expert
        per token (-1 = none) for the `route` loss (`medplib.training.data`)."""
        vision_feats = self.encode_vision(vision_pixels)
        example_feats = None
        if example_pixels is not None and any(p.shape[0] for p in example_pixels):
            # One tower pass for every example image of the batch, split back per sample.
            feats = self.encode_vision(torch.cat(list(example_pixels)).to(vision_pixels.device, vision_pixels.dtype))
            example_feats = [[f] if f.shape[0] else [] for f in feats.split([p.shape[0] for p in example_pixels])]
        words = self.pseudo_words(vision_feats) if self.tisr is not None else None  # (B, K, H)
        emb = self.embed(input_ids, vision_feats, region_masks, example_feats, words)
        moe = self._moe_layers()
        inputs = RoutingInputs(token_mask=attention_mask.bool(), groups=token_groups, targets=route_targets)
        with routing(self.llm, inputs):  # a no-op for a dense LLM
            hidden = self.llm.get_decoder()(inputs_embeds=emb, attention_mask=attention_mask,
                                            use_cache=False).last_hidden_state
        head = self.llm.get_output_embeddings()
        dev = hidden.device
        zero = torch.zeros((), device=dev)
        parts: dict[str, torch.Tensor] = {}
        if labels is None:
            logits = head(hidden)
            parts["ce"] = zero
        else:
            # The head only where a label is predicted: with a 49k vocabulary it is a fifth of a small LLM's
            # compute, and most positions are the prompt.
            predicts = labels[:, 1:] != IGNORE_INDEX
            logits = head(hidden[:, :-1][predicts])
            parts["ce"] = F.cross_entropy(logits.float(), labels[:, 1:][predicts]) if predicts.any() else zero
        # The hidden state at position i predicts token i+1: that is the one a [SEG] answer uses.
        answer = (labels[:, 1:] != IGNORE_INDEX if labels is not None
                  else torch.ones_like(input_ids[:, 1:], dtype=torch.bool))
        seg_at = (input_ids[:, 1:] == self.ids.seg) & answer
        mask_logits: list[list[torch.Tensor]] = [[] for _ in range(input_ids.shape[0])]
        bce, dice, focal, iou_l = [], [], [], []
        if seg_at.any():
            rows, cols = torch.nonzero(seg_at, as_tuple=True)
            for b in rows.unique().tolist():
                if int((rows == b).sum()) != len(target_masks[b]):
                    raise InputError(f"sample {b}: {int((rows == b).sum())} [SEG] tokens but "
                                     f"{len(target_masks[b])} target masks")
            used = rows.unique()
            pix = self.encode_pixels(pixel_values[used])
            slot = {int(b): i for i, b in enumerate(used.tolist())}
            masks, iou_pred = self.decode_masks(
                pix[[slot[int(b)] for b in rows]], hidden[rows, cols],
                [original_hw[int(b)] for b in rows], [pixel_valid_hw[int(b)] for b in rows],
            )
            k_of = {}
            for j, b in enumerate(rows.tolist()):
                k = k_of.get(b, 0)
                k_of[b] = k + 1
                target = target_masks[b][k].to(masks[j].device, masks[j].dtype)
                mask_logits[b].append(masks[j])
                bce.append(bce_loss(masks[j], target))
                dice.append(dice_loss(masks[j], target))
                focal.append(focal_loss(masks[j], target))
                iou_l.append((iou_pred[j] - soft_iou(masks[j].detach(), target).to(iou_pred.dtype)) ** 2)
        for name, xs in (("bce", bce), ("dice", dice), ("focal", focal), ("iou", iou_l)):
            parts[name] = torch.stack(xs).mean() if xs else zero
        for name in LOSS_NAMES:
            parts[name] = torch.stack([m.losses[name].to(dev) for m in moe]).sum() if moe else zero
        # The report's text side is the answer's own input embeddings (untouched by the image splicing).
        parts["contrastive"] = (contrastive_loss(words, emb, input_ids, answer_words(input_ids, labels, self.ids.eos),
                                                 self.cfg.tisr.temperature).to(dev)
                                if words is not None and labels is not None else zero)
        return MedPLIBOutput(logits=logits, parts=parts, mask_logits=mask_logits)

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def generate_batch(
        self, requests: list[DecodeRequest], mode: str | None = None
    ) -> list[GenerationOutput | Exception]:
        """Decode several prompts together, padded (`medplib.model.decoding.generate_batch`): per
        request its output or the exception it alone raised. `mode` defaults to `decode_mode`."""
        return generate_batch(self, requests, mode)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        features: ImageFeatures,
        pixel_values: torch.Tensor,
        region_masks: list[torch.Tensor],
        original_hw: tuple[int, int],
        pixel_valid_hw: tuple[int, int],
        *,
        max_new_tokens: int | None = None,
        use_cache: bool = True,
        temperature: float = 0.0,
        generator: torch.Generator | None = None,
        on_token: Callable[[int], None] | None = None,
        examples: list[torch.Tensor] | None = None,
        box_grammar: "BoxGrammar | None" = None,
    ) -> GenerationOutput:
        """Decode one sample: input_ids (1, T) ending with `ASSISTANT:`; pixel_values (1, 3, Sp, Sp).

        Greedy when temperature < MIN_SAMPLING_TEMPERATURE. `features.pixel` is computed on the first `[SEG]` only
        (and kept, so a later question on the same image reuses it). With the cache this is a batch
        of one of `generate_batch` (the image's prefix cache reused); without it, every step reruns
        the whole sequence (the slow reference). `examples`: the in-context example images' vision
        features (1, N, Dv) each, in prompt order (`embed`). `box_grammar`: boxes in the answer are
        decoded under it (`medplib.model.decoding`), with or without the cache."""
        examples = list(examples or [])
        if input_ids.shape[0] != 1:
            raise InputError("generate decodes one sample at a time")
        if use_cache:
            req = DecodeRequest(input_ids[0], features, pixel_values, region_masks, original_hw, pixel_valid_hw,
                                max_new_tokens, temperature, generator, on_token, examples=examples,
                                box_grammar=box_grammar)
            out = self.generate_batch([req])[0]
            if isinstance(out, Exception):
                raise out
            return out
        max_new = max_new_tokens or self.cfg.max_new_tokens
        limit = getattr(self.llm.config, "max_position_embeddings", None)
        if limit is not None:
            max_new = min(max_new, limit - input_ids.shape[1])
            if max_new <= 0:
                raise InputError(f"the prompt ({input_ids.shape[1]} tokens) fills the model's context of {limit}")
        decoder, head = self.llm.get_decoder(), self.llm.get_output_embeddings()
        embed_tokens = self.llm.get_input_embeddings()
        seq = self.embed(input_ids, features.vision, [region_masks], [examples])
        out = decoder(inputs_embeds=seq, use_cache=False)
        tokens: list[int] = []
        seg_hidden: list[torch.Tensor] = []
        constraint = box_grammar.start(max_new) if box_grammar is not None else None
        for _ in range(max_new):
            h = out.last_hidden_state[:, -1]  # (1, H)
            logits = head(h).float()
            nxt = choose_token(logits[0], temperature, generator, constraint)  # the cached path's rule
            tokens.append(nxt)
            if on_token is not None:
                on_token(nxt)
            if nxt == self.ids.seg:
                seg_hidden.append(h[0])
            if nxt == self.ids.eos:
                break
            seq = torch.cat([seq, embed_tokens(torch.tensor([[nxt]], device=input_ids.device))], dim=1)
            out = decoder(inputs_embeds=seq, use_cache=False)
        req = DecodeRequest(input_ids[0], features, pixel_values, region_masks, original_hw, pixel_valid_hw)
        return decoding_masks(self, req, tokens, seg_hidden, GenerationOutput)
