"""Mixture-of-Experts MLPs for the LLM, and upcycling of dense MLPs into experts.

MedPLIB turns every LLM MLP into an MoE of 2 experts with top-1 routing: expert 0 is the
pixel-grounding expert (stage III MLPs), expert 1 the vision-language expert (stage II MLPs).

Why our own small module instead of transformers' Mixtral / Qwen2-MoE blocks: transformers 5.x
stores those experts as fused 3-D weight tensors and has no capacity / token-dropping semantics.
We upcycle dense LlamaMLP / Qwen2MLP modules, and their weights must stay in the dense layout
(`gate_proj` / `up_proj` / `down_proj` Linear modules) so that stage merges copy them one to one
and LoRA keeps targeting them by name.

Routing, per (non-padding) token x of shape (H,):
    logits = router(x) in fp32            (E,)
    probs  = softmax(logits)              (E,)
    top-k experts by probs; gates = their probs (k=1: the raw probability, as published;
    k>1: renormalised to sum to 1, as in Mixtral, so the output keeps the scale of one expert)
    k=1 with gate="straight_through": gate = p / p.detach(), 1.0 in the forward, dp/p in the backward
    y = sum over kept selections of gate * expert(x)

Capacity: each expert takes at most ceil(capacity_factor * N * k / E) tokens per forward, N = the
number of non-padding tokens in the batch; selections past it are dropped (they contribute zero and
the decoder layer's residual carries the token). Queue order is GShard's: all first choices before
any second choice, and within a choice the flattened (batch, time) order. DeepSpeed's default
(which the published code uses) picks the kept tokens at random and counts padding tokens toward N
and toward the queues; we exclude padding from both, so the amount of padding in a batch cannot
change which real tokens are dropped.

Why a straight-through gate: right after upcycling the router is near-random, so every token's top-1
probability is about 1/E and the published gate scales each MLP output by ~0.5. A model trained for
500k samples recovers; a short CPU run does not (our small demo lost most of stage III's grounding
this way). The straight-through gate starts stage IV exactly at the dense experts' outputs and still
trains the router: d(loss)/d(router) = (d(loss)/dy . expert(x)) * d(log p).

Why task-supervised routing (the `route` loss, not published): a straight-through gate keeps the
scale, but a near-random router still sends about half of a grounding answer's tokens to the
vision-language expert, which never learned to emit [SEG]; the published run has 500k samples to
sort this out, a CPU run has a few hundred steps. Given route targets, each token of a question and
its answer gets the expert of its task, and cross-entropy(router logits, target) is the `route`
loss. Only tokens after the image are supervised: the system prompt and image tokens come before the
question, cannot see it, and so cannot know the task (a recipe may instead send them all to one expert:
`upcycle.prefix_expert`). Routing stays a learned function of the hidden state; inference is unchanged.

Losses are unweighted here: after a forward each layer holds `losses` = {balance, z, route}; the
training recipe's `loss` section weights them (training settings are not model settings).

Per-batch inputs (token mask, token groups, route targets) are arguments of one forward, given
through `routing(llm, RoutingInputs(...))`, a context that restores the previous inputs on exit.
Under activation checkpointing the backward pass recomputes each layer after that context has
exited, so `recompute_context(llm)` (a `torch.utils.checkpoint` `context_fn`) captures the inputs
a layer saw in the forward and re-enters them for its recompute: forward and recompute route the
same tokens.

Inference: a dropped token at inference would silently change answers, so in eval mode a forward
with T == 1 (a KV-cache decoding step) never drops. With `capacity_factor_eval >= E / k` (the
published 2.0 with E=2, k=1) a prefill cannot drop either, so cached and uncached generation agree.

Sync-free decoding (`sync_free = True`, or `set_sync_free(llm, True)`): the batch-1 top-1 decoding
step normally reads the chosen expert's index on the host and runs that expert alone, one host
round trip per layer per token (free on the CPU, a device sync on a GPU, and no CUDA graph can
capture it). Sync-free, every expert runs on the token and the chosen output is picked on the
device by index, so the step is one static graph; the answer is bit-identical. The price is E
experts' arithmetic and weight reads for that step. Gathering the chosen expert's weights by index
instead (stacked weights + index_select) would copy a whole expert per layer per token and keep a
second, stacked copy of every expert's weights; benchmarks/bench_moe.py measures both on the CPU.
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medplib.config import MoEConfig
from medplib.errors import ConfigError

# Small normal router init (std as transformers' `initializer_range`): routing starts as a near-random
# split with gates close to 1/E, so every expert receives tokens and gradients from the first step.
# A zero router would tie all logits and send every token to expert 0 until the router moved.
ROUTER_INIT_STD = 0.02
LOSS_NAMES = ("balance", "z", "route")


@dataclass(frozen=True)
class RoutingInputs:
    """Per-batch inputs of every MoE layer for one forward (module docstring).

    token_mask: (B, T) bool, True = real token (None = every token is real); groups: (B, T) small
    non-negative ints for routing statistics (e.g. 0 text/VQA, 1 region, 2 grounding); targets:
    (B, T) expert index per token, -1 = unsupervised (the `route` loss)."""

    token_mask: Tensor | None = None
    groups: Tensor | None = None
    targets: Tensor | None = None


NO_INPUTS = RoutingInputs()


class MoEMLP(nn.Module):
    """Top-k MoE with capacity, padding-aware routing, auxiliary losses and routing statistics.

    A drop-in replacement for a decoder layer's `mlp`: `forward(x: (B, T, H)) -> (B, T, H)`. Its
    per-batch inputs are `self.inputs`, set for one forward by `routing(...)`.

    After each forward:
        losses: {"balance", "z", "route"} unweighted scalar tensors: the Switch balance loss (1.0
            when balanced), the ST-MoE z-loss and the route cross-entropy (0 without targets)
        last_counts: (E,) long, router selections per expert over non-padding tokens (before capacity;
            sums to N * k)
        last_dropped: int, selections dropped by capacity (a property: reading it syncs the device)
        group_counts: (num_groups, E) long, selections per token group, accumulated over forwards
            until `reset_stats()` (with activation checkpointing the recompute counts again: collect
            statistics without it)
    """

    def __init__(self, experts: list[nn.Module], hidden_size: int, cfg: MoEConfig):
        super().__init__()
        if len(experts) < 1 or len(experts) != cfg.num_experts:
            raise ConfigError(f"MoEMLP got {len(experts)} experts but moe.num_experts is {cfg.num_experts}")
        if not 1 <= cfg.top_k <= cfg.num_experts:
            raise ConfigError(f"moe.top_k must be in 1..{cfg.num_experts}, got {cfg.top_k}")
        if cfg.gate not in ("prob", "straight_through") or (cfg.gate == "straight_through" and cfg.top_k != 1):
            raise ConfigError(
                f"moe.gate must be 'prob', or 'straight_through' with top_k=1; got {cfg.gate!r}, top_k={cfg.top_k}"
            )
        self.cfg = cfg
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k
        self.experts = nn.ModuleList(experts)
        self.router = nn.Linear(hidden_size, self.num_experts, bias=False)
        nn.init.normal_(self.router.weight, std=ROUTER_INIT_STD)
        self.forced_expert: int | None = None  # analysis hook, see `force_expert`
        self.sync_free = False  # decoding step without a host read of the chosen expert (module docstring)
        self.inputs = NO_INPUTS
        self.losses: dict[str, Tensor] = {k: torch.zeros(()) for k in LOSS_NAMES}
        self.last_counts: Tensor = torch.zeros(self.num_experts, dtype=torch.long)
        self._dropped: Tensor = torch.zeros((), dtype=torch.long)
        self.reset_stats()

    @property
    def last_dropped(self) -> int:
        """Selections dropped by capacity in the last forward (kept as a tensor until asked: reading
        it forces a device sync, which a decoding step must not pay)."""
        return int(self._dropped)

    def reset_stats(self) -> None:
        """Clear the accumulated per-group counts."""
        self.group_counts: Tensor = torch.zeros(0, self.num_experts, dtype=torch.long)

    def capacity(self, n_tokens: int, seq_len: int) -> int | None:
        """Per-expert capacity for `n_tokens` non-padding tokens; None = unlimited."""
        if not self.training and seq_len == 1:
            return None
        factor = self.cfg.capacity_factor_train if self.training else self.cfg.capacity_factor_eval
        # The epsilon keeps float round-off just above an integer (2.0000000000000004) from adding a slot.
        return math.ceil(factor * n_tokens * self.top_k / self.num_experts - 1e-9)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, T, H) -> (B, T, H)."""
        if x.dim() != 3:
            raise ValueError(f"MoEMLP expects (B, T, H) input, got shape {tuple(x.shape)}")
        B, T, H = x.shape
        flat = x.reshape(B * T, H)
        mask = self.inputs.token_mask
        valid = self._per_token(None if mask is None else mask.bool(), B, T, x.device, "token mask")

        # fp32 routing even under autocast: bf16 logits flip near-tied choices between otherwise equal runs.
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(flat.float(), self.router.weight.float())  # (B*T, E)
        probs = logits.softmax(dim=-1)
        if not self.training and B * T == 1 and self.top_k == 1 and valid is None and self.forced_expert is None:
            return self._decode_step(x, probs)
        if self.forced_expert is None:
            gates, choice = probs.topk(self.top_k, dim=-1)  # (B*T, k)
            if self.top_k > 1:
                gates = gates / gates.sum(dim=-1, keepdim=True)
            elif self.cfg.gate == "straight_through":
                gates = gates / gates.detach()
        else:
            choice = torch.full((B * T, 1), self.forced_expert, dtype=torch.long, device=x.device)
            gates = torch.ones(B * T, 1, dtype=probs.dtype, device=x.device)
        k = choice.shape[1]

        # (B*T, k, E) one-hot, by comparison: F.one_hot checks its input's range, a device sync.
        selected = (choice.unsqueeze(-1) == torch.arange(self.num_experts, device=x.device)).long()
        if valid is not None:
            selected = selected * valid[:, None, None]
        n_tokens = B * T if valid is None else int(valid.sum())
        cap = None if self.forced_expert is not None else self.capacity(n_tokens, T)
        if cap is None:
            kept = selected.bool()
        else:
            # Position of each selection in its expert's queue: choice-major, then token order.
            queue = selected.transpose(0, 1).reshape(k * B * T, self.num_experts)
            position = queue.cumsum(dim=0) - 1
            kept = ((queue > 0) & (position < cap)).reshape(k, B * T, self.num_experts).transpose(0, 1)

        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token, slot = kept[:, :, e].nonzero(as_tuple=True)
            if token.numel() == 0:
                continue
            gate = gates[token, slot].unsqueeze(-1)  # (n, 1) fp32
            if token.numel() == B * T:
                # Every token here (the usual batch-1 decoding step, or forced routing): skip the
                # gather/scatter, so forced routing is bit-identical to the dense MLP.
                out = out + (expert(x).reshape(B * T, H) * gate).to(out.dtype)
            else:
                y = expert(flat.index_select(0, token))
                out = out.index_add(0, token, (y * gate).to(out.dtype))

        self._record(logits, probs, selected, kept, valid, n_tokens, B, T)
        return out.reshape(B, T, H)

    def _decode_step(self, x: Tensor, probs: Tensor) -> Tensor:
        """One decoding token (eval, top-1): x (1, 1, H), probs (1, E) -> (1, 1, H).

        Decoding one token at a time is bound by per-operation overhead and weight reads, not
        arithmetic, so this path does only what the answer needs: run the chosen expert alone and
        scale by the gate (the probability for gate="prob", 1.0 for the straight-through gate). No
        capacity (never drops at T == 1), no auxiliary loss. The choice is read on the host in eager
        mode; under torch.compile it goes through `torch.cond`, so the step stays one graph that
        still reads one expert's weights. With `sync_free`, every expert runs and the chosen output
        is selected on the device (no host read at all, for graph capture on a GPU).
        An eager step records `last_counts`; a compiled step records nothing (a module attribute
        written inside the graph is replayed in Python after every step), so the statistics stay
        those of the last eager forward."""
        p, choice = probs.max(dim=-1)  # (1,), (1,)
        compiling = torch.compiler.is_compiling()
        if self.sync_free:
            outs = torch.stack([expert(x) for expert in self.experts])  # (E, 1, 1, H)
            y = outs.index_select(0, choice).squeeze(0)  # the same values the chosen expert alone gives
        elif compiling:
            y = _run_chosen(list(self.experts), choice[0], x)
        else:
            y = self.experts[int(choice)](x)
        if self.cfg.gate == "prob":
            y = (y * p).to(y.dtype)  # fp32 gate, as in the general path, so cached and uncached decoding agree
        if not compiling:
            self.last_counts = (choice == torch.arange(self.num_experts, device=choice.device)).long()  # (E,)
            self._dropped = torch.zeros((), dtype=torch.long)
            self.losses = {k: torch.zeros(()) for k in LOSS_NAMES}
        return y

    def _per_token(self, value: Tensor | None, B: int, T: int, device: torch.device, name: str) -> Tensor | None:
        if value is None:
            return None
        if tuple(value.shape) != (B, T):
            raise ValueError(
                f"MoE {name} has shape {tuple(value.shape)} but the input is ({B}, {T}); "
                f"give this batch's inputs to `routing`"
            )
        return value.reshape(B * T).to(device)

    def _record(self, logits: Tensor, probs: Tensor, selected: Tensor, kept: Tensor, valid: Tensor | None,
                n_tokens: int, B: int, T: int) -> None:
        """Store losses, last_counts, last_dropped and accumulate group_counts.

        logits, probs: (B*T, E) fp32; selected, kept: (B*T, k, E); valid: (B*T,) bool or None.
        """
        counts = selected.sum(dim=(0, 1))  # (E,)
        self.last_counts = counts.detach()
        self._dropped = (counts.sum() - kept.sum()).detach()

        zero = logits.new_zeros(())
        losses = {k: zero for k in LOSS_NAMES}
        if self.inputs.targets is not None:
            target = self._per_token(self.inputs.targets.long(), B, T, logits.device, "route targets")
            if valid is not None:
                target = target.masked_fill(~valid, -1)
            if int(target.max()) >= self.num_experts:
                raise ValueError(f"MoE route target {int(target.max())} out of range for {self.num_experts} experts")
            if bool((target >= 0).any()):
                losses["route"] = F.cross_entropy(logits, target, ignore_index=-1)
        if n_tokens > 0:
            real_logits, real_probs = (logits, probs) if valid is None else (logits[valid], probs[valid])
            # Switch / GShard balance: E * sum_e f_e * P_e, f_e = share of selections (sums to 1
            # for any k), P_e = mean router probability; 1.0 when perfectly balanced.
            f = counts.float() / counts.sum()
            losses["balance"] = self.num_experts * (f * real_probs.mean(dim=0)).sum()
            # ST-MoE router z-loss: mean of squared log-partition, keeps logits small.
            losses["z"] = real_logits.logsumexp(dim=-1).square().mean()
        self.losses = losses

        groups = self._per_token(None if self.inputs.groups is None else self.inputs.groups.long(), B, T,
                                 logits.device, "token groups")
        if groups is None:
            return
        per_token = selected.sum(dim=1)  # (B*T, E), padding rows are zero
        if valid is not None:
            groups = groups[valid]
            per_token = per_token[valid]
        if groups.numel() == 0:
            return
        if int(groups.min()) < 0:
            raise ValueError("MoE token groups must be non-negative")
        n_groups = max(int(groups.max()) + 1, self.group_counts.shape[0])
        acc = torch.zeros(n_groups, self.num_experts, dtype=torch.long, device=per_token.device)
        acc[: self.group_counts.shape[0]] += self.group_counts.to(per_token.device)
        acc.index_add_(0, groups, per_token.long())
        self.group_counts = acc


