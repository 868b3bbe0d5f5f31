"""Grammar-constrained decoding of boxes in text: once a box starts, it is well formed and on the grid.

Formats (the text of `medplib.data.boxes`, parsed there by `parse_med_grit` / `parse_minigpt`):
- "med-grit" (BiRD): `<box>(x1,y1),(x2,y2)</box>`, integers on 0..1000; `<box>` opens a box.
- "minigpt" (PFMVG): `{<x1><y1><x2><y2>}`, integers on 0..100; `{` opens a box.

`BoxGrammar` is a logits processor, `(input_ids (B, T), scores (B, V)) -> scores (B, V)`: tokens
that would break the box under way are set to -inf. It works on the text each token adds, so a
byte-level BPE token that holds several characters (`"),("`, `")</"`, `" {"`) is checked character
by character, and the special `<box>` / `</box>` tokens are just their text. The automaton:
- outside a box, any text is allowed; every occurrence of the opener (also spelled out of
  several tokens) starts a box;
- inside, only the format's characters: integers without leading zeros on 0..grid, then the
  closer (`</box>` or `}`); with `ordered=True` (default) x1 <= x2 and y1 <= y2 as well. A digit
  is refused as soon as no number with that prefix can satisfy the bound, so no state is a dead end;
- with `max_new_tokens`, a box is only opened or continued while it can still be closed in the
  tokens left (counted as one character per token: every character of the grammar must exist as
  a one-character token, which byte-level vocabularies guarantee), so a box is never cut off by
  the length limit. Without it, generation stopped early can leave an unclosed box.

Use: build one processor per `generate` call (it takes the prompt length from its first call,
or from `prompt_length`) and pass it as a logits processor, e.g. with transformers
`model.generate(..., logits_processor=LogitsProcessorList([BoxGrammar(tok, "med-grit",
max_new_tokens=64)]), max_new_tokens=64)`, or call it on the scores of a custom decoding loop
before sampling or argmax. medplib's own decoding (`medplib.model.decoding`, with `box_format` on
`MedPLIB.generate`, the Predictor, `medplib ask` and the server) keeps one grammar per format and
walks it per sequence with a `BoxConstraint` (`grammar.start(budget)`): each row of a batch has its
own state, token budget and format (or none). Other models' text is still checked by the parsers,
which report what does not parse.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from medplib.data.boxes import MED_GRIT_GRID, MINIGPT_GRID, BoxFormat, format_med_grit, format_minigpt
from medplib.data.schema import BOX_START_TOKEN
from medplib.errors import ConfigError

__all__ = ["BoxConstraint", "BoxFormat", "BoxGrammar", "token_texts"]

_FORMATS = {"med-grit": (format_med_grit, MED_GRIT_GRID, BOX_START_TOKEN),
            "minigpt": (format_minigpt, MINIGPT_GRID, "{")}
_NUM = None  # an item of the body pattern that is a number field, not a literal character
_INF = float("inf")
# Inside-box states are met about once per box (the numbers typed so far are part of the state), so a
# grammar shared by a long-lived server would otherwise keep one (V,) tensor per box ever written: their
# memo is dropped when full. The few outside states (a scan of the whole vocabulary each) are kept.
_MAX_INSIDE_STATES = 512

# State: ("out", k) with k characters of the opener matched, or ("in", pos, digits, values):
# at body item `pos`, `digits` typed of the current number, `values` the numbers finished.
State = tuple


def _smallest_completion(digits: str, lo: int, grid: int) -> int | None:
    """The smallest integer in [lo, grid] written as `digits` + more digits (no leading zeros), or None.
    The smallest is also the shortest, so it gives the fewest characters left to type."""
    if digits == "0":
        return 0 if lo == 0 else None
    for extra in range(0, len(str(grid)) + 1 - len(digits)):
        if digits:
            start = int(digits) * 10**extra
            end = start + 10**extra - 1
        elif extra == 0:
            continue
        else:
            start, end = (0 if extra == 1 else 10 ** (extra - 1)), 10**extra - 1
        if max(start, lo) <= min(end, grid):
            return max(start, lo)
    return None


def token_texts(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The text each token id adds to a decoded sequence -> list of len(tokenizer) strings.

    Decoded after an anchor token, so sentencepiece's leading-space stripping and any clean-up do
    not change a token's own text; special tokens decode to their content (e.g. "<box>")."""
    anchor = tokenizer.encode("a", add_special_tokens=False)
    kw = {"skip_special_tokens": False, "clean_up_tokenization_spaces": False}
    prefix = tokenizer.decode(anchor, **kw)
    texts = tokenizer.batch_decode([anchor + [i] for i in range(len(tokenizer))], **kw)
    return [t[len(prefix):] if t.startswith(prefix) else t for t in texts]


