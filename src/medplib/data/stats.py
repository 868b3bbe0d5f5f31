"""Counts over a sample file: per task, modality, label, split, answer type, source, region kind."""

from __future__ import annotations

from collections import Counter
from typing import Iterable

from medplib.data.schema import Sample


def sample_stats(samples: Iterable[Sample]) -> dict:
    """{'samples': n, 'images': n, 'task': {...}, 'modality': {...}, 'label': {...}, 'split': {...},
    'answer_type': {...}, 'source': {...}, 'region_kind': {...}, 'targets': {'mask': n, 'box': n}}.
    Labels are counted once per sample (from its regions and targets)."""
    counters = {k: Counter() for k in ("task", "modality", "label", "split", "answer_type", "source", "region_kind")}
    n, images, masks, boxes = 0, set(), 0, 0
    for s in samples:
        n += 1
        images.add(s.image)
        counters["task"][s.task or "none"] += 1
        counters["modality"][s.modality or "unknown"] += 1
        counters["split"][s.split] += 1
        counters["answer_type"][s.answer_type or "none"] += 1
        counters["source"][s.source] += 1
        for r in s.regions:
            counters["region_kind"][r.kind] += 1
        labels = {x.label for x in [*s.regions, *s.targets] if x.label}
        for label in labels:
            counters["label"][label] += 1
        masks += sum(1 for t in s.targets if t.mask is not None)
        boxes += sum(1 for t in s.targets if t.box is not None)
    out: dict = {"samples": n, "images": len(images)}
    out.update({k: dict(c.most_common()) for k, c in counters.items()})
    out["targets"] = {"mask": masks, "box": boxes}
    return out


def format_stats(stats: dict, top: int = 15) -> str:
    """A plain-text report of `sample_stats` (the `top` most common labels)."""
    lines = [f"samples: {stats['samples']}  images: {stats['images']}  "
             f"targets: {stats['targets']['mask']} masks, {stats['targets']['box']} boxes"]
    for key in ("task", "modality", "split", "answer_type", "source", "region_kind", "label"):
        items = list(stats[key].items())
        shown = items[:top] if key == "label" else items
        more = f" (+{len(items) - len(shown)} more)" if len(shown) < len(items) else ""
        lines.append(f"{key}: " + ", ".join(f"{k}={v}" for k, v in shown) + more)
    return "\n".join(lines)
