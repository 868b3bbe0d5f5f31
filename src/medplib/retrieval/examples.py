"""In-context examples: an (image, mask) pair, checked, then encoded the two published ways.

- `overlay`: the mask painted on its own image, 0.45 image + 0.55 colour inside the mask (MedPLIB-ICL);
  the example costs one image in the prompt.
- `separate`: the image unchanged plus the mask as an image of its own (0/255 in all three channels), so
  both pass through the vision tower, the pixel encoder and the Predictor's per-image cache like any image;
  a mask encoder reads channel 0.

Every function here is pure: arrays in, new arrays out, nothing read but what `load_example` is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image

from medplib.data.images import as_rgb, grey_to_rgb, read_image
from medplib.data.masks import read_mask
from medplib.data.schema import MaskRef
from medplib.errors import ConfigError, InputError

OVERLAY_IMAGE_WEIGHT = 0.45  # published: 0.45 image + 0.55 colour where the mask is
OVERLAY_COLOR = (255, 0, 0)


class Encoding(str, Enum):
    overlay = "overlay"
    separate = "separate"


@dataclass(frozen=True)
class Example:
    """image: (H, W, 3) uint8 RGB. mask: (H, W) bool, not empty. label: what the mask marks, if known."""

    image: np.ndarray
    mask: np.ndarray
    label: str | None = None


def check_example(image: np.ndarray, mask: np.ndarray, *, label: str | None = None,
                  where: str = "example") -> Example:
    """Validate an (image, mask) pair -> Example. image (H, W) or (H, W, 3) uint8; mask (H, W) bool or
    integers (non-zero is the structure). Raises InputError naming `where` for a wrong shape or dtype, a
    mask whose size differs from the image's, or an empty mask."""
    image, mask = np.asarray(image), np.asarray(mask)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise InputError(f"{where}: the image must be (H, W) or (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if mask.ndim != 2 or not (mask.dtype == bool or np.issubdtype(mask.dtype, np.integer)):
        raise InputError(f"{where}: the mask must be a 2-D bool or integer array, got {mask.shape} {mask.dtype}")
    if mask.shape != image.shape[:2]:
        raise InputError(f"{where}: the mask is {mask.shape[1]}x{mask.shape[0]} (WxH) but the image is "
                         f"{image.shape[1]}x{image.shape[0]}")
    mask = mask.astype(bool)
    if not mask.any():
        raise InputError(f"{where}: the mask is empty; an example must mark the structure to segment")
    rgb = grey_to_rgb(image) if image.ndim == 2 else image
    return Example(image=rgb, mask=mask, label=label)


def load_example(image: str | Path, mask: MaskRef, root: str | Path = ".", *, label: str | None = None) -> Example:
    """Read an example's image and mask (paths relative to `root`, with the readers' `#options`) and
    check them. A missing or unreadable file, a size mismatch or an empty mask raises InputError."""
    data = read_image(image, root)
    where = f"example {Path(root) / str(image)}"
    try:
        return check_example(data.rgb, read_mask(mask, root), label=label, where=where)
    except InputError as exc:
        mask_name = mask if isinstance(mask, (str, Path)) else "RLE"
        raise InputError(f"{exc} (mask {mask_name})") from None


ExampleInput = Union[Example, tuple[Any, Any]]  # an Example or an (image, mask) pair


def as_example(item: ExampleInput, *, where: str = "example") -> Example:
    """An Example as given, or an (image, mask) pair checked into one: the image an (H, W[, 3]) uint8
    array, a PIL image, an ImageData or a file path (`as_rgb`); the mask an (H, W) bool/integer array or a mask
    file path (with the readers' `#options`). Raises InputError naming `where` (and the files) for a missing file, a
    size mismatch, an empty mask or anything that is not such a pair."""
    if isinstance(item, Example):
        return item
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise InputError(f"{where}: expected an Example or an (image, mask) pair, got {type(item).__name__}")
    image, mask = item
    if isinstance(image, (str, Path)) and isinstance(mask, (str, Path)):
        return load_example(image, str(mask))
    if isinstance(image, (str, Path)):
        where = f"{where} {image}"
    if not isinstance(image, np.ndarray):
        image = as_rgb(image)  # a file (its errors name it), PIL image or ImageData; arrays are checked below
    if isinstance(mask, (str, Path)):
        where = f"{where} (mask {mask})"
        mask = read_mask(str(mask))
    elif isinstance(mask, Image.Image):
        mask = np.asarray(mask.convert("L"))
    return check_example(image, mask, where=where)


def overlay_example(example: Example, *, color: tuple[int, int, int] = OVERLAY_COLOR,
                    image_weight: float = OVERLAY_IMAGE_WEIGHT) -> np.ndarray:
    """The mask painted on its image -> (H, W, 3) uint8: `image_weight` * image + (1 - `image_weight`) *
    `color` inside the mask, the image untouched outside it."""
    if not 0.0 <= image_weight <= 1.0:
        raise InputError(f"overlay image weight must lie in [0, 1], got {image_weight}")
    out = example.image.copy()
    blend = image_weight * example.image[example.mask].astype(np.float32) + (1.0 - image_weight) * np.float32(color)
    out[example.mask] = np.round(blend).clip(0, 255).astype(np.uint8)
    return out


def mask_image(example: Example) -> np.ndarray:
    """The mask as an image of its own -> (H, W, 3) uint8, 255 on the structure and 0 elsewhere."""
    return grey_to_rgb(np.where(example.mask, np.uint8(255), np.uint8(0)))


def encode_example(example: Example, encoding: Encoding | str) -> list[np.ndarray]:
    """The images one example puts in the prompt, in order: [overlay] or [image, mask image],
    each (H, W, 3) uint8."""
    try:
        encoding = Encoding(encoding)
    except ValueError:
        raise ConfigError(f"unknown example encoding {encoding!r} (overlay or separate)") from None
    if encoding is Encoding.overlay:
        return [overlay_example(example)]
    return [example.image.copy(), mask_image(example)]
