"""Instruction builder (MeCoVQA / Med-GRIT style) from any source of images with labelled masks.

For each image: merge the instances of each label, then write samples for
- vqa: modality, presence yes/no (absent labels of the source's vocabulary are negatives),
  count, location/side, largest structure;
- region_vqa: a region (point, box or free-form mask sampled from a structure) -> its label or
  a description, and "is this region the X?" with negatives;
- grounding: text -> `[SEG]` mask (and "there is no X" for an absent label);
- box_grounding: text -> boxes in the answer text (Med-GRIT `<box>` on 0..1000 by default);
- caption: a one-sentence description (modality and the structures present, largest first): the
  image-caption pairs of stage I alignment, where the answer can only come from the image;
- icl (opt-in, not in the default tasks): in-context segmentation episodes, k example (image, mask)
  pairs and a query image sharing a label, drawn across the images and groups (patients) of one
  source and one split; the question does not name the label, so the answer must come from the
  examples. Written after every image was seen (`icl_episodes`).
Every task has several phrasings. Splits are drawn per group (patient / volume) from a hash, so
one group never straddles splits, and the whole build is deterministic for a seed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
from scipy import ndimage

from medplib.data.boxes import MED_GRIT_GRID, MINIGPT_GRID, box_to_grid, format_med_grit, format_minigpt, mask_to_box
from medplib.data.masks import write_mask_png
from medplib.data.schema import (
    IMAGE_TOKEN,
    REGION_TOKEN,
    SEG_TOKEN,
    BoxRegion,
    ExampleRef,
    MaskRegion,
    PointRegion,
    Sample,
    Target,
    Turn,
)
from medplib.errors import ConfigError

TASKS = ("vqa", "region_vqa", "grounding", "box_grounding", "caption")  # the default build
ALL_TASKS = TASKS + ("icl", "report")  # opt-in: in-context episodes, templated reports (data/reports.py)
MAX_BOXES_IN_TEXT = 8

MODALITY_NAMES = {
    "ct": "CT", "mr": "MRI", "xray": "X-ray", "pet": "PET", "endoscopy": "endoscopy", "dermoscopy": "dermoscopy",
    "fundus": "fundus photography", "ultrasound": "ultrasound", "histopathology": "histopathology",
}

_IRREGULAR_PLURALS = {
    "nucleus": "nuclei", "vertebra": "vertebrae", "ventricle": "ventricles", "optic disc": "optic discs",
}


@dataclass
class Instance:
    """One labelled object: `mask` is (H, W) bool; `path` (relative to the dataset root) is where it
    is stored, or None to let the builder write it."""

    label: str
    mask: np.ndarray
    path: str | None = None
    box: tuple[float, float, float, float] | None = None  # an official pixel box; else the mask's box


@dataclass
class LabelledImage:
    """One image (path relative to the dataset root) with its labelled instances."""

    image: str
    modality: str | None
    instances: list[Instance]
    group: str | None = None  # patient / volume id; defaults to the image stem
    source: str = "unknown"
    vocabulary: Sequence[str] = ()  # labels this source can have: absent ones become negatives
    split: str | None = None  # a fixed split from the source, else drawn from the group hash
    meta: dict = field(default_factory=dict)


@dataclass
class BuildConfig:
    seed: int = 0
    tasks: Sequence[str] = TASKS
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    region_kinds: Sequence[str] = ("point", "box", "mask")
    box_format: str = "med-grit"  # or "minigpt"
    negatives: bool = True
    paraphrase: Callable[[str], str] | None = None  # rewrites a user question; placeholders must survive
    icl_examples: Sequence[int] = (1, 2, 3)  # icl task: example counts k, one drawn per episode
    icl_episodes: int = 1  # icl task: episodes per (image, label) as the query
    # grounding task: also one question per image naming 2..multi_grounding of its structures, answered with one
    # [SEG] per structure (0 = off). One LLM pass then trains several masks: on a CPU budget the LLM is most of a
    # grounding sample's cost.
    multi_grounding: int = 0


@dataclass
class _Structure:
    label: str
    mask: np.ndarray  # (H, W) bool, union of the instances
    path: str  # the merged mask file, relative to the root
    instances: list[np.ndarray]  # (H, W) bool each
    boxes: list[tuple[float, float, float, float]]  # pixel box per instance


_T_MODALITY = ["What imaging modality is this?", "Which modality was used to acquire this image?",
               "What kind of image is this?", "Name the imaging technique shown."]
_T_PRESENCE = ["Is there {a} in this image?", "Can you see {a} in the image?", "Does this image show {a}?",
               "Is {a} visible here?"]
_T_COUNT = ["How many {p} are there in this image?", "Count the {p} in the image.", "How many {p} can you see?"]
_T_LOCATION = ["Where is the {l} located in this image?", "In which part of the image is the {l}?",
               "Describe the position of the {l} in the image."]
_T_SIDE = ["On which side of the image is the {l}?", "Is the {l} on the left or the right side of the image?"]
_T_LARGEST = ["Which structure is the largest in this image?", "What is the biggest labelled structure in the image?",
              "Among the visible structures, which one covers the most area?"]
_T_REGION_WHAT = ["What is shown in {r}?", "What structure does {r} mark?", "Identify the structure in {r}.",
                  "What is this {r}?"]
_T_REGION_DESCRIBE = ["Describe {r}.", "Give a short description of {r}.", "What can you tell me about {r}?"]
_T_REGION_IS = ["Is {r} the {l}?", "Does {r} show the {l}?", "Is the structure in {r} the {l}?"]
# The grounding question `medplib eval` and `Predictor.segment` ask: the first phrasing grounding is trained on.
SEGMENT_QUESTION = "Please segment the {target}."
_T_SEG = [SEGMENT_QUESTION, "Segment the {target} in this image.", "Can you segment the {target}?",
          "Where is the {target}? Please output the mask.", "Show me the {target}."]
_A_SEG = ["Sure, it is {s}.", "{s}.", "Here is the {l}: {s}.", "The {l} is {s}."]
_A_SEG_NONE = ["There is no {l} in this image.", "No {l} is visible in this image."]
_T_BOX = ["Where is the {l}? Answer with a box.", "Give the bounding box of the {l}.", "Locate the {l} in the image.",
          "Find the {l} and give its coordinates."]
_T_ICL = ["Segment the same structure in this image.", "Find the same structure here and segment it.",
          "Segment the structure marked in the examples.",
          "Where is the same structure in this image? Please output the mask."]
_A_ICL = ["Sure, it is {s}.", "{s}.", "Here it is: {s}."]
_T_CAPTION = ["Describe this image briefly.", "What does this image show?", "Give a short caption for this image.",
              "Summarize the image in one sentence."]


def with_article(label: str) -> str:
    """'an MRI', 'an X-ray', 'a CT', 'an endoscopy', 'a polyp': acronyms go by the sound of their first letter."""
    head = label.split("-")[0].split(" ")[0]
    spelled = len(head) > 0 and head.isupper()
    vowel = head[:1].upper() in "AEFHILMNORSX" if spelled else label[:1].lower() in "aeiou"
    return f"{'an' if vowel else 'a'} {label}"


def plural(label: str) -> str:
    if label in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[label]
    head, _, last = label.rpartition(" ")
    word = _IRREGULAR_PLURALS.get(last) or (last + "es" if last.endswith(("s", "x", "sh", "ch")) else last + "s")
    return f"{head} {word}" if head else word


def location_words(mask: np.ndarray) -> tuple[str, str]:
    """(position, side) of a (H, W) bool mask's centroid in image thirds: ("upper left", "left")."""
    h, w = mask.shape
    rows, cols = np.nonzero(mask)
    cy, cx = (rows.mean() + 0.5) / h, (cols.mean() + 0.5) / w
    vert = "upper" if cy < 1 / 3 else ("lower" if cy > 2 / 3 else "middle")
    side = "left" if cx < 1 / 3 else ("right" if cx > 2 / 3 else "center")
    return ("center" if (vert, side) == ("middle", "center") else f"{vert} {side}"), side


