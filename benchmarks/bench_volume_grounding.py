"""A model trained on 2-D slices segments a real 3-D volume: white and grey matter on the MNI152 brain
MRI that `nilearn` ships, trained on axial slices of the inferior half and evaluated on the whole
volume along the coronal axis (and, for comparison, the axial axis it was trained on), against an
intensity-threshold baseline fitted on the same training slices. Then volume inference speed in
slices/s on a procedural CT phantom, batch 1 vs 8, side by side. Prints JSON lines. Not a CI test.

    python benchmarks/bench_volume_grounding.py --work runs/q_brain --steps 200

Labels: tissue probability > 0.5 of the map's maximum (as `medplib.data.mni`), white matter first.
Training: stage III (the grounding expert: LoRA on the LLM's MLPs, the mask decoder, the [SEG]
projection and embedding, and the pixel encoder's new neck) of the `lite` preset, started from the
preset itself (its pretrained LLM and ImageNet pixel backbone; no stage I/II: the grounding path does
not go through the vision projector); the slices are cut by `volume_slices`, exactly as inference
cuts them (RAS view, one percentile window for the whole volume). Scores: 3-D Dice and HD95 in mm
over the whole volume and over its superior half, whose voxels no training slice showed.
The baseline: the intensity band [lo, hi] (white matter: hi = max) that maximises Dice over the
training slices' voxels, applied to every voxel of the volume.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from medplib.api import MedPLIB
from medplib.config import preset as get_preset
from medplib.data.builder import BuildConfig, build_samples
from medplib.data.mni import T1, TISSUES, template_dir
from medplib.data.phantoms3d import make_phantom_volume
from medplib.data.schema import write_jsonl
from medplib.data.volume_cases import read_case, volume_slices
from medplib.evaluation.volume_eval import run_volume_benchmark
from medplib.evaluation.volumes import score_volume
from medplib.inference import Predictor
from medplib.training.loop import train
from medplib.training.pipeline import default_recipes_dir, preset_settings, unfreeze_for
from medplib.training.recipe import load_recipe

PRESET = "lite"
STAGE = "stage3_pg_expert"
LABELS = ("white matter", "gray matter")


def emit(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def write_case(folder: Path) -> Path:
    """The MNI152 T1 and its tissue label map as a volume case (image.nii.gz, labels.nii.gz, labels.json)."""
    src = template_dir()
    t1 = nib.load(str(src / T1))
    label_map = np.zeros(t1.shape, dtype=np.uint8)
    for value, label in reversed(list(enumerate(LABELS, start=1))):  # white matter wins a (rare) tie
        p = np.asarray(nib.load(str(src / TISSUES[label])).dataobj, dtype=np.float32)
        label_map[p > 0.5 * float(p.max())] = value
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(t1.dataobj, dtype=np.float32), t1.affine), str(folder / "image.nii.gz"))
    nib.save(nib.Nifti1Image(label_map, t1.affine), str(folder / "labels.nii.gz"))
    (folder / "labels.json").write_text(json.dumps({str(v): lab for v, lab in enumerate(LABELS, start=1)}))
    return folder


def halves(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(I, J, K) bool: the inferior half (axial slices k < K/2, trained on) and the superior half of a volume
    read in RAS voxel order (axis 2 runs inferior -> superior)."""
    inferior = np.zeros(shape, dtype=bool)
    inferior[:, :, : shape[2] // 2] = True
    return inferior, ~inferior


def build_training_data(case_dir: Path, data: Path) -> int:
    """Axial slices (axis 2) of the inferior half, grounding questions only, every slice in train."""
    case = read_case(case_dir)
    n = case.volume.shape[2]
    inferior = (it for it in volume_slices([case], data, axis=2) if it.meta["slice"] < n // 2)
    cfg = BuildConfig(tasks=("grounding",), val_fraction=0.0, test_fraction=0.0)
    return write_jsonl(build_samples(inferior, data, cfg), data / "samples.jsonl")


def train_grounding(data: Path, out: Path, steps: int) -> None:
    """Stage III of the preset into OUT (OUT/model)."""
    over = [f"data.dir={data}", f"output_dir={out}", "model.path=null", f"model.preset={PRESET}",
            f"unfreeze=[{','.join(unfreeze_for(STAGE, get_preset(PRESET)))}]", "train.mixed_precision=fp32",
            *preset_settings(PRESET, STAGE), "log.progress=false", f"train.steps={steps}",
            "data.augment=[hflip,vflip,transpose]"]
    train(load_recipe(default_recipes_dir() / f"{STAGE}.yaml", over), log=lambda s: emit(log=s))


def fit_threshold(values: np.ndarray, gt: np.ndarray, white: bool) -> tuple[float, float]:
    """The intensity band [lo, hi) with the best Dice on the training voxels, over band edges at every
    percentile (white matter, the brightest tissue in T1: hi = the maximum). values, gt: (N,) voxels."""
    edges = np.unique(np.percentile(values, np.arange(0, 100.5, 0.5)))
    edges[-1] = np.nextafter(edges[-1], np.inf)  # the top edge includes the maximum
    n_all = np.concatenate([[0], np.cumsum(np.histogram(values, edges)[0])])
    n_gt = np.concatenate([[0], np.cumsum(np.histogram(values[gt], edges)[0])])
    hi_choices = [len(edges) - 1] if white else range(1, len(edges))
    best = max(((lo, hi) for hi in hi_choices for lo in range(hi)),
               key=lambda b: 2 * (n_gt[b[1]] - n_gt[b[0]]) / max(n_all[b[1]] - n_all[b[0]] + n_gt[-1], 1))
    return float(edges[best[0]]), float(edges[best[1]])


def score(pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, ...], half: np.ndarray) -> dict[str, float]:
    whole, upper = score_volume(pred, gt, spacing), score_volume(pred & half, gt & half, spacing)
    return {"dice": round(whole.dice, 4), "hd95_mm": round(whole.hd95_mm, 2),
            "dice_unseen_half": round(upper.dice, 4), "hd95_unseen_half_mm": round(upper.hd95_mm, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="folder for the case, the data and the run")
    ap.add_argument("--steps", type=int, default=200, help="stage III optimizer steps")
    ap.add_argument("--axes", type=int, nargs="+", default=[1, 2], help="evaluation axes (1 coronal, 2 axial)")
    ap.add_argument("--phantom-slices", type=int, default=32, help="slices of the speed phantom")
    args = ap.parse_args()
    case_dir = args.work / "cases" / "mni152"
    if not (case_dir / "labels.json").is_file():
        write_case(case_dir)
    case = read_case(case_dir)
    data = args.work / "data"
    if not (data / "samples.jsonl").is_file():
        emit(bench="brain_volume", training_samples=build_training_data(case_dir, data))

    train_voxels, half = halves(case.volume.shape)
    for label in LABELS:
        gt = case.labels[label]
        band = fit_threshold(case.volume.voxels[train_voxels], gt[train_voxels], white=label == "white matter")
        pred = (case.volume.voxels >= band[0]) & (case.volume.voxels < band[1])
        emit(bench="brain_volume", model="intensity_threshold", label=label, band=[round(b, 2) for b in band],
             **score(pred, gt, case.volume.spacing, half))

    cpu, wall = time.process_time(), time.time()
    model_dir = args.work / "run" / "stage3" / "model"
    if (model_dir / "model.safetensors").is_file():
        emit(bench="brain_volume", reused=str(model_dir))  # its training figures are in the first run's output
    else:
        train_grounding(data, model_dir.parent, args.steps)
        emit(bench="brain_volume", trained=str(model_dir), steps=args.steps,
             train_cpu_minutes=round((time.process_time() - cpu) / 60, 1),
             train_wall_minutes=round((time.time() - wall) / 60, 1))

    for axis in args.axes:
        out = args.work / f"eval_axis{axis}"
        metrics = run_volume_benchmark(model_dir, case_dir.parent, out, split="all", axis=axis,
                                       log=lambda s: emit(log=s))
        for label in LABELS:
            pred = np.asarray(nib.load(str(out / "masks" / f"mni152--{label.replace(' ', '_')}.nii.gz")).dataobj) > 0
            emit(bench="brain_volume", model=f"medplib_{PRESET}_stage3", axis=axis,
                 axis_name={0: "sagittal", 1: "coronal", 2: "axial"}[axis], label=label,
                 **score(pred, case.labels[label], case.volume.spacing, half),
                 slices_per_s=round(metrics["slices_per_s"], 2))

    # Inference speed on a phantom: the towers batched over slices vs one slice at a time, a fresh feature
    # cache each run; two rounds, the first warms allocators (reported with round=0).
    phantom = make_phantom_volume("ct", seed=0, shape=(128, 128, args.phantom_slices))
    model = MedPLIB.from_pretrained(model_dir)
    for rnd in (0, 1):
        for batch_size in (1, 8):
            predictor = Predictor(model, cache_entries=args.phantom_slices)
            predictor.set_volume(phantom.volume, axis=2)
            t = time.perf_counter()
            res = predictor.ask_volume("Please segment the liver.", slices="all", batch_size=batch_size)
            sec = time.perf_counter() - t
            emit(bench="volume_inference", round=rnd, phantom_shape=list(phantom.volume.shape), batch_size=batch_size,
                 seconds=round(sec, 2), slices_per_s=round(len(res.slices) / sec, 2),
                 image_s=round(res.timings["image_s"], 2), generate_s=round(res.timings["generate_s"], 2))

if __name__ == "__main__":
    main()
