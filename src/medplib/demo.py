"""`medplib demo`: build a data set of phantoms and real brain MRI slices, train the `lite` model (ImageNet
EfficientNet-Lite0 towers, SmolLM2-135M-Instruct) through stages I-IV (the real pipeline: alignment,
vision-language expert, pixel-grounding expert, upcycled 2-expert MoE), evaluate it on the held-out test
split, answer a VQA, a region and a grounding question about unseen images, and write mask overlays as PNGs.

Everything lives under OUT: `data/` (images, masks, JSONL), `run/` (one folder per stage, checkpoints,
metrics, TensorBoard) and `run/model` (the final model). A second run reuses the trained model;
an interrupted run continues where it stopped (finished stages are skipped, the current stage
resumes from its last checkpoint). The laptop settings of each preset (batch, learning rates) live in
`medplib.training.pipeline.PRESET_SETTINGS`; the demo chooses the step counts and, for lite, what the stages
train (STAGE_EXTRA).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from medplib.api import Answer, MedPLIB
from medplib.data.builder import BuildConfig, build_samples
from medplib.data.loading import LoadedSample, load_sample
from medplib.data.mni import mni_items
from medplib.data.phantoms import phantom_items
from medplib.data.schema import IMAGE_TOKEN, PointRegion, read_jsonl, write_jsonl
from medplib.evaluation.masks import mask_overlap
from medplib.evaluation.runner import grounding_masks
from medplib.evaluation.vqa import normalized_match
from medplib.inference import Predictor, Query
from medplib.training.data import VL_EXPERT
from medplib.training.pipeline import run_pipeline
from medplib.visualize import overlay

# Optimizer steps for stages I-IV at a global batch of 8, per preset. From random weights (small), stage I
# (captions and VQA) is where the towers learn that answers depend on the image; grounding learns slowest.
# lite: what 15 minutes on a 2-core CPU pays for. With STAGE_EXTRA a stage II step takes 2.4 s instead of 2.8 and a
# stage IV step (routers alone: no backward through the LLM) 2.2 s instead of 3.7; stage III, the slowest
# learner, gets the seconds saved.
DEMO_STEPS = {"lite": (20, 90, 75, 40), "small": (120, 120, 240, 160)}
DEFAULT_PRESET = "lite"
# The questions the demo trains on: captions (stage I's alignment) and the three kinds it scores. In a
# 15-minute CPU budget each extra kind takes steps from these (measured with lite through stages I-IV at
# 20 / 35 / 60 / 25 steps, held-out: modality 0.25 -> 0.60, region label 0.08 -> 0.32, grounding mDice
# 0.14 -> 0.36 when the other VQA, region and box kinds are left out).
DEMO_TASKS = ("caption", "grounding")
DEMO_KINDS = ("modality", "label")
# lite: what each stage trains on, beyond the recipes and the preset's laptop settings (held-out figures of each
# choice in docs/BENCHMARKS.md, "Region labels"; the small preset's demo keeps the recipes). Region labels are the
# kind learnt slowest: 0.58 after the demo's 90-step stage II on the recipes' own data. Stage I also trains the
# region encoder on the region questions (published: the projector only), so stage II starts from region tokens
# the LLM already reads, and stage II sees three region questions to one modality question (the file's mix has
# 55%): 0.86 after stage II, modality 1.00. Stage IV trains the routers alone, by the task-supervised route loss
# (model/moe.py), with the tokens before the question (the image) sent to the vision-language expert: the experts
# stay as stages II and III left them. With the lite default (LoRA and the vocabulary trained at lr 1e-3 by every
# task's loss) the routers sent most tokens to the grounding expert and region labels fell back to 0.58; routers
# alone kept 0.78, for 0.03 of mDice.
STAGE_EXTRA = {"lite": {
    "stage1_alignment": ('data.sources=[{file: "*.jsonl", tasks: [caption, vqa, region_vqa]}]',
                         "trainable=[projector,region_encoder]"),
    "stage2_vl_expert": ('data.sources=[{file: "*.jsonl", tasks: [region_vqa], ratio: 0.75}, '
                         '{file: "*.jsonl", tasks: [vqa], ratio: 0.25}]',),
    "stage4_moe": ("trainable=[router]", "lora.r=0", "loss.route=1.0", "loss.ce=0", "loss.dice=0", "loss.bce=0",
                   "loss.focal=0", "optim.lr=5e-2", f"upcycle.prefix_expert={VL_EXPERT}"),
}}
MAX_EVAL = 50  # test questions per task
EVAL_BATCH = 8  # test questions decoded together
TEST_FRACTION = 0.2  # of the image groups: enough unseen images for >= 50 questions per task
# Per image also one question naming up to this many structures, one [SEG] each (builder's multi_grounding):
# stage III then trains several masks per LLM pass. Scored questions name one structure, as before.
MULTI_GROUNDING = 4
@dataclass
class DemoResult:
    model_dir: Path
    trained: bool
    answers: list[dict]
    metrics: dict[str, float]
    train_seconds: float


def _grounding_score(s: LoadedSample, answer: Answer) -> tuple[np.ndarray, float]:
    """The answer's mask and its Dice as `medplib eval` scores grounding: the union of the answer's masks against
    the union of the reference's targets (runner.grounding_masks), by medplib.evaluation.masks' rules, so that a
    question about an absent structure answered without a mask scores 1."""
    gt, pred = grounding_masks(s, answer.masks)
    return pred, float(mask_overlap(pred, gt).dice[0])


def write_demo_dataset(data: Path, n_phantoms: int, seed: int, size: int = 256,
                       log: Callable[[str], None] = print) -> Path:
    """Phantoms and MNI152 brain MRI slices with their captions, modality, region-label and grounding questions
    -> data/demo.jsonl."""
    out = data / "demo.jsonl"
    items = [*phantom_items(data, n_phantoms, seed, size), *mni_items(data)]
    n_mni = sum(1 for i in items if i.source == "mni152")
    samples = [s for s in build_samples(items, data, BuildConfig(seed=seed, test_fraction=TEST_FRACTION,
                                                                    multi_grounding=MULTI_GROUNDING))
               if s.task in DEMO_TASKS or s.meta.get("kind") in DEMO_KINDS]
    write_jsonl(samples, out)
    log(f"wrote {len(items) - n_mni} phantoms and {n_mni} MNI152 brain MRI slices with {len(samples)} questions "
        f"to {out}")
    return out


def _click(mask: np.ndarray) -> PointRegion:
    """The most interior pixel of a structure: where a person would click."""
    y, x = np.unravel_index(ndimage.distance_transform_edt(mask).argmax(), mask.shape)
    return PointRegion(point=(x + 0.5, y + 0.5))


def _question(s: LoadedSample) -> str:
    return s.sample.conversations[0].content.replace(IMAGE_TOKEN, "").strip()


def _answer_all(p: Predictor, xs: Sequence[LoadedSample], regions: bool) -> list[Answer]:
    """Each sample's question answered about its image, EVAL_BATCH at a time (`Predictor.ask_batch`: greedy
    answers equal one-at-a-time answers, in less time on a CPU)."""
    out: list[Answer] = []
    for i in range(0, len(xs), EVAL_BATCH):
        chunk = xs[i: i + EVAL_BATCH]
        queries = [Query(s.image, _question(s), s.regions if regions else (), s.region_masks if regions else None)
                   for s in chunk]
        for s, a in zip(chunk, p.ask_batch(queries)):
            if isinstance(a, Exception):  # the demo's own data: a failure here is a bug, not bad input
                raise RuntimeError(f"answering test question {s.sample.id} failed") from a
            out.append(a)
    return out


def evaluate(p: Predictor, test: Sequence[LoadedSample]) -> dict[str, float]:
    """Modality accuracy, region-label accuracy (exact match after normalisation) and grounding mDice
    on up to MAX_EVAL test questions each, answered by `p` (a Predictor, or anything with its `ask_batch`)."""
    vqa = [s for s in test if s.sample.task == "vqa" and s.sample.meta.get("kind") == "modality"][:MAX_EVAL]
    region = [s for s in test if s.sample.task == "region_vqa" and s.sample.meta.get("kind") == "label"][:MAX_EVAL]
    # absent structures too, as medplib eval; one structure per question
    seg = [s for s in test if s.sample.task == "grounding" and s.sample.meta.get("kind") != "multi"][:MAX_EVAL]

    def acc(xs: list[LoadedSample], regions: bool) -> float:
        if not xs:
            return float("nan")
        return float(np.mean([normalized_match(a.text, s.sample.conversations[1].content)
                              for s, a in zip(xs, _answer_all(p, xs, regions))]))

    dices = [_grounding_score(s, a)[1] for s, a in zip(seg, _answer_all(p, seg, False))]
    return {"modality_accuracy": acc(vqa, False), "region_label_accuracy": acc(region, True),
            "grounding_mdice": float(np.mean(dices)) if dices else float("nan"),
            "n_vqa": len(vqa), "n_region": len(region), "n_grounding": len(seg)}


def run_demo(
    out: Path, *, preset: str = DEFAULT_PRESET, n_phantoms: int = 270, steps: Sequence[int] | None = None,
    size: int = 256, seed: int = 0, retrain: bool = False, log: Callable[[str], None] = print,
) -> DemoResult:
    steps = tuple(steps) if steps is not None else DEMO_STEPS.get(preset, DEMO_STEPS["small"])
    out = Path(out)
    data, run = out / "data", out / "run"
    model_dir = run / "model"
    if retrain:
        shutil.rmtree(run, ignore_errors=True)
    jsonl = data / "demo.jsonl"
    if not jsonl.is_file():
        log(f"building {n_phantoms} phantoms and the MNI152 brain MRI slices in {data}")
        write_demo_dataset(data, n_phantoms, seed, size, log=log)

    trained, seconds = False, 0.0
    if (model_dir / "config.json").is_file():
        log(f"reusing the trained model in {model_dir} (pass --retrain to train again)")
    else:
        log(f"training '{preset}' through stages I-IV ({', '.join(map(str, steps))} steps); "
            f"progress and losses in {run}/stage*/metrics.jsonl")
        start = time.time()
        run_pipeline(preset, data, run, steps=list(steps), stage_extra=STAGE_EXTRA.get(preset), log=log)
        seconds = time.time() - start
        trained = True
    m = MedPLIB.from_pretrained(model_dir)
    log(f"the trained model is in {model_dir} (medplib ask --model {model_dir} IMAGE QUESTION)")

    test = [load_sample(s, data) for s in read_jsonl(jsonl) if s.split == "test"]
    log(f"evaluating on the held-out test split ({len(test)} questions about unseen images)")
    start = time.time()
    metrics = evaluate(Predictor(m), test)
    metrics["eval_seconds"] = round(time.time() - start, 1)
    log(f"  modality accuracy {metrics['modality_accuracy']:.2f} (n={metrics['n_vqa']}), "
        f"region label accuracy {metrics['region_label_accuracy']:.2f} (n={metrics['n_region']}), "
        f"grounding mDice {metrics['grounding_mdice']:.3f} (n={metrics['n_grounding']})")

    answers = []
    shown = [s for s in test if s.sample.task == "grounding" and s.target_masks and s.target_masks[0] is not None]
    seen: set[str] = set()
    for s in shown:
        if s.sample.image in seen or len(answers) == 3:  # three different images
            continue
        seen.add(s.sample.image)
        gt, image, name = s.target_masks[0], s.image, s.sample.modality or "image"
        label = next((t.label for t in s.sample.targets if t.label), "structure")
        vqa = m.generate(image, "What imaging modality is this?")
        click = _click(gt)
        region = m.generate(image, "What is shown in <region>?", [click])
        seg = m.generate(image, _question(s))
        pred, dice = _grounding_score(s, seg)
        png = out / f"demo_{len(answers)}_{name}.png"
        mark = np.zeros_like(gt)  # the click, drawn as a small square
        cx, cy = (int(v) for v in click.point)
        mark[max(0, cy - 4): cy + 5, max(0, cx - 4): cx + 5] = True
        Image.fromarray(np.concatenate([image, overlay(image, [pred], regions=[mark])], axis=1)).save(png)
        row = {"image": s.sample.image, "modality": name,
               "vqa": {"q": "What imaging modality is this?", "a": vqa.text},
               "region": {"q": "What is shown in <region>?", "point": click.point, "a": region.text, "truth": label},
               "grounding": {"q": _question(s), "a": seg.text, "dice": round(dice, 3)}, "overlay": str(png)}
        answers.append(row)
        log(f"[{name}] Q: What imaging modality is this?  A: {vqa.text!r}")
        log(f"[{name}] Q: What is shown in <region>? (click at {cx},{cy})  A: {region.text!r}  (truth: {label})")
        log(f"[{name}] Q: {_question(s)}  A: {seg.text!r}  Dice {dice:.3f}  -> {png}")
    result = DemoResult(model_dir, trained, answers, metrics, seconds)
    (out / "demo.json").write_text(json.dumps({"answers": answers, "metrics": metrics, "train_seconds": seconds,
                                               "preset": m.config.name, "steps": list(steps)}, indent=2) + "\n")
    log(f"results in {out / 'demo.json'}")
    return result
