"""Generated-text metrics (BLEU-1..4, ROUGE-L, METEOR, CIDEr) through maintained libraries.

What computes each number, and why:
- BLEU: nltk (`sentence_bleu`, `corpus_bleu`), unsmoothed as MedPLIB publishes. `kind`
  "cumulative" is standard BLEU-n (uniform weights over 1..n-grams); "individual" weights only
  the n-gram order n, which is what MedPLIB's released scorer calls BLEU-1..3.
- ROUGE-L: Google's `rouge-score` (F-measure, beta 1), or pycocoevalcap's (beta 1.2, the
  captioning and report-generation convention) with `convention="coco"`.
- METEOR: pycocoevalcap's METEOR 1.5 (Java, with its bundled paraphrase tables: the number
  report-generation papers print), or nltk's METEOR with `backend="nltk"`. nltk's synonym stage
  needs the WordNet corpus, which nltk downloads at run time and cannot fetch offline, so that
  backend runs nltk's algorithm with exact and stem matching only (stated in the result key).
- CIDEr: pycocoevalcap's CIDEr-D (the `Cider` class; IDF from the evaluated references, x10).
Nothing here re-implements a scorer; medplib only tokenises consistently and maps the inputs.
"""

from __future__ import annotations

import re
import shutil
import warnings
from typing import Callable, Literal, Sequence

import numpy as np
from nltk.translate.bleu_score import corpus_bleu as _nltk_corpus_bleu
from nltk.translate.bleu_score import sentence_bleu as _nltk_sentence_bleu
from nltk.translate.meteor_score import meteor_score as _nltk_meteor
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from rouge_score.rouge_scorer import RougeScorer

from medplib.errors import InputError, MedplibError

_WORD = re.compile(r"[^\W_]+(?:[.'][^\W_]+)*", re.UNICODE)


def tokenize(text: str) -> list[str]:
    """Lower-case word tokens; punctuation dropped, decimals and apostrophes kept ("2.5", "don't").
    Unicode letters count as word characters. This is the R2Gen-style cleaning for reports."""
    return _WORD.findall(str(text).lower())


def _check(preds: Sequence[str], refs: Sequence[str | Sequence[str]]) -> list[list[str]]:
    if len(preds) != len(refs):
        raise InputError(f"{len(preds)} predictions but {len(refs)} references")
    return [[r] if isinstance(r, str) else list(r) for r in refs]


def _weights(n: int, kind: str) -> tuple[float, ...]:
    if n not in (1, 2, 3, 4):
        raise InputError(f"BLEU order must be 1..4, got {n}")
    if kind == "cumulative":
        return tuple([1.0 / n] * n)
    if kind == "individual":
        return tuple(1.0 if i == n - 1 else 0.0 for i in range(n))
    raise InputError(f"BLEU kind must be 'cumulative' or 'individual', got {kind!r}")


def sentence_bleu(
    prediction: str,
    references: str | Sequence[str],
    n: int = 4,
    *,
    kind: Literal["cumulative", "individual"] = "cumulative",
    tokenizer: Callable[[str], list[str]] = tokenize,
) -> float:
    """nltk sentence BLEU-n, unsmoothed: when a weighted n-gram order has no match nltk returns a
    vanishing value (about 1e-78), not an error. An empty prediction scores 0."""
    refs = [references] if isinstance(references, str) else list(references)
    hyp = tokenizer(prediction)
    if not hyp:
        return 0.0
    with warnings.catch_warnings():
        # nltk warns on every zero-count order; a zero score already says it.
        warnings.simplefilter("ignore")
        return float(_nltk_sentence_bleu([tokenizer(r) for r in refs], hyp, weights=_weights(n, kind)))


def corpus_bleu(
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    *,
    kind: Literal["cumulative", "individual"] = "cumulative",
    tokenizer: Callable[[str], list[str]] = tokenize,
) -> dict[str, float]:
    """nltk corpus BLEU-1..4 (n-gram counts pooled over the corpus, one brevity penalty)."""
    refs = _check(predictions, references)
    hyps = [tokenizer(p) for p in predictions]
    toks = [[tokenizer(r) for r in rs] for rs in refs]
    out: dict[str, float] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for n in (1, 2, 3, 4):
            out[f"bleu{n}"] = float(_nltk_corpus_bleu(toks, hyps, weights=_weights(n, kind))) if any(hyps) else 0.0
    return out


