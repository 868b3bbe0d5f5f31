"""Turning request inputs into model inputs, with limits: bodies (bytes), data URLs (base64),
images (pixels; PNG/JPG/TIFF/DICOM) and region prompts (the schema's Region objects)."""

from __future__ import annotations

import base64
import binascii
import io
import re
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image
from pydantic import TypeAdapter, ValidationError
from starlette.requests import Request

from medplib.data.images import read_image
from medplib.data.masks import rle_decode
from medplib.data.schema import RLE, MaskRegion, Region
from medplib.errors import InputError
from medplib.serving.errors import PayloadTooLarge

_DATA_URL = re.compile(r"^data:([\w.+/-]*)(;[\w=.+-]+)*;base64,", re.IGNORECASE)
_REGION = TypeAdapter(Region)


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refused with PayloadTooLarge past `max_bytes` (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLarge(f"request body of {int(declared)} bytes is over the limit of {max_bytes}")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > max_bytes:
            raise PayloadTooLarge(f"request body is over the limit of {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def decode_data_url(url: str) -> bytes:
    """`data:<mime>;base64,<data>` (or bare base64) -> bytes. Remote URLs are refused: the server
    never fetches from the network on a client's behalf."""
    url = url.strip()
    if url.lower().startswith(("http://", "https://", "file:")):
        raise InputError("images must be sent inline as data URLs (data:image/png;base64,...), not as links")
    m = _DATA_URL.match(url)
    if url.lower().startswith("data:") and not m:
        raise InputError("image data URL must be base64-encoded (data:<type>;base64,...)")
    payload = url[m.end():] if m else url
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InputError("image is not valid base64") from None
    if not data:
        raise InputError("image is empty")
    return data


def _header_size(data: bytes, dicom: bool) -> tuple[int, int]:
    """(width, height) from the file header, before any pixels are decoded."""
    if dicom:
        import pydicom

        try:
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
            return int(ds.Columns), int(ds.Rows)
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types on corrupt files
            raise InputError(f"cannot read DICOM header ({exc})") from None
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.width, im.height
    except Image.DecompressionBombError as exc:
        raise PayloadTooLarge(f"image is too large ({exc})") from None
    except Exception:  # noqa: BLE001 - Pillow raises many types on corrupt files
        raise InputError("image is not a readable PNG, JPEG, TIFF or DICOM file") from None


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Image file bytes -> (H, W, 3) uint8, read by medplib's own readers (DICOM windowing,
    16-bit scaling) so a served image looks as it does in training."""
    dicom = len(data) >= 132 and data[128:132] == b"DICM"
    w, h = _header_size(data, dicom)
    if w * h > max_pixels:
        raise PayloadTooLarge(f"image of {w}x{h} = {w * h} pixels is over the limit of {max_pixels}")
    with tempfile.TemporaryDirectory(prefix="medplib-") as folder:
        path = Path(folder) / ("upload.dcm" if dicom else "upload.img")
        path.write_bytes(data)
        rgb = read_image(path).rgb
    if rgb.shape[0] * rgb.shape[1] > max_pixels:
        raise PayloadTooLarge(f"image of {rgb.shape[1]}x{rgb.shape[0]} pixels is over the limit of {max_pixels}")
    return rgb


def parse_regions(objs: Sequence[Any], hw: tuple[int, int]) -> tuple[list[Region], list[np.ndarray | None]]:
    """JSON region objects -> (regions, loaded mask arrays). Mask regions must carry a COCO RLE
    of the image's size: a path would let a client read the server's files."""
    regions: list[Region] = []
    arrays: list[np.ndarray | None] = []
    for i, obj in enumerate(objs):
        try:
            region = _REGION.validate_python(obj)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise InputError(f"regions[{i}]: {first['msg']}" + (f" (field '{where}')" if where else "")) from None
        array = None
        if isinstance(region, MaskRegion):
            if not isinstance(region.mask, RLE):
                raise InputError(f"regions[{i}]: a mask region must be a COCO RLE {{'size': [h, w], 'counts': ...}}")
            if tuple(region.mask.size) != tuple(hw):
                raise InputError(f"regions[{i}]: mask size {list(region.mask.size)} differs from the image's {list(hw)}")
            array = rle_decode(region.mask)
        regions.append(region)
        arrays.append(array)
    return regions, arrays
