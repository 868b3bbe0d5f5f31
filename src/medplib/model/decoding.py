"""Batched, padding-aware decoding for MedPLIB, with an eager and a static-cache (optionally
compiled) decoding step. `MedPLIBModel.generate` is this module's batch of one.

Layout of a batch of B prompts. Every prompt starts with the same-length image prefix (system
prompt + image tokens, see `prefix_length`) whose key/value cache each image keeps
(`ImageFeatures.prefix_cache`), so the prefix is never recomputed for a known image. The rest of
each prompt (the question, its regions, the history) is left-padded to the longest one:

    slot:    0 ........ P-1 | P ........................ P+S-1 | P+S ... (decoded tokens)
    row b:   prefix of b    | pad ... pad | question of b      | answer of b

Padding slots are masked out of attention (and out of MoE routing and capacity), positions skip
them (a row's positions are 0..P-1, then P, P+1, ... over its real tokens), so every row sees what
it would see alone. Left padding puts every row's last prompt token in the same slot, so the first
answer token of every row comes from the same column and all rows then advance one slot per step.
A row that has stopped (end of answer, its own token limit, or an error in its callback) keeps a
place in the batch until the last row stops, fed the pad token and ignored; the shapes stay fixed,
which a compiled step needs.

Decoding step modes (`MedPLIBModel.decode_mode`):
- "eager": transformers' decoder with its dynamic cache: the reference;
- "static": the cache preallocated for the whole answer (keys/values (B, kv_heads, L, head_dim) per
  layer, L rounded up to a bucket of `SLOT_BUCKET` slots) and a step written against it: the new
  key/value goes into its slot in place and attention reads all L slots under a mask, so the step
  has the same shapes at every token;
- "compiled": the static step under `torch.compile`. Shapes are fixed within a bucket (B, L), so
  the compile cost is paid once per bucket and later answers reuse it. A top-1 MoE layer routes
  through `torch.cond` there (moe.py), so the step is one graph reading one expert per layer.
Greedy tokens are the same in all three modes (tests/test_decoding.py); logits differ by float
round-off (a different summation order), so a near-tie could in principle flip a greedy choice.

Boxes in text: a request with a `box_grammar` (`medplib.model.box_grammar.BoxGrammar`, one per
format, shared) has its row's logits masked by its own walk through that grammar (`BoxConstraint`)
before the greedy argmax or the sampling, in every mode, so each box it opens is well formed, on
the grid and closed within the row's token budget. Rows without one are decoded as before.

The static step is written for the LLaMA-style decoders medplib builds (`llm.kind` llama or
qwen2: `self_attn.{q,k,v,o}_proj`, `input_layernorm`, `post_attention_layernorm`, `mlp`, a
`rotary_emb` and a final `norm`), so it does not depend on how a transformers release passes its
cache to attention.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from medplib.errors import InputError
from medplib.model.moe import RoutingInputs, routing

if TYPE_CHECKING:
    from medplib.model.box_grammar import BoxConstraint, BoxGrammar
    from medplib.model.medplib import GenerationOutput, ImageFeatures, MedPLIBModel

DECODE_MODES = ("eager", "static", "compiled")
SLOT_BUCKET = 256  # static caches hold a multiple of this many slots: fewer distinct shapes to compile
# Temperatures below this decode greedily: sampling at them is greedy but for exact ties, and logits / t
# overflows to inf (NaN probabilities) as t nears 0 (1e-300, 5e-324).
MIN_SAMPLING_TEMPERATURE = 1e-4


@dataclass
class DecodeRequest:
    """One prompt of a batch, ready for the LLM."""

    input_ids: torch.Tensor  # (T,) long, ending with the assistant prompt
    features: "ImageFeatures"
    pixel_values: torch.Tensor  # (1, 3, Sp, Sp), for the pixel encoder at the first [SEG]
    region_masks: list[torch.Tensor]  # one (Sv, Sv) bool per <region>
    original_hw: tuple[int, int]
    pixel_valid_hw: tuple[int, int]
    max_new_tokens: int | None = None  # None: the config's max_new_tokens
    temperature: float = 0.0
    generator: torch.Generator | None = None
    on_token: Callable[[int], None] | None = None
    # in-context example images before the query: their vision features (1, N, Dv) each, in prompt order
    examples: list[torch.Tensor] = field(default_factory=list)
    box_grammar: "BoxGrammar | None" = None  # boxes in the answer decoded under this grammar (its format)


def _same_tensors(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> bool:
    """The same tensor objects in the same order (a prefix cache holds for the very example features
    it was computed with; every example token shares the `<image>` id)."""
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


def prefix_length(input_ids: torch.Tensor, image_id: int) -> int:
    """Tokens up to and including the `<im_end>` after the last image token: the part of a prompt
    that is the same for every question about one image. input_ids (T,)."""
    return int(torch.nonzero(input_ids == image_id)[-1]) + 2


def run_decoder(decoder: nn.Module, embeds: torch.Tensor, cache: Any = None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """transformers' decoder with a cache -> (last hidden states (B, T, H), the cache). The cache
    argument is `cache` in recent 5.x releases and `past_key_values` before."""
    name = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
    out = decoder(inputs_embeds=embeds, use_cache=True, **{name: cache}, **kwargs)
    return out.last_hidden_state, getattr(out, name)


def _stack_prefix(caches: Sequence[Any], n_layers: int) -> DynamicCache:
    """One dynamic cache holding B prefix caches side by side (B, kv_heads, P, d) per layer. A copy:
    the stored prefixes stay at their length while the batch's cache grows."""
    cache = DynamicCache()
    for layer in range(n_layers):
        cache.update(torch.cat([c.layers[layer].keys for c in caches]),
                     torch.cat([c.layers[layer].values for c in caches]), layer)
    return cache


