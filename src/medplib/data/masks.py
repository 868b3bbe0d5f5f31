"""Mask readers and writers: PNG/JPG/TIFF (binary or label maps), COCO RLE, NPZ and DICOM SEG.

Every reader returns (H, W) bool arrays. Conventions:
- an image mask is foreground where any channel is >= 1 (the MedPLIB convention), except lossy
  JPEG masks, where compression noise makes > 127 the only safe threshold;
- a label map is read with a value -> label table;
- a mask reference string may select one part of a file with a fragment: `labels.png#3` (pixel
  value 3 of a label map), `masks.npz#liver` (one array of an NPZ), `seg.dcm#2` (segment 2 of a
  DICOM SEG; frames of that segment are merged).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
from PIL import Image
from pydantic import ValidationError

from medplib.data.schema import RLE, MaskRef
from medplib.errors import InputError

_LOSSY = {".jpg", ".jpeg"}
_MAX_PIXELS = 1 << 28  # refuse decompression bombs rather than exhausting memory


def _read_array(path: Path) -> np.ndarray:
    """Pixel values of an image file as (H, W) or (H, W, C)."""
    if not path.is_file():
        raise InputError(f"{path}: mask file not found")
    try:
        with Image.open(path) as im:
            if im.width * im.height > _MAX_PIXELS:
                raise InputError(f"{path}: mask of {im.width}x{im.height} pixels is too large")
            if im.mode == "P":
                im = im.convert("RGB") if "transparency" not in im.info else im.convert("RGBA")
            arr = np.asarray(im)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types on corrupt files
        raise InputError(f"{path}: cannot read mask image ({exc})") from None
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[..., :3]  # alpha is not mask content
    return arr


def read_mask_image(path: str | Path, threshold: float | None = None) -> np.ndarray:
    """Binary mask from an image file -> (H, W) bool. Foreground is value >= 1 (> 127 for JPEG)
    unless `threshold` is given (foreground = value > threshold)."""
    path = Path(path)
    arr = _read_array(path)
    if arr.ndim == 3:
        arr = arr.max(axis=2)
    if threshold is None:
        threshold = 127 if path.suffix.lower() in _LOSSY else 0
    return arr > threshold


def read_label_map(path: str | Path, table: Mapping[int, str]) -> dict[str, np.ndarray]:
    """Label-map image -> {label: (H, W) bool}, for the values in `table` that occur (several values
    may share a label: their pixels are merged)."""
    path = Path(path)
    arr = _read_array(path)
    if arr.ndim == 3:
        if not (arr == arr[..., :1]).all():
            raise InputError(f"{path}: a label map must have one channel (or identical channels)")
        arr = arr[..., 0]
    out: dict[str, np.ndarray] = {}
    for value, label in table.items():
        hit = arr == value
        if hit.any():
            out[label] = out[label] | hit if label in out else hit
    return out


def write_mask_png(mask: np.ndarray, path: str | Path) -> None:
    """(H, W) bool -> 8-bit PNG with 0/255."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(mask, dtype=bool).astype(np.uint8) * 255).save(path)


# ---- COCO RLE (column-major runs starting with background; string form as in pycocotools) ----

def rle_encode(mask: np.ndarray, compressed: bool = True) -> RLE:
    """(H, W) bool -> RLE with the compressed string form (or the list of run lengths)."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise InputError(f"RLE needs a 2-D mask, got shape {mask.shape}")
    flat = mask.ravel(order="F")
    counts: list[int] = []
    if flat.size:
        change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
        counts = np.diff(np.concatenate([[0], change, [flat.size]])).astype(int).tolist()
        if flat[0]:
            counts.insert(0, 0)  # runs always start with background
    size = (int(mask.shape[0]), int(mask.shape[1]))
    return RLE(size=size, counts=_counts_to_string(counts) if compressed else counts)


def _counts_to_string(counts: list[int]) -> str:
    out = []
    for i, c in enumerate(counts):
        x = c - counts[i - 2] if i > 2 else c
        more = True
        while more:
            ch = x & 0x1F
            x >>= 5
            more = x != -1 if ch & 0x10 else x != 0
            if more:
                ch |= 0x20
            out.append(chr(ch + 48))
    return "".join(out)


def _string_to_counts(s: str) -> list[int]:
    counts: list[int] = []
    p = 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            if p >= len(s):
                raise InputError("RLE string ends in the middle of a number")
            ch = ord(s[p]) - 48
            if ch < 0 or ch > 63:
                raise InputError(f"RLE string has an invalid character {s[p]!r}")
            x |= (ch & 0x1F) << (5 * k)
            more = bool(ch & 0x20)
            p += 1
            k += 1
            if not more and ch & 0x10:
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def rle_decode(rle: RLE | Mapping) -> np.ndarray:
    """RLE (schema object or a pycocotools-style dict) -> (H, W) bool."""
    if not isinstance(rle, RLE):
        try:
            rle = RLE.model_validate(dict(rle))
        except (TypeError, ValueError, ValidationError) as exc:  # dict() of a non-mapping: TypeError/ValueError
            # pydantic's message is precise enough to show
            raise InputError(f"not a valid RLE: {exc}") from None
    h, w = rle.size
    if h < 0 or w < 0:
        raise InputError(f"RLE size {rle.size} is negative")
    counts = _string_to_counts(rle.counts) if isinstance(rle.counts, str) else list(rle.counts)
    if any(c < 0 for c in counts):
        raise InputError("RLE has a negative run length")
    if sum(counts) != h * w:
        raise InputError(f"RLE runs cover {sum(counts)} pixels but size {h}x{w} has {h * w}")
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, counts)
    return flat.reshape((w, h)).T.copy()


# ---- NPZ ----

def read_npz_mask(path: str | Path, key: str | None = None) -> np.ndarray:
    """One 2-D array of an NPZ file (`key`, or the only array) -> (H, W) bool (nonzero)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: mask file not found")
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = list(npz.keys())
            if key is None:
                if len(keys) != 1:
                    raise InputError(f"{path}: holds arrays {keys}; name one with '{path.name}#<key>'")
                key = keys[0]
            if key not in keys:
                raise InputError(f"{path}: no array {key!r} (has {keys})")
            arr = npz[key]
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - numpy/zipfile raise many types on corrupt files
        raise InputError(f"{path}: cannot read NPZ ({exc})") from None
    arr = np.squeeze(arr)
    if arr.ndim != 2:
        raise InputError(f"{path}: array {key!r} has shape {arr.shape}, a mask must be 2-D")
    return arr != 0


