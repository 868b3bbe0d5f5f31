"""Procedural, licence-free 3-D phantoms: a CT abdomen or an MR head as a Volume with exact label volumes.

The 3-D counterpart of medplib.data.phantoms: structures are solids defined in world millimetres
(irregular ellipsoids, cylinders) and painted in order, a later one hiding what lies under it;
label volumes come from the same geometry, after that occlusion, so they are exact voxel for
voxel. Voxels can be anisotropic (thick slices, as in clinical CT) and the affine is RAS-aligned
with the volume centred on the origin. CT intensities are whole Hounsfield units, so the phantom
survives a round trip through a DICOM series exactly. Deterministic for a seed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from medplib.data.phantoms import LABELS
from medplib.data.volume import Volume, affine_from_spacing
from medplib.errors import InputError

MODALITIES_3D = ("ct", "mr")


@dataclass
class PhantomVolume:
    """volume: the image (I, J, K) float32 (HU for CT). labels: label -> (I, J, K) bool, the union of
    that structure, never empty; disjoint from each other."""

    volume: Volume
    labels: dict[str, np.ndarray]
    modality: str

    def label_map(self) -> tuple[np.ndarray, dict[int, str]]:
        """(I, J, K) uint8 with 1..n per label (0 background) and the value -> label table."""
        table = {n: label for n, label in enumerate(self.labels, start=1)}
        out = np.zeros(self.volume.shape, dtype=np.uint8)
        for n, label in table.items():
            out[self.labels[label]] = n
        return out, table


class _Space:
    """World coordinates (mm, RAS) of every voxel centre, a float image and labelled solids."""

    def __init__(self, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> None:
        origin = tuple(-(n - 1) * s / 2.0 for n, s in zip(shape, spacing))  # the volume centred on 0
        self.affine = affine_from_spacing(spacing, origin)
        self.shape, self.spacing = shape, spacing
        axes = [o + s * np.arange(n) for o, s, n in zip(origin, spacing, shape)]
        self.x, self.y, self.z = np.meshgrid(*axes, indexing="ij", sparse=True)  # broadcast to (I, J, K)
        self.img = np.zeros(shape, dtype=np.float64)
        self.solids: list[tuple[str, np.ndarray]] = []

    def paint(self, mask: np.ndarray, value: np.ndarray | float, label: str | None = None) -> np.ndarray:
        mask = np.broadcast_to(mask, self.shape)
        self.img[mask] = np.broadcast_to(value, self.shape)[mask]
        for _, solid in self.solids:
            solid &= ~mask
        if label is not None:
            self.solids.append((label, mask.copy()))
        return mask

    def blob(self, rng: np.random.Generator, centre: tuple[float, float, float], radii: tuple[float, float, float],
             irregularity: float = 0.12) -> np.ndarray:
        """An ellipsoid (mm) whose radius wobbles with a few random harmonics of azimuth and elevation."""
        u = (self.x - centre[0]) / radii[0]
        v = (self.y - centre[1]) / radii[1]
        w = (self.z - centre[2]) / radii[2]
        r = np.sqrt(u * u + v * v + w * w)
        azimuth, elevation = np.arctan2(v, u), np.arctan2(w, np.hypot(u, v))
        wobble = np.ones_like(r)
        for k in (2, 3):
            amp = irregularity / k * rng.uniform(0.5, 1.0)
            wobble = wobble + amp * np.cos(k * azimuth + rng.uniform(0, 2 * np.pi)) * np.cos(
                (k - 1) * elevation + rng.uniform(0, 2 * np.pi))
        return r <= wobble

    def cylinder(self, cx: float, cy: float, rx: float, ry: float, z0: float = -np.inf,
                 z1: float = np.inf) -> np.ndarray:
        """An elliptic cylinder along z (superior) between z0 and z1 mm."""
        return (((self.x - cx) / rx) ** 2 + ((self.y - cy) / ry) ** 2 <= 1.0) & (self.z >= z0) & (self.z <= z1)

    def texture(self, rng: np.random.Generator, sigma_mm: float) -> np.ndarray:
        """(I, J, K) smooth noise, zero mean and unit std, blurred by `sigma_mm` in world units."""
        sigma = [max(sigma_mm / s, 0.5) for s in self.spacing]
        noise = ndimage.gaussian_filter(rng.standard_normal(self.shape), sigma=sigma)
        return (noise - noise.mean()) / (noise.std() + 1e-9)


def _ct(s: _Space, rng: np.random.Generator) -> None:
    """Abdomen in HU; the extent is read off the volume so any field of view holds the organs."""
    half = [(n - 1) * sp / 2.0 for n, sp in zip(s.shape, s.spacing)]
    bx, by = half[0] * rng.uniform(0.8, 0.88), half[1] * rng.uniform(0.6, 0.68)
    s.paint(np.ones(s.shape, bool), -1000.0)  # air
    body = s.cylinder(0.0, 0.0, bx, by)
    s.paint(body, -100.0 + 10.0 * s.texture(rng, 3.0))  # subcutaneous fat
    inner = s.cylinder(0.0, 0.0, bx * rng.uniform(0.86, 0.9), by * rng.uniform(0.84, 0.88))
    s.paint(inner, 15.0 + 12.0 * s.texture(rng, 8.0))  # muscle and bowel
    zh = half[2]
    liver_c = (bx * 0.42 + rng.uniform(-5, 5), by * 0.1 + rng.uniform(-5, 5), zh * rng.uniform(0.05, 0.2))
    liver_r = (bx * rng.uniform(0.36, 0.44), by * rng.uniform(0.5, 0.6), zh * rng.uniform(0.55, 0.7))
    liver = s.blob(rng, liver_c, liver_r) & inner
    s.paint(liver, 70.0 + 6.0 * s.texture(rng, 6.0), "liver")  # patient's right is +x in RAS
    lesion_r = min(bx, by) * rng.uniform(0.12, 0.18)
    lesion = s.blob(rng, liver_c, (lesion_r, lesion_r, lesion_r * rng.uniform(0.8, 1.2)), 0.2) & liver
    s.paint(lesion, 25.0 + 5.0 * s.texture(rng, 3.0), "lesion")  # hypodense
    spleen = s.blob(rng, (-bx * 0.6, -by * 0.2, zh * rng.uniform(0.1, 0.3)),
                    (bx * rng.uniform(0.12, 0.16), by * rng.uniform(0.25, 0.32), zh * rng.uniform(0.3, 0.4))) & inner
    s.paint(spleen, 50.0 + 5.0 * s.texture(rng, 4.0), "spleen")
    for side, label in ((1, "right kidney"), (-1, "left kidney")):
        centre = (side * bx * rng.uniform(0.3, 0.38), -by * rng.uniform(0.4, 0.5), -zh * rng.uniform(0.1, 0.25))
        radii = (bx * rng.uniform(0.12, 0.15), by * rng.uniform(0.2, 0.26), zh * rng.uniform(0.3, 0.4))
        kidney = s.blob(rng, centre, radii, 0.06) & inner
        s.paint(kidney, 160.0 + 10.0 * s.texture(rng, 2.0), label)  # contrast-enhanced cortex
    vr = by * rng.uniform(0.16, 0.2)
    vertebra = s.cylinder(0.0, -by * 0.6, vr, vr * 0.9) & inner
    s.paint(vertebra, 400.0 + 250.0 * (s.texture(rng, 2.0) > 0), "vertebra")  # cortical and cancellous bone
    ar = vr * rng.uniform(0.35, 0.45)
    aorta = s.cylinder(-vr * 0.3, -by * 0.6 + vr + ar * 1.3, ar, ar) & inner
    s.paint(aorta, 200.0, "aorta")
    s.img = np.round(s.img + 12.0 * rng.standard_normal(s.shape))  # quantum noise; whole HU


def _mr(s: _Space, rng: np.random.Generator) -> None:
    """T1-like head in arbitrary units 0..1000."""
    half = [(n - 1) * sp / 2.0 for n, sp in zip(s.shape, s.spacing)]
    r = [h * rng.uniform(0.82, 0.9) for h in half]
    s.paint(np.ones(s.shape, bool), 20.0)
    s.paint(s.blob(rng, (0.0, 0.0, 0.0), tuple(r), 0.0), 850.0)  # scalp fat, bright on T1
    s.paint(s.blob(rng, (0.0, 0.0, 0.0), tuple(x * 0.94 for x in r), 0.0), 80.0)  # skull, dark
    brain = s.blob(rng, (0.0, 0.0, 0.0), tuple(x * 0.89 for x in r), 0.03)
    s.paint(brain, 550.0 + 60.0 * s.texture(rng, 3.0), "brain")
    spread = r[0] * rng.uniform(0.1, 0.16)
    for side in (-1, 1):
        vent = s.blob(rng, (side * spread, r[1] * rng.uniform(-0.05, 0.05), r[2] * 0.1),
                      (r[0] * rng.uniform(0.06, 0.09), r[1] * rng.uniform(0.22, 0.3), r[2] * rng.uniform(0.15, 0.22)),
                      0.1)
        s.paint(vent & brain, 150.0, "ventricle")
    direction = rng.standard_normal(3)
    direction /= np.linalg.norm(direction)
    centre = tuple(float(d * x * rng.uniform(0.35, 0.5)) for d, x in zip(direction, r))
    tr = min(r) * rng.uniform(0.12, 0.2)
    s.paint(s.blob(rng, centre, (tr, tr * rng.uniform(0.7, 1.0), tr * rng.uniform(0.7, 1.0)), 0.25) & brain,
            900.0 + 30.0 * s.texture(rng, 1.5), "tumor")
    s.img = s.img + 20.0 * rng.standard_normal(s.shape)


_GENERATORS = {"ct": _ct, "mr": _mr}
_DEFAULT_GRID = {"ct": ((96, 96, 48), (3.6, 3.6, 5.0)), "mr": ((96, 96, 64), (2.0, 2.0, 2.5))}


def make_phantom_volume(modality: str = "ct", seed: int = 0, shape: tuple[int, int, int] | None = None,
                        spacing: tuple[float, float, float] | None = None) -> PhantomVolume:
    """A phantom volume of `shape` voxels measuring `spacing` mm, with its exact label volumes. The
    defaults give a life-sized field of view: CT 96 x 96 x 48 voxels of 3.6 x 3.6 x 5 mm (an
    abdomen), MR 96 x 96 x 64 of 2 x 2 x 2.5 mm (a head). Structures scale with the field of view."""
    if modality not in _GENERATORS:
        raise InputError(f"unknown 3-D phantom modality {modality!r} (choose from {', '.join(MODALITIES_3D)})")
    shape = shape or _DEFAULT_GRID[modality][0]
    spacing = spacing or _DEFAULT_GRID[modality][1]
    if len(shape) != 3 or min(shape) < 8:
        raise InputError(f"phantom shape must be three sizes of at least 8 voxels, got {shape}")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise InputError(f"phantom spacing must be three positive sizes in mm, got {spacing}")
    space = _Space(tuple(int(n) for n in shape), tuple(float(s) for s in spacing))  # type: ignore[arg-type]
    _GENERATORS[modality](space, np.random.default_rng(seed))
    labels: dict[str, np.ndarray] = {}
    for label, solid in space.solids:
        labels[label] = labels[label] | solid if label in labels else solid
    labels = {k: labels[k] for k in LABELS[modality] if k in labels and labels[k].any()}
    volume = Volume(voxels=space.img.astype(np.float32), affine=space.affine,
                    meta={"format": "phantom", "modality": modality.upper(), "seed": seed})
    return PhantomVolume(volume=volume, labels=labels, modality=modality)


def write_phantom_volume(phantom: PhantomVolume, out_dir: str | Path, dicom: bool = False) -> dict[str, str]:
    """Write `image.nii.gz`, `labels.nii.gz` (a label map), `labels.json` (value -> label) and, with
    `dicom`, the image as a DICOM series in `dicom/`. Returns the written paths by role."""
    import nibabel as nib

    from medplib.data.volume_io import write_dicom_series, write_nifti_mask

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vol = phantom.volume
    nib.save(nib.Nifti1Image(vol.voxels, vol.affine), str(out / "image.nii.gz"))
    label_map, table = phantom.label_map()
    write_nifti_mask(label_map, vol, out / "labels.nii.gz")
    (out / "labels.json").write_text(json.dumps({str(k): v for k, v in table.items()}, indent=1) + "\n")
    paths = {"image": str(out / "image.nii.gz"), "labels": str(out / "labels.nii.gz"),
             "table": str(out / "labels.json")}
    if dicom:
        write_dicom_series(vol, out / "dicom", modality=phantom.modality.upper(),
                           series_description=f"phantom {phantom.modality}")
        paths["dicom"] = str(out / "dicom")
    return paths
