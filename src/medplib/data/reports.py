"""Templated reports for labelled images (the phantoms): the text report generation trains on, and
its inverse, which reads the findings back out of a generated report for finding-level scoring.

A report is one sentence per structure present, in the source's vocabulary order, then an
impression:

    There is a medium liver in the middle left of the image. There are 2 lesions, the largest small,
    in the upper right of the image. Impression: abnormal (lesion).

Position is where the (largest) instance's centroid falls in image thirds
(`builder.location_words`, the rule the builder's location questions use), so "left" is the
image's left. Size is the largest instance's share of the image area. Render and parse share
the templates below, so whatever `render_report` writes `parse_report` reads back exactly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from medplib.data.builder import LabelledImage, location_words, plural, with_article

# Structures whose presence makes a study abnormal; the others are anatomy.
ABNORMAL = ("lesion", "tumor", "nodule", "polyp", "cyst")
# Share of the image area of the largest instance: below SMALL small, below LARGE medium, else large.
SMALL, LARGE = 0.01, 0.06
SIZES = ("small", "medium", "large")
REPORT_PROMPT = "[report] Describe the findings of this image."  # PeFoMed's tag + one instruction, train and eval
NORMAL_IMPRESSION = "Impression: no abnormality."


@dataclass(frozen=True)
class Finding:
    """One structure in a report: how many instances, and the largest one's size and position."""

    label: str
    count: int
    size: str
    position: str

    @property
    def abnormal(self) -> bool:
        return self.label in ABNORMAL


def size_word(mask: np.ndarray) -> str:
    """mask: (H, W) bool -> small / medium / large by its share of the image area."""
    share = float(mask.mean())
    return "small" if share < SMALL else ("medium" if share < LARGE else "large")


def findings_of(item: LabelledImage, vocabulary: Sequence[str] = ()) -> list[Finding]:
    """The findings of a labelled image, one per label present, in vocabulary order (then by name)."""
    by_label: dict[str, list[np.ndarray]] = {}
    for inst in item.instances:
        by_label.setdefault(inst.label, []).append(inst.mask)
    order = list(vocabulary or item.vocabulary)
    labels = sorted(by_label, key=lambda lab: (order.index(lab) if lab in order else len(order), lab))
    out = []
    for label in labels:
        largest = max(by_label[label], key=lambda m: int(m.sum()))
        out.append(Finding(label, len(by_label[label]), size_word(largest), location_words(largest)[0]))
    return out


def render_report(findings: Sequence[Finding]) -> str:
    sentences = []
    for f in findings:
        if f.count == 1:
            sentences.append(f"There is {with_article(f.size)} {f.label} in the {f.position} of the image.")
        else:
            sentences.append(f"There are {f.count} {plural(f.label)}, the largest {f.size}, "
                             f"in the {f.position} of the image.")
    abnormal = [f.label for f in findings if f.abnormal]
    sentences.append(f"Impression: abnormal ({', '.join(abnormal)})." if abnormal else NORMAL_IMPRESSION)
    return " ".join(sentences)


_SIZE = "|".join(SIZES)
_POSITION = r"center|(?:upper|middle|lower) (?:left|center|right)"
_ONE = re.compile(rf"There is an? ({_SIZE}) (.+?) in the ({_POSITION}) of the image\.")
_MANY = re.compile(rf"There are (\d+) (.+?), the largest ({_SIZE}), in the ({_POSITION}) of the image\.")


def parse_report(text: str, vocabulary: Sequence[str]) -> list[Finding]:
    """The findings a report states, in the order it states them; a sentence that does not follow
    the templates, or names a structure outside `vocabulary`, states nothing."""
    singular = {lab: lab for lab in vocabulary} | {plural(lab): lab for lab in vocabulary}
    found: list[tuple[int, Finding]] = []
    for m in _ONE.finditer(text):
        if m.group(2) in singular:
            found.append((m.start(), Finding(singular[m.group(2)], 1, m.group(1), m.group(3))))
    for m in _MANY.finditer(text):
        if m.group(2) in singular:
            found.append((m.start(), Finding(singular[m.group(2)], int(m.group(1)), m.group(3), m.group(4))))
    return [f for _, f in sorted(found, key=lambda p: p[0])]


def stated_abnormal(text: str) -> bool | None:
    """What the impression says: True (abnormal), False (no abnormality), None (no impression)."""
    if NORMAL_IMPRESSION in text:
        return False
    return True if re.search(r"Impression: abnormal", text) else None
