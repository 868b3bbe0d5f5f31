"""Report corruptions and rewrites on the 590 real IU-Xray test reports: each corruption changes the
clinical content it claims (checked on the text as well as through `findings`), rewrites keep every
finding, the same seed gives the same edit, and a report with nothing to edit is skipped."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from medplib.errors import InputError
from medplib.evaluation.corruptions import KINDS, Mention, corrupt, findings, rewrite, sentences

NEGATION = re.compile(r"\b(?:no|not|without|negative|free of|clear of)\b", re.I)


@pytest.fixture(scope="module")
def reports(shared_data: Path) -> dict[str, str]:
    data = json.loads((shared_data / "iu_xray" / "annotation.json").read_text(encoding="utf-8"))
    out = {r["id"]: r["report"] for r in data["test"]}
    assert len(out) == 590
    return out


def test_findings_read_polarity_and_sides_of_real_sentences(reports: dict[str, str]) -> None:
    got = findings(reports["CXR3774_IM-1892"])  # "... No pneumothorax. ... Right lower lung granuloma."
    assert Mention("pneumothorax", True, frozenset()) in got
    assert Mention("pleural effusion", True, frozenset()) in got
    assert Mention("granuloma", False, frozenset({"right"})) in got
    assert Mention("calcification", False, frozenset()) in got
    clear = findings("The lungs are clear of focal airspace disease, pneumothorax, or pleural effusion.")
    assert {m.term for m in clear} == {"airspace disease", "pneumothorax", "pleural effusion"}
    assert all(m.negated for m in clear)
    assert findings("No pleural effusion or pneumothorax is seen. Degenerative changes are present in the spine.") == {
        Mention("pleural effusion", True, frozenset()), Mention("pneumothorax", True, frozenset()),
        Mention("degenerative change", False, frozenset())}


def test_negation_flips_the_polarity_of_a_finding(reports: dict[str, str]) -> None:
    assert corrupt(reports["CXR3991_IM-2044"], "negate").text == \
        "The cardiac contours are normal. The lungs are clear. No thoracic spondylosis."
    done = 0
    for report in reports.values():
        edit = corrupt(report, "negate")
        if edit.skipped:
            assert not any(findings(s) for s in sentences(report)) or "flip" in edit.detail
            continue
        done += 1
        before, after = sentences(report), sentences(edit.text)
        changed = [(a, b) for a, b in zip(before, after) if a != b]
        assert len(before) == len(after) and len(changed) == 1, (report, edit.text)
        old, new = changed[0]
        assert len(NEGATION.findall(old)) != len(NEGATION.findall(new)), (old, new)  # a cue added or removed
        before_p, after_p = ({(m.term, m.negated) for m in findings(s)} for s in (old, new))
        assert any((t, not neg) in after_p and (t, neg) not in after_p for t, neg in before_p), (old, new)
    assert done >= 500  # 521 of 590 reports have a finding sentence a rule can flip


def test_side_swap_exchanges_left_and_right(reports: dict[str, str]) -> None:
    done = 0
    for report in reports.values():
        edit = corrupt(report, "swap_sides")
        lefts, rights = (len(re.findall(rf"\b{w}\b", report, re.I)) for w in ("left", "right"))
        if lefts + rights == 0:
            assert edit.skipped and "no left or right" in edit.detail
            continue
        done += 1
        assert len(re.findall(r"\bleft\b", edit.text, re.I)) == rights
        assert len(re.findall(r"\bright\b", edit.text, re.I)) == lefts
        swapped = {Mention(m.term, m.negated, frozenset({"left": "right", "right": "left"}[s] for s in m.sides))
                   for m in findings(report)}
        assert findings(edit.text) == swapped
        assert re.sub(r"\b(left|right)\b", "", edit.text, flags=re.I) == re.sub(r"\b(left|right)\b", "", report,
                                                                                flags=re.I)
    assert done == 130


def test_dropping_the_key_finding_removes_it(reports: dict[str, str]) -> None:
    assert corrupt(reports["CXR3774_IM-1892"], "drop_finding").text == (
        "Heart size is within normal limits. Tortuous aorta. Clear lungs. No pneumothorax. No pleural effusion. "
        "Right lower lung granuloma.")  # the first positive finding (calcification) goes
    done = 0
    for report in reports.values():
        edit = corrupt(report, "drop_finding")
        if edit.skipped:
            continue
        done += 1
        before, after = sentences(report), sentences(edit.text)
        assert len(after) == len(before) - 1 and all(s in before for s in after)
        assert {m.term for m in findings(report)} - {m.term for m in findings(edit.text)}
    assert done >= 500


def test_adding_a_false_finding_adds_a_positive_finding_the_report_lacked(reports: dict[str, str]) -> None:
    for report in reports.values():
        edit = corrupt(report, "add_finding")
        before, after = sentences(report), sentences(edit.text)
        added = [s for s in after if s not in before]
        assert len(after) == len(before) + 1 and len(added) == 1
        assert [s for s in after if s in before] == before  # the report itself is untouched, in order
        new = {m.term for m in findings(added[0]) if not m.negated}
        assert new and not new & {m.term for m in findings(report)}


def test_rewrites_keep_every_finding(reports: dict[str, str]) -> None:
    assert rewrite("There is no pneumothorax. The heart is normal in size.").text == \
        "No pneumothorax is seen. Heart size is normal."
    done = 0
    for report in reports.values():
        edit = rewrite(report)
        if edit.skipped:
            continue
        done += 1
        assert edit.text != report
        assert findings(edit.text) == findings(report), (report, edit.text)
        assert sorted(re.findall(r"\b(?:left|right)\b", edit.text, re.I)) == \
            sorted(re.findall(r"\b(?:left|right)\b", report, re.I))
    assert done >= 550


def test_the_same_seed_gives_the_same_edit(reports: dict[str, str]) -> None:
    texts = list(reports.values())
    for kind in KINDS:
        assert [corrupt(r, kind, seed=7) for r in texts] == [corrupt(r, kind, seed=7) for r in texts]
    assert [rewrite(r, seed=7) for r in texts] == [rewrite(r, seed=7) for r in texts]
    # the seed matters where there is a choice to make
    added = {seed: [corrupt(r, "add_finding", seed=seed).text for r in texts] for seed in (1, 2)}
    assert added[1] != added[2]
    assert [rewrite(r, seed=1).text for r in texts] != [rewrite(r, seed=2).text for r in texts]


def test_a_report_with_nothing_to_corrupt_is_skipped_not_crashed(reports: dict[str, str]) -> None:
    normal = "Heart size normal."
    for kind in ("negate", "swap_sides", "drop_finding"):
        edit = corrupt(normal, kind)
        assert edit.skipped and edit.text is None and edit.detail
    for kind in KINDS:
        assert corrupt("", kind).skipped
    assert rewrite("").skipped
    assert corrupt(reports["CXR3991_IM-2044"], "swap_sides").detail == "no left or right in the report"
    with pytest.raises(InputError, match="unknown corruption"):
        corrupt(normal, "shuffle")  # type: ignore[arg-type]
