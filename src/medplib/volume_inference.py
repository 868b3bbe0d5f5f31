"""Questions about a 3-D volume, answered slice by slice with the 2-D model.

    p = Predictor.from_pretrained("runs/demo/model")
    p.set_volume("brain.nii.gz", axis=2)          # a Volume, a NIfTI file or a DICOM series folder
    out = p.ask_volume("Please segment the white matter.")
    out.mask            # (I, J, K) bool, voxel for voxel the input's grid
    out.scores          # (n,) predicted IoU per slice along the axis, NaN where no mask was made
    out.save_nifti("wm.nii.gz")                   # the input's affine
    p.ask_volume("What is shown in <region>?", regions=[VoxelPoint((90, 120, 80))]).text

How slices are cut. `axis` is a voxel axis of the input (0, 1 or 2; for a DICOM series 2 is the
slice axis, for a NIfTI file read by medplib 2 is axial). Whatever order the voxels are stored
in, each slice is shown to the model the way `read_nifti_slice` and the MNI152 demo data show it:
the volume is viewed in RAS orientation (nibabel's `io_orientation`, permutations and flips only,
never resampled), with anterior or superior at the top and the patient's right on the image's
left. Intensities are windowed once per volume (default: the 0.5th..99.5th percentile of the
finite voxels, so all slices share one grey scale), and every predicted slice mask is mapped
back through the same view, so the mask volume lines up with the input voxel for voxel.

Which slices are asked (`slices`):
- None (default): a grounding question (it asks to segment, mask, outline or delineate, or the
  model's answer on the reference slice holds a `[SEG]`) is asked on every slice; any other
  question (VQA) is answered from the reference slice only: the middle slice along the axis, or
  the middle one of the slices the region prompts touch;
- "all", "middle", or slice indices along the axis: exactly those.

Region prompts are in voxel coordinates of the input: a `VoxelPoint` (i, j, k) reaches the one
slice holding that voxel, a `VoxelBox` (inclusive voxel index ranges) every slice it crosses,
and a (I, J, K) bool array (a free-form 3-D region) every slice where it has voxels; on each of
those slices it becomes a 2-D point, box or mask region. With regions, only the slices that all
regions touch are asked; the others get no mask.

3-D post-processing (`postprocess`, off by default; in the order given):
- "largest_component": keep the largest 26-connected component of the mask volume;
- "consistency": slice-to-slice consistency along the axis: drop a slice's 8-connected 2-D
  component that overlaps neither neighbouring slice's mask (an isolated false detection), then
  fill an empty slice between two masked ones with their intersection (a missed slice).

Features: slices are prepared in batches of `batch_size`; their vision and pixel features are
computed in one batched forward pass each and go into the Predictor's per-image feature cache, so
asking a second question about a volume skips the vision towers for the slices still cached
(raise the Predictor's `cache_entries` and `cache_bytes` to keep a whole volume).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence, Union

import numpy as np
from scipy import ndimage

from medplib.data.boxes import mask_to_box
from medplib.data.images import grey_to_rgb, window_to_uint8
from medplib.data.schema import BoxRegion, MaskRegion, PointRegion, Region
from medplib.data.volume import Volume, read_volume
from medplib.errors import InputError

if TYPE_CHECKING:
    from medplib.inference import Predictor

POSTPROCESS = ("largest_component", "consistency")
DEFAULT_PERCENTILES = (0.5, 99.5)
# A question asking for a mask: asked on every slice even when the reference slice's answer has no [SEG].
_GROUNDING = re.compile(r"\b(segment\w*|mask\w*|outline|delineate|contour)\b", re.IGNORECASE)


@dataclass(frozen=True)
class VoxelPoint:
    """One voxel (i, j, k) of the input volume (fractions are rounded to the nearest voxel centre)."""

    ijk: tuple[float, float, float]


@dataclass(frozen=True)
class VoxelBox:
    """A block of voxels: `lo` and `hi` are (i, j, k) voxel indices, both inclusive."""

    lo: tuple[int, int, int]
    hi: tuple[int, int, int]


VoxelRegion = Union[VoxelPoint, VoxelBox, np.ndarray]
Slices = Union[None, Literal["all", "middle"], int, Sequence[int]]


def _ornt(affine: np.ndarray) -> np.ndarray:
    from nibabel.orientations import io_orientation

    return io_orientation(affine)  # (3, 2): per voxel axis, its RAS axis and direction (+1 / -1)


class VolumeSlices:
    """A volume cut into 2-D slices along voxel axis `axis`, as the model is shown them (see the
    module docstring). Slice k is the k-th index along `axis` of the input's voxels."""

    def __init__(self, volume: Volume, axis: int = 2, window: tuple[float, float] | None = None,
                 percentiles: tuple[float, float] = DEFAULT_PERCENTILES):
        from nibabel.orientations import apply_orientation

        if axis not in (0, 1, 2):
            raise InputError(f"axis must be 0, 1 or 2 (a voxel axis of the volume), got {axis}")
        self.volume, self.axis = volume, axis
        self._ornt = _ornt(volume.affine)
        self._ras_axis = int(self._ornt[axis, 0])
        self._flip = self._ornt[axis, 1] < 0
        self.n = volume.shape[axis]
        self._ras = apply_orientation(volume.voxels, self._ornt)  # a view: permuted and flipped
        if window is None:
            finite = volume.voxels[np.isfinite(volume.voxels)]
            if finite.size == 0:
                raise InputError("the volume has no finite voxels")
            window = tuple(float(v) for v in np.percentile(finite, percentiles))  # type: ignore[assignment]
        self.window: tuple[float, float] = (float(window[0]), float(window[1]))
        self.hw = self.view(self._ras_zero(), 0, ras=True).shape  # (H, W) of every slice image

    def _ras_zero(self) -> np.ndarray:
        return np.zeros(self._ras.shape, dtype=bool)

    def _ras_index(self, k: int) -> int:
        return self.n - 1 - k if self._flip else k

    def check(self, k: int) -> int:
        if not isinstance(k, (int, np.integer)) or not 0 <= int(k) < self.n:
            raise InputError(f"slice {k!r} is out of range: axis {self.axis} has slices 0..{self.n - 1}")
        return int(k)

    def view(self, array: np.ndarray, k: int, *, ras: bool = False) -> np.ndarray:
        """Slice k of an (I, J, K) array shaped like the volume -> (H, W), as displayed."""
        from nibabel.orientations import apply_orientation

        r = array if ras else apply_orientation(array, self._ornt)
        plane = np.take(r, self._ras_index(k), axis=self._ras_axis)
        return np.ascontiguousarray(plane.T[::-1, ::-1])  # rows: A/S at the top; columns: patient right on the left

    def image(self, k: int) -> np.ndarray:
        """Slice k as the model sees it: (H, W, 3) uint8."""
        plane = self.view(self._ras, self.check(k), ras=True)
        low, high = self.window
        return grey_to_rgb(window_to_uint8(np.nan_to_num(plane, nan=low), low, high))

    def assemble(self, views: dict[int, np.ndarray]) -> np.ndarray:
        """{slice k: (H, W) bool as displayed} -> (I, J, K) bool in the input's voxel order."""
        from nibabel.orientations import apply_orientation, axcodes2ornt, ornt_transform

        ras = self._ras_zero()
        for k, m in views.items():
            if m.shape != self.hw:
                raise InputError(f"slice {k}: mask of shape {m.shape} is not the slice's {self.hw}")
            index = [slice(None)] * 3
            index[self._ras_axis] = self._ras_index(k)  # type: ignore[call-overload]
            ras[tuple(index)] = m[::-1, ::-1].T
        back = ornt_transform(axcodes2ornt("RAS"), self._ornt)
        return np.ascontiguousarray(apply_orientation(ras, back))


