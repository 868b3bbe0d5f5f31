"""Batched, padding-aware decoding and the static / compiled decoding steps, against the eager
one-prompt-at-a-time reference (random-init `tiny`, with and without MoE)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from medplib.api import MedPLIB
from medplib.data.schema import BoxRegion, PointRegion, Turn
from medplib.inference import Predictor, Query
from medplib.model.decoding import SLOT_BUCKET, steps_of
from medplib.model.moe import moe_layers
from medplib.model.quantize import Int8WeightOnlyLinear, quantize_llm_weight_only


def _images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (120, 100, 3), dtype=np.uint8), rng.integers(0, 255, (90, 160, 3), dtype=np.uint8)]


def _queries(imgs: list[np.ndarray]) -> list[Query]:
    """Prompts of different lengths (so the batch is padded), each with its own image, regions,
    history and token limit."""
    return [
        Query(imgs[0], "Describe the image.", max_new_tokens=12),
        Query(imgs[1], "What is in this long question about the <region> region, and <region>?",
              [BoxRegion(box=(10, 10, 60, 50)), PointRegion(point=(30, 40))], max_new_tokens=20),
        Query(imgs[0], "Why?",
              history=[Turn(role="user", content="What is it?"), Turn(role="assistant", content="A scan.")],
              max_new_tokens=7),
        Query(imgs[1], "Describe the image.", max_new_tokens=16),
    ]


def _one_at_a_time(p: Predictor, q: Query) -> list[int]:
    p.set_image(q.image)
    return p.ask(q.question, q.regions, q.region_arrays, q.history, max_new_tokens=q.max_new_tokens).token_ids


@pytest.mark.parametrize("experts", [0, 2])
@pytest.mark.parametrize("mode", ["eager", "static"])
def test_batched_greedy_answers_equal_one_at_a_time(mode: str, experts: int) -> None:
    m = MedPLIB.from_preset("tiny", seed=0, **{"moe.num_experts": experts})
    m.model.ids = dataclasses.replace(m.model.ids, eos=-1)  # every answer runs to its own limit
    qs = _queries(_images())
    reference = [_one_at_a_time(Predictor(m), q) for q in qs]  # eager, one prompt at a time
    m.model.decode_mode = mode
    batch = Predictor(m).ask_batch(qs)
    assert [len(t) for t in reference] == [q.max_new_tokens for q in qs]  # per-sequence limits
    assert [b.token_ids for b in batch] == reference
    assert all(b.timings["batch"] == len(qs) for b in batch)
    assert len(set(map(tuple, reference))) > 1  # the rows really differ: no row copied another's answer


def test_a_failing_request_fails_alone() -> None:
    m = MedPLIB.from_preset("tiny", seed=0)
    imgs = _images()
    qs = _queries(imgs)
    reference = [_one_at_a_time(Predictor(m), q) for q in qs]

    def broken(text: str) -> None:
        raise RuntimeError("client gone")

    bad = [Query(imgs[0], "What is <region>?", [], max_new_tokens=4),  # a placeholder without a region
           Query(np.zeros((4, 4), np.float32), "Describe the image."),  # not an image
           Query(imgs[1], "Describe the image.", max_new_tokens=9, on_text=broken)]  # its callback raises mid-answer
    out = Predictor(m).ask_batch([bad[0], qs[0], bad[1], qs[1], bad[2], qs[2], qs[3]])
    assert [type(o).__name__ for o in (out[0], out[2], out[4])] == ["InputError", "InputError", "RuntimeError"]
    assert [o.token_ids for o in (out[1], out[3], out[5], out[6])] == reference
    # the broken callback's row was decoded too
    assert all(o.timings["batch"] == 5 for o in (out[1], out[3], out[5], out[6]))


def test_streaming_callbacks_get_each_rows_own_text() -> None:
    m = MedPLIB.from_preset("tiny", seed=0)
    qs = _queries(_images())[:3]
    pieces: list[list[str]] = [[] for _ in qs]
    for q, got in zip(qs, pieces):
        q.on_text = got.append
    out = Predictor(m).ask_batch(qs)
    assert ["".join(got) for got in pieces] == [o.text for o in out]


@pytest.mark.parametrize("experts", [0, 2])
def test_compiled_and_static_steps_give_eager_greedy_tokens_and_compile_once_per_bucket(experts: int) -> None:
    """MoE included: its compiled step routes through torch.cond, so it is one graph with no break."""
    from torch._dynamo.utils import counters

    counters.clear()
    m = MedPLIB.from_preset("tiny", seed=0, **{"moe.num_experts": experts})
    if experts:
        with torch.no_grad():
            for moe in moe_layers(m.model.llm):
                moe.router.weight.normal_(std=0.5)  # both experts in use
    m.model.ids = dataclasses.replace(m.model.ids, eos=-1)
    p = Predictor(m)
    img = _images()[0]
    p.set_image(img)
    questions = ["Describe the image.", "What is shown at <region>?"]
    regions = [[], [BoxRegion(box=(5, 5, 50, 40))]]
    answers = {}
    for mode in ("eager", "static", "compiled"):
        m.model.decode_mode = mode
        answers[mode] = [p.ask(q, r, max_new_tokens=24).token_ids for q, r in zip(questions, regions)]
        if mode == "compiled":
            graphs = counters["stats"]["unique_graphs"]
            # Another answer in the same (batch, slots) bucket, on the image whose prefix cache is kept.
            prefix = p._current().features.prefix_cache
            again = p.ask(questions[0], max_new_tokens=24).token_ids
            assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled again
            assert p._current().features.prefix_cache is prefix  # the image's prefix was reused, not recomputed
            assert again == answers["eager"][0]
    assert answers["static"] == answers["eager"]
    assert answers["compiled"] == answers["eager"]
    assert len(answers["eager"][0]) == 24
    assert steps_of(m.model).buckets == {(1, SLOT_BUCKET)}
    assert not counters["graph_break"]


def test_compiled_step_on_weight_only_int8_gives_the_int8_models_eager_tokens() -> None:
    """Weight-only int8 (the int8 compiled benchmark rows): the compiled step decodes the same greedy
    tokens as the same int8 model decoded eagerly, and close to what fp32 decodes."""
    m = MedPLIB.from_preset("tiny", seed=0)
    m.model.ids = dataclasses.replace(m.model.ids, eos=-1)
    p = Predictor(m)
    p.set_image(_images()[0])
    embedding = m.model.llm.get_input_embeddings().weight.detach().clone()
    fp32 = p.ask("Describe the image.", max_new_tokens=16).token_ids
    quantize_llm_weight_only(m.model)
    assert all(isinstance(lin, Int8WeightOnlyLinear) for lin in (m.model.llm.get_output_embeddings(),
                                                                 m.model.llm.get_decoder().layers[0].self_attn.q_proj))
    assert torch.equal(m.model.llm.get_input_embeddings().weight, embedding)  # the input embedding stays fp32
    answers = {}
    for mode in ("eager", "compiled"):
        m.model.decode_mode = mode
        answers[mode] = p.ask("Describe the image.", max_new_tokens=16).token_ids
    assert answers["compiled"] == answers["eager"]
    assert sum(a == b for a, b in zip(answers["eager"], fp32)) >= 8  # int8 rounding moves few choices
