"""The one sample schema every medplib tool reads and writes (one JSON object per line, JSONL).

A sample is one image with a conversation about it. Text conventions inside the conversation:
- `<image>` marks where the image goes; the Processor adds it to the first user turn if absent.
- each `<region>` in a user turn refers, in order of appearance over the whole conversation,
  to the next entry of `regions` (any number per question);
- each `[SEG]` in an assistant turn is grounded by the next entry of `targets` that has a mask;
- boxes in answer text use the model's box format (see `medplib.data.boxes`); `targets` keeps
  the box in pixels for evaluation;
- `examples` are in-context (image, mask) pairs shown before the image (the query); the Processor
  writes their placeholders into the first user turn (see `Processor.with_examples`).
All coordinates are pixels of the original image, x to the right, y down, (0, 0) the top-left
corner of the top-left pixel. Paths are relative to the JSONL file's folder unless absolute.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Iterator, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from medplib.errors import DataValidationError

IMAGE_TOKEN = "<image>"
REGION_TOKEN = "<region>"
SEG_TOKEN = "[SEG]"
BOX_START_TOKEN, BOX_END_TOKEN = "<box>", "</box>"  # around a Med-GRIT box in answer text



def region_count_problem(n_placeholders: int, n_regions: int) -> str | None:
    """The region-count rule, one home for every check (a sample record, an inference prompt, the model's
    embedding): each `<region>` placeholder takes exactly one region, in order. None when it holds."""
    if n_placeholders == n_regions:
        return None
    return f"{n_placeholders} {REGION_TOKEN} placeholders but {n_regions} regions"


Modality = str  # ct, mr, xray, pet, endoscopy, dermoscopy, fundus, ultrasound, histopathology, ...
Task = Literal["vqa", "region_vqa", "grounding", "box_grounding", "caption", "report", "icl"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RLE(_Strict):
    """COCO run-length encoding (column-major), compatible with pycocotools. `counts` is the
    compressed string form or the uncompressed list of run lengths."""

    size: tuple[int, int]  # (height, width)
    counts: Union[str, list[int]]


MaskRef = Union[str, RLE]  # a mask file path (PNG/NPZ/DICOM SEG) or an RLE


class PointRegion(_Strict):
    kind: Literal["point"] = "point"
    point: tuple[float, float]  # (x, y)
    label: str | None = None


class BoxRegion(_Strict):
    kind: Literal["box"] = "box"
    box: tuple[float, float, float, float]  # (x1, y1, x2, y2), x1 <= x2, y1 <= y2

    label: str | None = None

    @model_validator(mode="after")
    def _ordered(self) -> "BoxRegion":
        x1, y1, x2, y2 = self.box
        if x2 < x1 or y2 < y1:
            raise ValueError(f"box {self.box} must satisfy x1 <= x2 and y1 <= y2")
        return self


class PolygonRegion(_Strict):
    kind: Literal["polygon"] = "polygon"
    polygon: list[tuple[float, float]] = Field(min_length=3)  # [(x, y), ...], closed implicitly
    label: str | None = None


class MaskRegion(_Strict):
    kind: Literal["mask"] = "mask"
    mask: MaskRef
    label: str | None = None


Region = Annotated[Union[PointRegion, BoxRegion, PolygonRegion, MaskRegion], Field(discriminator="kind")]


class Target(_Strict):
    """What a grounded answer should produce: a mask (for `[SEG]`) and/or a box (boxes in text)."""

    mask: MaskRef | None = None
    box: tuple[float, float, float, float] | None = None
    label: str | None = None

    @model_validator(mode="after")
    def _something(self) -> "Target":
        if self.mask is None and self.box is None:
            raise ValueError("a target needs a mask or a box")
        return self


class ExampleRef(_Strict):
    """An in-context example: an image and the mask of the structure to find in the sample's image."""

    image: str = Field(min_length=1)
    mask: MaskRef
    label: str | None = None


class Turn(_Strict):
    role: Literal["user", "assistant"]
    content: str


class Sample(_Strict):
    id: str = Field(min_length=1)
    image: str = Field(min_length=1)
    conversations: list[Turn] = Field(min_length=2)
    regions: list[Region] = Field(default_factory=list)
    targets: list[Target] = Field(default_factory=list)
    examples: list[ExampleRef] = Field(default_factory=list)
    modality: Modality | None = None
    task: Task | None = None
    answer_type: Literal["open", "closed"] | None = None
    source: str = "unknown"
    split: Literal["train", "val", "test"] = "train"
    group: str | None = None  # patient / volume id: splits never separate one group
    meta: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> "Sample":
        if self.conversations[0].role != "user":
            raise ValueError("the conversation must start with a user turn")
        for a, b in zip(self.conversations, self.conversations[1:]):
            if a.role == b.role:
                raise ValueError("user and assistant turns must alternate")
        n_region_tags = sum(t.content.count(REGION_TOKEN) for t in self.conversations if t.role == "user")
        problem = region_count_problem(n_region_tags, len(self.regions))
        if problem:
            raise ValueError(problem)
        n_seg = sum(t.content.count(SEG_TOKEN) for t in self.conversations if t.role == "assistant")
        n_mask_targets = sum(1 for t in self.targets if t.mask is not None)
        if n_seg > n_mask_targets:
            raise ValueError(f"{n_seg} '{SEG_TOKEN}' tokens but only {n_mask_targets} mask targets")
        return self


def _field_of(err: ValidationError) -> str:
    first = err.errors()[0]
    return ".".join(str(p) for p in first["loc"]) or "<sample>"


def parse_sample(obj: Any, *, path: str | None = None, line: int | None = None) -> Sample:
    """Validate one decoded JSON object; errors name the file, line and field."""
    try:
        return Sample.model_validate(obj)
    except ValidationError as err:
        first = err.errors()[0]
        raise DataValidationError(first["msg"], path=path, line=line, field=_field_of(err)) from None


def read_jsonl(path: str | Path) -> Iterator[Sample]:
    """Yield validated samples from a JSONL file; the first bad line raises DataValidationError."""
    path = Path(path)
    if not path.is_file():
        raise DataValidationError("file not found", path=str(path))
    with path.open("rb") as fh:
        for lineno, raw_bytes in enumerate(fh, start=1):
            try:
                raw = raw_bytes.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataValidationError(f"not UTF-8 text ({exc.reason})", path=str(path), line=lineno) from None
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise DataValidationError(f"malformed JSON: {exc.msg}", path=str(path), line=lineno) from None
            yield parse_sample(obj, path=str(path), line=lineno)


def write_jsonl(samples: Iterator[Sample] | list[Sample], path: str | Path) -> int:
    """Write samples as JSONL (atomically: a temp file renamed into place). Returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    n = 0
    with tmp.open("w", encoding="utf-8") as fh:
        for s in samples:
            # Samples without examples are written as before the field existed (older readers still read them).
            fh.write(s.model_dump_json(exclude_defaults=False, exclude=None if s.examples else {"examples"}) + "\n")
            n += 1
    tmp.replace(path)
    return n