# ---------------------------------------------------------------------------- regions

def region_volume(region: VoxelRegion, shape: tuple[int, int, int]) -> np.ndarray:
    """A voxel-coordinate region -> (I, J, K) bool. Raises InputError for one outside the volume."""
    if isinstance(region, VoxelPoint):
        ijk = np.round(np.asarray(region.ijk, dtype=np.float64)).astype(int)
        if ijk.shape != (3,) or np.any(ijk < 0) or np.any(ijk >= shape):
            raise InputError(f"point {tuple(region.ijk)} lies outside the volume of {shape} voxels")
        out = np.zeros(shape, dtype=bool)
        out[tuple(ijk)] = True
        return out
    if isinstance(region, VoxelBox):
        lo, hi = np.asarray(region.lo, dtype=int), np.asarray(region.hi, dtype=int)
        if lo.shape != (3,) or hi.shape != (3,) or np.any(hi < lo):
            raise InputError(f"box {tuple(region.lo)}..{tuple(region.hi)} needs lo <= hi on each of i, j, k")
        if np.any(lo < 0) or np.any(hi >= shape):
            raise InputError(f"box {tuple(region.lo)}..{tuple(region.hi)} reaches outside the volume of {shape} voxels")
        out = np.zeros(shape, dtype=bool)
        out[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1] = True
        return out
    if isinstance(region, np.ndarray):
        if region.shape != shape:
            raise InputError(f"a region volume of shape {region.shape} does not match the volume's {shape}")
        if not region.any():
            raise InputError("the region volume is empty")
        return region.astype(bool)
    raise InputError(f"a volume region is a VoxelPoint, a VoxelBox or an (I, J, K) bool array, "
                     f"not {type(region).__name__}")


