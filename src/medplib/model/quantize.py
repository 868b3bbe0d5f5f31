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

For the compiled decoding step there is also weight-only int8 (`quantize_llm_weight_only`, gpt-fast's
recipe): int8 weights with one fp32 scale per output row, activations kept in fp32. A batch-1 decoding
step on the CPU is bound by reading the weights, and under torch.compile the int8-to-fp32 conversion
fuses into the one-row matrix-vector product, so each weight is read as one byte instead of four.
Run eagerly, the same layer converts its whole weight to fp32 on every call; it is meant for the
compiled step, while `int8` (dynamic quantisation) is the eager int8 path.
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
            # torch marks its eager-mode quantisation APIs as moving to torchao; they still work and need no extra
            # install.
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", message=".*quantiz.*", category=UserWarning)
            quantize_dynamic(
                model.llm, {name: default_dynamic_qconfig for name in linears}, dtype=torch.qint8, inplace=True
            )
        return
    _replace_with_bnb(model.llm, linears, mode)
    model.to(device)  # bitsandbytes quantises Int8Params / Params4bit here, on their way to the GPU


def _replace_with_bnb(llm: nn.Module, linears: dict[str, nn.Linear], mode: str) -> None:
    """Swap each Linear for its bitsandbytes counterpart holding the same (bf16, CPU) weights."""
    bnb = _bitsandbytes()
    for name, lin in linears.items():
        has_bias = lin.bias is not None
        if mode == "int8":
            new = bnb.nn.Linear8bitLt(
                lin.in_features, lin.out_features, bias=has_bias, has_fp16_weights=False, threshold=6.0
            )
            new.weight = bnb.nn.Int8Params(lin.weight.data, requires_grad=False, has_fp16_weights=False)
        else:
            new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=has_bias, compute_dtype=torch.bfloat16,
                                    quant_type="nf4")
            new.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4")
        if has_bias:
            new.bias = nn.Parameter(lin.bias.data, requires_grad=False)
        owner, _, leaf = name.rpartition(".")
        setattr(llm.get_submodule(owner) if owner else llm, leaf, new)


class Int8WeightOnlyLinear(nn.Module):
    """A Linear layer with int8 weights (out, in), symmetric, one fp32 scale per output row.

    forward(x (..., in) fp32) -> (..., out) fp32. A single row (a batch-1 decoding step) is computed
    as an explicit multiply-and-sum, which torch.compile turns into one fused kernel reading the int8
    weight once (it leaves a matmul as a library call on an fp32 copy of the weight); more rows (a
    prefill) go through one matmul on the converted weight."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scales = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127.0  # (out,)
        self.register_buffer("weight", torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == x.shape[-1]:
            y = (x.unsqueeze(-2) * self.weight.to(x.dtype)).sum(dim=-1)  # (..., 1, in) * (out, in) -> (..., out)
        else:
            y = torch.nn.functional.linear(x, self.weight.to(x.dtype))
        y = y * self.scales
        return y if self.bias is None else y + self.bias


def quantize_llm_weight_only(model: nn.Module) -> None:
    """Replace every Linear of `model.llm` (routers left out; the output head too, untied from the
    input embedding, which stays fp32) with an Int8WeightOnlyLinear, in place. fp32 on the CPU."""
    linears = _llm_linears(model.llm)
    if not linears:
        raise InputError("the LLM has no Linear layers to quantise")
    for name, lin in linears.items():
        if lin.weight.device.type != "cpu" or lin.weight.dtype != torch.float32:
            raise ConfigError(
                f"weight-only int8 takes fp32 CPU weights; {name} is {lin.weight.dtype} on {lin.weight.device}"
            )
        owner, _, leaf = name.rpartition(".")
        setattr(model.llm.get_submodule(owner) if owner else model.llm, leaf, Int8WeightOnlyLinear(lin))


def full_precision_parts(model: nn.Module) -> dict[str, nn.Module]:
    """The parts quantisation leaves alone, by name (for checks and the benchmark)."""
    return {"vision": model.vision, "projector": model.projector, "region_encoder": model.region_encoder,
            "pixel_encoder": model.pixel_encoder, "mask_decoder": model.mask_decoder, "seg_proj": model.seg_proj}