def _run_chosen(experts: list[nn.Module], choice: Tensor, x: Tensor) -> Tensor:
    """experts[choice](x) as a graph: a binary tree of `torch.cond` over the experts, so a compiled
    step runs (and reads the weights of) the chosen expert only. choice: () long, x: (1, 1, H)."""
    if len(experts) == 1:
        return experts[0](x)
    mid = len(experts) // 2
    low, high = experts[:mid], experts[mid:]
    return torch.cond(choice < mid, lambda c, h: _run_chosen(low, c, h),
                      lambda c, h: _run_chosen(high, c - mid, h), (choice, x))


def moe_from_dense(dense_mlps: list[nn.Module], hidden_size: int, cfg: MoEConfig) -> MoEMLP:
    """Upcycle: deep copies of `dense_mlps` become the experts, in order; the router is fresh
    (normal, std ROUTER_INIT_STD) with the dtype and device of the first expert's parameters."""
    experts = [copy.deepcopy(m) for m in dense_mlps]
    moe = MoEMLP(experts, hidden_size, cfg)
    ref = next(experts[0].parameters(), None)
    if ref is not None:
        moe.router.to(device=ref.device, dtype=ref.dtype)
    return moe


def replace_mlps_with_moe(llm: nn.Module, cfg: MoEConfig, expert_sources: list[nn.Module] | None = None) -> None:
    """Swap every `llm.model.layers[i].mlp` of a transformers causal LM for an MoEMLP, in place.

    expert_sources=None: each expert is a copy of that layer's own MLP. Otherwise a list of E dense
    causal LMs of the same architecture: expert e of layer i copies `expert_sources[e].model.layers[i].mlp`
    (stage IV: [stage III model, stage II model]).
    """
    if cfg.num_experts < 1:
        raise ConfigError("replace_mlps_with_moe needs moe.num_experts >= 1")
    layers = llm.model.layers
    if expert_sources is not None:
        if len(expert_sources) != cfg.num_experts:
            raise ConfigError(f"{len(expert_sources)} expert sources for moe.num_experts={cfg.num_experts}")
        for src in expert_sources:
            if len(src.model.layers) != len(layers):
                raise ConfigError(
                    f"expert source has {len(src.model.layers)} layers, the model has {len(layers)}"
                )
    hidden_size = int(llm.config.hidden_size)
    for i, layer in enumerate(layers):
        if isinstance(layer.mlp, MoEMLP):
            raise ConfigError(f"layer {i} already has an MoE MLP")
        if expert_sources is None:
            dense = [layer.mlp] * cfg.num_experts
        else:
            dense = [src.model.layers[i].mlp for src in expert_sources]
            if any(isinstance(m, MoEMLP) for m in dense):
                raise ConfigError(f"expert source layer {i} is already an MoE; sources must be dense models")
        layer.mlp = moe_from_dense(dense, hidden_size, cfg)


