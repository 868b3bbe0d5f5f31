"""Generation latency of the 2-expert top-1 MoE model over the dense model it is upcycled from,
measured side by side in one process (interleaved, median of repeats). Prints JSON lines.

The paper's claim: at inference one expert runs per token, so the MoE model costs what the dense
model costs. Both models decode exactly `--tokens` tokens (end-of-sequence is disabled), with the
KV cache, greedy. The MoE model runs twice: with the decoding step's expert read on the host (the
default) and sync-free (`set_sync_free`: every expert runs, the chosen output is selected on the
device). A second measurement times one MoE layer's decoding step three ways: host-routed,
sync-free select, and sync-free gather (both experts' weights stacked once, the chosen one taken
with index_select, the alternative the module docstring names; it lives only here).

    python benchmarks/bench_moe.py --preset small --tokens 32 --repeats 7
    python benchmarks/bench_moe.py --paper-width --layers 2   # LLM layers of the published width
    python benchmarks/bench_moe.py --paper-width --layers 32 --device cuda --dtype bf16   # the 7B LLM on a GPU

The small preset's LLM (hidden 384) is so narrow that the router's bookkeeping per layer is a
visible share of a decoding step; `--paper-width` gives the LLM the published LLaMA-2-7B layer
width (hidden 4096, MLP 11008, 32 heads), `--layers` of them, where the claim is meant to hold.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from medplib.api import MedPLIB
from medplib.data.phantoms import make_phantom
from medplib.model.moe import MoEMLP, moe_layers, set_sync_free
from medplib.training.build import upcycle
from medplib.training.recipe import UpcycleSection

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _never_stop(m: MedPLIB) -> None:
    m.model.ids = dataclasses.replace(m.model.ids, eos=-1)


def _median_s(fn: Callable[[], object], repeats: int) -> float:
    """Median over `repeats` of the mean seconds of `inner` calls, `inner` sized to ~0.1 s."""
    start = time.perf_counter()
    fn()
    inner = max(1, min(50, round(0.1 / max(time.perf_counter() - start, 1e-6))))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - start) / inner)
    return statistics.median(times)


def layer_step(layer: MoEMLP, x: Tensor, repeats: int) -> dict[str, float]:
    """One decoding step (x: (1, 1, H)) of one MoE layer: host-routed, sync-free select and
    sync-free gather (LLaMA experts' gate/up/down weights stacked to (E, out, in) beforehand)."""
    stacked = [torch.stack([getattr(e, n).weight for e in layer.experts])  # (E, out, in)
               for n in ("gate_proj", "up_proj", "down_proj")]
    act = layer.experts[0].act_fn

    def gather() -> Tensor:
        probs = F.linear(x.reshape(1, -1).float(), layer.router.weight.float()).softmax(-1)
        p, choice = probs.max(dim=-1)
        g, u, d = (w.index_select(0, choice)[0] for w in stacked)  # copies one expert's weights
        return (F.linear(act(F.linear(x, g)) * F.linear(x, u), d) * p).to(x.dtype)

    out = {}
    with torch.no_grad():
        variants = (("host", lambda: layer(x)), ("sync_free_select", lambda: layer(x)), ("sync_free_gather", gather))
        for name, fn in variants:
            layer.sync_free = name == "sync_free_select"
            out[name] = _median_s(fn, repeats)
        layer.sync_free = False
        torch.testing.assert_close(gather(), layer(x))  # the gather variant computes the same step
        dense = layer.experts[0]
        out["dense"] = _median_s(lambda: dense(x), repeats)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--paper-width", action="store_true", help="LLM layers of the published 7B width")
    ap.add_argument("--layers", type=int, default=2, help="LLM layers with --paper-width")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    over = {}
    if args.paper_width:
        over = {"llm.hf.hidden_size": 4096, "llm.hf.intermediate_size": 11008, "llm.hf.num_attention_heads": 32,
                "llm.hf.num_key_value_heads": 32, "llm.hf.num_hidden_layers": args.layers}

    dense = MedPLIB.from_preset(args.preset, seed=0, **over)
    # Expert 1 is a second copy of the same dense MLPs: the cost does not depend on the weights.
    moe = upcycle(MedPLIB.from_preset(args.preset, seed=0, **over), [dense, dense], UpcycleSection())
    for m in (dense, moe):
        m.model.to(device=args.device, dtype=DTYPES[args.dtype]).eval()
        _never_stop(m)
    image = make_phantom("ct", seed=0, size=256).image
    question = "What imaging modality is this?"
    feats = {id(m): m.image_features(image) for m in (dense, moe)}

    def timed(m: MedPLIB, cached_features: bool, sync_free: bool = False) -> float:
        set_sync_free(m.model.llm, sync_free)
        start = time.perf_counter()
        ans = m.generate(image, question, max_new_tokens=args.tokens,
                         features=feats[id(m)] if cached_features else None)
        if m.device.type == "cuda":
            torch.cuda.synchronize()  # the last token's kernels must finish inside the timed span
        elapsed = time.perf_counter() - start
        assert len(ans.token_ids) == args.tokens
        return elapsed

    for m, sync_free in ((dense, False), (moe, False), (moe, True)):  # warm-up
        timed(m, False, sync_free)
    for mode, cached in (("generate", False), ("llm_only", True)):
        d, e, f = [], [], []
        for _ in range(args.repeats):  # interleaved, so load changes hit all alike
            d.append(timed(dense, cached))
            e.append(timed(moe, cached))
            f.append(timed(moe, cached, sync_free=True))
        dm, em, fm = statistics.median(d), statistics.median(e), statistics.median(f)
        print(json.dumps({"bench": "moe_generation_latency", "mode": mode, "preset": args.preset,
                          "llm_hidden": dense.model.llm.config.hidden_size,
                          "llm_layers": dense.model.llm.config.num_hidden_layers, "tokens": args.tokens,
                          "repeats": args.repeats, "threads": torch.get_num_threads(),
                          "device": str(dense.device), "dtype": args.dtype,
                          "dense_s": round(dm, 4), "moe_s": round(em, 4), "moe_sync_free_s": round(fm, 4),
                          "ratio": round(em / dm, 3), "ratio_sync_free": round(fm / dm, 3),
                          "dense_ms_per_token": round(1000 * dm / args.tokens, 2),
                          "moe_ms_per_token": round(1000 * em / args.tokens, 2),
                          "moe_sync_free_ms_per_token": round(1000 * fm / args.tokens, 2)}), flush=True)
    counts = torch.stack([layer.last_counts for layer in moe_layers(moe.model.llm)]).sum(0)
    print(json.dumps({"bench": "moe_routing_last_step", "tokens_per_expert": counts.tolist(),
                      "experts": len(counts), "top_k": moe.config.moe.top_k}), flush=True)
    n_dense = sum(p.numel() for p in dense.model.parameters())
    n_moe = sum(p.numel() for p in moe.model.parameters())
    n_router = sum(layer.router.weight.numel() for layer in moe_layers(moe.model.llm))
    # top-1: a token runs one expert per layer, so its active parameters are the dense ones plus the routers
    print(json.dumps({"bench": "moe_parameters", "dense": n_dense, "moe_total": n_moe,
                      "moe_active_per_token": n_dense + n_router}), flush=True)
    layer = moe_layers(moe.model.llm)[0]
    x = torch.randn(1, 1, dense.model.llm.config.hidden_size, device=args.device, dtype=DTYPES[args.dtype])
    step = layer_step(layer, x, args.repeats)
    print(json.dumps({"bench": "moe_layer_decode_step", "llm_hidden": dense.model.llm.config.hidden_size,
                      "device": str(dense.device), "dtype": args.dtype,
                      **{f"{k}_us": round(1e6 * v, 1) for k, v in step.items()},
                      **{f"{k}_over_dense": round(v / step["dense"], 3) for k, v in step.items() if k != "dense"}}),
          flush=True)


if __name__ == "__main__":
    main()