def split_of(group: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    """Deterministic split for a group: a hash of (seed, group) mapped to [0, 1)."""
    u = int.from_bytes(hashlib.sha1(f"{seed}:{group}".encode()).digest()[:8], "big") / 2**64
    return "test" if u < test_fraction else ("val" if u < test_fraction + val_fraction else "train")


def _stem(path: str) -> str:
    return Path(path).stem


def _slug(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in label)


def merge_instances(item: LabelledImage, root: Path) -> list[_Structure]:
    """One structure per label: the pixel-wise union of its instances. A label with one stored
    instance keeps its file; otherwise the union is written to masks_merged/<stem>--<label>_merged.png."""
    by_label: dict[str, list[Instance]] = {}
    for inst in item.instances:
        if inst.mask.any():
            by_label.setdefault(inst.label, []).append(inst)
    out = []
    for label, insts in by_label.items():
        union = np.logical_or.reduce([i.mask for i in insts])
        if len(insts) == 1 and insts[0].path is not None:
            path = insts[0].path
        else:
            path = f"masks_merged/{_stem(item.image)}--{_slug(label)}_merged.png"
            write_mask_png(union, root / path)
        boxes = [i.box if i.box is not None else mask_to_box(i.mask) for i in insts]
        out.append(_Structure(label, union, path, [i.mask for i in insts], boxes))
    return out


class _Writer:
    """Builds the samples of one image with its own random stream."""

    def __init__(self, item: LabelledImage, structures: list[_Structure], cfg: BuildConfig, split: str) -> None:
        self.item, self.structures, self.cfg, self.split = item, structures, cfg, split
        digest = hashlib.sha1(f"{cfg.seed}:{item.image}".encode()).digest()
        self.rng = np.random.default_rng(int.from_bytes(digest[:8], "big"))
        self.n = 0
        present = {s.label for s in structures}
        self.absent = [v for v in dict.fromkeys(item.vocabulary) if v not in present]

    def pick(self, options: Sequence[str]) -> str:
        return options[int(self.rng.integers(len(options)))]

    def question(self, text: str, fixed: bool = False) -> str:
        if self.cfg.paraphrase is not None and not fixed:
            text = self.cfg.paraphrase(text)
        return f"{IMAGE_TOKEN}\n{text}"

    def sample(self, task: str, q: str, a: str, answer_type: str, regions: list | None = None,
               targets: list[Target] | None = None, fixed_prompt: bool = False, number: str | None = None,
               **meta: object) -> Sample:
        """number: the id's last part, else the next of the image's counter."""
        if number is None:
            self.n += 1
            number = str(self.n)
        return Sample(
            id=f"{self.item.source}:{_stem(self.item.image)}:{task}:{number}", image=self.item.image,
            conversations=[Turn(role="user", content=self.question(q, fixed_prompt)),
                           Turn(role="assistant", content=a)],
            regions=regions or [], targets=targets or [], modality=self.item.modality, task=task,  # type: ignore[arg-type]
            answer_type=answer_type, source=self.item.source, split=self.split,  # type: ignore[arg-type]
            group=self.item.group or _stem(self.item.image), meta={**self.item.meta, **meta})

    def vqa(self) -> Iterator[Sample]:
        if self.item.modality in MODALITY_NAMES:
            yield self.sample("vqa", self.pick(_T_MODALITY), MODALITY_NAMES[self.item.modality], "open",
                              kind="modality")
        if self.structures:
            s = self.structures[int(self.rng.integers(len(self.structures)))]
            yield self.sample("vqa", self.pick(_T_PRESENCE).format(a=with_article(s.label)), "Yes.", "closed",
                              kind="presence")
            n = len(s.instances)
            yield self.sample("vqa", self.pick(_T_COUNT).format(p=plural(s.label)), str(n), "closed", kind="count")
            pos, side = location_words(s.mask)
            yield self.sample("vqa", self.pick(_T_LOCATION).format(l=s.label), f"In the {pos} of the image.", "open",
                              kind="location")
            if side != "center":
                yield self.sample("vqa", self.pick(_T_SIDE).format(l=s.label), f"The {side} side.", "closed",
                                  kind="side")
        if self.cfg.negatives and self.absent:
            label = self.pick(self.absent)
            yield self.sample("vqa", self.pick(_T_PRESENCE).format(a=with_article(label)), "No.", "closed",
                              kind="presence")
        areas = sorted(((int(s.mask.sum()), s.label) for s in self.structures), reverse=True)
        if len(areas) >= 2 and areas[0][0] > 1.1 * areas[1][0]:  # only ask when the answer is clear
            yield self.sample("vqa", self.pick(_T_LARGEST), f"The {areas[0][1]}.", "open", kind="largest")

    def region(self, s: _Structure) -> PointRegion | BoxRegion | MaskRegion:
        kind = self.pick(list(self.cfg.region_kinds))
        if kind == "point":
            # a point well inside the structure, so it still hits it after resizing
            depth = ndimage.distance_transform_edt(np.pad(s.mask, 1))[1:-1, 1:-1]
            rows, cols = np.nonzero(depth >= max(depth.max() * 0.5, 1.0))
            k = int(self.rng.integers(rows.size))
            return PointRegion(point=(float(cols[k]) + 0.5, float(rows[k]) + 0.5), label=s.label)
        if kind == "box":
            return BoxRegion(box=mask_to_box(s.mask), label=s.label)
        return MaskRegion(mask=s.path, label=s.label)

    def region_vqa(self) -> Iterator[Sample]:
        labels = [s.label for s in self.structures]
        for s in self.structures:
            pos, _ = location_words(s.mask)
            reg = self.region(s)
            if self.rng.random() < 0.5:
                yield self.sample("region_vqa", self.pick(_T_REGION_WHAT).format(r=REGION_TOKEN), f"The {s.label}.",
                                  "open", [reg], region_kind=reg.kind, kind="label")
            else:
                yield self.sample("region_vqa", self.pick(_T_REGION_DESCRIBE).format(r=REGION_TOKEN),
                                  f"This region shows the {s.label}, in the {pos} of the image.", "open", [reg],
                                  region_kind=reg.kind, kind="description")
            yield self.sample("region_vqa", self.pick(_T_REGION_IS).format(r=REGION_TOKEN, l=s.label), "Yes.", "closed",
                              [self.region(s)], kind="verify")
            others = [lab for lab in labels + self.absent if lab != s.label]
            if self.cfg.negatives and others:
                wrong = self.pick(others)
                yield self.sample("region_vqa", self.pick(_T_REGION_IS).format(r=REGION_TOKEN, l=wrong),
                                  f"No, it is the {s.label}.", "closed", [self.region(s)], kind="verify")

    def grounding(self) -> Iterator[Sample]:
        for s in self.structures:
            answer = self.pick(_A_SEG).format(s=SEG_TOKEN, l=s.label)
            target = Target(mask=s.path, box=mask_to_box(s.mask), label=s.label)
            yield self.sample("grounding", self.pick(_T_SEG).format(target=s.label), answer, "open", targets=[target])
        if self.cfg.negatives and self.absent:
            label = self.pick(self.absent)
            yield self.sample("grounding", self.pick(_T_SEG).format(target=label),
                              self.pick(_A_SEG_NONE).format(l=label), "open", kind="absent")
        if self.cfg.multi_grounding >= 2 and len(self.structures) >= 2:
            yield self.multi_grounding()

    def multi_grounding(self) -> Sample:
        """"Please segment the liver, the spleen and the aorta." -> "The liver is [SEG], the spleen is [SEG] and
        the aorta is [SEG].", targets in that order. Its own random stream, so turning it on leaves every other
        sample of the build as it was."""
        rng = np.random.default_rng([int(self.rng.bit_generator.seed_seq.entropy) % 2**63, 1])
        k = int(rng.integers(2, min(self.cfg.multi_grounding, len(self.structures)) + 1))
        chosen = [self.structures[i] for i in rng.permutation(len(self.structures))[:k]]
        labels = [f"the {s.label}" for s in chosen]
        answers = [f"the {s.label} is {SEG_TOKEN}" for s in chosen]
        answer = ", ".join(answers[:-1]) + " and " + answers[-1] + "."
        targets = [Target(mask=s.path, box=mask_to_box(s.mask), label=s.label) for s in chosen]
        question = SEGMENT_QUESTION.format(target=", ".join(labels[:-1])[4:] + " and " + labels[-1])
        return self.sample("grounding", question, answer[0].upper() + answer[1:], "open", targets=targets,
                           number="multi", kind="multi")

    def box_grounding(self) -> Iterator[Sample]:
        h, w = self.structures[0].mask.shape if self.structures else (0, 0)
        if self.cfg.box_format == "med-grit":
            grid, fmt = MED_GRIT_GRID, format_med_grit
        else:
            grid, fmt = MINIGPT_GRID, format_minigpt
        for s in self.structures:
            boxes = s.boxes
            if len(boxes) > MAX_BOXES_IN_TEXT:
                continue  # dozens of boxes make an answer no model should learn to write
            text = " ".join(fmt(box_to_grid(b, w, h, grid)) for b in boxes)
            targets = [Target(box=b, label=s.label) for b in boxes]
            yield self.sample("box_grounding", self.pick(_T_BOX).format(l=s.label), f"The {s.label} is at {text}.",
                              "open", targets=targets, box_format=self.cfg.box_format)

    def report(self) -> Iterator[Sample]:
        """PeFoMed's report task: one fixed prompt for training and evaluation alike (never paraphrased),
        the templated report of the image's structures as the answer."""
        # reports.py builds its sentences from this module's wording rules, so it is imported here
        from medplib.data.reports import REPORT_PROMPT, findings_of, render_report

        yield self.sample("report", REPORT_PROMPT, render_report(findings_of(self.item)), "open",
                          fixed_prompt=True, kind="report")

    def caption(self) -> Iterator[Sample]:
        name = MODALITY_NAMES.get(self.item.modality or "")
        if name is None and not self.structures:
            return
        what = f"{with_article(name)} image" if name else "An image"
        what = what[0].upper() + what[1:]
        if not self.structures:
            yield self.sample("caption", self.pick(_T_CAPTION), f"{what}.", "open", kind="caption")
            return
        parts = [f"{len(s.instances)} {plural(s.label)}" if len(s.instances) > 1 else f"the {s.label}"
                 for s in sorted(self.structures, key=lambda s: -int(s.mask.sum()))]
        listed = parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} and {parts[-1]}"
        yield self.sample("caption", self.pick(_T_CAPTION), f"{what} showing {listed}.", "open", kind="caption")


