"""Image readers: one entry point, `read_image`, for PNG/JPG/TIFF (8/16-bit, grey/RGB), DICOM and
NIfTI. Each returns the model's view (RGB uint8) and the raw values (e.g. float HU for CT).

An image reference may carry options after `#`, separated by `,` or `&`:
`scan.dcm#window=ct-lung,frame=2`, `brain.nii.gz#axis=2,index=40`, `stack.tif#frame=1`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageSequence

from medplib.errors import InputError

_MAX_PIXELS = 1 << 28  # larger files are refused, not decoded into gigabytes


@dataclass
class ImageData:
    """rgb: (H, W, 3) uint8 for the model. raw: (H, W) or (H, W, C) source values (HU for CT,
    uint16 for 16-bit PNG, float for NIfTI). meta: how it was read (format, window, frame, ...)."""

    rgb: np.ndarray
    raw: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> tuple[int, int]:
        """(height, width)."""
        return int(self.rgb.shape[0]), int(self.rgb.shape[1])


def window_to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Linear map of [low, high] to [0, 255], clipped -> uint8 of the same shape."""
    if not np.isfinite(low) or not np.isfinite(high):
        raise InputError(f"window [{low}, {high}] is not finite")
    if high <= low:
        return np.where(values > low, 255, 0).astype(np.uint8)  # a flat image stays usable
    scaled = (values.astype(np.float64) - low) / (high - low)
    return np.round(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)


def grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    """(H, W) uint8 -> (H, W, 3) uint8."""
    return np.repeat(grey[..., None], 3, axis=2)


def parse_options(ref: str) -> tuple[str, dict[str, str]]:
    """'file.dcm#window=ct-lung,frame=2' -> ('file.dcm', {'window': 'ct-lung', 'frame': '2'})."""
    name, _, frag = ref.partition("#")
    opts: dict[str, str] = {}
    for part in frag.replace("&", ",").split(","):
        if not part:
            continue
        key, eq, value = part.partition("=")
        if not eq or not key:
            raise InputError(f"{name}: image option {part!r} must look like key=value")
        opts[key.strip()] = value.strip()
    return name, opts


def _int_opt(opts: dict[str, str], key: str, path: Path) -> int | None:
    if key not in opts:
        return None
    try:
        return int(opts[key])
    except ValueError:
        raise InputError(f"{path}: option {key}={opts[key]!r} must be an integer") from None


