"""Turning request inputs into model inputs, with limits: bodies (bytes), data URLs (base64),
images (pixels; PNG, JPEG, TIFF and DICOM only), region prompts (the schema's Region objects) and
in-context examples (image + mask data URLs)."""

from __future__ import annotations

import base64
import binascii
import io
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
from PIL import Image
from starlette.requests import ClientDisconnect, Request

from medplib.data.images import read_image
from medplib.data.masks import rle_decode
from medplib.data.schema import RLE, MaskRegion, Region
from medplib.errors import InputError
from medplib.inference import SEGMENT_TEMPLATE
from medplib.retrieval.examples import Example, check_example
from medplib.serving.errors import ClientClosed, PayloadTooLarge

if TYPE_CHECKING:
    from medplib.serving.schemas import ExamplePair

_DATA_URL = re.compile(r"^data:([\w.+/-]*)(;[\w=.+-]+)*;base64,", re.IGNORECASE)
# What docs/SERVING.md promises, besides DICOM. Pillow opens many more (GIF, BMP, WebP, ICO, TGA, ...);
# they are refused so the accepted set stays the documented one. MPO is how Pillow names a camera JPEG.
_FORMATS = {"PNG", "JPEG", "MPO", "TIFF"}
_NOT_AN_IMAGE = "image is not a readable PNG, JPEG, TIFF or DICOM file"
_NOT_A_MASK = "mask is not a readable PNG, JPEG or TIFF file"
# COCO's compressed RLE string: 5 bits a character, characters 'P'..'o' carry the "more" bit. 13 of
# them in a row make a number over 2^64, more than any image's run, and decoding one that long
# costs quadratic time (each character shifts a growing integer): refused before decoding.
_RLE_RUNAWAY = re.compile(r"[P-o]{13,}")


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refused with PayloadTooLarge past `max_bytes` (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLarge(f"request body of {int(declared)} bytes is over the limit of {max_bytes}")
    chunks, total = [], 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > max_bytes:
                raise PayloadTooLarge(f"request body is over the limit of {max_bytes} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientClosed(f"the client disconnected after {total} bytes of the body") from None
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
            fmt, size = im.format, (im.width, im.height)
    except Image.DecompressionBombError as exc:
        raise PayloadTooLarge(f"image is too large ({exc})") from None
    except Exception:  # noqa: BLE001 - Pillow raises many types on corrupt files
        raise InputError(_NOT_AN_IMAGE) from None
    if fmt not in _FORMATS:
        raise InputError(f"{fmt} images are not accepted: send a PNG, JPEG, TIFF or DICOM file")
    return size


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
        try:
            rgb = read_image(path).rgb
        except InputError as exc:  # the reader names its file: keep the server's paths out of the reply
            raise InputError(str(exc).replace(f"{path}: ", "").replace(str(path), "the image")) from None
    # A header that disagrees with the pixel data (a DICOM with Rows=Columns=1 over a 128x128 slice)
    # decodes to extra axes: refuse it here rather than fail later on a shape nothing can draw.
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8 or 0 in rgb.shape:
        raise InputError(f"{_NOT_AN_IMAGE} (it decodes to {rgb.dtype} {tuple(rgb.shape)}, not (H, W, 3) uint8)")
    if rgb.shape[0] * rgb.shape[1] > max_pixels:
        raise PayloadTooLarge(f"image of {rgb.shape[1]}x{rgb.shape[0]} pixels is over the limit of {max_pixels}")
    return rgb


def decode_mask(data: bytes, max_pixels: int) -> np.ndarray:
    """Mask image file bytes (PNG, JPEG or TIFF) -> (H, W) bool: non-zero in any channel, > 127 for a
    JPEG (its compression blurs 0/255 edges)."""
    try:
        w, h = _header_size(data, dicom=False)
    except InputError as exc:
        message = str(exc).replace(_NOT_AN_IMAGE, _NOT_A_MASK).replace(" images are not", " masks are not")
        raise InputError(message) from None
    if w * h > max_pixels:
        raise PayloadTooLarge(f"mask of {w}x{h} = {w * h} pixels is over the limit of {max_pixels}")
    try:
        with Image.open(io.BytesIO(data)) as im:
            jpeg = im.format in ("JPEG", "MPO")
            arr = np.asarray(im.convert("RGB") if im.mode in ("P", "CMYK", "YCbCr") else im)
    except Exception:  # noqa: BLE001 - Pillow raises many types on corrupt files
        raise InputError(_NOT_A_MASK) from None
    if arr.ndim == 3:
        arr = arr[..., :3].max(axis=2) if arr.shape[2] != 2 else arr[..., 0]  # an alpha channel is not the mask
    return arr > (127 if jpeg else 0)


def examples_of(pairs: Sequence["ExamplePair"], max_pixels: int) -> list[Example]:
    """Request examples -> checked Examples; errors name the example ("examples[1]: the mask is empty ...")."""
    out = []
    for i, pair in enumerate(pairs):
        where = f"examples[{i}]"
        try:
            image = decode_image(decode_data_url(pair.image), max_pixels)
            mask = decode_mask(decode_data_url(pair.mask), max_pixels)
        except InputError as exc:
            raise InputError(f"{where}: {exc}") from None
        out.append(check_example(image, mask, where=where))
    return out


def region_arrays(regions: Sequence[Region], hw: tuple[int, int]) -> list[np.ndarray | None]:
    """Validated regions (the request schema's) -> their loaded mask arrays, None for other kinds.
    Mask regions must carry a COCO RLE of the image's size: a path would let a client read the
    server's files."""
    arrays: list[np.ndarray | None] = []
    for i, region in enumerate(regions):
        array = None
        if isinstance(region, MaskRegion):
            if not isinstance(region.mask, RLE):
                raise InputError(f"regions[{i}]: a mask region must be a COCO RLE {{'size': [h, w], 'counts': ...}}")
            if tuple(region.mask.size) != tuple(hw):
                raise InputError(f"regions[{i}]: mask size {list(region.mask.size)} "
                                 f"differs from the image's {list(hw)}")
            if isinstance(region.mask.counts, str) and _RLE_RUNAWAY.search(region.mask.counts):
                raise InputError(f"regions[{i}]: the RLE string has a run length over 2^64")
            try:
                array = rle_decode(region.mask)
            except InputError as exc:
                raise InputError(f"regions[{i}]: {exc}") from None
        arrays.append(array)
    return arrays


def segment_question(target: str | None, question: str | None) -> str:
    """A segment request's question: its own, or the grounding template for `target` (exactly one given)."""
    if (target is None) == (question is None):
        raise InputError("give exactly one of 'target' (e.g. \"liver\") or 'question'")
    text = question if question is not None else SEGMENT_TEMPLATE.format(target=target.strip())
    if not text.strip() or (target is not None and not target.strip()):
        raise InputError("the question is empty")
    return text