def moe_layers(module: nn.Module) -> list[MoEMLP]:
    """Every MoEMLP inside `module`, in module order."""
    return [m for m in module.modules() if isinstance(m, MoEMLP)]


def set_sync_free(module: nn.Module, on: bool) -> None:
    """Turn sync-free top-1 decoding steps on or off in every MoEMLP inside `module` (module docstring)."""
    for m in moe_layers(module):
        m.sync_free = on


@contextmanager
def _set_on_layers(layers: list[MoEMLP], name: str, value: object) -> Iterator[None]:
    """Set attribute `name` of every layer to `value` for the block; the previous values come back on
    exit, also when the block raises."""
    previous = [getattr(m, name) for m in layers]
    for m in layers:
        setattr(m, name, value)
    try:
        yield
    finally:
        for m, p in zip(layers, previous):
            setattr(m, name, p)


def routing(llm: nn.Module, inputs: RoutingInputs) -> ContextManager[None]:
    """Give every MoEMLP inside `llm` these per-batch inputs for the forwards run inside the block."""
    return _set_on_layers(moe_layers(llm), "inputs", inputs)


def recompute_context(llm: nn.Module) -> Callable[[], tuple[ContextManager[None], ContextManager[None]]]:
    """A `context_fn` for non-reentrant `torch.utils.checkpoint`: called when a checkpointed layer
    runs its forward, it captures the routing inputs in force then and returns (nothing for the
    forward, those inputs again for the backward's recompute) — module docstring."""

    def context_fn() -> tuple[ContextManager[None], ContextManager[None]]:
        layers = moe_layers(llm)
        return nullcontext(), routing(llm, layers[0].inputs if layers else NO_INPUTS)

    return context_fn


def force_expert(llm: nn.Module, e: int) -> ContextManager[None]:
    """Analysis hook, for the block: every router sends every token to expert `e` with gate 1.0 and
    no capacity limit, so an upcycled model reproduces the dense model of expert e.

    Bit-exact when no token mask is given (the expert then runs on the whole (B, T, H) input, as the
    dense MLP does); with padding masked out, real tokens match up to matmul round-off, since the
    expert sees a gathered (n, H) batch, and padding positions get zero."""
    layers = moe_layers(llm)
    for m in layers:
        if not 0 <= e < m.num_experts:
            raise ValueError(f"expert {e} out of range for {m.num_experts} experts")
    return _set_on_layers(layers, "forced_expert", e)