class BoxGrammar:
    """Masks the logits so that every box in the generated text parses and lies on the grid."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, box_format: BoxFormat = "med-grit", *,
                 ordered: bool = True, max_new_tokens: int | None = None, prompt_length: int | None = None) -> None:
        if box_format not in _FORMATS:
            raise ConfigError(f"unknown box format {box_format!r}; choose from {', '.join(_FORMATS)}")
        if max_new_tokens is not None and max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        self.box_format: BoxFormat = box_format
        fmt, self.grid, self.opener = _FORMATS[box_format]
        # The body comes from the format's own writer, so grammar and parser share one spelling.
        template = fmt((-1, -2, -3, -4))
        body = template[len(self.opener):]
        for k in range(4):
            body = body.replace(str(-1 - k), "\0")
        self.items: list[str | None] = [_NUM if ch == "\0" else ch for ch in body]
        self.ordered, self.max_new_tokens, self.prompt_length = ordered, max_new_tokens, prompt_length
        self.texts = token_texts(tokenizer)
        singles = {t for t in self.texts if len(t) == 1}
        self._missing = sorted(set(self.opener + body.replace("\0", "") + "0123456789") - singles)
        if max_new_tokens is not None:
            self._check_budget()
        # Tokens grouped by first character: inside a box only a few groups can match.
        self._by_first: dict[str, list[int]] = {}
        for i, t in enumerate(self.texts):
            self._by_first.setdefault(t[:1], []).append(i)
        self._step: dict[tuple[State, int], State | None] = {}  # from outside states
        self._step_in: dict[tuple[State, int], State | None] = {}  # from inside states, bounded
        self._need_after: dict[State, torch.Tensor] = {}  # outside states
        self._need_in: dict[State, torch.Tensor] = {}  # inside states, bounded

    def _check_budget(self) -> None:
        if self._missing:
            raise ConfigError(f"the tokenizer has no one-character token for {self._missing}; "
                              "the length budget needs them")

    # --- the character automaton ----------------------------------------------------------
    def _lower_bound(self, values: tuple[int, ...]) -> int:
        """x2 >= x1 and y2 >= y1 when ordered; numbers are typed x1, y1, x2, y2."""
        k = len(values)
        return values[k - 2] if self.ordered and k >= 2 else 0

    def _char(self, state: State, ch: str) -> State | None:
        if state[0] == "out":
            k = state[1]
            while k and self.opener[k] != ch:  # KMP: "<<box>" still opens a box
                k = self._fallback(k)
            k = k + 1 if self.opener[k] == ch else 0
            return ("in", 0, "", ()) if k == len(self.opener) else ("out", k)
        _, pos, digits, values = state
        if self.items[pos] is _NUM:
            lo = self._lower_bound(values)
            if ch.isdigit() and ch.isascii():
                typed = digits + ch
                return None if _smallest_completion(typed, lo, self.grid) is None or digits == "0" or \
                    int(typed) > self.grid else ("in", pos, typed, values)
            if not digits or int(digits) < lo:
                return None
            pos, digits, values = pos + 1, "", values + (int(digits),)
        if self.items[pos] != ch:
            return None
        return ("out", 0) if pos + 1 == len(self.items) else ("in", pos + 1, "", values)

    def _fallback(self, k: int) -> int:
        """Longest proper prefix of opener[:k] that is also its suffix."""
        for j in range(k - 1, 0, -1):
            if self.opener[:j] == self.opener[k - j:k]:
                return j
        return 0

    def _need(self, state: State) -> int:
        """Characters still needed to close the box (0 outside one)."""
        if state[0] == "out":
            return 0
        _, pos, digits, values = state
        need, values = 0, list(values)
        for p in range(pos, len(self.items)):
            if self.items[p] is _NUM:
                typed = digits if p == pos else ""
                n = _smallest_completion(typed, self._lower_bound(tuple(values)), self.grid)
                assert n is not None, "a reachable state always has a completion"
                need += len(str(n)) - len(typed)
                values.append(n)
            else:
                need += 1
        return need

    def advance(self, state: State, token_id: int) -> State | None:
        """State after one token, None when the token breaks the box."""
        if token_id >= len(self.texts):  # padding rows of the embedding matrix: no text, never sampled
            return None
        key = (state, token_id)
        memo = self._step if state[0] == "out" else self._step_in
        if key not in memo:
            s: State | None = state
            for ch in self.texts[token_id]:
                s = self._char(s, ch) if s is not None else None
            if memo is self._step_in and len(memo) >= _MAX_INSIDE_STATES * 64:
                memo.clear()
            memo[key] = s
        return memo[key]

    def need_after(self, state: State) -> torch.Tensor:
        """(V,) characters needed to close after each token from `state`; inf where a token breaks the box."""
        memo = self._need_after if state[0] == "out" else self._need_in
        if state not in memo:
            out = torch.full((len(self.texts),), _INF)
            if state[0] == "in":
                _, pos, digits, _ = state
                item = self.items[pos]
                # A number takes digits, and once typed it may end at the literal after it.
                firsts = [item] if item is not _NUM else list("0123456789") + ([self.items[pos + 1]] if digits else [])
                candidates = [i for c in firsts for i in self._by_first.get(c, [])] + self._by_first.get("", [])
            else:
                candidates = range(len(self.texts))
            for i in candidates:
                nxt = self.advance(state, i)
                if nxt is not None:
                    out[i] = self._need(nxt)
            if memo is self._need_in and len(memo) >= _MAX_INSIDE_STATES:
                memo.clear()
            memo[state] = out
        return memo[state]

    def allowed(self, state: State, left: int | None) -> torch.Tensor:
        """(V,) bool: the tokens that keep the box under way well formed after `state`, and, with `left`
        tokens still to generate (this one included), leave enough to close it; None: no length limit.
        The one masking rule, shared by the logits processor and `BoxConstraint`."""
        need = self.need_after(state)
        return need <= (left - 1) if left is not None else torch.isfinite(need)

    def start(self, max_new_tokens: int | None) -> "BoxConstraint":
        """A walk through this grammar for one sequence about to generate at most `max_new_tokens` tokens."""
        if max_new_tokens is not None:
            self._check_budget()
        return BoxConstraint(self, max_new_tokens)

    def state_of(self, token_ids: list[int]) -> State | None:
        """State after generated tokens (from the outside of any box)."""
        state: State | None = ("out", 0)
        for t in token_ids:
            if state is None:
                return None
            state = self.advance(state, int(t))
        return state

    # --- the logits processor ----------------------------------------------------------------
    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """input_ids (B, T) prompt + generated so far; scores (B, V) next-token logits -> masked (B, V)."""
        if scores.shape[-1] < len(self.texts):
            raise ConfigError(f"scores have {scores.shape[-1]} entries but the tokenizer has {len(self.texts)} tokens")
        if self.prompt_length is None:
            self.prompt_length = input_ids.shape[1]
        generated = input_ids.shape[1] - self.prompt_length
        left = None if self.max_new_tokens is None else self.max_new_tokens - generated
        allowed = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
        for b in range(input_ids.shape[0]):
            state = self.state_of(input_ids[b, self.prompt_length:].tolist())
            if state is None:  # the prompt region was edited by the caller: nothing sensible to enforce
                raise ConfigError("the generated tokens already break the box grammar; was prompt_length right?")
            ok = self.allowed(state, left)
            allowed[b, : ok.shape[0]] = ok.to(scores.device)
        return scores.masked_fill(~allowed, float("-inf"))


class BoxConstraint:
    """One sequence's walk through a `BoxGrammar`: `mask` its next-token scores, then `advance` on the
    token chosen. Its own state and budget, so the rows of a batch are constrained independently."""

    def __init__(self, grammar: BoxGrammar, max_new_tokens: int | None) -> None:
        self.grammar, self.left = grammar, max_new_tokens
        self.state: State = ("out", 0)

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        """scores (V',) next-token logits (V' >= the tokenizer's V: padding rows are never allowed) -> masked copy."""
        if scores.shape[-1] < len(self.grammar.texts):
            raise ConfigError(f"scores have {scores.shape[-1]} entries but the tokenizer has "
                              f"{len(self.grammar.texts)} tokens")
        ok = torch.zeros(scores.shape[-1], dtype=torch.bool)
        ok[: len(self.grammar.texts)] = self.grammar.allowed(self.state, self.left)
        return scores.masked_fill(~ok.to(scores.device), float("-inf"))

    def advance(self, token_id: int) -> None:
        """Take the chosen token; one the mask refused is an error (the caller sampled around the mask)."""
        nxt = self.grammar.advance(self.state, int(token_id))
        if nxt is None:
            raise ConfigError(f"token {token_id} breaks the {self.grammar.box_format} box grammar")
        self.state = nxt
        if self.left is not None:
            self.left -= 1
