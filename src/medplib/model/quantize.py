"""Quantised inference: the LLM's Linear layers in int8 (CPU or CUDA) or NF4 (CUDA), everything else kept.

Only the language model is quantised. The vision tower, projector, region encoder, pixel encoder, mask
decoder and `[SEG]` projection keep full precision (fp32 on the CPU, bf16 on CUDA): quantising the
mask path is what turns 4-bit masks blank in LISA-style models, and those parts are a small share of
the weights. The MoE routers also stay in full precision: a [2, H] matrix costs nothing, and rounding
it can flip which expert a token goes to.

    CPU   int8  torch's dynamic quantisation (`torch.ao.quantization.quantize_dynamic`): int8 weights,
                activations quantised per batch; fp32 in, fp32 out.
    CUDA  int8  bitsandbytes `Linear8bitLt` (LLM.int8(), outlier threshold 6.0), bf16 compute.
    CUDA  nf4   bitsandbytes `Linear4bit` with NF4 weights and bf16 compute.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from medplib.errors import ConfigError, InputError

MODES = ("int8", "nf4")
BNB_INSTALL = "pip install bitsandbytes"


def check_quantize(mode: str | None, device: str | torch.device,
                   dtype: torch.dtype | None) -> tuple[torch.device, torch.dtype | None]:
    """Validate a quantisation request before any weights are read; returns (device to load the
    full-precision weights on, dtype to load them in).

    Raises ConfigError for an unknown mode, nf4 off CUDA, a device other than CPU / CUDA, a CPU dtype
    other than fp32, or bitsandbytes missing on CUDA."""
    device = torch.device(device)
    if mode is None:
        return device, dtype
    if mode not in MODES:
        raise ConfigError(f"--quantize must be one of {', '.join(MODES)}, got {mode!r}")
    if device.type == "cpu":
        if mode == "nf4":
            raise ConfigError("nf4 quantisation needs a CUDA GPU and bitsandbytes; on the CPU use --quantize int8")
        if dtype not in (None, torch.float32):
            raise ConfigError(f"int8 on the CPU computes in float32 (torch's dynamic quantisation); got dtype {dtype}")
        return device, torch.float32
    if device.type != "cuda":
        raise ConfigError(f"--quantize {mode} runs on the CPU (int8) or on CUDA (int8, nf4), not on {device.type}")
    _bitsandbytes()
    # bitsandbytes quantises when the weights move to the GPU: load them on the CPU in bf16 first.
    return torch.device("cpu"), dtype or torch.bfloat16


def _bitsandbytes():  # -> the bitsandbytes module
    try:
        import bitsandbytes
    except ImportError:
        raise ConfigError(f"--quantize on CUDA needs bitsandbytes, which is not installed: {BNB_INSTALL}") from None
    return bitsandbytes


def _llm_linears(llm: nn.Module) -> dict[str, nn.Linear]:
    """The LLM's Linear layers by name, routers left out (module docstring)."""
    from medplib.model.moe import MoEMLP

    routers = {id(m.router) for m in llm.modules() if isinstance(m, MoEMLP)}
    return {name: m for name, m in llm.named_modules() if type(m) is nn.Linear and id(m) not in routers}


def quantize_llm(model: nn.Module, mode: str, device: str | torch.device) -> None:
    """Quantise `model.llm` in place and put the whole model on `device` (a MedPLIBModel already holding
    its full-precision weights, fp32 on the CPU or bf16 for CUDA, as `check_quantize` asked)."""
    device = torch.device(device)
    linears = _llm_linears(model.llm)
    if not linears:
        raise InputError("the LLM has no Linear layers to quantise")
    if device.type == "cpu":
        from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

        with warnings.catch_warnings():
            # torch marks its eager-mode quantisation APIs as moving to torchao; they still work and need no extra install.
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", message=".*quantiz.*", category=UserWarning)
            quantize_dynamic(model.llm, {name: default_dynamic_qconfig for name in linears}, dtype=torch.qint8, inplace=True)
        return
    _replace_with_bnb(model.llm, linears, mode)
    model.to(device)  # bitsandbytes quantises Int8Params / Params4bit here, on their way to the GPU


def _replace_with_bnb(llm: nn.Module, linears: dict[str, nn.Linear], mode: str) -> None:
    """Swap each Linear for its bitsandbytes counterpart holding the same (bf16, CPU) weights."""
    bnb = _bitsandbytes()
    for name, lin in linears.items():
        has_bias = lin.bias is not None
        if mode == "int8":
            new = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=has_bias, has_fp16_weights=False, threshold=6.0)
            new.weight = bnb.nn.Int8Params(lin.weight.data, requires_grad=False, has_fp16_weights=False)
        else:
            new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=has_bias, compute_dtype=torch.bfloat16,
                                    quant_type="nf4")
            new.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4")
        if has_bias:
            new.bias = nn.Parameter(lin.bias.data, requires_grad=False)
        owner, _, leaf = name.rpartition(".")
        setattr(llm.get_submodule(owner) if owner else llm, leaf, new)


def full_precision_parts(model: nn.Module) -> dict[str, nn.Module]:
    """The parts quantisation leaves alone, by name (for checks and the benchmark)."""
    return {"vision": model.vision, "projector": model.projector, "region_encoder": model.region_encoder,
            "pixel_encoder": model.pixel_encoder, "mask_decoder": model.mask_decoder, "seg_proj": model.seg_proj}
