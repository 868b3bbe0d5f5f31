"""Procedural, licence-free phantoms: medical-looking images with exact masks and plain-word labels.

Each modality has its own generator that paints a few anatomical structures with distinct
intensities and textures at jittered positions and sizes, so a model has to look at the image to
find them. Masks are exact: they come from the same geometry that painted the image, after
occlusion by structures painted later. Everything is deterministic for a seed.

Coordinates inside a generator are in units of the image's short side, centred on the image
centre, so shapes stay round in non-square images. Image-left is the patient's right in CT, MR,
X-ray and PET (radiological convention); labels such as "left kidney" name the patient's side.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from medplib.data.builder import BuildConfig, Instance, LabelledImage, build_samples
from medplib.data.masks import write_mask_png
from medplib.data.schema import write_jsonl
from medplib.errors import InputError

MODALITIES = ("ct", "mr", "xray", "pet", "endoscopy", "dermoscopy", "fundus", "ultrasound", "histopathology")

# Every label a generator can produce, per modality: the builder asks about absent ones as negatives.
LABELS: dict[str, tuple[str, ...]] = {
    "ct": ("liver", "spleen", "right kidney", "left kidney", "aorta", "vertebra", "lesion"),
    "mr": ("brain", "ventricle", "tumor"),
    "xray": ("right lung", "left lung", "heart", "nodule"),
    "pet": ("brain", "heart", "bladder", "tumor"),
    "endoscopy": ("polyp",),
    "dermoscopy": ("lesion",),
    "fundus": ("optic disc", "optic cup"),
    "ultrasound": ("cyst", "lesion"),
    "histopathology": ("nucleus",),
}

MIN_SIZE = 32


@dataclass
class Phantom:
    """One generated image with its structures.

    image: (H, W, 3) uint8 RGB. masks: label -> (H, W) bool, the union of that label's instances,
    never empty. instances: label -> list of (H, W) bool masks, one per instance (disjoint).
    """

    image: np.ndarray
    masks: dict[str, np.ndarray]
    modality: str
    instances: dict[str, list[np.ndarray]] = field(default_factory=dict)


class _Canvas:
    """A float image plus labelled instance masks; painting a shape hides what lies under it."""

    def __init__(self, h: int, w: int, channels: int) -> None:
        self.h, self.w = h, w
        self.img = np.zeros((h, w, channels), dtype=np.float64)
        s = float(min(h, w))
        yy, xx = np.mgrid[0:h, 0:w]
        self.x = (xx + 0.5 - w / 2.0) / s  # (H, W), short-side units, 0 at the centre
        self.y = (yy + 0.5 - h / 2.0) / s
        self.half_w, self.half_h = w / (2.0 * s), h / (2.0 * s)
        self.instances: list[tuple[str, np.ndarray]] = []

    def paint(self, mask: np.ndarray, value: np.ndarray | float | Sequence[float], label: str | None = None,
              occlude: bool = True) -> np.ndarray:
        """Set the pixels of `mask` to `value` ((H, W), (H, W, C) or a colour); returns the mask."""
        val = np.asarray(value, dtype=np.float64)
        if val.ndim == 2:
            val = val[..., None]
        self.img[mask] = np.broadcast_to(val, self.img.shape)[mask]
        if occlude:
            for _, inst in self.instances:
                inst &= ~mask
        if label is not None:
            self.instances.append((label, mask.copy()))
        return mask

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, angle: float = 0.0) -> np.ndarray:
        c, s = np.cos(angle), np.sin(angle)
        dx, dy = self.x - cx, self.y - cy
        u, v = (c * dx + s * dy) / rx, (-s * dx + c * dy) / ry
        return u * u + v * v <= 1.0

    def window(self, cx: float, cy: float, r: float) -> tuple[slice, slice]:
        """Row and column slices that cover a disc of radius `r` around (cx, cy)."""
        s = float(min(self.h, self.w))
        r0, r1 = int(np.floor((cy - r) * s + self.h / 2.0)), int(np.ceil((cy + r) * s + self.h / 2.0)) + 1
        c0, c1 = int(np.floor((cx - r) * s + self.w / 2.0)), int(np.ceil((cx + r) * s + self.w / 2.0)) + 1
        return slice(max(r0, 0), max(min(r1, self.h), 0)), slice(max(c0, 0), max(min(c1, self.w), 0))

    def blob(self, rng: np.random.Generator, cx: float, cy: float, rx: float, ry: float,
             irregularity: float = 0.15, angle: float | None = None) -> np.ndarray:
        """An ellipse whose radius wobbles with a few random harmonics (organs, lesions)."""
        angle = rng.uniform(0, np.pi) if angle is None else angle
        harmonics = [(k, irregularity / k * rng.uniform(0.5, 1.0), rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5)]
        win = self.window(cx, cy, max(rx, ry) * (1.0 + irregularity))  # only this part can be inside
        c, s = np.cos(angle), np.sin(angle)
        dx, dy = self.x[win] - cx, self.y[win] - cy
        u, v = (c * dx + s * dy) / rx, (-s * dx + c * dy) / ry
        theta = np.arctan2(v, u)
        radius = np.ones_like(theta)
        for k, amp, phase in harmonics:
            radius += amp * np.cos(k * theta + phase)
        out = np.zeros((self.h, self.w), dtype=bool)
        out[win] = np.hypot(u, v) <= radius
        return out

    def texture(self, rng: np.random.Generator, scale: float) -> np.ndarray:
        """(H, W) smooth noise with zero mean and unit std; `scale` is the blur in short-side units."""
        noise = ndimage.gaussian_filter(
            rng.standard_normal((self.h, self.w)), sigma=max(scale * min(self.h, self.w), 0.5)
        )
        return (noise - noise.mean()) / (noise.std() + 1e-9)

    def curve(self, rng: np.random.Generator, x0: float, y0: float, heading: float, length: float,
              width: float, bend: float = 1.5, steps: int = 40) -> np.ndarray:
        """A thick random-walk curve (vessels, hairs) as a mask."""
        pts = []
        x, y, step = x0, y0, length / steps
        for _ in range(steps):
            pts.append((x, y))
            heading += rng.normal(0.0, bend / np.sqrt(steps))
            x, y = x + step * np.cos(heading), y + step * np.sin(heading)
        out = np.zeros((self.h, self.w), dtype=bool)
        s = float(min(self.h, self.w))
        for px, py in pts:
            col, row = int((px * s) + self.w / 2.0), int((py * s) + self.h / 2.0)
            if 0 <= row < self.h and 0 <= col < self.w:
                out[row, col] = True
        radius = max(width * s / 2.0, 0.5)
        dist = ndimage.distance_transform_edt(~out)
        return dist <= radius


def _grey(c: _Canvas) -> np.ndarray:
    return c.img[..., 0]


def _ct(c: _Canvas, rng: np.random.Generator) -> None:
    cx, cy = rng.uniform(-0.04, 0.04), rng.uniform(-0.03, 0.03)
    brx, bry = rng.uniform(0.36, 0.44), rng.uniform(0.27, 0.33)
    c.paint(np.ones((c.h, c.w), bool), 0.03 + 0.01 * c.texture(rng, 0.003))
    body = c.ellipse(cx, cy, brx, bry)
    c.paint(body, 0.30 + 0.02 * c.texture(rng, 0.004))  # subcutaneous fat
    inner = c.ellipse(cx, cy, brx - 0.035, bry - 0.03)
    c.paint(inner, 0.45 + 0.03 * c.texture(rng, 0.01))  # muscle and bowel
    liver = c.blob(rng, cx - brx * 0.42 + rng.uniform(-0.03, 0.03), cy - bry * 0.15 + rng.uniform(-0.03, 0.03),
                   brx * rng.uniform(0.36, 0.46), bry * rng.uniform(0.5, 0.62), 0.12) & inner
    c.paint(liver, 0.58 + 0.025 * c.texture(rng, 0.006), "liver")
    if rng.random() < 0.5:
        lesion = c.blob(rng, cx - brx * 0.42 + rng.uniform(-0.06, 0.06), cy - bry * 0.15 + rng.uniform(-0.06, 0.06),
                        rng.uniform(0.025, 0.05), rng.uniform(0.025, 0.05), 0.2) & liver
        c.paint(lesion, 0.38 + 0.02 * c.texture(rng, 0.004), "lesion")
    spleen = c.blob(rng, cx + brx * 0.62 + rng.uniform(-0.03, 0.02), cy + bry * 0.15 + rng.uniform(-0.04, 0.04),
                    brx * rng.uniform(0.12, 0.17), bry * rng.uniform(0.28, 0.38), 0.1,
                    angle=rng.uniform(-0.6, -0.2)) & inner
    c.paint(spleen, 0.64 + 0.01 * c.texture(rng, 0.01), "spleen")
    for side, label in ((-1, "right kidney"), (1, "left kidney")):
        kx = cx + side * brx * rng.uniform(0.3, 0.38)
        ky = cy + bry * rng.uniform(0.35, 0.5)
        krx, kry = brx * rng.uniform(0.1, 0.13), bry * rng.uniform(0.2, 0.26)
        kidney = c.ellipse(kx, ky, krx, kry, side * rng.uniform(0.1, 0.4)) & inner
        value = 0.74 - 0.16 * c.ellipse(kx + side * krx * 0.4, ky, krx * 0.45, kry * 0.5)  # darker sinus
        c.paint(kidney, value, label)
    vx, vy = cx + rng.uniform(-0.01, 0.01), cy + bry * rng.uniform(0.55, 0.65)
    vr = bry * rng.uniform(0.16, 0.2)
    vertebra = c.ellipse(vx, vy, vr, vr * 0.9) & inner
    c.paint(vertebra, 0.95 - 0.6 * c.ellipse(vx, vy + vr * 0.55, vr * 0.35, vr * 0.3), "vertebra")
    ar = vr * rng.uniform(0.35, 0.45)
    aorta = c.ellipse(vx - vr * 0.3, vy - vr - ar * 1.2, ar, ar) & inner
    c.paint(aorta, 0.8, "aorta")
    c.img += 0.015 * rng.standard_normal(c.img.shape)


def _mr(c: _Canvas, rng: np.random.Generator) -> None:
    cx, cy = rng.uniform(-0.03, 0.03), rng.uniform(-0.03, 0.03)
    rx, ry = rng.uniform(0.3, 0.36), rng.uniform(0.38, 0.44)
    c.paint(np.ones((c.h, c.w), bool), 0.02)
    c.paint(c.ellipse(cx, cy, rx, ry), 0.85)  # scalp fat, bright on T1
    c.paint(c.ellipse(cx, cy, rx - 0.025, ry - 0.025), 0.08)  # skull, dark
    gyri = np.sin(40 * c.x + 6 * c.texture(rng, 0.02)) * np.sin(40 * c.y + 6 * c.texture(rng, 0.02))
    brain = c.ellipse(cx, cy, rx - 0.045, ry - 0.045)
    c.paint(brain, 0.55 + 0.07 * gyri + 0.02 * c.texture(rng, 0.004), "brain")
    spread = rng.uniform(0.04, 0.07)
    for side in (-1, 1):
        v = c.ellipse(cx + side * spread, cy - rng.uniform(0.0, 0.04), rng.uniform(0.025, 0.04),
                      rng.uniform(0.09, 0.14), side * rng.uniform(0.15, 0.4)) & brain
        c.paint(v, 0.15, "ventricle")
    if rng.random() < 0.7:
        ang, dist = rng.uniform(0, 2 * np.pi), rng.uniform(0.12, 0.22)
        tx, ty = cx + dist * np.cos(ang), cy + dist * np.sin(ang) * ry / rx
        tr = rng.uniform(0.04, 0.08)
        tumor = c.blob(rng, tx, ty, tr, tr * rng.uniform(0.7, 1.0), 0.25) & brain
        c.paint(tumor, 0.9 - 0.45 * c.ellipse(tx, ty, tr * 0.4, tr * 0.4) + 0.03 * c.texture(rng, 0.005), "tumor")
    c.img += 0.02 * rng.standard_normal(c.img.shape)


def _xray(c: _Canvas, rng: np.random.Generator) -> None:
    cx, cy = rng.uniform(-0.03, 0.03), rng.uniform(-0.02, 0.04)
    c.paint(np.ones((c.h, c.w), bool), 0.08)
    trunk = c.ellipse(cx, cy + 0.1, rng.uniform(0.42, 0.47), 0.6)
    c.paint(trunk, 0.62 + 0.03 * c.texture(rng, 0.05))
    ribs = 0.08 * (np.sin(55 * (c.y - 0.25 * np.abs(c.x - cx) ** 1.5)) > 0.6)
    lungs = {}
    for side, label in ((-1, "right lung"), (1, "left lung")):
        lx = cx + side * rng.uniform(0.17, 0.21)
        lung = c.blob(rng, lx, cy - rng.uniform(-0.02, 0.03), rng.uniform(0.12, 0.15), rng.uniform(0.26, 0.31), 0.08,
                      angle=0.0)
        lungs[label] = c.paint(lung, 0.18 + ribs + 0.03 * c.texture(rng, 0.006), label)
    spine = (np.abs(c.x - cx) < 0.035) & trunk
    c.paint(spine, 0.78 + 0.04 * np.sin(90 * c.y))
    hx, hy = cx + rng.uniform(0.03, 0.07), cy + rng.uniform(0.1, 0.15)
    heart = c.blob(rng, hx, hy, rng.uniform(0.11, 0.15), rng.uniform(0.09, 0.12), 0.08, angle=rng.uniform(-0.5, -0.2))
    c.paint(heart, 0.72 + 0.02 * c.texture(rng, 0.02), "heart")
    if rng.random() < 0.5:
        host = lungs["right lung" if rng.random() < 0.5 else "left lung"]
        rows, cols = np.nonzero(host)
        if rows.size:
            k = rng.integers(rows.size)
            s = float(min(c.h, c.w))
            nx, ny = (cols[k] + 0.5 - c.w / 2) / s, (rows[k] + 0.5 - c.h / 2) / s
            nr = rng.uniform(0.015, 0.03)
            nodule = c.ellipse(nx, ny, nr, nr) & host
            c.paint(nodule, 0.6, "nodule")
    c.img += 0.015 * rng.standard_normal(c.img.shape)


def _pet(c: _Canvas, rng: np.random.Generator) -> None:
    cx = rng.uniform(-0.03, 0.03)
    c.paint(np.ones((c.h, c.w), bool), 0.0)
    top = -c.half_h
    head_r = rng.uniform(0.08, 0.1)
    hy = top + head_r + 0.04
    head = c.ellipse(cx, hy, head_r * 0.85, head_r)
    trunk = c.ellipse(cx, hy + head_r + 0.45, rng.uniform(0.2, 0.25), 0.45)
    c.paint(head | trunk, 0.12 + 0.03 * c.texture(rng, 0.02))
    c.paint(c.ellipse(cx, hy, head_r * 0.7, head_r * 0.82), 0.85 + 0.05 * c.texture(rng, 0.01), "brain")
    heart = c.blob(rng, cx + rng.uniform(0.02, 0.05), hy + head_r + rng.uniform(0.2, 0.26), rng.uniform(0.05, 0.07),
                   rng.uniform(0.04, 0.06), 0.1) & trunk
    c.paint(heart, 0.6, "heart")
    bladder = c.ellipse(cx + rng.uniform(-0.02, 0.02), min(c.half_h - 0.08, hy + head_r + 0.78),
                        rng.uniform(0.04, 0.06), rng.uniform(0.03, 0.05)) & trunk
    c.paint(bladder, 0.95, "bladder")
    for _ in range(rng.integers(0, 3)):
        tx, ty = cx + rng.uniform(-0.15, 0.15), hy + head_r + rng.uniform(0.3, 0.6)
        tr = rng.uniform(0.02, 0.035)
        c.paint(c.ellipse(tx, ty, tr, tr) & trunk, 1.0, "tumor")
    c.img = np.clip(ndimage.gaussian_filter(c.img, sigma=(1.0, 1.0, 0)) + 0.02 * rng.standard_normal(c.img.shape), 0, 1)
    v = c.img[..., 0]
    c.img = np.stack([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)], axis=-1)  # "hot" map


def _endoscopy(c: _Canvas, rng: np.random.Generator) -> None:
    lx, ly = rng.uniform(-0.25, 0.25), rng.uniform(-0.25, 0.25)  # the dark lumen
    r = np.hypot(c.x - lx, c.y - ly)
    folds = 0.08 * np.sin(28 * r + 3 * c.texture(rng, 0.05))
    shade = np.clip(0.35 + 1.3 * r, 0, 1)[..., None]
    base = np.array([0.85, 0.42, 0.38]) + 0.04 * c.texture(rng, 0.03)[..., None]
    c.paint(np.ones((c.h, c.w), bool), np.clip(base * shade + folds[..., None], 0, 1))
    n = 1 if rng.random() < 0.8 else 2
    placed = np.zeros((c.h, c.w), bool)
    for _ in range(n):
        for _attempt in range(20):
            px, py = rng.uniform(-c.half_w + 0.18, c.half_w - 0.18), rng.uniform(-c.half_h + 0.18, c.half_h - 0.18)
            pr = rng.uniform(0.07, 0.14)
            polyp = c.blob(rng, px, py, pr, pr * rng.uniform(0.7, 1.0), 0.2)
            if not (polyp & ndimage.binary_dilation(placed, iterations=2)).any():
                break
        dome = np.clip(1 - ((c.x - px + 0.3 * pr) ** 2 + (c.y - py + 0.3 * pr) ** 2) / (1.6 * pr) ** 2, 0, 1)[..., None]
        colour = np.array([0.93, 0.6, 0.52]) * (0.75 + 0.35 * dome) + 0.04 * c.texture(rng, 0.004)[..., None]
        c.paint(polyp & ~placed, np.clip(colour, 0, 1), "polyp")
        placed |= polyp
    for _ in range(rng.integers(3, 8)):  # specular highlights, over everything
        sx, sy = rng.uniform(-c.half_w, c.half_w), rng.uniform(-c.half_h, c.half_h)
        c.paint(c.ellipse(sx, sy, rng.uniform(0.005, 0.015), rng.uniform(0.005, 0.015)), 1.0, occlude=False)
    corner = (np.abs(c.x) + np.abs(c.y)) > (c.half_w + c.half_h) * 0.82
    c.paint(corner, 0.0)


def _dermoscopy(c: _Canvas, rng: np.random.Generator) -> None:
    skin = np.array([0.88, 0.7, 0.6]) * rng.uniform(0.85, 1.05) + 0.03 * c.texture(rng, 0.02)[..., None]
    c.paint(np.ones((c.h, c.w), bool), np.clip(skin, 0, 1))
    lx, ly = rng.uniform(-0.12, 0.12), rng.uniform(-0.12, 0.12)
    lr = rng.uniform(0.16, 0.28)
    lesion = c.blob(rng, lx, ly, lr, lr * rng.uniform(0.65, 1.0), 0.35)
    network = (np.sin(90 * c.x + 4 * c.texture(rng, 0.02)) * np.sin(90 * c.y + 4 * c.texture(rng, 0.02)) > 0.3)
    depth = np.clip(1 - np.hypot(c.x - lx, c.y - ly) / lr, 0, 1)
    brown = np.array([0.55, 0.35, 0.22]) * (1 - 0.45 * depth)[..., None] - 0.12 * network[..., None]
    c.paint(lesion, np.clip(brown + 0.03 * c.texture(rng, 0.005)[..., None], 0, 1), "lesion")
    for _ in range(rng.integers(0, 6)):  # hairs are unlabelled artefacts drawn over the skin
        hair = c.curve(rng, rng.uniform(-c.half_w, c.half_w), rng.uniform(-c.half_h, c.half_h),
                       rng.uniform(0, 2 * np.pi), rng.uniform(0.3, 0.8), 0.006)
        c.paint(hair, np.array([0.15, 0.1, 0.08]), occlude=False)
    vignette = np.hypot(c.x, c.y) > min(c.half_w, c.half_h) * 1.35
    c.paint(vignette, 0.0, occlude=False)


def _fundus(c: _Canvas, rng: np.random.Generator) -> None:
    c.paint(np.ones((c.h, c.w), bool), 0.0)
    fr = min(c.half_w, c.half_h) * rng.uniform(0.9, 0.97)
    fundus = c.ellipse(0.0, 0.0, fr, fr)
    shade = np.clip(1.0 - 0.35 * np.hypot(c.x, c.y) / fr, 0, 1)[..., None]
    c.paint(fundus, np.clip(np.array([0.78, 0.33, 0.12]) * shade + 0.03 * c.texture(rng, 0.01)[..., None], 0, 1))
    side = 1 if rng.random() < 0.5 else -1  # right or left eye
    dx, dy = side * fr * rng.uniform(0.35, 0.5), rng.uniform(-0.06, 0.06)
    c.paint(c.ellipse(-side * fr * 0.1, dy, fr * 0.14, fr * 0.14) & fundus, np.array([0.5, 0.18, 0.06]))  # macula
    for _ in range(rng.integers(6, 10)):
        heading = (0 if side < 0 else np.pi) + rng.uniform(-1.3, 1.3)
        vessel = c.curve(rng, dx, dy, heading, rng.uniform(0.4, 0.7), rng.uniform(0.008, 0.016), bend=1.2) & fundus
        c.paint(vessel, np.array([0.55, 0.1, 0.05]))
    drx = fr * rng.uniform(0.13, 0.18)
    disc = c.ellipse(dx, dy, drx, drx * rng.uniform(1.0, 1.15)) & fundus
    c.paint(disc, np.array([0.98, 0.78, 0.45]) + 0.02 * c.texture(rng, 0.005)[..., None], "optic disc")
    cup = c.ellipse(dx + rng.uniform(-0.2, 0.2) * drx, dy, drx * rng.uniform(0.3, 0.65),
                    drx * rng.uniform(0.35, 0.7)) & disc
    # the disc includes its cup (REFUGE convention)
    c.paint(cup, np.array([1.0, 0.95, 0.8]), "optic cup", occlude=False)
    c.img = np.clip(c.img, 0, 1)


def _ultrasound(c: _Canvas, rng: np.random.Generator) -> None:
    c.paint(np.ones((c.h, c.w), bool), 0.0)
    ax, ay = 0.0, -c.half_h + 0.02
    r = np.hypot(c.x - ax, c.y - ay)
    theta = np.arctan2(c.x - ax, c.y - ay)
    half_angle = rng.uniform(0.55, 0.7)
    depth = 2 * c.half_h * 0.95
    fan = (r <= depth) & (np.abs(theta) <= half_angle) & (r >= 0.05)
    tissue = np.clip(0.45 + 0.08 * c.texture(rng, 0.03), 0, 1)
    c.paint(fan, tissue)
    rmin, rmax = 0.3 * depth, 0.8 * depth
    cr, ca = rng.uniform(rmin, rmax), rng.uniform(-0.6, 0.6) * half_angle
    cx, cy = ax + cr * np.sin(ca), ay + cr * np.cos(ca)
    rad = rng.uniform(0.06, 0.1)
    cyst = c.ellipse(cx, cy, rad, rad * rng.uniform(0.6, 0.9), rng.uniform(0, np.pi)) & fan
    c.img[..., 0][fan & (np.abs(c.x - cx) < rad) & (c.y > cy)] *= 1.45  # posterior acoustic enhancement
    c.paint(cyst, 0.04, "cyst")
    if rng.random() < 0.5:
        for _attempt in range(20):
            lr_, la = rng.uniform(rmin, rmax), rng.uniform(-0.6, 0.6) * half_angle
            lx, ly = ax + lr_ * np.sin(la), ay + lr_ * np.cos(la)
            if np.hypot(lx - cx, ly - cy) > rad + 0.14:
                lesion = c.blob(rng, lx, ly, 0.07, 0.05, 0.3) & fan
                c.paint(lesion, np.clip(0.22 + 0.05 * c.texture(rng, 0.01), 0, 1), "lesion")
                break
    speckle = rng.rayleigh(0.8, size=(c.h, c.w))
    c.img[..., 0] = np.clip(ndimage.gaussian_filter(c.img[..., 0] * speckle, 0.6), 0, 1) * fan


def _histopathology(c: _Canvas, rng: np.random.Generator) -> None:
    stroma = np.array([0.93, 0.62, 0.78]) + 0.05 * c.texture(rng, 0.01)[..., None] * np.array([0.3, 1, 0.5])
    c.paint(np.ones((c.h, c.w), bool), np.clip(stroma, 0, 1))
    for _ in range(rng.integers(0, 3)):  # white gland lumens, unlabelled
        c.paint(c.blob(rng, rng.uniform(-c.half_w, c.half_w), rng.uniform(-c.half_h, c.half_h), 0.08, 0.05, 0.3),
                np.array([0.97, 0.93, 0.95]))
    occupied = np.zeros((c.h, c.w), bool)
    density = rng.uniform(0.3, 1.0)
    grain = 0.04 * c.texture(rng, 0.003)[..., None]
    for _ in range(int(60 * density * 4 * c.half_w * c.half_h)):
        nx, ny = rng.uniform(-c.half_w, c.half_w), rng.uniform(-c.half_h, c.half_h)
        nr = rng.uniform(0.015, 0.03)
        nucleus = c.blob(rng, nx, ny, nr, nr * rng.uniform(0.6, 1.0), 0.15)
        if not nucleus.any() or (nucleus & occupied).any():
            continue  # instances stay disjoint and separate so a count is well defined
        win = c.window(nx, ny, nr * 1.3 + 3.0 / min(c.h, c.w))
        occupied[win] |= ndimage.binary_dilation(nucleus[win], iterations=2)
        colour = np.array([0.35, 0.2, 0.55]) * rng.uniform(0.7, 1.1) + grain
        c.paint(nucleus, np.clip(colour, 0, 1), "nucleus")


_GENERATORS: dict[str, tuple[Callable[[_Canvas, np.random.Generator], None], int]] = {
    "ct": (_ct, 1), "mr": (_mr, 1), "xray": (_xray, 1), "pet": (_pet, 3), "endoscopy": (_endoscopy, 3),
    "dermoscopy": (_dermoscopy, 3), "fundus": (_fundus, 3), "ultrasound": (_ultrasound, 1),
    "histopathology": (_histopathology, 3),
}


def _size_hw(size: int | tuple[int, int]) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    if int(h) < MIN_SIZE or int(w) < MIN_SIZE:
        raise InputError(f"phantom size {size} is too small: height and width must be >= {MIN_SIZE}")
    return int(h), int(w)


def make_phantom(modality: str, seed: int, size: int | tuple[int, int] = 256) -> Phantom:
    """Generate one phantom. `size` is an int (square) or (height, width)."""
    if modality not in _GENERATORS:
        raise InputError(f"unknown phantom modality {modality!r}; choose from {', '.join(MODALITIES)}")
    h, w = _size_hw(size)
    generate, channels = _GENERATORS[modality]
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), MODALITIES.index(modality)]))
    canvas = _Canvas(h, w, channels)
    generate(canvas, rng)
    img = np.clip(canvas.img, 0.0, 1.0)
    if channels == 1:
        img = np.repeat(img, 3, axis=-1)
    image = np.round(img * 255).astype(np.uint8)
    instances: dict[str, list[np.ndarray]] = {}
    for label, mask in canvas.instances:
        if mask.any():  # an instance fully hidden by later structures is not in the image
            instances.setdefault(label, []).append(mask)
    masks = {label: np.logical_or.reduce(insts) for label, insts in instances.items()}
    return Phantom(image=image, masks=masks, modality=modality, instances=instances)


def _slug(label: str) -> str:
    return label.replace(" ", "_")


def phantom_items(out_dir: Path, n: int, seed: int = 0, size: int | tuple[int, int] = 256,
                  modalities: Sequence[str] | None = None) -> Iterator[LabelledImage]:
    """Generate `n` phantoms (cycling through `modalities`), write images/<stem>.png and one PNG per
    instance under masks/ (SA-Med2D naming: `<stem>--<label>_<k>.png`), and yield them as labelled
    images for the instruction builder. Phantom i depends only on (seed, i)."""
    out_dir = Path(out_dir)
    mods = tuple(modalities) if modalities else MODALITIES
    for m in mods:
        if m not in _GENERATORS:
            raise InputError(f"unknown phantom modality {m!r}; choose from {', '.join(MODALITIES)}")
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "masks").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        modality = mods[i % len(mods)]
        ph = make_phantom(modality, seed=int(np.random.SeedSequence([int(seed), i]).generate_state(1)[0]), size=size)
        stem = f"{modality}_{i:05d}--phantom"
        Image.fromarray(ph.image).save(out_dir / "images" / f"{stem}.png")
        instances = []
        for label, insts in ph.instances.items():
            for k, inst in enumerate(insts):
                rel = f"masks/{stem}--{_slug(label)}_{k}.png"
                write_mask_png(inst, out_dir / rel)
                instances.append(Instance(label=label, mask=inst, path=rel))
        yield LabelledImage(image=f"images/{stem}.png", modality=modality, instances=instances, group=stem,
                            source="phantoms", vocabulary=LABELS[modality])


def write_phantom_dataset(out_dir: Path, n: int, seed: int = 0, size: int | tuple[int, int] = 256,
                          modalities: Sequence[str] | None = None) -> Path:
    """Write `n` phantoms (see `phantom_items`) and their instruction samples (VQA, region VQA,
    grounding, box grounding) to `<out_dir>/phantoms.jsonl`. Returns the JSONL path."""
    out = Path(out_dir) / "phantoms.jsonl"
    items = phantom_items(Path(out_dir), n, seed, size, modalities)
    write_jsonl(build_samples(items, Path(out_dir), BuildConfig(seed=seed)), out)
    return out
