"""MoE layer: routing, capacity, padding, losses, statistics, and exact upcycling of dense LLMs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, LlamaConfig

from medplib.config import MoEConfig
from medplib.errors import ConfigError
from medplib.model.moe import (
    MoEMLP,
    RoutingInputs,
    force_expert,
    moe_from_dense,
    moe_layers,
    replace_mlps_with_moe,
    routing,
    set_sync_free,
)


class Scale(nn.Module):
    """A toy expert: y = s * x, so expected outputs are easy to write by hand."""

    def __init__(self, s: float):
        super().__init__()
        self.s = s
        self.calls: list[int] = []  # tokens seen per call

    def forward(self, x: Tensor) -> Tensor:
        self.calls.append(x.shape[:-1].numel())
        return self.s * x


def scale_moe(n: int = 2, k: int = 1, hidden: int = 4, **cfg_kw: float) -> MoEMLP:
    cfg = MoEConfig(num_experts=n, top_k=k, **cfg_kw)
    return MoEMLP([Scale(float(e + 2)) for e in range(n)], hidden, cfg)


def route_all_to(moe: MoEMLP, e: int) -> None:
    """Router weights that send every input with x[..., 0] > 0 to expert e."""
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[e, 0] = 5.0


def test_routing_picks_argmax_and_scales_by_gate() -> None:
    torch.manual_seed(0)
    moe = scale_moe(n=3, k=1, hidden=6, capacity_factor_eval=10.0).eval()
    with torch.no_grad():
        moe.router.weight.normal_()
    x = torch.randn(2, 5, 6)
    y = moe(x)
    probs = (x @ moe.router.weight.T).softmax(-1)
    p, e = probs.max(-1)
    expected = (p * (e + 2).float()).unsqueeze(-1) * x
    torch.testing.assert_close(y, expected)
    assert moe.last_counts.tolist() == torch.bincount(e.flatten(), minlength=3).tolist()
    assert moe.last_dropped == 0


def test_top2_combines_two_experts_with_renormalised_gates() -> None:
    torch.manual_seed(1)
    moe = scale_moe(n=3, k=2, hidden=6, capacity_factor_eval=10.0).eval()
    with torch.no_grad():
        moe.router.weight.normal_()
    x = torch.randn(1, 7, 6)
    y = moe(x)
    probs = (x @ moe.router.weight.T).softmax(-1)
    p, e = probs.topk(2, dim=-1)
    gates = p / p.sum(-1, keepdim=True)
    expected = ((gates * (e + 2).float()).sum(-1)).unsqueeze(-1) * x
    torch.testing.assert_close(y, expected)
    assert int(moe.last_counts.sum()) == 14


def test_capacity_drops_overflow_tokens_in_training() -> None:
    # capacity = ceil(0.8 * 5 tokens * k=1 / 2 experts) = 2
    moe = scale_moe(capacity_factor_train=0.8).train()
    route_all_to(moe, 0)
    assert moe.capacity(5, 5) == 2
    x = torch.rand(1, 5, 4) + 0.1
    y = moe(x)
    assert moe.last_dropped == 3
    assert moe.last_counts.tolist() == [5, 0]
    gate = torch.sigmoid(5.0 * x[0, :2, :1])  # softmax([5 * x0, 0])[0]
    assert torch.all(y[0, :2] != 0)
    torch.testing.assert_close(y[0, :2], gate * 2.0 * x[0, :2])
    assert torch.equal(y[0, 2:], torch.zeros(3, 4))


def test_padding_neither_counted_nor_routed() -> None:
    # 6 positions, 2 left-padding: capacity = ceil(1.0 * 4 / 2) = 2 (it would be 3 if padding counted,
    # and the padding at the front would take two of the slots).
    moe = scale_moe(capacity_factor_train=1.0).train()
    route_all_to(moe, 0)
    x = torch.rand(1, 6, 4) + 0.1
    with routing(moe, RoutingInputs(token_mask=torch.tensor([[0, 0, 1, 1, 1, 1]]))):
        y = moe(x)
    assert moe.last_counts.tolist() == [4, 0]
    assert moe.last_dropped == 2
    assert torch.equal(y[0, :2], torch.zeros(2, 4))  # padding: not routed
    assert torch.all(y[0, 2:4] != 0)  # first two real tokens fill the capacity
    assert torch.equal(y[0, 4:], torch.zeros(2, 4))
    with routing(moe, RoutingInputs(token_mask=torch.ones(2, 3, dtype=torch.bool))):
        with pytest.raises(ValueError, match="token mask"):
            moe(x)


def test_eval_single_token_steps_never_drop() -> None:
    moe = scale_moe(capacity_factor_eval=0.1).eval()
    route_all_to(moe, 1)
    x = torch.rand(4, 1, 4) + 0.1  # a batched decoding step: 4 sequences, 1 token each
    y = moe(x)
    assert moe.last_dropped == 0
    assert torch.all(y != 0)
    moe.train()  # the same step in training mode would drop: capacity = ceil(1.5 * 4 / 2) = 3
    moe(x)
    assert moe.last_dropped == 1


def test_balance_loss_matches_switch_formula() -> None:
    moe = scale_moe(hidden=2).train()
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(2))
    rows = [[2.0, 0.0], [0.0, 1.0], [1.0, 0.5], [0.3, 0.9]]  # logits = x (identity router)
    moe(torch.tensor([rows]))
    probs = [[math.exp(a) / (math.exp(a) + math.exp(b)), math.exp(b) / (math.exp(a) + math.exp(b))] for a, b in rows]
    f = [2 / 4, 2 / 4]  # argmax: 0, 1, 0, 1
    p = [sum(r[e] for r in probs) / 4 for e in range(2)]
    expected = 2 * (f[0] * p[0] + f[1] * p[1])  # unweighted: the recipe's loss.balance weights it
    assert moe.losses["balance"].item() == pytest.approx(expected, rel=1e-6)
    assert moe.losses["route"].item() == 0.0  # no route targets given


def test_z_loss_formula() -> None:
    moe = scale_moe(hidden=2).train()
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(2))
    rows = [[2.0, 0.0], [0.0, 1.0], [1.0, 0.5]]
    moe(torch.tensor([rows]))
    expected = sum(math.log(math.exp(a) + math.exp(b)) ** 2 for a, b in rows) / 3
    assert moe.losses["z"].item() == pytest.approx(expected, rel=1e-6)


def test_aux_losses_ignore_padding() -> None:
    torch.manual_seed(2)
    moe = scale_moe(hidden=4, capacity_factor_train=4.0).train()
    x = torch.randn(1, 5, 4)
    with routing(moe, RoutingInputs(token_mask=torch.tensor([[1, 1, 1, 0, 0]]))):
        moe(x)
    masked = dict(moe.losses)
    moe(x[:, :3])
    for name in ("balance", "z"):
        torch.testing.assert_close(masked[name], moe.losses[name])


def test_gradient_reaches_router() -> None:
    torch.manual_seed(3)
    x = torch.randn(2, 4, 4)
    moe = scale_moe(capacity_factor_train=4.0).train()
    moe(x).sum().backward()  # the routing losses left out: gradient only through the gates
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0

    moe = scale_moe(capacity_factor_train=4.0).train()
    moe(x)
    moe.losses["balance"].backward()  # the balance loss alone moves the router
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0


def test_straight_through_gate_keeps_expert_scale_and_trains_router() -> None:
    torch.manual_seed(4)
    x = torch.randn(1, 1, 4)
    published = scale_moe(capacity_factor_train=4.0).train()
    st = scale_moe(capacity_factor_train=4.0, gate="straight_through").train()
    st.router.load_state_dict(published.router.state_dict())
    y_pub, y_st = published(x), st(x)
    p, e = (x[0, 0] @ published.router.weight.T).softmax(-1).max(-1)
    torch.testing.assert_close(y_st, (e + 2).float() * x, rtol=0, atol=0)  # gate exactly 1.0 in the forward
    torch.testing.assert_close(y_pub, p * (e + 2).float() * x)
    y_pub.sum().backward()
    y_st.sum().backward()
    # Backward: d(p / p.detach()) = dp / p, so the router gradient is the published one divided by p.
    torch.testing.assert_close(st.router.weight.grad, published.router.weight.grad / p)
    assert st.router.weight.grad.abs().sum() > 0


def test_route_targets_add_a_cross_entropy_that_trains_the_router() -> None:
    torch.manual_seed(6)
    moe = scale_moe(hidden=8, capacity_factor_train=4.0).train()
    x = torch.randn(2, 6, 8)
    targets = torch.tensor([[-1, -1, 0, 0, 0, 0], [-1, 1, 1, 1, 1, 0]])
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 5] = False  # a padding token with a target: ignored
    inputs = RoutingInputs(token_mask=mask, targets=targets)
    with routing(moe, inputs):
        moe(x)
    keep = (targets >= 0) & mask
    logits = x[keep] @ moe.router.weight.T
    torch.testing.assert_close(moe.losses["route"], F.cross_entropy(logits, targets[keep]))

    opt = torch.optim.SGD(moe.router.parameters(), lr=0.5)
    for _ in range(100):
        with routing(moe, inputs):
            moe(x)
        opt.zero_grad()
        moe.losses["route"].backward()
        opt.step()
    assert torch.equal((x[keep] @ moe.router.weight.T).argmax(-1), targets[keep])  # each token goes to its target

    moe(x)  # inference: no targets, no route loss
    assert moe.losses["route"].item() == 0.0
    with routing(moe, RoutingInputs(targets=torch.full((2, 6), 2))):
        with pytest.raises(ValueError, match="out of range"):
            moe(x)


def test_group_statistics_count_non_padding_tokens() -> None:
    torch.manual_seed(4)
    moe = scale_moe(capacity_factor_train=0.5).train()  # drops happen; statistics count router choices
    with torch.no_grad():
        moe.router.weight.normal_()
    x = torch.randn(3, 8, 4)
    mask = torch.rand(3, 8) > 0.3
    groups = torch.randint(0, 3, (3, 8))
    inputs = RoutingInputs(token_mask=mask, groups=groups)
    with routing(moe, inputs):
        moe(x)
    n = int(mask.sum())
    assert moe.group_counts.shape == (3, 2)
    assert int(moe.group_counts.sum()) == n == int(moe.last_counts.sum())
    for g in range(3):
        assert int(moe.group_counts[g].sum()) == int((groups[mask] == g).sum())
    with routing(moe, inputs):
        moe(x)
    assert int(moe.group_counts.sum()) == 2 * n  # accumulates over forwards
    moe.reset_stats()
    assert moe.group_counts.numel() == 0


def test_top1_cost_equals_dense() -> None:
    """Each expert runs once per forward on only its tokens: top-1 computes every token once."""
    torch.manual_seed(5)
    moe = scale_moe(n=2, k=1, capacity_factor_eval=2.0).eval()
    with torch.no_grad():
        moe.router.weight.normal_()
    with routing(moe, RoutingInputs(token_mask=torch.tensor([[1] * 8, [1] * 5 + [0] * 3]))):
        moe(torch.randn(2, 8, 4))
    calls = [e.calls for e in moe.experts]
    assert all(len(c) <= 1 for c in calls)
    assert sum(sum(c) for c in calls) == 13  # = non-padding tokens = dense MLP tokens

    top2 = scale_moe(n=3, k=2, capacity_factor_eval=2.0).eval()
    top2(torch.randn(2, 8, 4))
    assert sum(sum(e.calls) for e in top2.experts) == 2 * 16


def test_config_validation() -> None:
    with pytest.raises(ConfigError):
        MoEMLP([Scale(1.0)], 4, MoEConfig(num_experts=2))
    with pytest.raises(ConfigError):
        MoEMLP([Scale(1.0), Scale(2.0)], 4, MoEConfig(num_experts=2, top_k=3))
    with pytest.raises(ConfigError):
        MoEMLP([Scale(1.0), Scale(2.0)], 4, MoEConfig(num_experts=2, top_k=2, gate="straight_through"))
    with pytest.raises(ConfigError):
        MoEMLP([Scale(1.0), Scale(2.0)], 4, MoEConfig(num_experts=2, gate="softmax"))


# ---- upcycling transformers LLMs -------------------------------------------------------------


def tiny_llama(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return AutoModelForCausalLM.from_config(cfg).eval()


def copy_non_mlp(dst: nn.Module, src: nn.Module) -> None:
    """Give `dst` every weight of `src` except the MLPs (attention, norms, embeddings, head)."""
    shared = {k: v for k, v in src.state_dict().items() if ".mlp." not in k}
    missing, unexpected = dst.load_state_dict(shared, strict=False)
    assert not unexpected and all(".mlp." in k for k in missing)


def greedy(model: nn.Module, prompt: Tensor, steps: int) -> tuple[list[int], list[Tensor]]:
    """KV-cache greedy decoding, one token per step."""
    out = model(input_ids=prompt, use_cache=True)
    tokens, logits = [], [out.logits[:, -1]]
    for _ in range(steps):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(int(nxt))
        name = "cache" if "cache" in out else "past_key_values"  # renamed in transformers 5.x
        out = model(input_ids=nxt, use_cache=True, **{name: out[name]})
        logits.append(out.logits[:, -1])
    return tokens, logits


@pytest.fixture(scope="module")
def dense_pair() -> tuple[nn.Module, nn.Module]:
    return tiny_llama(10), tiny_llama(11)


def test_upcycled_model_reproduces_each_dense_expert_exactly(dense_pair: tuple[nn.Module, nn.Module]) -> None:
    dense0, dense1 = dense_pair
    base = tiny_llama(12)
    cfg = MoEConfig(num_experts=2, top_k=1)
    replace_mlps_with_moe(base, cfg, expert_sources=[dense0, dense1])
    layers = moe_layers(base)
    assert len(layers) == 2
    for i, moe in enumerate(layers):
        for e, src in enumerate((dense0, dense1)):
            expert, dense_mlp = moe.experts[e], src.model.layers[i].mlp
            assert expert is not dense_mlp
            assert torch.equal(expert.gate_proj.weight, dense_mlp.gate_proj.weight)
            assert torch.equal(expert.down_proj.weight, dense_mlp.down_proj.weight)
    base.eval()
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    prompt = ids[:1, :5]
    with torch.no_grad():
        for e, dense in enumerate((dense0, dense1)):
            copy_non_mlp(base, dense)
            with force_expert(base, e):
                assert torch.equal(base(input_ids=ids).logits, dense(input_ids=ids).logits)
                moe_tokens, moe_logits = greedy(base, prompt, 6)
                dense_tokens, dense_logits = greedy(dense, prompt, 6)
            assert moe_tokens == dense_tokens
            assert all(torch.equal(a, b) for a, b in zip(moe_logits, dense_logits))
        assert not torch.equal(base(input_ids=ids).logits, dense1(input_ids=ids).logits)


def test_upcycle_from_own_mlps_and_cached_generation_matches_uncached() -> None:
    llm = tiny_llama(13)
    dense_mlp0 = llm.model.layers[0].mlp
    replace_mlps_with_moe(llm, MoEConfig(num_experts=2, top_k=1))
    moe = llm.model.layers[0].mlp
    assert isinstance(moe, MoEMLP)
    assert all(torch.equal(ex.up_proj.weight, dense_mlp0.up_proj.weight) for ex in moe.experts)
    assert moe.experts[0] is not moe.experts[1]
    with pytest.raises(ConfigError):
        replace_mlps_with_moe(llm, MoEConfig(num_experts=2))
    with torch.no_grad():
        for m in moe_layers(llm):
            m.router.weight.normal_()  # real routing: both experts in use
        prompt = torch.randint(0, 100, (1, 5), generator=torch.Generator().manual_seed(1))
        tokens, logits = greedy(llm, prompt, 6)
        assert all(m.last_dropped == 0 for m in moe_layers(llm))
        full = llm(input_ids=torch.cat([prompt, torch.tensor([tokens[:-1]])], dim=1)).logits
        torch.testing.assert_close(torch.stack([lg[0] for lg in logits[:-1]]), full[0, 4:], atol=1e-5, rtol=1e-5)
        assert full[0, 4:].argmax(-1).tolist() == tokens


def test_moe_from_dense_keeps_dtype_and_order() -> None:
    mlps = [nn.Linear(4, 4).to(torch.float64), nn.Linear(4, 4).to(torch.float64)]
    moe = moe_from_dense(mlps, 4, MoEConfig(num_experts=2))
    assert moe.router.weight.dtype == torch.float64
    assert torch.equal(moe.experts[1].weight, mlps[1].weight) and moe.experts[1] is not mlps[1]


@pytest.mark.parametrize("gate", ["prob", "straight_through"])
def test_decoding_step_path_equals_the_general_path(gate: str) -> None:
    """A single eval token takes the lean decoding path; the same token inside a 2-token batch takes
    the general path (gather, capacity, statistics): outputs and counts must agree."""
    torch.manual_seed(7)
    moe = scale_moe(hidden=6, capacity_factor_eval=2.0, gate=gate).eval()
    with torch.no_grad():
        moe.router.weight.normal_()
    x = torch.randn(1, 1, 6)
    one = moe(x)
    counts = moe.last_counts.clone()
    two = moe(torch.cat([x, x], dim=1))
    torch.testing.assert_close(one[0, 0], two[0, 0], rtol=0, atol=0)
    assert (2 * counts).tolist() == moe.last_counts.tolist() and moe.last_dropped == 0


@pytest.mark.parametrize("gate", ["prob", "straight_through"])
def test_sync_free_decoding_step_equals_the_host_routed_step(gate: str) -> None:
    """Sync-free, every expert runs and the chosen output is picked on the device: the same output,
    bit for bit, and the same counts as reading the choice on the host, for tokens routed to each expert."""
    torch.manual_seed(8)
    moe = scale_moe(n=3, hidden=6, gate=gate).eval()
    with torch.no_grad():
        moe.router.weight.normal_()
    xs = torch.randn(64, 1, 1, 6)
    chosen = set()
    for x in xs:
        moe.sync_free = False
        host = moe(x)
        host_counts = moe.last_counts.clone()
        moe.sync_free = True
        free = moe(x)
        torch.testing.assert_close(free, host, rtol=0, atol=0)
        assert moe.last_counts.tolist() == host_counts.tolist() and moe.last_dropped == 0
        chosen.add(int(host_counts.argmax()))
    assert chosen == {0, 1, 2}  # every expert was chosen by some token
    assert sum(len(e.calls) for e in moe.experts) == 64 + 3 * 64  # host: the chosen expert; sync-free: all


@pytest.mark.parametrize("gate", ["prob", "straight_through"])
def test_sync_free_routing_keeps_greedy_decoding_and_training_unchanged(
    dense_pair: tuple[nn.Module, nn.Module], gate: str
) -> None:
    """An upcycled LLaMA decodes the same tokens and logits with sync-free routing; training-mode
    forwards (capacity, drops, losses) do not take the decoding path and are unchanged."""
    llm = tiny_llama(14)
    replace_mlps_with_moe(llm, MoEConfig(num_experts=2, top_k=1, gate=gate, capacity_factor_train=0.6),
                          expert_sources=list(dense_pair))
    with torch.no_grad():
        for m in moe_layers(llm):
            m.router.weight.normal_(std=0.5)  # both experts in use
    prompt = torch.randint(0, 100, (1, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        host_tokens, host_logits = greedy(llm, prompt, 8)
        set_sync_free(llm, True)
        assert all(m.sync_free for m in moe_layers(llm))
        free_tokens, free_logits = greedy(llm, prompt, 8)
    assert free_tokens == host_tokens
    assert all(torch.equal(a, b) for a, b in zip(free_logits, host_logits))

    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(3))
    llm.train()
    results = []
    for on in (False, True):
        set_sync_free(llm, on)
        torch.manual_seed(0)
        loss = llm(input_ids=ids, labels=ids).loss
        results.append((loss.item(), [m.last_dropped for m in moe_layers(llm)],
                        [m.losses["balance"].item() for m in moe_layers(llm)]))
    assert results[0] == results[1]
    assert sum(results[0][1]) > 0  # capacity 0.6 dropped tokens in training, the same ones both times


@pytest.mark.parametrize("n", [2, 3])
def test_compiled_decoding_step_is_one_graph_and_equals_the_host_routed_step(n: int) -> None:
    """Under torch.compile the top-1 step routes through torch.cond (a tree of them for more than two
    experts): one graph with no break, the host-routed step's output for tokens sent to each expert,
    and no statistics written from inside the graph."""
    torch.manual_seed(9)
    experts = [nn.Linear(6, 6) for _ in range(n)]
    moe = MoEMLP(experts, 6, MoEConfig(num_experts=n, top_k=1)).eval()
    with torch.no_grad():
        moe.router.weight.normal_()
    compiled = torch.compile(moe, fullgraph=True, backend="aot_eager")
    chosen = set()
    with torch.no_grad():
        for x in torch.randn(32, 1, 1, 6):
            host = moe(x)
            counts = moe.last_counts.clone()
            moe.last_counts = torch.full((n,), -1)
            torch.testing.assert_close(compiled(x), host, rtol=0, atol=0)
            assert moe.last_counts.tolist() == [-1] * n  # left as it was
            chosen.add(int(counts.argmax()))
    assert chosen == set(range(n))  # every expert was chosen by some token
