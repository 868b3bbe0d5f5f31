"""DICOM images via pydicom: rescale slope/intercept, windowing, MONOCHROME1, colour and multi-frame.

The window is, in order of preference: the one asked for (a preset name such as `ct-lung`, or
`center:width`), the file's WindowCenter/WindowWidth, else the frame's min..max.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medplib.data.images import ImageData, grey_to_rgb, window_to_uint8
from medplib.errors import InputError

# (center, width) in Hounsfield units; the usual radiology presets
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "ct-abdomen": (40.0, 400.0),
    "ct-liver": (60.0, 160.0),
    "ct-mediastinum": (50.0, 350.0),
    "ct-lung": (-600.0, 1500.0),
    "ct-bone": (400.0, 1800.0),
    "ct-brain": (40.0, 80.0),
}


def parse_window(window: str | tuple[float, float]) -> tuple[float, float]:
    """A preset name, 'center:width' or (center, width) -> (center, width)."""
    if isinstance(window, tuple):
        center, width = window
    elif window in WINDOW_PRESETS:
        center, width = WINDOW_PRESETS[window]
    else:
        parts = str(window).split(":")
        try:
            center, width = float(parts[0]), float(parts[1])
            if len(parts) != 2:
                raise ValueError
        except (ValueError, IndexError):
            raise InputError(f"window {window!r} is neither a preset ({', '.join(WINDOW_PRESETS)}) "
                             "nor 'center:width'") from None
    if not (np.isfinite(center) and np.isfinite(width)) or width <= 0:
        raise InputError(f"window center {center} width {width}: the width must be positive and both finite")
    return float(center), float(width)


def _first(value: object) -> float:
    """WindowCenter/Width may be multi-valued; the first value is the primary one."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = list(value)[0]  # type: ignore[arg-type]
    return float(value)  # type: ignore[arg-type]


def read_dicom(path: str | Path, window: str | tuple[float, float] | None = None, frame: int = 0) -> ImageData:
    """A DICOM image -> ImageData. raw is (H, W) float64 after rescale (HU for CT) for grey images,
    (H, W, 3) for colour ones. `frame` picks one frame of a multi-frame file."""
    path = Path(path)
    try:
        return _read_dicom(path, window, frame)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on corrupt files
        raise InputError(f"{path}: cannot read DICOM ({type(exc).__name__}: {exc})") from None


def _read_dicom(path: Path, window: str | tuple[float, float] | None, frame: int) -> ImageData:
    import pydicom

    if not path.is_file():
        raise InputError(f"{path}: image file not found")
    ds = pydicom.dcmread(path)
    if "PixelData" not in ds:
        raise InputError(f"{path}: DICOM file has no pixel data")
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if not 0 <= frame < n_frames:
        raise InputError(f"{path}: frame {frame} out of range (the file has {n_frames})")
    pixels = ds.pixel_array
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    samples = int(ds.get("SamplesPerPixel", 1))
    if n_frames > 1:
        pixels = pixels[frame]
    meta: dict = {"format": "dicom", "modality": ds.get("Modality"), "photometric": photometric,
                  "frame": frame, "n_frames": n_frames}
    if samples == 3:
        # pydicom converts YBR to RGB when decoding
        rgb = pixels if pixels.dtype == np.uint8 else window_to_uint8(pixels, float(pixels.min()), float(pixels.max()))
        return ImageData(rgb=np.ascontiguousarray(rgb), raw=pixels, meta=meta)
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    raw = pixels.astype(np.float64) * slope + intercept
    if window is not None:
        center, width = parse_window(window)
        meta["window_source"] = window if isinstance(window, str) else "given"
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
        meta["window_source"] = "tags"
    else:
        lo, hi = float(raw.min()), float(raw.max())
        center, width = (lo + hi) / 2.0, hi - lo
        meta["window_source"] = "minmax"
    meta["window"] = (center, width)
    grey = window_to_uint8(raw, center - width / 2.0, center + width / 2.0)
    if photometric == "MONOCHROME1":
        grey = 255 - grey  # MONOCHROME1: low values are white
    return ImageData(rgb=grey_to_rgb(grey), raw=raw, meta=meta)
