"""Controlled edits of radiology reports for testing metrics: corruptions with a known clinical effect
and rewrites that keep the meaning (PeFoMed's question: which metric can be trusted).

Corruptions (`corrupt(report, kind, seed)`):
- "negate": one finding sentence changes polarity ("There is no pneumothorax." -> "There is
  pneumothorax."; "Left basilar atelectasis." -> "No left basilar atelectasis.").
- "swap_sides": every left <-> right (laterality of the findings).
- "drop_finding": the sentence of the key finding is removed (the first positive finding, else
  the first pertinent negative whose finding no other sentence names).
- "add_finding": a sentence stating a finding the report does not mention is inserted.
`rewrite(report, seed)` keeps the meaning: phrasings of negations and normal statements change
("No pneumothorax." <-> "There is no pneumothorax."; "normal in size" -> "of normal size") and,
for reports of three or more sentences, two neighbouring sentences trade places.

What "clinical content" means here is `findings(report)`: each mention of a finding from a fixed
chest X-ray vocabulary with its polarity (a negation cue before it in its clause, NegEx-style:
"no", "without", "negative for", "clear of" ...; or "not seen" after it) and the side words of
its sentence. Every edit is checked against it before it is returned: a corruption must change
the content as its kind says, a rewrite must leave it equal; an edit that cannot is returned as
skipped with the reason (a normal report has nothing to swap, a one-sentence report nothing to
drop). The rules are written here rather than taken from negspacy/medspaCy because those need
a spaCy language model download, and the edits must be exact and deterministic.
All choices are drawn from a generator seeded with (seed, kind, report), so an edit is reproducible
and independent of the order reports are processed in.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable, Literal

from medplib.errors import InputError

Kind = Literal["negate", "swap_sides", "drop_finding", "add_finding"]
KINDS: tuple[Kind, ...] = ("negate", "swap_sides", "drop_finding", "add_finding")

# canonical finding -> pattern; longer alternatives first so "airspace opacity" is not also "opacity".
_TERMS = {
    "pneumothorax": r"pneumothora(?:x|ces|xes)",
    "airspace disease": r"air ?space (?:disease|opacit(?:y|ies)|consolidation)",
    "pleural effusion": r"(?:pleural )?effusions?|pleural fluid",
    "consolidation": r"consolidations?",
    "opacity": r"opacit(?:y|ies)",
    "edema": r"edema",
    "atelectasis": r"atelecta(?:sis|ses|tic)",
    "cardiomegaly": r"cardiomegaly",
    "pneumonia": r"pneumonia",
    "infiltrate": r"infiltrates?",
    "nodule": r"nodules?|nodular",
    "mass": r"mass(?:es)?",
    "fracture": r"fractures?",
    "granuloma": r"granulomas?|granulomatous",
    "emphysema": r"emphysema(?:tous)?",
    "scarring": r"scar(?:ring|s)?",
    "adenopathy": r"(?:lymph)?adenopathy",
    "hyperinflation": r"hyperinflat(?:ion|ed)",
    "degenerative change": r"degenerative (?:changes?|disease)|spondylosis",
    "calcification": r"calcifi(?:cations?|ed)",
    "abnormality": r"abnormalit(?:y|ies)",
}
_TERM_RE = re.compile(r"\b(" + "|".join(f"(?P<t{i}>{p})" for i, p in enumerate(_TERMS.values())) + r")\b", re.I)
_TERM_NAMES = list(_TERMS)
_PRE_CUE = re.compile(r"\b(?:no|not|without|negative for|free of|clear of|absence of|resolution of)\b", re.I)
_POST_CUE = re.compile(
    r"^\s*(?:is|are|was|were|has|have)\s+(?:not\s+(?:seen|present|identified|visualized)|absent|resolved)\b", re.I)
_CLAUSE_BREAK = re.compile(r"\b(?:but|however|although|except|with the exception of)\b|;", re.I)
_SIDE = re.compile(r"\b(left|right)\b", re.I)
_SENTENCE = re.compile(r"(?<=[.!?])\s+")

# False findings to add: each names one finding and a side, in the reports' own style.
_FALSE_FINDINGS = {
    "pneumothorax": "There is a small right apical pneumothorax.",
    "pleural effusion": "There is a moderate left pleural effusion.",
    "consolidation": "There is focal consolidation in the right lower lobe.",
    "edema": "There is mild interstitial pulmonary edema.",
    "atelectasis": "There is left basilar atelectasis.",
    "cardiomegaly": "There is moderate cardiomegaly.",
    "nodule": "There is a 1 cm nodule in the left upper lobe.",
    "mass": "There is a right hilar mass.",
    "fracture": "There is an acute fracture of a right posterior rib.",
    "pneumonia": "There is right middle lobe pneumonia.",
}


@dataclass(frozen=True)
class Mention:
    """One finding in a report: canonical term, negated or not, and the side words of its sentence."""

    term: str
    negated: bool
    sides: frozenset[str]


@dataclass(frozen=True)
class Edit:
    """An edited report (`text`), or a skipped one (`text` is None); `detail` says what changed or why not."""

    kind: str
    text: str | None
    detail: str

    @property
    def skipped(self) -> bool:
        return self.text is None


def sentences(report: str) -> list[str]:
    """Sentences of a report, split after . ! ? (the IU-Xray reports' own punctuation)."""
    return [s for s in _SENTENCE.split(str(report).strip()) if s]


def _sentence_mentions(sentence: str) -> list[Mention]:
    sides = frozenset(m.group(1).lower() for m in _SIDE.finditer(sentence))
    out = []
    for m in _TERM_RE.finditer(sentence):
        term = _TERM_NAMES[next(i for i in range(len(_TERM_NAMES)) if m.group(f"t{i}") is not None)]
        before = _CLAUSE_BREAK.split(sentence[: m.start()])[-1]
        negated = bool(_PRE_CUE.search(before)) or bool(_POST_CUE.match(sentence[m.end():]))
        out.append(Mention(term, negated, sides))
    return out


def findings(report: str) -> frozenset[Mention]:
    """The report's clinical content as this module sees it: the set of finding mentions."""
    return frozenset(m for s in sentences(report) for m in _sentence_mentions(s))


def _rng(seed: int, kind: str, report: str) -> random.Random:
    return random.Random(f"{seed}\0{kind}\0{report}")  # str seeds are hashed with SHA-512: stable across runs


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _join(parts: list[str]) -> str:
    return " ".join(parts)


# --- negate -----------------------------------------------------------------------------------
_UNNEGATE = [  # (pattern, replacement) that remove the negation of a negated sentence
    (re.compile(r"\bthere (is|are) no evidence of\b", re.I), r"there \1 evidence of"),
    (re.compile(r"\bthere (is|are) no\b", re.I), r"there \1"),
    (re.compile(r"^no evidence of\s+", re.I), "Evidence of "),
    (re.compile(r"^no\s+", re.I), ""),
    (re.compile(r"\bwithout (?:evidence of )?", re.I), "with "),
    (re.compile(r"\bnegative for\b", re.I), "positive for"),
    (re.compile(r"\b(is|are) (?:clear|free) of\b", re.I), r"\1 with"),
    (re.compile(r"\b(is|are) not (seen|present|identified|visualized)\b", re.I), r"\1 \2"),
    (re.compile(r"\bno\b", re.I), ""),
]


def _negate_sentence(sentence: str) -> str | None:
    ms = _sentence_mentions(sentence)
    if not ms:
        return None
    if any(m.negated for m in ms):
        for pat, rep in _UNNEGATE:
            if pat.search(sentence):
                return _cap(re.sub(r"\s{2,}", " ", pat.sub(rep, sentence, count=1)).strip())
        return None
    m = re.match(r"(there (?:is|are))\s+(?:an?\s+)?", sentence, re.I)
    if m:
        return f"{m.group(1)} no {sentence[m.end():]}"
    return "No " + sentence[:1].lower() + sentence[1:]


def flipped_terms(old: str, new: str) -> list[str]:
    """Terms that `old` states with one polarity and `new` with the other only (sentence level)."""
    before = {(m.term, m.negated) for m in _sentence_mentions(old)}
    after = {(m.term, m.negated) for m in _sentence_mentions(new)}
    return sorted(t for t, neg in before if (t, not neg) in after and (t, neg) not in after)


def _negate(report: str, rng: random.Random) -> Edit:
    parts = sentences(report)
    order = list(range(len(parts)))
    rng.shuffle(order)
    for i in order:
        new = _negate_sentence(parts[i])
        flipped = flipped_terms(parts[i], new) if new is not None else []
        if flipped:
            return Edit("negate", _join(parts[:i] + [new] + parts[i + 1:]), f"polarity flipped: {', '.join(flipped)}")
    return Edit("negate", None, "no finding sentence whose polarity a rule can flip")


# --- swap sides -------------------------------------------------------------------------------
def _swap_sides(report: str, rng: random.Random) -> Edit:
    del rng  # nothing to choose: every side word swaps

    def swap(m: re.Match) -> str:
        word = m.group(1)
        other = "right" if word.lower() == "left" else "left"
        return other.upper() if word.isupper() else (_cap(other) if word[0].isupper() else other)

    text, n = _SIDE.subn(swap, report)
    if n == 0:
        return Edit("swap_sides", None, "no left or right in the report")
    return Edit("swap_sides", text, f"{n} side word(s) swapped")


# --- drop the key finding ---------------------------------------------------------------------
def _drop(report: str, rng: random.Random) -> Edit:
    del rng  # the key finding is defined, not drawn
    parts = sentences(report)
    if len(parts) < 2:
        return Edit("drop_finding", None, "one sentence: dropping it leaves no report")
    terms = [{m.term for m in _sentence_mentions(p)} for p in parts]
    positive = [any(not m.negated for m in _sentence_mentions(p)) for p in parts]
    # positives first (the key finding), then pertinent negatives, each in report order
    for i in sorted(range(len(parts)), key=lambda i: (not positive[i], i)):
        others = set().union(*(terms[j] for j in range(len(parts)) if j != i))
        gone = sorted(terms[i] - others)
        if gone:
            kind = "positive finding" if positive[i] else "pertinent negative"
            return Edit("drop_finding", _join(parts[:i] + parts[i + 1:]), f"dropped {kind}: {', '.join(gone)}")
    return Edit("drop_finding", None, "no sentence holds a finding that no other sentence names")


# --- add a false finding ----------------------------------------------------------------------
def _add(report: str, rng: random.Random) -> Edit:
    named = {m.term for m in findings(report)}
    options = [t for t in _FALSE_FINDINGS if t not in named]
    if not options:
        return Edit("add_finding", None, "the report already names every finding this module can add")
    term = rng.choice(options)
    parts = sentences(report)
    # after a closing sentence without a full stop, the new one would run into it
    at = rng.randrange(len(parts) + (1 if parts[-1].endswith((".", "!", "?")) else 0))
    return Edit("add_finding", _join(parts[:at] + [_FALSE_FINDINGS[term]] + parts[at:]), f"added: {term}")


_CORRUPTIONS: dict[str, Callable[[str, random.Random], Edit]] = {
    "negate": _negate, "swap_sides": _swap_sides, "drop_finding": _drop, "add_finding": _add,
}


def corrupt(report: str, kind: Kind, seed: int = 0) -> Edit:
    """One corruption of `report` with a known clinical effect (see the module docstring)."""
    if kind not in _CORRUPTIONS:
        raise InputError(f"unknown corruption {kind!r}; choose from {', '.join(KINDS)}")
    if not str(report).strip():
        return Edit(kind, None, "empty report")
    return _CORRUPTIONS[kind](str(report).strip(), _rng(seed, kind, report))


# --- meaning-preserving rewrite ---------------------------------------------------------------
_REPHRASE = [  # (pattern, replacement), each keeps cue-before-finding order and every finding word
    (re.compile(r"^there is no (.+?)\.?$", re.I), r"No \1 is seen."),
    (re.compile(r"^there are no (.+?)\.?$", re.I), r"No \1 are seen."),
    (re.compile(r"^no (.+?) (?:is|are) (?:seen|identified)\.?$", re.I), r"There is no \1."),
    (re.compile(r"^no (.+?)\.?$", re.I), r"There is no \1."),
    (re.compile(r"^(?:the )?heart is normal in size\b", re.I), "Heart size is normal"),
    (re.compile(r"^heart size is normal\b", re.I), "The heart is normal in size"),
    (re.compile(r"\bnormal in size\b", re.I), "of normal size"),
    (re.compile(r"\bwithin normal limits\b", re.I), "normal"),
    (re.compile(r"\bunremarkable\b", re.I), "within normal limits"),
    (re.compile(r"^(?:the )?lungs are clear\b", re.I), "The lungs are clear"),
    (re.compile(r"\bbony\b", re.I), "osseous"),
    (re.compile(r"\bosseous\b", re.I), "bony"),
    (re.compile(r"\bcardiac\b", re.I), "heart"),
]


def _rephrase(sentence: str) -> str:
    """The first rule that changes the sentence and keeps its findings; else the sentence as it was."""
    keep = set(_sentence_mentions(sentence))
    for pat, rep in _REPHRASE:
        new = _cap(pat.sub(rep, sentence, count=1))
        if new != sentence and set(_sentence_mentions(new)) == keep:
            return new
    return sentence


def rewrite(report: str, seed: int = 0) -> Edit:
    """A rewrite of `report` that keeps its findings, polarity and sides (see the module docstring)."""
    text = str(report).strip()
    if not text:
        return Edit("rewrite", None, "empty report")
    rng = _rng(seed, "rewrite", text)
    parts = [_rephrase(p) for p in sentences(text)]
    changed = sum(a != b for a, b in zip(parts, sentences(text)))
    detail = f"{changed} sentence(s) rephrased"
    movable = len(parts) - (0 if parts[-1].endswith((".", "!", "?")) else 1)  # same reason as in _add
    if movable >= 3:
        i = rng.randrange(movable - 1)
        parts[i], parts[i + 1] = parts[i + 1], parts[i]
        detail += f", sentences {i + 1} and {i + 2} swapped"
    out = _join(parts)
    if out == text:
        return Edit("rewrite", None, "no rule rephrases this report")
    return Edit("rewrite", out, detail)
