"""Real-data quality of a CPU preset's pipeline (`--preset lite` or `small`) on a CPU budget. Prints JSON
lines. Not a CI test.

    python benchmarks/bench_quality.py vqa-rad --preset lite --data ../shared/data/vqa_rad --steps 20,300 \
        --work runs/q_vqarad
    python benchmarks/bench_quality.py kvasir --preset lite --data ../shared/data/kvasir_seg --steps 10,20,400,40 \
        --work runs/q_kvasir

vqa-rad: stages I and II (VQA-RAD has no masks, so no grounding expert and no MoE) on the train
split; on the test split, side by side: the model with the real image, the same model with a blank
(black) image, the majority answer, and a question-only baseline (TF-IDF of the question + logistic
regression over the training answers). Closed accuracy and open exact match after normalisation.
kvasir: stages I-IV on the train split of `medplib data build --source kvasir` (polyp grounding plus
the builder's VQA / region questions); mDice over the held-out test split through `generate`, for
the dense grounding expert (after stage III, measured before stage IV starts) and the final MoE.
`--stageN key=value ...` adds overrides to stage N (e.g. `--stage3 "data.augment=[hflip,vflip]"`);
`--device cuda` evaluates on a GPU. Each run reports the training CPU minutes it used (evaluation
excluded).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from medplib.api import MedPLIB
from medplib.config import preset as get_preset
from medplib.data.loading import load_sample
from medplib.data.schema import IMAGE_TOKEN, read_jsonl
from medplib.evaluation.masks import mask_overlap
from medplib.evaluation.vqa import normalize_medplib
from medplib.training.loop import train
from medplib.training.pipeline import STAGES, default_recipes_dir, preset_settings, run_pipeline, stage_overrides
from medplib.training.recipe import load_recipe

# The preset's laptop settings (training.pipeline.PRESET_SETTINGS) apply as in `medplib pipeline`.
QUIET = ["log.progress=false"]


def _build(source: str, src: Path, out: Path) -> Path:
    if not (out / "samples.jsonl").is_file():
        subprocess.run([sys.executable, "-m", "medplib.cli", "data", "build", str(src), "--source", source,
                        "--out", str(out)], check=True, capture_output=True)
    return out


_EVAL = {"cpu": 0.0, "wall": 0.0}  # seconds spent evaluating, not training


def _cpu_minutes() -> float:
    return time.process_time() / 60


def _log(text: str) -> None:
    print(json.dumps({"log": text}), flush=True)


def _train_stages(preset: str, stages: tuple[str, ...], data: Path, work: Path, steps: list[int],
                  extra: dict[str, list[str]]) -> None:
    """Train the first stages of the preset's pipeline into WORK/run (a stage already trained is kept)."""
    cfg = get_preset(preset)
    for k, stage in enumerate(stages):
        over = [*stage_overrides(stage, preset, data, work / "run", cfg), *preset_settings(preset, stage), *QUIET,
                *extra.get(stage, []), f"train.steps={steps[k]}"]
        recipe = load_recipe(default_recipes_dir() / f"{stage}.yaml", over)
        if not (Path(recipe.output_dir) / "model" / "model.safetensors").is_file():
            train(recipe, log=_log)