def read_pil_image(path: str | Path, frame: int = 0) -> ImageData:
    """PNG/JPG/TIFF/BMP -> ImageData. 16-bit and float images are scaled min..max to 8 bits; grey is
    replicated to RGB; alpha is dropped; `frame` picks a page of a multi-page TIFF."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: image file not found")
    try:
        with Image.open(path) as im:
            if im.width * im.height > _MAX_PIXELS:
                raise InputError(f"{path}: image of {im.width}x{im.height} pixels is too large")
            n_frames = getattr(im, "n_frames", 1)
            if not 0 <= frame < n_frames:
                raise InputError(f"{path}: frame {frame} out of range (the file has {n_frames})")
            page = ImageSequence.Iterator(im)[frame]
            mode = page.mode
            if mode == "P":
                page = page.convert("RGBA" if "transparency" in page.info else "RGB")
            elif mode in ("1", "CMYK", "YCbCr", "LAB", "HSV"):
                page = page.convert("L" if mode == "1" else "RGB")
            raw = np.asarray(page)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types on corrupt files
        raise InputError(f"{path}: cannot read image ({exc})") from None
    if raw.ndim == 3 and raw.shape[2] in (2, 4):
        raw = raw[..., :-1]  # drop alpha (LA -> L, RGBA -> RGB)
    if raw.ndim == 3 and raw.shape[2] == 1:
        raw = raw[..., 0]
    if raw.size == 0:
        raise InputError(f"{path}: image is empty")
    if raw.dtype == np.uint8:
        img8 = raw
        window = (0.0, 255.0)
    else:
        finite = raw[np.isfinite(raw)] if raw.dtype.kind == "f" else raw
        if finite.size == 0:
            raise InputError(f"{path}: image has no finite values")
        window = (float(finite.min()), float(finite.max()))
        img8 = window_to_uint8(np.nan_to_num(raw, nan=window[0]), *window)
    rgb = grey_to_rgb(img8) if img8.ndim == 2 else np.ascontiguousarray(img8[..., :3])
    meta = {"format": path.suffix.lower().lstrip("."), "mode": mode, "dtype": str(raw.dtype), "window": window,
            "frame": frame, "n_frames": n_frames}
    return ImageData(rgb=rgb, raw=raw, meta=meta)


def is_dicom(path: Path) -> bool:
    if path.suffix.lower() in (".dcm", ".dicom"):
        return True
    try:
        with path.open("rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def read_image(ref: str | Path, root: str | Path = ".") -> ImageData:
    """Read any supported image; `ref` is resolved against `root` and may carry `#options`."""
    name, opts = parse_options(str(ref))
    path = Path(name) if Path(name).is_absolute() else Path(root) / name
    if not path.is_file():
        raise InputError(f"{path}: image file not found")
    lower = path.name.lower()
    if lower.endswith((".nii", ".nii.gz")):
        from medplib.data.nifti import read_nifti_slice

        unknown = set(opts) - {"axis", "index", "volume"}
        if unknown:
            raise InputError(f"{path}: unknown NIfTI option(s) {sorted(unknown)} (axis, index, volume)")
        axis = _int_opt(opts, "axis", path)
        return read_nifti_slice(path, axis=2 if axis is None else axis, index=_int_opt(opts, "index", path),
                                volume=_int_opt(opts, "volume", path) or 0)
    if is_dicom(path):
        from medplib.data.dicom import read_dicom

        unknown = set(opts) - {"window", "frame"}
        if unknown:
            raise InputError(f"{path}: unknown DICOM option(s) {sorted(unknown)} (window, frame)")
        return read_dicom(path, window=opts.get("window"), frame=_int_opt(opts, "frame", path) or 0)
    unknown = set(opts) - {"frame"}
    if unknown:
        raise InputError(f"{path}: unknown image option(s) {sorted(unknown)} (frame)")
    return read_pil_image(path, frame=_int_opt(opts, "frame", path) or 0)


def image_size(ref: str | Path, root: str | Path = ".") -> tuple[int, int]:
    """(height, width) of an image, from the header alone where the format allows."""
    name, opts = parse_options(str(ref))
    path = Path(name) if Path(name).is_absolute() else Path(root) / name
    lower = path.name.lower()
    if not lower.endswith((".nii", ".nii.gz")) and path.is_file() and not is_dicom(path):
        try:
            with Image.open(path) as im:
                return int(im.height), int(im.width)
        except Exception as exc:  # noqa: BLE001 - Pillow raises many types on corrupt files
            raise InputError(f"{path}: cannot read image ({exc})") from None
    return read_image(ref, root).size


def as_rgb(image: Any) -> np.ndarray:
    """Any image a caller may hand the model -> (H, W, 3) uint8, C-contiguous and writeable.

    Accepts an ImageData, a file path (as `read_image`, `#options` allowed), a PIL image or an
    (H, W) / (H, W, 3|4) uint8 array (grey is repeated, alpha dropped); H, W >= 2."""
    if isinstance(image, (str, Path)):
        image = read_image(image)
    if isinstance(image, ImageData):
        image = image.rgb
    elif isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if not isinstance(image, np.ndarray):
        raise InputError(f"expected an image array, PIL image, ImageData or path; got {type(image).__name__}")
    if image.ndim == 2:
        image = grey_to_rgb(image)
    if image.ndim != 3 or image.shape[2] not in (3, 4) or image.shape[0] < 2 or image.shape[1] < 2:
        raise InputError(f"image must be (H, W, 3) with H, W >= 2; got shape {tuple(image.shape)}")
    if image.dtype != np.uint8:
        raise InputError(f"image must be uint8 RGB (use medplib.data readers for DICOM/NIfTI); got {image.dtype}")
    rgb = np.ascontiguousarray(image[:, :, :3])
    return rgb if rgb.flags.writeable else rgb.copy()  # torch.from_numpy warns on read-only arrays
