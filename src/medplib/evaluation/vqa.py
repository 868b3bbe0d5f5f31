"""VQA answer scoring under each published convention, side by side.

- `exact_match`: true exact match (strings equal after Unicode NFC and outer whitespace).
- MedPLIB / LLaVA-Med (`normalize_medplib`): lower-case, then the VQA-v2 answer normalisation
  (punctuation, periods, number words to digits, articles, contractions, commas). Closed
  accuracy is equality after it. Its "exact match" (`medplib_exact_match`) is not exact match:
  (number of distinct reference words found in the prediction) / (number of prediction words).
  Its open "recall" is `token_prf(...).recall`, counted as in the published code.
- PeFoMed (`normalize_pefomed`): LAVIS caption cleaning (lower-case, `.!"()*#:;~` to spaces,
  truncate to 50 words), then the same VQA-v2 normalisation plus "x ray" -> "xray"; accuracy is
  equality after it.
- BiRD referring-object accuracy (`bird_containment`): every lower-cased reference word occurs
  (as a substring) in the lower-cased response.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from typing import Callable, NamedTuple

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd", "thered've": "there'd've",
    "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
# The published pattern: "(?!<=\d)" is a (harmless) typo for a look-behind, kept for fidelity.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_LAVIS_PUNCT = re.compile(r"([.!\"()*#:;~])")


def _vqa_v2_normalize(text: str) -> str:
    """The VQA-v2 answer processing shared by LLaVA-Med, MedPLIB and PeFoMed."""
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # The published code passes re.UNICODE (= 32) as `count`: at most 32 periods are stripped.
    out = _PERIOD_STRIP.sub("", out, count=32)
    words = [_NUMBER_WORDS.get(w, w) for w in out.lower().split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words).replace(",", "")


def normalize_medplib(text: str) -> str:
    """MedPLIB / LLaVA-Med answer normalisation (lower-case, then VQA-v2 processing)."""
    return _vqa_v2_normalize(str(text).lower())


def normalize_pefomed(text: str, max_words: int = 50) -> str:
    """PeFoMed: LAVIS caption cleaning with truncation to `max_words`, then VQA-v2 processing."""
    t = _LAVIS_PUNCT.sub(" ", str(text).lower())
    t = re.sub(r"\s{2,}", " ", t).rstrip("\n").strip(" ")
    words = t.split(" ")
    if len(words) > max_words:
        t = " ".join(words[:max_words])
    t = _vqa_v2_normalize(t)
    return t.replace("x ray", "xray").replace("\n", " ").replace("\t", " ")


def exact_match(prediction: str, reference: str) -> float:
    """True exact match: 1.0 iff the strings are equal after Unicode NFC and outer whitespace."""
    def norm(s: object) -> str:
        return unicodedata.normalize("NFC", str(s)).strip()

    return float(norm(prediction) == norm(reference))


def normalized_match(prediction: str, reference: str, normalize: Callable[[str], str] = normalize_medplib) -> float:
    """1.0 iff prediction and reference are equal after `normalize` (MedPLIB closed accuracy,
    PeFoMed accuracy with `normalize_pefomed`)."""
    return float(normalize(prediction) == normalize(reference))


class TokenPRF(NamedTuple):
    f1: float
    precision: float
    recall: float


def token_prf(prediction: str, reference: str) -> TokenPRF:
    """Open-question token F1/precision/recall exactly as LLaVA-Med and MedPLIB publish them.

    Both sides are normalised and split on whitespace. True positives add the *prediction's*
    count of each shared word; false negatives add the reference's count of missing words; so
    "no no" against "no" has recall 1. Empty prediction or reference scores 0 on all three.
    """
    cand = Counter(normalize_medplib(prediction).split())
    ref = Counter(normalize_medplib(reference).split())
    if not cand or not ref:
        return TokenPRF(0.0, 0.0, 0.0)
    tp = sum(c for w, c in cand.items() if w in ref)
    fp = sum(c for w, c in cand.items() if w not in ref)
    fn = sum(c for w, c in ref.items() if w not in cand)
    if tp == 0:
        return TokenPRF(0.0, 0.0, 0.0)
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return TokenPRF(2 * precision * recall / (precision + recall), precision, recall)


def medplib_exact_match(prediction: str, reference: str) -> float:
    """MedPLIB / LLaVA-Med's "exact match": distinct reference words present in the prediction,
    divided by the number of prediction words (0 for an empty prediction). Not exact match."""
    cand = Counter(normalize_medplib(prediction).split())
    total = sum(cand.values())
    if total == 0:
        return 0.0
    ref_words = set(normalize_medplib(reference).split())
    return sum(1 for w in ref_words if w in cand) / total


def bird_containment(prediction: str, reference: str) -> float:
    """BiRD referring-object accuracy: 1.0 iff every lower-cased reference word is a substring of
    the lower-cased response. An empty reference is contained in anything."""
    response = str(prediction).lower()
    return float(all(w in response for w in str(reference).lower().split()))