def blind_baseline(train_qa: list[tuple[str, str]], test_qa: list[tuple[str, str, str]]) -> dict[str, float]:
    """TF-IDF of the question + logistic regression over the training answers, and the majority answer."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True)
    x = vec.fit_transform([q for q, _ in train_qa])
    y = [normalize_medplib(a) for _, a in train_qa]
    clf = LogisticRegression(max_iter=2000, C=10.0).fit(x, y)
    pred = clf.predict(vec.transform([q for q, _, _ in test_qa]))
    majority = Counter(y).most_common(1)[0][0]
    return {
        **_score(list(pred), test_qa, "blind_tfidf_logreg"),
        **_score([majority] * len(test_qa), test_qa, "majority"),
    }


def _score(pred: list[str], test_qa: list[tuple[str, str, str]], name: str) -> dict[str, float]:
    closed = [normalize_medplib(p) == normalize_medplib(a) for p, (_, a, t) in zip(pred, test_qa) if t == "closed"]
    opened = [normalize_medplib(p) == normalize_medplib(a) for p, (_, a, t) in zip(pred, test_qa) if t == "open"]
    return {f"{name}_closed_accuracy": round(float(np.mean(closed)), 4),
            f"{name}_open_exact_match": round(float(np.mean(opened)), 4)}


def vqa_rad(preset: str, src: Path, work: Path, steps: list[int], extra: dict[str, list[str]], device: str) -> None:
    data = _build("vqa-rad", src, work / "data")
    samples = list(read_jsonl(data / "samples.jsonl"))
    train_qa = [(s.conversations[0].content.replace(IMAGE_TOKEN, "").strip(), s.conversations[1].content)
                for s in samples if s.split == "train"]
    test = [s for s in samples if s.split == "test"]
    test_qa = [(s.conversations[0].content.replace(IMAGE_TOKEN, "").strip(), s.conversations[1].content,
                s.answer_type or "open") for s in test]
    print(json.dumps({"bench": "vqa_rad", "n_train": len(train_qa), "n_test": len(test_qa),
                      **blind_baseline(train_qa, test_qa)}), flush=True)

    start = time.time()
    _train_stages(preset, STAGES[:2], data, work, steps, extra)
    m = MedPLIB.from_pretrained(work / "run" / "stage2" / "model", device=device)
    real, blank = [], []
    for s in test:
        loaded = load_sample(s, data)
        q = s.conversations[0].content.replace(IMAGE_TOKEN, "").strip()
        real.append(m.generate(loaded.image, q, max_new_tokens=12).text)
        blank.append(m.generate(np.zeros_like(loaded.image), q, max_new_tokens=12).text)
    print(json.dumps({"bench": "vqa_rad", "preset": preset, "steps": steps, "extra": extra,
                      "wall_minutes": round((time.time() - start) / 60, 1),
                      "cpu_minutes": round(_cpu_minutes(), 1), **_score(real, test_qa, "model_image"),
                      **_score(blank, test_qa, "model_blank_image")}), flush=True)


def _kvasir_mdice(folder: Path, data: Path, test: list, device: str) -> tuple[float, int]:
    """Mean Dice over the test grounding samples through `generate`; an answer without a mask counts 0."""
    m = MedPLIB.from_pretrained(folder, device=device)
    dices, no_mask = [], 0
    for s in test:
        loaded = load_sample(s, data)
        gt = loaded.target_masks[0]
        ans = m.generate(loaded.image, s.conversations[0].content.replace(IMAGE_TOKEN, "").strip())
        no_mask += not ans.masks
        pred = ans.masks[0] if ans.masks else np.zeros_like(gt)
        dices.append(float(mask_overlap(pred[None], gt[None]).dice[0]))
    return float(np.mean(dices)), no_mask


def kvasir(preset: str, src: Path, work: Path, steps: list[int], extra: dict[str, list[str]], device: str) -> None:
    data = _build("kvasir", src, work / "data")
    test = [s for s in read_jsonl(data / "samples.jsonl") if s.split == "test" and s.task == "grounding"]
    start = time.time()

    def train_wall() -> float:
        return round((time.time() - start - _EVAL["wall"]) / 60, 1)

    # Stages I-III first, so that the dense grounding expert is measured before stage IV starts.
    _train_stages(preset, STAGES[:3], data, work, steps, extra)
    report(work / "run" / "stage3" / "model", "stage3_dense_grounding_expert", data, test, device,
           {"steps": steps[:3], "extra": {k: v for k, v in extra.items() if k != "stage4_moe"},
            "train_wall_minutes": train_wall()})
    run_pipeline(preset, data, work / "run", steps=steps, overrides=QUIET, stage_extra=extra, log=_log)
    report(work / "run" / "model", "final_moe", data, test, device,
           {"steps": steps, "stage4_extra": extra["stage4_moe"], "train_wall_minutes": train_wall()})


def report(folder: Path, name: str, data: Path, test: list, device: str, info: dict) -> None:
    """Print one model's test mDice; the CPU minutes exclude evaluation (this process's training time)."""
    cpu, wall = time.process_time(), time.time()
    mdice, no_mask = _kvasir_mdice(folder, data, test, device)
    _EVAL["cpu"] += time.process_time() - cpu
    _EVAL["wall"] += time.time() - wall
    print(json.dumps({"bench": "kvasir_grounding", "model": name, **info, "n_test": len(test), "mdice": round(mdice, 4),
                      "answers_without_mask": no_mask,
                      "train_cpu_minutes": round((time.process_time() - _EVAL["cpu"]) / 60, 1)}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("task", choices=["vqa-rad", "kvasir"])
    ap.add_argument("--preset", default="lite", choices=["lite", "small"], help="the CPU preset to train")
    ap.add_argument("--data", type=Path, required=True, help="the raw dataset folder")
    ap.add_argument("--work", type=Path, required=True, help="folder for the built data and the runs")
    ap.add_argument("--steps", required=True, help="optimizer steps per stage (2 for vqa-rad, 4 for kvasir)")
    for k, stage in enumerate(STAGES, 1):
        ap.add_argument(f"--stage{k}", nargs="*", default=[], help=f"more {stage} overrides (key=value)")
    ap.add_argument("--device", default="cpu", help="device for the evaluation (training follows accelerate)")
    args = ap.parse_args()
    steps = [int(x) for x in args.steps.split(",")]
    extra = {stage: getattr(args, f"stage{k}") for k, stage in enumerate(STAGES, 1)}
    if args.task == "vqa-rad":
        vqa_rad(args.preset, args.data, args.work, steps, extra, args.device)
    else:
        kvasir(args.preset, args.data, args.work, steps, extra, args.device)


if __name__ == "__main__":
    main()