@dataclass(frozen=True)
class _Annotated:
    """One (image, label) structure as an icl query or example."""

    image: str
    mask: str
    box: tuple[float, float, float, float]
    group: str
    modality: str | None
    meta: dict


def icl_episodes(pools: dict[tuple[str, str, str], list[_Annotated]], cfg: BuildConfig) -> Iterator[Sample]:
    """In-context episodes from `pools` ((source, split, label) -> its structures, in build order):
    each structure is the query of `cfg.icl_episodes` episodes whose k examples are other images of
    its pool, from other groups (patients) when the pool has them, so a patient never serves as its
    own example. Examples and query share source, split and label, so splits stay leak-free."""
    bad = [k for k in cfg.icl_examples if not 1 <= int(k) <= 8]
    if bad or not cfg.icl_examples:
        raise ConfigError(f"icl_examples must be example counts in 1..8, got {list(cfg.icl_examples)}")
    for (source, split, label), pool in pools.items():
        for q in pool:
            others = [a for a in pool if a.image != q.image]
            elsewhere = [a for a in others if a.group != q.group]
            candidates = elsewhere or others
            if not candidates:
                continue  # a label seen in one image only cannot make an episode
            digest = hashlib.sha1(f"{cfg.seed}:icl:{source}:{q.image}:{label}".encode()).digest()
            rng = np.random.default_rng(int.from_bytes(digest[:8], "big"))
            for e in range(cfg.icl_episodes):
                k = min(int(cfg.icl_examples[int(rng.integers(len(cfg.icl_examples)))]), len(candidates))
                chosen = [candidates[int(i)] for i in rng.choice(len(candidates), size=k, replace=False)]
                question = _T_ICL[int(rng.integers(len(_T_ICL)))]
                if cfg.paraphrase is not None:
                    question = cfg.paraphrase(question)
                answer = _A_ICL[int(rng.integers(len(_A_ICL)))].format(s=SEG_TOKEN)
                yield Sample(
                    id=f"{source}:{_stem(q.image)}:icl:{_slug(label)}:{e + 1}", image=q.image,
                    conversations=[Turn(role="user", content=f"{IMAGE_TOKEN}\n{question}"),
                                   Turn(role="assistant", content=answer)],
                    targets=[Target(mask=q.mask, box=q.box, label=label)],
                    examples=[ExampleRef(image=a.image, mask=a.mask, label=label) for a in chosen],
                    modality=q.modality, task="icl", answer_type="open", source=source, split=split,  # type: ignore[arg-type]
                    group=q.group, meta={**q.meta, "k": k, "example_groups": [a.group for a in chosen]})


