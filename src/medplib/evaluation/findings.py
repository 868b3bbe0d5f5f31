"""Finding-level scores of generated reports against templated reference findings
(medplib.data.reports): what lexical metrics cannot tell, whether each finding is right.

- finding_accuracy: share of reference findings the report states exactly (label, count, size
  and position all correct);
- label_recall: share of reference findings whose structure the report mentions at all;
- false_findings: structures stated that the reference lacks, per report;
- impression_accuracy: share of reports whose impression (normal / abnormal) is the reference's;
  a report without an impression counts as wrong.
"""

from __future__ import annotations

from typing import Sequence

from medplib.data.reports import Finding, parse_report, stated_abnormal
from medplib.errors import InputError


def finding_scores(reports: Sequence[str], references: Sequence[Sequence[Finding]],
                   vocabularies: Sequence[Sequence[str]]) -> dict[str, float]:
    """One generated report, its reference findings and its source's vocabulary per sample."""
    if not (len(reports) == len(references) == len(vocabularies)) or not reports:
        raise InputError(f"need as many reports, references and vocabularies (> 0), got "
                         f"{len(reports)}, {len(references)} and {len(vocabularies)}")
    exact = mentioned = total = false = impression = 0
    for text, ref, vocab in zip(reports, references, vocabularies):
        stated = parse_report(text, vocab)
        by_label = {f.label: f for f in stated}
        total += len(ref)
        exact += sum(by_label.get(f.label) == f for f in ref)
        mentioned += sum(f.label in by_label for f in ref)
        false += len(set(by_label) - {f.label for f in ref})
        impression += stated_abnormal(text) == any(f.abnormal for f in ref)
    n = len(reports)
    return {"finding_accuracy": exact / total if total else 1.0, "label_recall": mentioned / total if total else 1.0,
            "false_findings_per_report": false / n, "impression_accuracy": impression / n, "n_reports": float(n),
            "n_findings": float(total)}
