"""Templated reports: what the builder writes for an image reads back into the same findings, the
sides follow the image (a real chest X-ray: the patient's right lung on the image's left), and the
finding-level scores tell a right report from plausible wrong ones."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from medplib.data.builder import TASKS, BuildConfig, build_samples
from medplib.data.converters.covid_cxr import read_covid_cxr
from medplib.data.phantoms import phantom_items
from medplib.data.reports import REPORT_PROMPT, Finding, findings_of, parse_report, render_report, stated_abnormal
from medplib.data.schema import IMAGE_TOKEN
from medplib.errors import InputError
from medplib.evaluation.findings import finding_scores

KNOWN = "ARDSSevere.png"  # Right Lung box [36, 2, 356, 546] of a 790 x 631 film: the image's left


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> list:
    return list(phantom_items(tmp_path_factory.mktemp("ph"), 18, seed=3, size=160))


def test_every_phantom_report_reads_back_into_its_findings(phantoms: list) -> None:
    for item in phantoms:
        findings = findings_of(item)
        assert [f.label for f in findings] == [lab for lab in item.vocabulary if lab in {f.label for f in findings}]
        text = render_report(findings)
        assert parse_report(text, item.vocabulary) == findings
        assert stated_abnormal(text) == any(f.abnormal for f in findings)
    counts = {f.count for item in phantoms for f in findings_of(item)}
    assert 1 in counts and max(counts) > 1  # both templates are exercised (histopathology nuclei)


def test_the_builder_report_task_writes_one_fixed_prompt_report_per_image(phantoms: list, tmp_path: Path) -> None:
    def paraphrase(text: str) -> str:
        return "Rephrased: " + text

    cfg = BuildConfig(tasks=["report"], paraphrase=paraphrase)
    samples = list(build_samples(phantoms, tmp_path, cfg))
    assert len(samples) == len(phantoms) and {s.task for s in samples} == {"report"}
    for item, s in zip(phantoms, samples):
        assert s.conversations[0].content == f"{IMAGE_TOKEN}\n{REPORT_PROMPT}"  # never paraphrased
        assert parse_report(s.conversations[1].content, item.vocabulary) == findings_of(item)
    assert "report" not in TASKS  # opt-in: default builds are unchanged


def test_a_real_chest_xray_report_keeps_the_sides(shared_data: Path, tmp_path: Path) -> None:
    item = next(it for it in read_covid_cxr(shared_data / "covid_cxr_lungs", tmp_path) if it.image.endswith(KNOWN))
    findings = {f.label: f for f in findings_of(item, ("right lung", "left lung"))}
    assert findings["right lung"].position.endswith("left") and findings["left lung"].position.endswith("right")
    text = render_report(list(findings.values()))
    assert "There is a large right lung in the middle left of the image." in text
    assert text.endswith("Impression: no abnormality.")


def test_finding_scores_separate_right_from_wrong_reports(phantoms: list) -> None:
    refs = [findings_of(it) for it in phantoms]
    vocabs = [it.vocabulary for it in phantoms]
    perfect = finding_scores([render_report(r) for r in refs], refs, vocabs)
    assert perfect["finding_accuracy"] == perfect["label_recall"] == perfect["impression_accuracy"] == 1.0
    assert perfect["false_findings_per_report"] == 0.0

    def flip(f: Finding) -> Finding:  # the same structure on the other side of the image
        pos = f.position.replace("left", "@").replace("right", "left").replace("@", "right")
        return replace(f, position=pos)

    swapped = finding_scores([render_report([flip(f) for f in r]) for r in refs], refs, vocabs)
    sided = sum(("left" in f.position or "right" in f.position) for r in refs for f in r) / sum(map(len, refs))
    assert swapped["label_recall"] == 1.0
    assert swapped["finding_accuracy"] == pytest.approx(1.0 - sided)
    dropped = finding_scores([render_report(r[1:]) for r in refs], refs, vocabs)
    assert dropped["label_recall"] == pytest.approx(1 - len(refs) / sum(map(len, refs)))
    chatty = finding_scores(["The image shows some anatomy."] * len(refs), refs, vocabs)
    assert chatty["finding_accuracy"] == chatty["label_recall"] == chatty["impression_accuracy"] == 0.0
    with pytest.raises(InputError):
        finding_scores(["x"], [], [])