def build_samples(items: Iterable[LabelledImage], root: Path, cfg: BuildConfig | None = None) -> Iterator[Sample]:
    """Yield instruction samples for every image; merged masks are written under `root`. The icl
    task's episodes come last (they need every image of a source)."""
    cfg = cfg or BuildConfig()
    unknown = set(cfg.tasks) - set(ALL_TASKS)
    if unknown:
        raise ConfigError(f"unknown task(s) {sorted(unknown)}; choose from {', '.join(ALL_TASKS)}")
    per_image = [t for t in cfg.tasks if t != "icl"]
    pools: dict[tuple[str, str, str], list[_Annotated]] = {}
    for item in items:
        structures = merge_instances(item, Path(root))
        split = item.split or split_of(item.group or _stem(item.image), cfg.seed, cfg.val_fraction, cfg.test_fraction)
        writer = _Writer(item, structures, cfg, split)
        for task in per_image:
            yield from getattr(writer, task)()
        if "icl" in cfg.tasks:
            for s in structures:
                pools.setdefault((item.source, split, s.label), []).append(_Annotated(
                    item.image, s.path, mask_to_box(s.mask), item.group or _stem(item.image), item.modality,
                    dict(item.meta)))
    if "icl" in cfg.tasks:
        yield from icl_episodes(pools, cfg)
