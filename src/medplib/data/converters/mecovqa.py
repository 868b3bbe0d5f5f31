"""MeCoVQA (LLaVA-style JSON list) <-> samples.

MeCoVQA record: {"image", "conversations": [{"from": "human"|"gpt", "value"}], "answer_type"?}.
Region VQA puts `<region>rel/region_mask.png</region>` in the question; grounding puts `<SEG>` and
`<mask>rel/mask.png</mask>` in the answer. Ours: `<region>` placeholders with MaskRegion entries,
`[SEG]` with mask targets. Where each `<mask>` tag sat is kept in `meta`, and unknown record keys
too, so MeCoVQA -> ours -> MeCoVQA gives back the same records.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable, Iterator

from medplib.data.converters.common import load_json, modality_from_name, rebase, require_exportable
from medplib.data.schema import REGION_TOKEN, SEG_TOKEN, MaskRegion, Sample, Target, parse_sample
from medplib.errors import DataValidationError, InputError

MECOVQA_SEG = "<SEG>"
_REGION_RE = re.compile(r"<region>(.*?)</region>", re.S)
_MASK_RE = re.compile(r"<mask>(.*?)</mask>", re.S)
_ROLES = {"human": "user", "gpt": "assistant"}
_KNOWN = {"image", "conversations", "answer_type"}


def record_to_sample(rec: Any, index: int, image_dir: Path, out_dir: Path, source: str = "mecovqa",
                     path: str | None = None) -> Sample:
    """One MeCoVQA record -> Sample; paths are rebased from `image_dir` to `out_dir`."""
    if not isinstance(rec, dict):
        raise DataValidationError("a MeCoVQA record must be a JSON object", path=path, line=None, field=f"[{index}]")
    for key in ("image", "conversations"):
        if key not in rec:
            raise DataValidationError(f"record {index} has no '{key}'", path=path, field=f"[{index}].{key}")
    if not isinstance(rec["image"], str) or not isinstance(rec["conversations"], list):
        raise DataValidationError(f"record {index}: 'image' must be a string and 'conversations' a list", path=path,
                                  field=f"[{index}]")
    turns, regions, targets, mask_at = [], [], [], []
    for t, turn in enumerate(rec["conversations"]):
        if not isinstance(turn, dict) or turn.get("from") not in _ROLES or not isinstance(turn.get("value"), str):
            raise DataValidationError(f"record {index}, turn {t}: needs 'from' (human|gpt) and a string 'value'",
                                      path=path, field=f"[{index}].conversations[{t}]")
        value = turn["value"]
        if turn["from"] == "human":
            for m in _REGION_RE.finditer(value):
                regions.append(MaskRegion(mask=rebase(m.group(1).strip(), image_dir, out_dir)))
            value = _REGION_RE.sub(REGION_TOKEN, value)
        else:
            pieces, last = [], 0
            for m in _MASK_RE.finditer(value):
                pieces.append(value[last:m.start()])
                mask_at.append([t, sum(len(p) for p in pieces)])  # offset in the cleaned text
                targets.append(Target(mask=rebase(m.group(1).strip(), image_dir, out_dir)))
                last = m.end()
            value = "".join(pieces) + value[last:]
            value = value.replace(MECOVQA_SEG, SEG_TOKEN)
        turns.append({"role": _ROLES[turn["from"]], "content": value})
    answer_type = rec.get("answer_type")
    meta: dict[str, Any] = {"mecovqa_mask_at": mask_at, "mecovqa_keys": list(rec.keys())}
    extra = {k: v for k, v in rec.items() if k not in _KNOWN}
    if extra:
        meta["mecovqa_extra"] = extra
    if answer_type is not None:
        meta["mecovqa_answer_type"] = answer_type  # kept verbatim, the schema field is normalised
    task = "grounding" if targets else ("region_vqa" if regions else "vqa")
    obj = {
        "id": str(rec.get("id", f"{source}:{index}")), "image": rebase(rec["image"], image_dir, out_dir),
        "conversations": turns, "regions": regions, "targets": targets,
        "modality": modality_from_name(rec["image"]), "task": task, "source": source, "meta": meta,
        "answer_type": (str(answer_type).strip().lower()
                        if str(answer_type).strip().lower() in ("open", "closed") else None),
    }
    return parse_sample(obj, path=path, line=None)


def read_mecovqa(path: str | Path, out_dir: str | Path, image_dir: str | Path | None = None,
                 source: str = "mecovqa") -> Iterator[Sample]:
    """Samples from a MeCoVQA JSON file; image and mask paths are relative to `image_dir`
    (default: the JSON's folder) and come out relative to `out_dir`."""
    path = Path(path)
    data = load_json(path)
    if not isinstance(data, list):
        raise DataValidationError("a MeCoVQA file must hold a JSON list of records", path=str(path))
    img_dir = Path(image_dir) if image_dir is not None else path.parent
    for i, rec in enumerate(data):
        yield record_to_sample(rec, i, img_dir, Path(out_dir), source, str(path))


def _mask_path(target: Target, sample: Sample) -> str:
    if not isinstance(target.mask, str):
        raise InputError(f"sample {sample.id}: MeCoVQA needs mask files, not RLE (write the mask to a PNG first)")
    return target.mask


def sample_to_record(sample: Sample, from_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Sample -> MeCoVQA record. Regions must be masks (MeCoVQA has no point or box regions)."""
    require_exportable(sample, "MeCoVQA")
    regions = iter(sample.regions)
    mask_targets = iter([t for t in sample.targets if t.mask is not None])
    positions = {(t, off) for t, off in sample.meta.get("mecovqa_mask_at", [])}
    conversations = []
    for t, turn in enumerate(sample.conversations):
        text = turn.content
        if turn.role == "user":
            parts = text.split(REGION_TOKEN)
            out = parts[0]
            for part in parts[1:]:
                region = next(regions)
                if not isinstance(region, MaskRegion) or not isinstance(region.mask, str):
                    raise InputError(f"sample {sample.id}: MeCoVQA regions are mask files; got a {region.kind} region")
                out += f"<region>{rebase(region.mask, from_dir, out_dir)}</region>" + part
            conversations.append({"from": "human", "value": out})
            continue
        offsets = sorted(off for tt, off in positions if tt == t)
        if offsets:  # an imported record: put each tag back where it was
            out, last = "", 0
            for off in offsets:
                mask = rebase(_mask_path(next(mask_targets), sample), from_dir, out_dir)
                out += text[last:off] + f"<mask>{mask}</mask>"
                last = off
            text = out + text[last:]
        else:  # a built sample: each mask tag follows its [SEG]
            pieces = text.split(SEG_TOKEN)
            text = pieces[0]
            for piece in pieces[1:]:
                mask = rebase(_mask_path(next(mask_targets), sample), from_dir, out_dir)
                text += f"{SEG_TOKEN}<mask>{mask}</mask>" + piece
        conversations.append({"from": "gpt", "value": text.replace(SEG_TOKEN, MECOVQA_SEG)})
    rec: dict[str, Any] = {"image": rebase(sample.image, from_dir, out_dir), "conversations": conversations}
    answer_type = sample.meta.get("mecovqa_answer_type", sample.answer_type)
    if answer_type is not None:
        rec["answer_type"] = answer_type
    rec.update(sample.meta.get("mecovqa_extra", {}))
    order = sample.meta.get("mecovqa_keys", [])
    return {**{k: rec[k] for k in order if k in rec}, **{k: v for k, v in rec.items() if k not in order}}


def write_mecovqa(samples: Iterable[Sample], from_dir: str | Path, out_path: str | Path) -> tuple[int, list[str]]:
    """Write samples as a MeCoVQA JSON list; returns (written, reasons for the skipped samples)."""
    import json

    out_path = Path(out_path)
    records, skipped = [], []
    for s in samples:
        try:
            records.append(sample_to_record(s, Path(from_dir), out_path.parent))
        except InputError as exc:
            skipped.append(str(exc))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(records, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return len(records), skipped