# ---- DICOM SEG ----

@dataclass
class SegFrame:
    """One frame of a DICOM SEG: `mask` is (H, W) bool."""

    segment: int
    label: str
    mask: np.ndarray


def read_dicom_seg(path: str | Path) -> list[SegFrame]:
    """All frames of a DICOM Segmentation (BINARY or FRACTIONAL, threshold at half the maximum)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: mask file not found")
    try:
        return _read_dicom_seg(path)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on corrupt files
        raise InputError(f"{path}: cannot read DICOM SEG ({type(exc).__name__}: {exc})") from None


def _read_dicom_seg(path: Path) -> list[SegFrame]:
    import pydicom

    ds = pydicom.dcmread(path)
    if ds.get("Modality") != "SEG" or "SegmentSequence" not in ds:
        raise InputError(f"{path}: not a DICOM SEG (Modality {ds.get('Modality')!r})")
    pixels = ds.pixel_array
    frames = pixels[None] if pixels.ndim == 2 else pixels
    labels = {
        int(s.SegmentNumber): str(s.get("SegmentLabel", f"segment {s.SegmentNumber}")) for s in ds.SegmentSequence
    }
    if ds.get("SegmentationType") == "FRACTIONAL":
        fg = frames > float(ds.get("MaximumFractionalValue", 255)) / 2.0
    else:
        fg = frames != 0
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    out = []
    for i in range(fg.shape[0]):
        if per_frame is not None and i < len(per_frame) and "SegmentIdentificationSequence" in per_frame[i]:
            seg = int(per_frame[i].SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        elif len(labels) == 1:
            seg = next(iter(labels))
        else:
            raise InputError(f"{path}: frame {i} does not say which segment it belongs to")
        out.append(SegFrame(segment=seg, label=labels.get(seg, f"segment {seg}"), mask=fg[i]))
    return out


def _dicom_seg_mask(path: Path, segment: str | None) -> np.ndarray:
    frames = read_dicom_seg(path)
    if segment is None:
        numbers = sorted({f.segment for f in frames})
        if len(numbers) != 1:
            raise InputError(f"{path}: has segments {numbers}; name one with '{path.name}#<number>'")
        chosen = frames
    else:
        if not segment.isdigit():
            raise InputError(f"{path}: segment selector {segment!r} must be a number")
        chosen = [f for f in frames if f.segment == int(segment)]
        if not chosen:
            raise InputError(f"{path}: no segment {segment}")
    return np.logical_or.reduce([f.mask for f in chosen])


# ---- one entry point for the schema's mask references ----

def read_mask(ref: MaskRef | Mapping, root: str | Path = ".", size: tuple[int, int] | None = None) -> np.ndarray:
    """Resolve a mask reference (path with optional `#selector`, or RLE) against `root` ->
    (H, W) bool. With `size` = (H, W), a mask of another size raises InputError."""
    if isinstance(ref, (RLE, Mapping)):
        mask, where = rle_decode(ref), "RLE mask"
    else:
        name, _, selector = str(ref).partition("#")
        path = Path(name) if Path(name).is_absolute() else Path(root) / name
        where = str(path)
        suffix = path.suffix.lower()
        if suffix == ".npz":
            mask = read_npz_mask(path, selector or None)
        elif suffix in {".dcm", ".dicom"}:
            mask = _dicom_seg_mask(path, selector or None)
        elif selector:
            if not selector.isdigit():
                raise InputError(f"{path}: label-map selector {selector!r} must be a pixel value")
            mask = read_label_map(path, {int(selector): "x"}).get("x")
            if mask is None:
                arr = _read_array(path)
                mask = np.zeros(arr.shape[:2], dtype=bool)
        else:
            mask = read_mask_image(path)
    if size is not None and tuple(mask.shape) != tuple(size):
        raise InputError(f"{where}: mask is {mask.shape[1]}x{mask.shape[0]} (WxH) but the image is {size[1]}x{size[0]}")
    return mask