def _attention_mask(valid: torch.Tensor, q_start: int, dtype: torch.dtype, additive: bool) -> torch.Tensor:
    """The 4-D mask for queries at slots q_start.. over keys at slots 0..K-1.

    valid (B, K) bool, True = a real token. Query slot i sees key slot j when j <= i and j is real;
    a padding query also sees itself, so its row is never empty (an empty row's softmax is NaN, and
    a NaN value at a masked key would still poison every row through 0 * NaN).
    Returns (B, 1, K - q_start, K): bool (True = attend) for SDPA, or 0 / dtype-min when `additive`."""
    B, K = valid.shape
    q = torch.arange(q_start, K, device=valid.device)[:, None]  # (Q, 1)
    k = torch.arange(K, device=valid.device)[None, :]  # (1, K)
    see = (k <= q)[None] & (valid[:, None, :] | (k == q)[None])  # (B, Q, K)
    see = see[:, None]
    if not additive:
        return see
    return torch.zeros(see.shape, dtype=dtype, device=valid.device).masked_fill(~see, torch.finfo(dtype).min)


class StaticStep(nn.Module):
    """One decoding token for B rows against a preallocated cache (the "static" and "compiled" modes).

    forward(emb (B, 1, H), position (B, 1) long, slot (1,) long, visible (B, 1, 1, L) bool,
            keys, values: per layer (B, kv_heads, L, head_dim), written in place at `slot`)
        -> logits (B, V) float32, hidden (B, H): the final hidden state (what a [SEG] answer uses)."""

    def __init__(self, llm: nn.Module):
        super().__init__()
        self.decoder, self.head = llm.get_decoder(), llm.get_output_embeddings()
        n = llm.config.num_hidden_layers
        self.layers = list(self.decoder.layers[:n])
        for part in ("rotary_emb", "norm"):
            if not hasattr(self.decoder, part):
                raise InputError(f"static decoding needs a LLaMA-style decoder; "
                                 f"{type(self.decoder).__name__} has no {part}")
        attn = self.layers[0].self_attn
        if not all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")):
            raise InputError(f"static decoding needs LLaMA-style attention, not {type(attn).__name__}")
        if getattr(llm.config, "use_sliding_window", False):
            raise InputError("static decoding does not support sliding-window attention")
        self.head_dim = int(attn.head_dim)
        self.groups = llm.config.num_attention_heads // llm.config.num_key_value_heads

    def forward(self, emb: torch.Tensor, position: torch.Tensor, slot: torch.Tensor, visible: torch.Tensor,
                keys: list[torch.Tensor], values: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        B = emb.shape[0]
        cos, sin = self.decoder.rotary_emb(emb, position)
        h = emb
        for layer, k_cache, v_cache in zip(self.layers, keys, values):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(B, 1, -1, self.head_dim).transpose(1, 2)  # (B, heads, 1, d)
            k = attn.k_proj(x).view(B, 1, -1, self.head_dim).transpose(1, 2)  # (B, kv_heads, 1, d)
            v = attn.v_proj(x).view(B, 1, -1, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            k_cache.index_copy_(2, slot, k.to(k_cache.dtype))
            v_cache.index_copy_(2, slot, v.to(v_cache.dtype))
            # Grouped-query attention reads each key/value head for its `groups` query heads in place
            # (enable_gqa), instead of copying the whole cache `groups` times per layer per token.
            o = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=visible, scale=attn.scaling,
                                               enable_gqa=self.groups > 1)  # (B, heads, 1, d)
            h = h + attn.o_proj(o.transpose(1, 2).reshape(B, 1, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        h = self.decoder.norm(h)[:, -1]
        return self.head(h).float(), h


class _Steps:
    """The static step of one model, eager and compiled (compiled lazily, on first use)."""

    def __init__(self, llm: nn.Module):
        self.step = StaticStep(llm)
        self.compiled: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None
        self.buckets: set[tuple[int, int]] = set()  # (B, L) shapes the compiled step has run at

    def get(self, compiled: bool, bucket: tuple[int, int]) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
        if not compiled:
            return self.step
        if self.compiled is None:
            # dynamic=False: one specialised graph per (B, L) bucket, each compiled once.
            self.compiled = torch.compile(self.step, dynamic=False)
        self.buckets.add(bucket)
        return self.compiled


def steps_of(model: "MedPLIBModel") -> _Steps:
    """The model's static steps, built on first use (kept on the model: they hold its modules)."""
    steps = model.__dict__.get("_static_steps")
    if steps is None:
        steps = _Steps(model.llm)
        model.__dict__["_static_steps"] = steps  # not a submodule: it holds the model's own modules
    return steps


def choose_token(logits: torch.Tensor, temperature: float, generator: torch.Generator | None,
                 constraint: "BoxConstraint | None" = None) -> int:
    """logits (V,) float32 -> the next token: greedy below MIN_SAMPLING_TEMPERATURE, sampled above;
    with a box `constraint`, among the tokens it allows only (and it takes the token chosen)."""
    if constraint is not None:
        logits = constraint.mask(logits)  # before the temperature: refused tokens get probability 0
    if temperature >= MIN_SAMPLING_TEMPERATURE:
        t = int(torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1, generator=generator))
    else:
        t = int(logits.argmax())
    if constraint is not None:
        constraint.advance(t)
    return t


@torch.no_grad()
def generate_batch(model: "MedPLIBModel", requests: Sequence[DecodeRequest], mode: str | None = None
                   ) -> list["GenerationOutput | Exception"]:
    """Decode B prompts together (module docstring). Returns, per request in order, its
    GenerationOutput, or the exception that request raised: a request that fails (its prompt, its
    callback or its masks) fails alone, and the others are answered as if it had not been there.
    An error of the batch as a whole is raised (callers retry its requests one at a time)."""
    from medplib.model.medplib import GenerationOutput

    mode = mode or model.decode_mode
    if mode not in DECODE_MODES:
        raise InputError(f"decode mode must be one of {', '.join(DECODE_MODES)}; got {mode!r}")
    results: list[Any] = [None] * len(requests)
    limit = getattr(model.llm.config, "max_position_embeddings", None)
    rows: list[int] = []  # requests that reach the LLM
    embeds, budgets = [], []
    for i, r in enumerate(requests):
        try:
            if r.input_ids.dim() != 1:
                raise InputError(f"a decode request's input_ids must be (T,), got {tuple(r.input_ids.shape)}")
            budget = r.max_new_tokens or model.cfg.max_new_tokens
            if limit is not None:
                budget = min(budget, limit - r.input_ids.numel())
                if budget <= 0:
                    raise InputError(f"the prompt ({r.input_ids.numel()} tokens) fills the model's context of {limit}")
            emb = model.embed(r.input_ids[None], r.features.vision, [r.region_masks], [r.examples])  # (1, T, H)
        except Exception as exc:  # noqa: BLE001 - this request's own failure
            results[i] = exc
            continue
        rows.append(i)
        embeds.append(emb)
        budgets.append(budget)
    if not rows:
        return results

    decoder, head = model.llm.get_decoder(), model.llm.get_output_embeddings()
    embed_tokens = model.llm.get_input_embeddings()
    n_layers = model.llm.config.num_hidden_layers
    reqs = [requests[i] for i in rows]
    B, dev = len(reqs), embeds[0].device

    # The image prefix: reused from each image's cache when every prompt has one of the same length.
    lengths = [prefix_length(r.input_ids, model.ids.image) for r in reqs]
    P = lengths[0] if len(set(lengths)) == 1 and all(n < r.input_ids.numel() for n, r in zip(lengths, reqs)) else 0
    if P:
        for r, emb in zip(reqs, embeds):
            f = r.features
            if (f.prefix_ids is None or not torch.equal(f.prefix_ids, r.input_ids[:P])
                    or not _same_tensors(f.prefix_examples, r.examples)):
                f.prefix_cache = run_decoder(decoder, emb[:, :P])[1]
                f.prefix_ids = r.input_ids[:P].clone()
                f.prefix_examples = tuple(r.examples)
        cache = _stack_prefix([r.features.prefix_cache for r in reqs], n_layers)
    else:
        cache = DynamicCache()

    # The rest of each prompt, left-padded to S.
    rest = [emb[0, P:] for emb in embeds]
    S = max(x.shape[0] for x in rest)
    pads = [S - x.shape[0] for x in rest]
    suffix = embeds[0].new_zeros(B, S, embeds[0].shape[-1])
    valid = torch.ones(B, P + S, dtype=torch.bool, device=dev)  # over slots
    for b, (x, pad) in enumerate(zip(rest, pads)):
        suffix[b, pad:] = x
        valid[b, P:P + pad] = False
    padded = any(pads)
    additive = model.llm.config._attn_implementation != "sdpa"
    if padded:
        # A row's positions count its real tokens only; padding slots get any position (they are masked).
        position = (P + (torch.arange(S, device=dev)[None] - torch.tensor(pads, device=dev)[:, None])).clamp(min=0)
        mask = _attention_mask(valid, P, suffix.dtype, additive)
    else:
        position, mask = None, None  # every row is full: transformers' own causal path, as for one prompt
    with routing(model.llm, RoutingInputs(token_mask=valid[:, P:] if padded else None)):  # MoE: padding is no token
        hidden, cache = run_decoder(decoder, suffix, cache, attention_mask=mask, position_ids=position)
    h = hidden[:, -1]  # (B, H): left padding puts every row's last prompt token here
    logits = head(h).float()
    next_pos = torch.tensor([P + S - pad for pad in pads], device=dev)[:, None]  # (B, 1)

    static = mode in ("static", "compiled")
    steps_left = max(budgets)
    if static:
        L = -(-(P + S + steps_left) // SLOT_BUCKET) * SLOT_BUCKET
        keys, values = [], []
        for layer in cache.layers[:n_layers]:
            k = layer.keys.new_zeros(*layer.keys.shape[:2], L, layer.keys.shape[-1])
            v = layer.values.new_zeros(*layer.values.shape[:2], L, layer.values.shape[-1])
            k[:, :, : P + S], v[:, :, : P + S] = layer.keys, layer.values
            keys.append(k)
            values.append(v)
        del cache
        visible = torch.zeros(B, 1, 1, L, dtype=torch.bool, device=dev)
        visible[:, 0, 0, : P + S] = valid
        step_fn = steps_of(model).get(mode == "compiled", (B, L))
        slot = torch.tensor([P + S], device=dev)

    tokens: list[list[int]] = [[] for _ in range(B)]
    seg_hidden: list[list[torch.Tensor]] = [[] for _ in range(B)]
    done = [False] * B
    errors: list[Exception | None] = [None] * B
    constraints: list[BoxConstraint | None] = [None] * B
    for b, r in enumerate(reqs):
        if r.box_grammar is not None:
            try:
                constraints[b] = r.box_grammar.start(budgets[b])  # the row's own budget: its boxes close in time
            except Exception as exc:  # noqa: BLE001 - e.g. a tokenizer the grammar cannot budget: this row alone
                errors[b], done[b] = exc, True
    for _ in range(steps_left):
        if all(done):
            break
        nxt = []
        for b, r in enumerate(reqs):
            if done[b]:
                nxt.append(model.ids.pad)
                continue
            t = choose_token(logits[b], r.temperature, r.generator, constraints[b])
            tokens[b].append(t)
            nxt.append(t)
            if r.on_token is not None:
                try:
                    r.on_token(t)
                except Exception as exc:  # noqa: BLE001 - e.g. a streaming client gone: this row stops alone
                    errors[b], done[b] = exc, True
                    continue
            if t == model.ids.seg:
                seg_hidden[b].append(h[b])
            if t == model.ids.eos or len(tokens[b]) >= budgets[b]:
                done[b] = True
        if all(done):
            break
        step = embed_tokens(torch.tensor(nxt, device=dev)[:, None])  # (B, 1, H)
        if static:
            visible[:, 0, 0, slot] = True
            logits, h = step_fn(step, next_pos, slot, visible, keys, values)
            slot = slot + 1
        else:
            if padded:
                valid = torch.cat([valid, valid.new_ones(B, 1)], dim=1)
                mask = _attention_mask(valid, valid.shape[1] - 1, step.dtype, additive)
            hidden, cache = run_decoder(decoder, step, cache, attention_mask=mask,
                                        position_ids=next_pos if padded else None)
            h = hidden[:, -1]
            logits = head(h).float()
        next_pos = next_pos + 1

    for b, (i, r) in enumerate(zip(rows, reqs)):
        if errors[b] is not None:
            results[i] = errors[b]
            continue
        try:
            results[i] = masks(model, r, tokens[b], seg_hidden[b], GenerationOutput)
        except Exception as exc:  # noqa: BLE001 - this request's masks only
            results[i] = exc
    return results


def masks(model: "MedPLIBModel", r: DecodeRequest, tokens: list[int], seg_hidden: list[torch.Tensor],
           output: type) -> "GenerationOutput":
    """One mask per [SEG] of a row; the image's pixel embedding is computed at its first [SEG] and kept."""
    if not seg_hidden:
        return output(tokens, [], [])
    if r.features.pixel is None:
        r.features.pixel = model.encode_pixels(r.pixel_values)
    n = len(seg_hidden)
    masks, iou = model.decode_masks(r.features.pixel.expand(n, -1, -1, -1), torch.stack(seg_hidden),
                                    [r.original_hw] * n, [r.pixel_valid_hw] * n)
    return output(tokens, [m.float() for m in masks], iou.float().tolist())