def _slice_region(region: VoxelRegion, view: np.ndarray) -> tuple[Region, np.ndarray | None]:
    """The 2-D prompt of a region on one slice, from its displayed (H, W) footprint."""
    if isinstance(region, VoxelPoint):
        r, c = np.argwhere(view)[0]
        return PointRegion(point=(float(c) + 0.5, float(r) + 0.5)), None  # the pixel's centre
    if isinstance(region, VoxelBox):
        return BoxRegion(box=mask_to_box(view)), None
    return MaskRegion(mask="volume-region"), view


# ---------------------------------------------------------------------------- post-processing

def largest_component(mask: np.ndarray) -> np.ndarray:
    """(I, J, K) bool -> its largest 26-connected component (empty stays empty)."""
    labels, n = ndimage.label(mask, structure=ndimage.generate_binary_structure(3, 3))
    if n <= 1:
        return mask.copy()
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (int(np.argmax(sizes)) + 1)


def slice_consistency(mask: np.ndarray, axis: int) -> np.ndarray:
    """Along `axis`: drop 2-D components touching neither neighbouring slice's mask, then fill an
    empty slice lying between two non-empty ones with their intersection."""
    m = np.moveaxis(mask.astype(bool), axis, 0)
    n = m.shape[0]
    kept = np.zeros_like(m)
    eight = ndimage.generate_binary_structure(2, 2)
    for k in range(n):
        if not m[k].any():
            continue
        near = np.zeros_like(m[k])
        if k > 0:
            near |= m[k - 1]
        if k < n - 1:
            near |= m[k + 1]
        labels, count = ndimage.label(m[k], structure=eight)
        touching = np.unique(labels[near & (labels > 0)])
        kept[k] = np.isin(labels, touching[touching > 0])
    filled = kept.copy()
    for k in range(1, n - 1):
        if not kept[k].any() and kept[k - 1].any() and kept[k + 1].any():
            filled[k] = kept[k - 1] & kept[k + 1]
    return np.ascontiguousarray(np.moveaxis(filled, 0, axis))


def postprocess_mask(mask: np.ndarray, steps: Sequence[str], axis: int) -> np.ndarray:
    unknown = [s for s in steps if s not in POSTPROCESS]
    if unknown:
        raise InputError(f"unknown post-processing {unknown}; choose from {', '.join(POSTPROCESS)}")
    for step in steps:
        mask = largest_component(mask) if step == "largest_component" else slice_consistency(mask, axis)
    return mask


# ---------------------------------------------------------------------------- answers

