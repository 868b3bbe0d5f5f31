"""Quantised inference on the CPU: the int8 model (LLM Linear layers only, torch dynamic quantisation)
still grounds the polyp on real Kvasir-SEG images, the parts on the mask path stay fp32, nf4 and other
unsupported requests are clear errors, and `--quantize` reaches the model from `ask` and `serve`."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from conftest import KVASIR_QUESTION, kvasir_images
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear
from typer.testing import CliRunner

from medplib.api import MedPLIB
from medplib.errors import CheckpointError, ConfigError
from medplib.model.moe import MoEMLP
from medplib.model.quantize import full_precision_parts
from medplib.serving.commands import ask, serve

MEDPLIB = [sys.executable, "-c", "from medplib.cli import main; main()"]


def _dice(p: np.ndarray, g: np.ndarray) -> float:
    return float(2 * (p & g).sum() / max(1, p.sum() + g.sum()))


@pytest.fixture(scope="module")
def fp32(kvasir_model: Path) -> MedPLIB:
    return MedPLIB.from_pretrained(kvasir_model)


@pytest.fixture(scope="module")
def int8(kvasir_model: Path) -> MedPLIB:
    return MedPLIB.from_pretrained(kvasir_model, quantize="int8")


def test_int8_model_answers_and_grounds_the_polyp(fp32: MedPLIB, int8: MedPLIB, shared_data: Path) -> None:
    for _, img, gt in kvasir_images(shared_data, 3):
        ref, got = fp32.generate(img, KVASIR_QUESTION), int8.generate(img, KVASIR_QUESTION)
        assert got.text == ref.text == "Sure, it is [SEG]."
        assert len(got.masks) == 1 and got.masks[0].shape == gt.shape
        assert _dice(got.masks[0], ref.masks[0]) >= 0.9
        assert _dice(got.masks[0], gt) >= 0.7
        # Quantised, not the same network: the [SEG] hidden state moved, so the predicted IoU did too.
        assert got.scores[0] != ref.scores[0]


def _llm_linears(llm: nn.Module, kind: type) -> list[str]:
    return [n for n, m in llm.named_modules() if type(m) is kind]


def test_only_the_llm_linears_are_quantised(fp32: MedPLIB, int8: MedPLIB) -> None:
    assert int8.quantize == "int8" and fp32.quantize is None
    linears = _llm_linears(fp32.model.llm, nn.Linear)
    assert linears and _llm_linears(int8.model.llm, DynamicQuantizedLinear) == linears
    assert not _llm_linears(int8.model.llm, nn.Linear)
    ref = fp32.model.state_dict()
    for name, part in full_precision_parts(int8.model).items():
        assert not any(isinstance(m, DynamicQuantizedLinear) for m in part.modules()), name
        for key, t in part.state_dict().items():
            assert t.dtype == ref[f"{name}.{key}"].dtype and torch.equal(t, ref[f"{name}.{key}"]), f"{name}.{key}"
        assert all(p.dtype == torch.float32 for p in part.parameters()), name
    # The embeddings are a lookup, not a Linear: kept as they were.
    assert torch.equal(int8.model.llm.get_input_embeddings().weight, fp32.model.llm.get_input_embeddings().weight)


def test_moe_routers_stay_full_precision(tmp_path: Path) -> None:
    folder = MedPLIB.from_preset("tiny", seed=0, **{"moe.num_experts": 2}).save_pretrained(tmp_path / "moe")
    m = MedPLIB.from_pretrained(folder, quantize="int8")
    moes = [x for x in m.model.llm.modules() if isinstance(x, MoEMLP)]
    assert moes and all(type(x.router) is nn.Linear and x.router.weight.dtype == torch.float32 for x in moes)
    assert all(type(e.gate_proj) is DynamicQuantizedLinear for x in moes for e in x.experts)


def test_unsupported_requests_are_clear_errors(kvasir_model: Path) -> None:
    with pytest.raises(ConfigError, match="nf4 quantisation needs a CUDA GPU and bitsandbytes.*--quantize int8"):
        MedPLIB.from_pretrained(kvasir_model, quantize="nf4")
    with pytest.raises(ConfigError, match="must be one of int8, nf4"):
        MedPLIB.from_pretrained(kvasir_model, quantize="int4")
    with pytest.raises(ConfigError, match="float32"):
        MedPLIB.from_pretrained(kvasir_model, quantize="int8", dtype=torch.bfloat16)
    with pytest.raises(ConfigError, match="not on mps"):
        MedPLIB.from_pretrained(kvasir_model, quantize="int8", device="mps")


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed")
def test_cuda_quantisation_without_bitsandbytes_names_the_install(kvasir_model: Path) -> None:
    # Checked before any weights are read or any GPU is touched.
    for mode in ("int8", "nf4"):
        with pytest.raises(ConfigError, match="pip install bitsandbytes"):
            MedPLIB.from_pretrained(kvasir_model, quantize=mode, device="cuda")


def test_a_quantised_model_is_not_saved(int8: MedPLIB, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="cannot be saved"):
        int8.save_pretrained(tmp_path / "q")
    assert not (tmp_path / "q").exists()


def test_ask_quantize_flag(kvasir_model: Path, shared_data: Path) -> None:
    image = shared_data / "kvasir_seg" / "images" / f"{kvasir_images(shared_data, 1)[0][0]}.jpg"
    app = typer.Typer()
    app.command()(ask)
    app.command("noop")(lambda: None)
    res = CliRunner().invoke(app, ["ask", "--model", str(kvasir_model), str(image), KVASIR_QUESTION, "--json",
                                   "--quantize", "int8"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["text"] == "Sure, it is [SEG]." and len(out["masks"]) == 1
    bad = subprocess.run([*MEDPLIB, "ask", "--model", str(kvasir_model), str(image), KVASIR_QUESTION,
                          "--quantize", "nf4"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert bad.returncode == 2 and "nf4" in bad.stderr and "--quantize int8" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_serve_quantize_flag_reaches_the_predictor(kvasir_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("fastapi")
    import uvicorn

    import medplib.serving.app as server_app

    run_server = server_app.serve
    calls: list[dict] = []
    monkeypatch.setattr(server_app, "serve", lambda model, **kw: calls.append(kw))
    app = typer.Typer()
    app.command()(serve)
    app.command("noop")(lambda: None)
    res = CliRunner().invoke(app, ["serve", "--model", str(kvasir_model), "--quantize", "int8"])
    assert res.exit_code == 0, res.output
    assert calls and calls[0]["quantize"] == "int8"
    res = CliRunner().invoke(app, ["serve", "--model", str(kvasir_model), "--quantize", "nf4"])
    assert isinstance(res.exception, ConfigError) and len(calls) == 1  # refused before the server starts
    # The server's own loader hands the flag to the model it serves.
    served: list = []
    monkeypatch.setattr(server_app, "create_app", lambda predictor, settings: served.append(predictor) or predictor)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: None)
    run_server(kvasir_model, quantize="int8")
    assert served[0].model.quantize == "int8"
    assert any(isinstance(m, DynamicQuantizedLinear) for m in served[0].model.model.llm.modules())
