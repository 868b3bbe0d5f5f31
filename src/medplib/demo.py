"""`medplib demo`: train a model on project-made phantoms, then answer a VQA, a region and a
grounding question about phantoms it has never seen, and write the mask overlays as PNGs.

The trained model is saved under `<out>/model` and reused by the next run.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image
from scipy import ndimage

from medplib.api import MedPLIB
from medplib.data.phantoms import MODALITIES, Phantom, make_phantom
from medplib.data.schema import PointRegion, Turn
from medplib.processing import Encoded
from medplib.training.fit import fit
from medplib.visualize import overlay

VQA_Q = "What modality is this image?"
REGION_Q = "What is in <region>?"
SEG_Q = "Please segment the {label}."
SEG_A = "Sure, it is [SEG]."


@dataclass
class DemoResult:
    model_dir: Path
    trained: bool
    answers: list[dict]
    mean_dice: float
    train_seconds: float


def _click(mask: np.ndarray) -> PointRegion:
    """The most interior pixel of a structure: where a person would click."""
    y, x = np.unravel_index(ndimage.distance_transform_edt(mask).argmax(), mask.shape)
    return PointRegion(point=(x + 0.5, y + 0.5))


def _phantoms(n: int, seed: int, size: int) -> list[Phantom]:
    return [make_phantom(MODALITIES[i % len(MODALITIES)], seed=seed + i, size=size) for i in range(n)]


def _items(m: MedPLIB, phantoms: list[Phantom]) -> list[Encoded]:
    """Per phantom: one modality question, one region question and one grounding per structure."""
    items = []
    for ph in phantoms:
        items.append(m.processor.encode(ph.image, [Turn(role="user", content=VQA_Q), Turn(role="assistant", content=ph.modality)]))
        for label, mask in ph.masks.items():
            items.append(m.processor.encode(
                ph.image, [Turn(role="user", content=REGION_Q), Turn(role="assistant", content=label)], [_click(mask)]))
            items.append(m.processor.encode(
                ph.image, [Turn(role="user", content=SEG_Q.format(label=label)), Turn(role="assistant", content=SEG_A)],
                target_masks=[mask]))
    return items


def run_demo(
    out: Path, *, preset: str = "small", n_train: int = 72, steps: int = 240, batch_size: int = 8,
    lr: float = 1e-3, size: int = 256, seed: int = 0, retrain: bool = False,
    log: Callable[[str], None] = print,
) -> DemoResult:
    out = Path(out)
    model_dir = out / "model"
    trained, seconds = False, 0.0
    if (model_dir / "config.json").is_file() and not retrain:
        log(f"reusing the trained model in {model_dir} (pass --retrain to train again)")
        m = MedPLIB.from_pretrained(model_dir)
    else:
        m = MedPLIB.from_preset(preset, seed=seed)
        items = _items(m, _phantoms(n_train, seed, size))
        n_params = sum(p.numel() for p in m.model.parameters())
        log(f"training the '{preset}' model ({n_params / 1e6:.1f}M parameters) on {len(items)} samples "
            f"from {n_train} phantoms for {steps} steps")
        start = time.time()

        def progress(step: int, parts: dict[str, float]) -> None:
            if step % 20 == 0 or step == steps - 1:
                log(f"  step {step + 1:4d}/{steps}  loss {parts['loss']:.3f}  ce {parts['ce']:.3f}  "
                    f"dice {parts['dice']:.3f}  ({time.time() - start:.0f}s)")

        fit(m, items, steps=steps, batch_size=batch_size, lr=lr, seed=seed, on_step=progress)
        seconds = time.time() - start
        m.save_pretrained(model_dir)
        trained = True
        log(f"saved the model to {model_dir}")

    answers, dices = [], []
    for k, ph in enumerate(_phantoms(3, seed + 10_000, size)):  # seeds never used for training
        label, mask = max(ph.masks.items(), key=lambda kv: kv[1].sum())
        vqa = m.generate(ph.image, VQA_Q)
        click = _click(mask)
        region = m.generate(ph.image, REGION_Q, [click])
        seg = m.generate(ph.image, SEG_Q.format(label=label))
        pred = seg.masks[0] if seg.masks else np.zeros_like(mask)
        dice = float(2 * (pred & mask).sum() / max(1, pred.sum() + mask.sum()))
        dices.append(dice)
        png = out / f"demo_{k}_{ph.modality}.png"
        disc = np.zeros_like(mask)  # the click, drawn as a small square outline
        cx, cy = (int(v) for v in click.point)
        disc[max(0, cy - 4): cy + 5, max(0, cx - 4): cx + 5] = True
        side = np.concatenate([ph.image, overlay(ph.image, [pred], regions=[disc])], axis=1)
        Image.fromarray(side).save(png)
        row = {"modality": ph.modality, "vqa": {"q": VQA_Q, "a": vqa.text, "truth": ph.modality},
               "region": {"q": REGION_Q, "point": click.point, "a": region.text, "truth": label},
               "grounding": {"q": SEG_Q.format(label=label), "a": seg.text, "dice": round(dice, 3)},
               "overlay": str(png)}
        answers.append(row)
        log(f"[{ph.modality}] Q: {VQA_Q}  A: {vqa.text!r}  (truth {ph.modality!r})")
        log(f"[{ph.modality}] Q: {REGION_Q} (click at {click.point[0]:.0f},{click.point[1]:.0f})  A: {region.text!r}  (truth {label!r})")
        log(f"[{ph.modality}] Q: {SEG_Q.format(label=label)}  A: {seg.text!r}  Dice {dice:.3f}  -> {png}")
    result = DemoResult(model_dir, trained, answers, float(np.mean(dices)), seconds)
    (out / "demo.json").write_text(json.dumps({"answers": answers, "mean_dice": result.mean_dice,
                                                "train_seconds": seconds, "preset": m.config.name}, indent=2))
    log(f"mean Dice on unseen phantoms: {result.mean_dice:.3f}; results in {out / 'demo.json'}")
    return result
