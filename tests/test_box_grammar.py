"""Box grammar decoding with the `tiny` byte-level BPE: random logits under the grammar always give
boxes that the project's parsers read and that lie on the grid, in both formats (property test);
without the grammar the same logits give malformed boxes, so the check can fail."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from medplib.config import preset
from medplib.data.boxes import MED_GRIT_GRID, MINIGPT_GRID, parse_med_grit, parse_minigpt
from medplib.errors import ConfigError
from medplib.model.box_grammar import BoxGrammar, token_texts
from medplib.tokenizer import build_tokenizer

FORMATS = {"med-grit": ("<box>", parse_med_grit, MED_GRIT_GRID), "minigpt": ("{", parse_minigpt, MINIGPT_GRID)}


@lru_cache(maxsize=1)
def tiny_tokenizer():
    return build_tokenizer(preset("tiny").tokenizer)


def decode(ids: list[int]) -> str:
    return tiny_tokenizer().decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def generate(processor: BoxGrammar | None, box_format: str, seed: int, bias: float, steps: int) -> str:
    """Greedy decoding of random logits (N(0,1) per token) with a bias towards tokens holding the opener."""
    tok = tiny_tokenizer()
    opener = FORMATS[box_format][0]
    boost = torch.tensor([opener in t for t in token_texts(tok)])
    rng = np.random.default_rng(seed)
    ids = torch.tensor([[tok.bos_token_id]])
    for _ in range(steps):
        scores = torch.tensor(rng.normal(size=(1, len(tok) + 3)), dtype=torch.float32)  # 3 padding rows
        scores[0, : len(tok)] += bias * boost
        if processor is not None:
            scores = processor(ids, scores)
        nxt = int(scores.argmax())
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        if nxt == tok.eos_token_id:
            break
    return decode(ids[0, 1:].tolist())


@settings(max_examples=60, deadline=None)
@given(box_format=st.sampled_from(sorted(FORMATS)), seed=st.integers(0, 2**32 - 1), bias=st.floats(0.0, 4.0),
       steps=st.integers(1, 48), ordered=st.booleans())
def test_every_generated_box_parses_and_is_on_the_grid(box_format: str, seed: int, bias: float, steps: int,
                                                      ordered: bool) -> None:
    opener, parse, grid = FORMATS[box_format]
    grammar = BoxGrammar(tiny_tokenizer(), box_format, ordered=ordered, max_new_tokens=steps)
    text = generate(grammar, box_format, seed, bias, steps)
    boxes = parse(text)
    assert len(boxes) == text.count(opener), text  # every opened box is closed and parses
    for x1, y1, x2, y2 in boxes:
        assert all(0 <= v <= grid for v in (x1, y1, x2, y2)), text
        if ordered:
            assert x1 <= x2 and y1 <= y2, text


@pytest.mark.parametrize("box_format", sorted(FORMATS))
def test_without_the_grammar_the_same_logits_give_malformed_boxes(box_format: str) -> None:
    opener, parse, _ = FORMATS[box_format]
    texts = [generate(None, box_format, seed, 3.0, 40) for seed in range(5)]
    assert sum(t.count(opener) for t in texts) > sum(len(parse(t)) for t in texts)


def _allowed(grammar: BoxGrammar, text: str) -> set[str]:
    """Texts of the tokens the grammar allows after `text` (encoded with the tiny tokenizer)."""
    tok = tiny_tokenizer()
    prompt = [tok.bos_token_id]
    ids = torch.tensor([prompt + tok.encode(text, add_special_tokens=False)])
    grammar.prompt_length = 1
    scores = grammar(ids, torch.zeros(1, len(tok)))
    return {grammar.texts[i] for i in torch.isfinite(scores[0]).nonzero().flatten().tolist()}


def test_multi_character_tokens_are_checked_character_by_character() -> None:
    g = BoxGrammar(tiny_tokenizer(), "med-grit")
    assert "),(" in _allowed(g, "The liver is at <box>(12,34")  # one token closes y1 and opens x2
    assert ")</" in _allowed(g, "<box>(1,2),(3,4")
    assert "),(" not in _allowed(g, "<box>(12,")  # y1 not typed yet
    after_x1 = _allowed(g, "<box>(500,10),(")
    assert "5" in after_x1 and "10" in after_x1 and "4" not in after_x1  # 4, 4x, 4xx are all < 500
    assert "</s>" not in _allowed(g, "<box>(5")  # no end of sequence inside a box
    assert "1001" not in _allowed(BoxGrammar(tiny_tokenizer(), "med-grit", ordered=False), "<box>(")
    assert "0" in _allowed(g, "<box>(") and "01" not in _allowed(g, "<box>(")  # no leading zeros


def test_the_length_budget_closes_boxes_in_time() -> None:
    tok = tiny_tokenizer()
    # The shortest PFMVG box, {<0><0><0><0>}, is 14 characters: counted one token each.
    assert "{" not in _allowed(BoxGrammar(tok, "minigpt", max_new_tokens=13), "The polyp is at")
    assert "{" in _allowed(BoxGrammar(tok, "minigpt", max_new_tokens=14), "")
    # After "{<5><7" (6 tokens) with 14 in all, ><5><7>} (8 characters, y2 >= y1) must follow: y1 ends here.
    assert tok.encode("{<5><7", add_special_tokens=False).__len__() == 6
    assert _allowed(BoxGrammar(tok, "minigpt", max_new_tokens=14), "{<5><7") == {">"}
    assert "0" in _allowed(BoxGrammar(tok, "minigpt", max_new_tokens=16), "{<5><7")  # y1 = 70 fits: ><5><70>}


def test_bad_settings_are_clear_errors() -> None:
    with pytest.raises(ConfigError, match="unknown box format"):
        BoxGrammar(tiny_tokenizer(), "yolo")  # type: ignore[arg-type]
    g = BoxGrammar(tiny_tokenizer(), "minigpt")
    with pytest.raises(ConfigError, match="scores have"):
        g(torch.tensor([[1]]), torch.zeros(1, 10))
