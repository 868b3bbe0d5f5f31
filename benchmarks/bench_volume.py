"""Volume throughput: reading a DICOM series vs the same volume as NIfTI (.nii and .nii.gz), in
slices/s, and 3D Dice / HD95 time on phantom label volumes, cropped (medplib) vs whole-volume
distance transforms, side by side in one run.

Prints one JSON line per measurement. Run:
    .venv/bin/python benchmarks/bench_volume.py --size 256 --slices 64 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
from scipy import ndimage

from medplib.data.dicom_series import read_dicom_series
from medplib.data.nifti import read_nifti_volume
from medplib.data.phantoms3d import make_phantom_volume
from medplib.data.volume_io import write_dicom_series
from medplib.evaluation.volumes import dice_3d, hausdorff_95


def _best_of(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def _hd95_whole(pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, ...]) -> float:
    """The same metric without the crop: distance transforms over the whole volume."""
    cross = ndimage.generate_binary_structure(3, 1)
    sp, sg = (m & ~ndimage.binary_erosion(m, cross, border_value=0) for m in (pred, gt))
    to_g = ndimage.distance_transform_edt(~sg, sampling=spacing)[sp]
    to_p = ndimage.distance_transform_edt(~sp, sampling=spacing)[sg]
    return float(max(np.percentile(to_g, 95), np.percentile(to_p, 95)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=256, help="in-plane voxels")
    ap.add_argument("--slices", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    shape = (args.size, args.size, args.slices)
    spacing = (350.0 / args.size, 350.0 / args.size, 5.0)  # a 35 cm abdominal field of view
    ph = make_phantom_volume("ct", seed=0, shape=shape, spacing=spacing)
    common = {"shape": list(shape), "spacing_mm": [round(s, 3) for s in spacing]}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_dicom_series(ph.volume, folder / "dicom")
        img = nib.Nifti1Image(ph.volume.voxels.astype(np.int16), ph.volume.affine)
        nib.save(img, str(folder / "ct.nii"))
        nib.save(img, str(folder / "ct.nii.gz"))
        readers = {"dicom_series": lambda: read_dicom_series(folder / "dicom"),
                   "nifti": lambda: read_nifti_volume(folder / "ct.nii"),
                   "nifti_gz": lambda: read_nifti_volume(folder / "ct.nii.gz")}
        for name, fn in readers.items():
            sec = _best_of(fn, args.repeats)
            print(json.dumps({"bench": "read", "reader": name, **common, "seconds": round(sec, 4),
                              "slices_per_s": round(args.slices / sec, 1)}))
    gt = ph.labels["liver"]
    pred = ndimage.binary_dilation(np.roll(gt, 2, axis=0), iterations=1)  # shifted and a little too large
    secs = {"dice_3d": _best_of(lambda: dice_3d(pred, gt), args.repeats),
            "hd95_cropped": _best_of(lambda: hausdorff_95(pred, gt, spacing), args.repeats),
            "hd95_whole_volume": _best_of(lambda: _hd95_whole(pred, gt, spacing), args.repeats)}
    assert abs(hausdorff_95(pred, gt, spacing) - _hd95_whole(pred, gt, spacing)) < 1e-9  # one metric, two speeds
    for name, sec in secs.items():
        print(json.dumps({"bench": "metric", "metric": name, **common, "label_voxels": int(gt.sum()),
                          "seconds": round(sec, 4), "volumes_per_s": round(1 / sec, 2)}))
    print(json.dumps({"bench": "metric", "ratio": "hd95_whole_over_cropped",
                      "value": round(secs["hd95_whole_volume"] / secs["hd95_cropped"], 2)}))


if __name__ == "__main__":
    main()
