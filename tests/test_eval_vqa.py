"""VQA scorers: true exact match vs each published normalisation, on hand-computed cases."""

from __future__ import annotations

import json
import unicodedata

import pytest

from medplib.evaluation.vqa import (
    bird_containment,
    exact_match,
    medplib_exact_match,
    normalize_medplib,
    normalize_pefomed,
    normalized_match,
    token_prf,
)


@pytest.mark.parametrize(
    ("pred", "ref", "exact", "medplib", "pefomed"),
    [
        ("two", "2", 0.0, 1.0, 1.0),
        ("Yes.", "yes", 0.0, 1.0, 1.0),
        ("yes", "yes", 1.0, 1.0, 1.0),
        ("The liver", "liver", 0.0, 1.0, 1.0),  # articles dropped
        ("X-ray", "xray", 0.0, 0.0, 1.0),  # only PeFoMed maps "x ray" to "xray"
        ("Größe", "größe", 0.0, 1.0, 1.0),
        ("", "", 1.0, 1.0, 1.0),
        ("", "no", 0.0, 0.0, 0.0),
    ],
)
def test_exact_match_against_published_normalisations(pred, ref, exact, medplib, pefomed):
    assert exact_match(pred, ref) == exact
    assert normalized_match(pred, ref, normalize_medplib) == medplib
    assert normalized_match(pred, ref, normalize_pefomed) == pefomed


def test_normalisation_details_follow_vqa_v2_processing():
    assert normalize_medplib("Yes, it is.") == "yes it is"
    assert normalize_medplib("none") == "0"
    assert normalize_medplib("3.5 cm") == "3.5 cm"  # a decimal point survives the period strip
    assert normalize_medplib("1,000") == "1000"
    assert normalize_medplib("left/right") == "left right"
    assert normalize_medplib("dont know") == "don't know"
    assert exact_match("e\u0301", unicodedata.normalize("NFC", "e\u0301")) == 1.0
    assert exact_match(" yes ", "yes") == 1.0


def test_pefomed_truncates_to_50_words_and_strips_lavis_punctuation():
    words = [f"w{i}" for i in range(60)]
    long, short = " ".join(words), " ".join(words[:50])
    assert normalized_match(long, short, normalize_pefomed) == 1.0
    assert normalized_match(long, short, normalize_medplib) == 0.0
    assert normalize_pefomed("Left lung: *opacity*!") == "left lung opacity"


def test_token_prf_as_published():
    assert token_prf("liver spleen", "liver kidney") == pytest.approx((0.5, 0.5, 0.5))
    # published counting: true positives use the prediction's count, so "no no" vs "no" is perfect
    assert token_prf("no no", "no") == pytest.approx((1.0, 1.0, 1.0))
    assert token_prf("the left lung", "left lung and heart").recall == pytest.approx(2 / 4)
    assert token_prf("", "liver") == (0.0, 0.0, 0.0)
    assert token_prf("liver", "") == (0.0, 0.0, 0.0)
    assert token_prf("kidney", "liver") == (0.0, 0.0, 0.0)


def test_medplib_exact_match_is_not_exact_match():
    assert medplib_exact_match("the liver is enlarged", "liver") == pytest.approx(1 / 3)
    assert medplib_exact_match("liver", "enlarged liver") == 1.0  # distinct ref words found / prediction words
    assert exact_match("liver", "enlarged liver") == 0.0
    assert medplib_exact_match("", "liver") == 0.0


def test_bird_containment():
    assert bird_containment("The lesion is in the Left Lung.", "left lung") == 1.0
    assert bird_containment("The lesion is in the left lung.", "right lung") == 0.0
    assert bird_containment("anything", "") == 1.0
    assert bird_containment("", "liver") == 0.0


def test_on_real_vqa_rad_answers(shared_data):
    qa = json.loads((shared_data / "vqa_rad" / "testset.json").read_text())
    refs = [str(r["answer"]) for r in qa]
    # Upper-casing and a trailing period break true exact match but no published normalisation.
    preds = [a.upper() + "." for a in refs]
    assert sum(exact_match(p, r) for p, r in zip(preds, refs)) < len(refs)
    assert all(normalized_match(p, r, normalize_medplib) == 1.0 for p, r in zip(preds, refs))
    assert all(normalized_match(p, r, normalize_pefomed) == 1.0 for p, r in zip(preds, refs))