def rouge_l(
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    *,
    convention: Literal["rouge-score", "coco"] = "rouge-score",
    tokenizer: Callable[[str], list[str]] = tokenize,
) -> np.ndarray:
    """Per-sample ROUGE-L F (N,): best over references. "rouge-score" = F1 by Google's package;
    "coco" = pycocoevalcap's F with beta 1.2."""
    refs = _check(predictions, references)
    if convention == "rouge-score":
        class _Tok:  # rouge-score's own tokenizer drops non-ASCII letters; use ours on both sides
            def tokenize(self, text: str) -> list[str]:
                return tokenizer(text)

        scorer = RougeScorer(["rougeL"], tokenizer=_Tok())
        return np.array([max(scorer.score(r, p)["rougeL"].fmeasure for r in rs) for p, rs in zip(predictions, refs)])
    if convention == "coco":
        scorer = Rouge()
        return np.array([
            scorer.calc_score([" ".join(tokenizer(p))], [" ".join(tokenizer(r)) for r in rs]) if tokenizer(p) else 0.0
            for p, rs in zip(predictions, refs)
        ])
    raise InputError(f"ROUGE-L convention must be 'rouge-score' or 'coco', got {convention!r}")


class _NoWordNet:
    """Stands in for nltk's WordNet reader: no synonyms, so nltk METEOR uses exact + stem stages."""

    def synsets(self, *_args: object, **_kwargs: object) -> list[object]:
        return []


def meteor(
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    *,
    backend: Literal["coco", "nltk"] = "coco",
    tokenizer: Callable[[str], list[str]] = tokenize,
) -> tuple[float, np.ndarray]:
    """(corpus score, per-sample scores (N,)). "coco" needs a Java runtime on PATH.

    The coco corpus score is METEOR 1.5's own aggregate (not the mean of per-sample scores);
    nltk's corpus score is the mean of per-sample scores.
    """
    refs = _check(predictions, references)
    if backend == "nltk":
        scores = np.array([
            _nltk_meteor([tokenizer(r) for r in rs], tokenizer(p), wordnet=_NoWordNet()) if tokenizer(p) else 0.0
            for p, rs in zip(predictions, refs)
        ])
        return (float(scores.mean()) if scores.size else float("nan")), scores
    if backend == "coco":
        if shutil.which("java") is None:
            raise MedplibError("METEOR backend 'coco' needs a Java runtime (install a JRE), or use backend='nltk'")
        gts = {i: [" ".join(tokenizer(r)) for r in rs] for i, rs in enumerate(refs)}
        res = {i: [" ".join(tokenizer(p))] for i, p in enumerate(predictions)}
        # One Java process per call; pycocoevalcap kills it when the scorer is collected.
        corpus, per = Meteor().compute_score(gts, res)
        return float(corpus), np.asarray(per, dtype=np.float64)
    raise InputError(f"METEOR backend must be 'coco' or 'nltk', got {backend!r}")


def cider(
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    *,
    tokenizer: Callable[[str], list[str]] = tokenize,
) -> tuple[float, np.ndarray]:
    """pycocoevalcap CIDEr-D: (corpus score = mean of per-sample scores, per-sample (N,)).
    IDF comes from the references passed in, so a score depends on the whole evaluated set."""
    refs = _check(predictions, references)
    if not predictions:
        return float("nan"), np.zeros(0)
    gts = {i: [" ".join(tokenizer(r)) for r in rs] for i, rs in enumerate(refs)}
    res = {i: [" ".join(tokenizer(p))] for i, p in enumerate(predictions)}
    corpus, per = Cider().compute_score(gts, res)
    return float(corpus), np.asarray(per, dtype=np.float64)


def text_metrics(
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    *,
    meteor_backend: Literal["coco", "nltk"] = "coco",
    rouge_convention: Literal["rouge-score", "coco"] = "rouge-score",
    tokenizer: Callable[[str], list[str]] = tokenize,
) -> dict[str, float]:
    """Corpus BLEU-1..4, mean sentence BLEU-1..4, ROUGE-L, METEOR and CIDEr for one set."""
    refs = _check(predictions, references)
    out = {f"corpus_{k}": v for k, v in corpus_bleu(predictions, refs, tokenizer=tokenizer).items()}
    for n in (1, 2, 3, 4):
        vals = [sentence_bleu(p, rs, n, tokenizer=tokenizer) for p, rs in zip(predictions, refs)]
        out[f"sentence_bleu{n}"] = float(np.mean(vals)) if vals else float("nan")
    out["rouge_l"] = float(rouge_l(predictions, refs, convention=rouge_convention, tokenizer=tokenizer).mean())
    m_key = "meteor" if meteor_backend == "coco" else "meteor_nltk_no_synonyms"
    out[m_key] = meteor(predictions, refs, backend=meteor_backend, tokenizer=tokenizer)[0]
    out["cider_d"] = cider(predictions, refs, tokenizer=tokenizer)[0]
    return out
