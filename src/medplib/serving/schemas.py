"""Request and response shapes. Requests follow OpenAI's chat API (unknown OpenAI fields are
accepted and ignored) plus one extension object, `medplib`; responses add `medplib` with masks.

Request extension:  "medplib": {"regions": [{"kind": "point", "point": [x, y]}, ...], "return_png": true,
                                "examples": [{"image": "data:image/png;base64,...",
                                              "mask": "data:image/png;base64,..."}],
                                "box_format": "med-grit"}
Response extension: "medplib": {"masks": [{"rle": {"size": [h, w], "counts": "..."}, "png_base64": "...",
                                           "box": [x1, y1, x2, y2], "score": 0.9}],
                                "text_boxes": [[x1, y1, x2, y2]], "timings": {...}}
"""

from __future__ import annotations

import base64
import io
from typing import Any, Literal, Union

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from medplib.data.boxes import BoxFormat
from medplib.data.masks import rle_encode
from medplib.data.schema import Region
from medplib.inference import Prediction


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageURL(_Lenient):
    url: str


class ContentPart(_Lenient):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: Union[ImageURL, str, None] = None


class Message(_Lenient):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[ContentPart], None] = None


class ExamplePair(_Strict):
    """An in-context example: an image and its mask, each a data URL (or bare base64) of an image file."""

    image: str  # PNG/JPEG/TIFF/DICOM, as a request's image
    mask: str  # PNG/JPEG/TIFF of the image's size; non-zero pixels (JPEG: > 127) mark the structure


class MedplibOptions(_Strict):
    regions: list[Region] = Field(default_factory=list)  # original pixels; a mask only as a COCO RLE
    return_png: bool = True  # masks as PNG base64 beside the RLE
    examples: list[ExamplePair] = Field(default_factory=list)  # shown before the image, in order
    # boxes in the answer decoded under a grammar ("med-grit" 0-1000 or "minigpt" 0-100), read into text_boxes
    box_format: BoxFormat | None = None


class StreamOptions(_Lenient):
    include_usage: bool = False


class ChatRequest(_Lenient):
    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    # None, 0 or below 1e-4 (where sampling is greedy but for ties, and overflows): greedy, as in evaluation
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    medplib: MedplibOptions = Field(default_factory=MedplibOptions)


class SegmentRequest(_Strict):
    image: str  # data URL or bare base64 of a PNG/JPEG/TIFF/DICOM file
    model: str | None = None
    target: str | None = None  # asks "Please segment the {target}."
    question: str | None = None  # or any question (one of target / question)
    regions: list[Region] = Field(default_factory=list)
    max_tokens: int | None = Field(default=None, ge=1)
    return_png: bool = True
    examples: list[ExamplePair] = Field(default_factory=list)  # in-context examples, shown before the image


class PreviewRequest(_Strict):
    image: str  # as SegmentRequest.image


# The request body of each POST route. The routes read their bodies themselves (byte limit first,
# then validation), so FastAPI cannot see these models: `openapi_bodies` puts them in the schema.
REQUEST_BODIES: dict[str, type[BaseModel]] = {
    "/v1/chat/completions": ChatRequest, "/v1/segment": SegmentRequest, "/v1/preview": PreviewRequest}


def openapi_bodies(doc: dict[str, Any]) -> dict[str, Any]:
    """Add REQUEST_BODIES to an OpenAPI document (FastAPI's `app.openapi()` output), in place."""
    refs, defs = models_json_schema([(m, "validation") for m in REQUEST_BODIES.values()],
                                    ref_template="#/components/schemas/{model}")
    doc.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
    for path, model in REQUEST_BODIES.items():
        doc["paths"][path]["post"]["requestBody"] = {
            "required": True, "content": {"application/json": {"schema": refs[(model, "validation")]}}}
    return doc


def png_base64(array: np.ndarray) -> str:
    """(H, W) bool -> 0/255 PNG, or (H, W, 3) uint8 -> RGB PNG, base64 text."""
    a = array.astype(np.uint8) * 255 if array.dtype == bool else array
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def mask_objects(pred: Prediction, return_png: bool) -> list[dict[str, Any]]:
    out = []
    for mask, box, score in zip(pred.masks, pred.boxes, pred.scores):
        obj: dict[str, Any] = {"rle": rle_encode(mask).model_dump(), "box": list(box) if box else None, "score": score}
        if return_png:
            obj["png_base64"] = png_base64(mask)
        out.append(obj)
    return out


def extension(pred: Prediction, return_png: bool) -> dict[str, Any]:
    return {"masks": mask_objects(pred, return_png), "text_boxes": [list(b) for b in pred.text_boxes],
            "timings": pred.timings}


def usage(pred: Prediction) -> dict[str, int]:
    n = len(pred.token_ids)
    return {"prompt_tokens": pred.prompt_tokens, "completion_tokens": n, "total_tokens": pred.prompt_tokens + n}


def completion(pred: Prediction, *, id: str, model: str, created: int, return_png: bool) -> dict[str, Any]:
    """A `chat.completion` object."""
    return {
        "id": id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": pred.text},
                     "finish_reason": pred.finish_reason, "logprobs": None}],
        "usage": usage(pred),
        "medplib": extension(pred, return_png),
    }


def chunk(*, id: str, model: str, created: int, delta: dict[str, Any], finish_reason: str | None = None,
          **extra: Any) -> dict[str, Any]:
    """A `chat.completion.chunk` object (one server-sent event)."""
    return {"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}], **extra}