@dataclass
class VolumePrediction:
    """An answer about a volume. mask: (I, J, K) bool on the input's voxel grid (the union of every
    asked slice's [SEG] masks, after post-processing). scores: (n,) float32 along the axis, the
    highest predicted IoU of the slice's masks, NaN for a slice not asked or without a mask.
    texts: the answer per asked slice; text: the answer on `reference`."""

    mask: np.ndarray
    scores: np.ndarray
    texts: dict[int, str]
    text: str
    reference: int
    slices: list[int]
    axis: int
    volume: Volume
    postprocess: tuple[str, ...] = ()
    timings: dict[str, float] = field(default_factory=dict)  # image_s, generate_s, total_s, slices_per_s

    @property
    def slice_has_mask(self) -> np.ndarray:
        """(n,) bool: slices along the axis where the mask volume has voxels."""
        other = tuple(a for a in range(3) if a != self.axis)
        return self.mask.any(axis=other)

    def save_nifti(self, path: str | Path) -> Path:
        """The mask as NIfTI (uint8) with the input volume's affine."""
        from medplib.data.volume_io import write_nifti_mask

        return write_nifti_mask(self.mask, self.volume, path)

    def save_dicom_seg(self, path: str | Path, label: str = "mask") -> Path:
        """The mask as a DICOM SEG referencing the input series (the volume must come from DICOM)."""
        from medplib.data.volume_io import write_dicom_seg

        return write_dicom_seg({label: self.mask}, self.volume, path)


def as_volume(volume: Volume | str | Path) -> Volume:
    if isinstance(volume, Volume):
        return volume
    if isinstance(volume, (str, Path)):
        return read_volume(volume)
    raise InputError(f"expected a Volume, a NIfTI file or a DICOM series folder, got {type(volume).__name__}")


