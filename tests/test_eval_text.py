"""Text metrics: hand-computed cases and agreement with the maintained libraries on fixed strings."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from nltk.translate.bleu_score import corpus_bleu as nltk_corpus_bleu
from nltk.translate.bleu_score import sentence_bleu as nltk_sentence_bleu
from rouge_score.rouge_scorer import RougeScorer

from medplib.errors import InputError
from medplib.evaluation.text import cider, corpus_bleu, meteor, rouge_l, sentence_bleu, text_metrics, tokenize

PRED, REF = "The cat sat on the mat.", "the cat is on the mat"


def test_tokenize_keeps_decimals_unicode_and_contractions():
    assert tokenize("Größe 2.5 cm, don't XXXX-XXXX.") == ["größe", "2.5", "cm", "don't", "xxxx", "xxxx"]
    assert tokenize("") == []


def test_bleu_hand_computed():
    assert sentence_bleu(PRED, REF, 1) == pytest.approx(5 / 6)  # 5 of 6 unigrams clipped-match, BP 1
    assert sentence_bleu(PRED, REF, 2) == pytest.approx(np.sqrt(5 / 6 * 3 / 5))
    assert sentence_bleu(PRED, REF, 2, kind="individual") == pytest.approx(3 / 5)
    assert sentence_bleu("", REF, 1) == 0.0
    assert sentence_bleu("heart", "heart size is normal", 1) == pytest.approx(np.exp(1 - 4))  # brevity penalty
    with pytest.raises(InputError):
        sentence_bleu(PRED, REF, 5)


def _iu_reports(shared_data, n=40):
    ann = json.loads((shared_data / "iu_xray" / "annotation.json").read_text())
    return [r["report"] for r in ann["test"][:n]], [r["report"] for r in ann["val"][:n]]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_bleu_agrees_with_nltk_on_real_reports(shared_data):
    refs, preds = _iu_reports(shared_data)

    def split(s: str) -> list[str]:  # independent re-tokenisation
        return " ".join(tokenize(s)).split()

    ours = corpus_bleu(preds, refs)
    for n in (1, 2, 3, 4):
        w = tuple([1 / n] * n)
        assert ours[f"bleu{n}"] == pytest.approx(
            nltk_corpus_bleu([[split(r)] for r in refs], [split(p) for p in preds], weights=w))
        assert sentence_bleu(preds[0], refs[0], n) == pytest.approx(
            nltk_sentence_bleu([split(refs[0])], split(preds[0]), weights=w))


def test_rouge_l_hand_computed_and_agrees_with_rouge_score(shared_data):
    assert rouge_l([PRED], [REF])[0] == pytest.approx(5 / 6)  # LCS "the cat on the mat": P = R = 5/6
    assert rouge_l(["größe normal"], ["größe normal"])[0] == 1.0  # non-ASCII words count
    refs, preds = _iu_reports(shared_data, 20)
    lib = RougeScorer(["rougeL"])  # its own tokenizer: same result on these ASCII reports without decimals
    expected = [lib.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs)]
    np.testing.assert_allclose(rouge_l(preds, refs), expected, rtol=1e-9)
    assert rouge_l([PRED], [REF], convention="coco")[0] == pytest.approx(5 / 6)  # P = R, so beta is moot
    assert rouge_l([PRED], [[REF, "the cat sat on the mat"]])[0] == 1.0  # best over references


def test_cider_d_hand_computed():
    # Each prediction equals its own reference and the two documents share no n-gram:
    # every TF-IDF vector matches its reference exactly, so each order scores 1, times 10.
    docs = ["heart size is normal", "small left pleural effusion"]
    score, per = cider(docs, docs)
    assert score == pytest.approx(10.0) and per.tolist() == pytest.approx([10.0, 10.0])
    # A three-word text has no 4-gram: that order scores 0, so (1 + 1 + 1 + 0) / 4 * 10.
    _, per = cider(["heart size normal", "small left effusion"], ["heart size normal", "small left effusion"])
    assert per.tolist() == pytest.approx([7.5, 7.5])
    _, per = cider(["unrelated words are here", docs[1]], docs)
    assert per[0] == 0.0 and per[1] == pytest.approx(10.0)


def test_meteor_nltk_backend_hand_computed():
    # all 3 words match in one chunk: Fmean 1, penalty 0.5 * (1/3)^3
    _, per = meteor(["the cat sat"], ["the cat sat"], backend="nltk")
    assert per[0] == pytest.approx(1 - 0.5 * (1 / 3) ** 3)
    # stems match ("sits"/"sit" -> "sit") without WordNet
    _, per = meteor(["the cat sits"], ["the cat sit"], backend="nltk")
    assert per[0] == pytest.approx(1 - 0.5 * (1 / 3) ** 3)


@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR 1.5 (coco backend) needs a Java runtime")
def test_meteor_coco_backend_orders_candidates():
    refs = ["the heart is normal in size", "the heart is normal in size", "the heart is normal in size"]
    preds = ["the heart is normal in size", "heart size is normal", "fracture of the left femur"]
    corpus, per = meteor(preds, refs, backend="coco")
    assert per[0] > per[1] > per[2] >= 0.0 and per[0] > 0.9
    assert 0.0 < corpus < 1.0


def test_text_metrics_on_real_reports(shared_data):
    refs, _ = _iu_reports(shared_data, 30)
    normal = "The heart is normal in size. The mediastinum is unremarkable. The lungs are clear."
    out = text_metrics([normal] * len(refs), refs, meteor_backend="nltk")
    assert set(out) == {
        "corpus_bleu1", "corpus_bleu2", "corpus_bleu3", "corpus_bleu4", "sentence_bleu1", "sentence_bleu2",
        "sentence_bleu3", "sentence_bleu4", "rouge_l", "meteor_nltk_no_synonyms", "cider_d",
    }
    assert 0 < out["corpus_bleu4"] < out["corpus_bleu1"] < 1
    assert 0 < out["rouge_l"] < 1 and out["cider_d"] >= 0
    perfect = text_metrics(refs, refs, meteor_backend="nltk")
    assert perfect["corpus_bleu4"] == pytest.approx(1.0) and perfect["rouge_l"] == pytest.approx(1.0)
    with pytest.raises(InputError, match="references"):
        text_metrics(["a"], ["a", "b"], meteor_backend="nltk")
