"""fp32 vs bf16 on the CPU, side by side in one run: a large matmul (GFLOPS), and the `lite` preset's LLM
(SmolLM2-135M) forward + backward to its input embeddings on a demo-sized batch, fp32 vs bf16 autocast.

Prints one JSON line per measurement and one with the ratios. Usage:
    python benchmarks/bench_precision.py [--batch 8] [--tokens 47] [--repeats 4] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from medplib.api import MedPLIB


def _best(fn, repeats: int) -> float:
    fn()  # warm-up: oneDNN picks its kernels on the first call
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=47, help="the demo's stage III sequences are 46-47 tokens")
    ap.add_argument("--size", type=int, default=2048, help="matmul side")
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n = args.size
    out: dict[str, float] = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        gflops = 2 * n**3 / _best(lambda a=a, b=b: a @ b, args.repeats) / 1e9
        out[f"matmul_{str(dtype)[6:]}_gflops"] = gflops
        print(json.dumps({"what": "matmul", "dtype": str(dtype)[6:], "size": n, "gflops": round(gflops, 1)}))

    llm = MedPLIB.from_preset("lite").model.llm
    llm.requires_grad_(False)  # as in stages III-IV: the base weights are frozen, gradients reach the input
    hidden = llm.config.hidden_size
    embeds = torch.randn(args.batch, args.tokens, hidden, requires_grad=True)

    def step(autocast: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            h = llm.model(inputs_embeds=embeds).last_hidden_state
        h.float().pow(2).mean().backward()

    for autocast in (False, True):
        s = _best(lambda a=autocast: step(a), args.repeats)
        out[f"llm_{'bf16_autocast' if autocast else 'fp32'}_s"] = s
        print(json.dumps({"what": "lite LLM forward+backward", "batch": args.batch, "tokens": args.tokens,
                          "precision": "bf16 autocast" if autocast else "fp32", "seconds": round(s, 3)}))
    print(json.dumps({"matmul_bf16_over_fp32": round(out["matmul_bfloat16_gflops"] / out["matmul_float32_gflops"], 2),
                      "llm_fp32_over_bf16_autocast": round(out["llm_fp32_s"] / out["llm_bf16_autocast_s"], 2)}))


if __name__ == "__main__":
    main()