def _chosen(slices: Slices, vs: VolumeSlices, candidates: list[int], with_regions: bool) -> list[int] | None:
    """Explicit slice choices; None means 'decide from the reference slice's answer'."""
    if slices is None:
        return None
    if isinstance(slices, str):
        if slices == "all":
            return candidates
        if slices == "middle":
            return [candidates[len(candidates) // 2]]
        raise InputError(f"slices must be 'all', 'middle', an index or a list of indices, not {slices!r}")
    picked = [vs.check(k) for k in ([slices] if isinstance(slices, (int, np.integer)) else list(slices))]
    if not picked:
        raise InputError("no slices were named")
    if with_regions:
        missed = sorted(set(picked) - set(candidates))
        if missed:
            raise InputError(f"slices {missed} are not touched by every region prompt (they touch {candidates[0]}.."
                             f"{candidates[-1]})" if candidates else "the region prompts share no slice")
    return sorted(set(picked))


def ask_volume(predictor: "Predictor", vs: VolumeSlices, question: str, regions: Sequence[VoxelRegion] = (), *,
               slices: Slices = None, postprocess: Sequence[str] = (), batch_size: int = 8, verbose: bool = False,
               max_new_tokens: int | None = None) -> VolumePrediction:
    """Answer `question` about the volume behind `vs` (see the module docstring for the slices
    asked, regions and post-processing)."""
    from tqdm import tqdm

    from medplib.inference import Query

    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}")
    postprocess_mask(np.zeros((1, 1, 1), dtype=bool), postprocess, 0)  # refuse unknown steps before any work
    t0 = time.perf_counter()
    shape = vs.volume.shape
    vols = [region_volume(r, shape) for r in regions]
    other = tuple(a for a in range(3) if a != vs.axis)
    if vols:
        touched = np.logical_and.reduce([v.any(axis=other) for v in vols])
        candidates = [int(k) for k in np.flatnonzero(touched)]
        if not candidates:
            raise InputError(f"the region prompts share no slice along axis {vs.axis}")
    else:
        candidates = list(range(vs.n))
    chosen = _chosen(slices, vs, candidates, bool(vols))
    reference = chosen[len(chosen) // 2] if chosen else candidates[len(candidates) // 2]
    # The prompt as the reference slice gets it, checked before any slice is asked (every slice's
    # prompt differs only in where its regions lie).
    ref_prompts = [_slice_region(r, vs.view(v, reference)) for r, v in zip(regions, vols)]
    predictor.model.processor.encode_prompt(question, vs.hw, [p for p, _ in ref_prompts], [a for _, a in ref_prompts])

    views: dict[int, np.ndarray] = {}
    scores = np.full(vs.n, np.nan, dtype=np.float32)
    texts: dict[int, str] = {}
    timing = {"image_s": 0.0, "generate_s": 0.0}
    batch = max(1, min(batch_size, predictor.cache_entries))  # a batch must fit the cache it is put in

    def answer(ks: list[int]) -> None:
        images = {k: vs.image(k) for k in ks}
        timing["image_s"] += predictor.prefetch(list(images.values()))
        queries = []
        for k in ks:
            prompts = [_slice_region(r, vs.view(v, k)) for r, v in zip(regions, vols)]
            queries.append(Query(images[k], question, [p for p, _ in prompts], [a for _, a in prompts],
                                 max_new_tokens=max_new_tokens))
        preds = predictor.ask_batch(queries)  # the slices decoded together; greedy answers as one by one
        for k, pred in zip(ks, preds):
            if isinstance(pred, Exception):
                raise InputError(f"slice {k} along axis {vs.axis}: {pred}") from pred
            texts[k] = pred.text
            if pred.masks:
                views[k] = np.logical_or.reduce(pred.masks)
                scores[k] = max(pred.scores)
        timing["generate_s"] += preds[0].timings["generate_s"]  # the batch's decoding time, shared by its answers

    with predictor._lock:
        if chosen is None:  # decide from the reference slice whether this is a grounding question
            answer([reference])
            grounding = reference in views or bool(_GROUNDING.search(question))
            chosen = candidates if grounding else [reference]
        todo = [k for k in chosen if k not in texts]
        bar = tqdm(total=len(chosen), initial=len(chosen) - len(todo), desc="slices", unit="slice",
                   disable=not verbose, dynamic_ncols=True)
        try:
            for start in range(0, len(todo), batch):
                part = todo[start:start + batch]
                answer(part)
                bar.update(len(part))
        finally:
            bar.close()
    mask = vs.assemble(views)
    steps = tuple(postprocess)
    if steps:
        mask = postprocess_mask(mask, steps, vs.axis)
    total = time.perf_counter() - t0
    timing.update(total_s=total, slices_per_s=len(chosen) / total if total > 0 else 0.0)
    return VolumePrediction(mask=mask, scores=scores, texts=texts, text=texts[reference], reference=reference,
                            slices=list(chosen), axis=vs.axis, volume=vs.volume, postprocess=steps, timings=timing)


def parse_voxel_region(kind: str, text: str) -> VoxelRegion:
    """'i,j,k' (point) or 'i1,j1,k1,i2,j2,k2' (box, inclusive) from the command line."""
    parts = text.replace(" ", "").split(",")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if kind == "point" and len(values) == 3:
        return VoxelPoint(tuple(values))  # type: ignore[arg-type]
    if kind == "box" and len(values) == 6 and all(v.is_integer() for v in values):
        ints = [int(v) for v in values]
        return VoxelBox(tuple(ints[:3]), tuple(ints[3:]))  # type: ignore[arg-type]
    want = "i,j,k" if kind == "point" else "i1,j1,k1,i2,j2,k2 (whole voxel indices)"
    raise InputError(f"a volume {kind} must be {want}, got {text!r}")


def region_from_json(obj: Any) -> VoxelRegion:
    """{"point": [i, j, k]} or {"box": [i1, j1, k1, i2, j2, k2]} (HTTP requests) -> a voxel region."""
    if isinstance(obj, dict) and set(obj) == {"point"} and isinstance(obj["point"], list):
        return parse_voxel_region("point", ",".join(map(str, obj["point"])))
    if isinstance(obj, dict) and set(obj) == {"box"} and isinstance(obj["box"], list):
        return parse_voxel_region("box", ",".join(map(str, obj["box"])))
    raise InputError(f'a volume region is {{"point": [i, j, k]}} or {{"box": [i1, j1, k1, i2, j2, k2]}}, got {obj!r}')
