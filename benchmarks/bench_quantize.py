"""fp32 vs int8 (the LLM's Linear layers, torch dynamic quantisation) on the CPU presets, side by side in one run.

For each preset the model is saved once (`small`: random init; `lite`: built from its packaged pretrained
weights), then each variant is loaded in a fresh subprocess and measured there:

    tokens_per_s   greedy decoding speed, a fixed number of tokens (end-of-answer disabled), best of repeats
    peak_rss_gb    the process's peak RSS (ru_maxrss), loading and answering included
    agreement      share of questions whose greedy answer text is identical to fp32's (real images)
    mask_dice      Dice of the int8 mask against the fp32 mask for the grounding answer on each image,
                   teacher-forced (the [SEG] hidden state comes through the quantised LLM either way)

Prints JSON lines: one per (preset, variant) and one comparison per preset. Usage:

    python benchmarks/bench_quantize.py [--presets small lite] [--images 8] [--tokens 32] [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

QUESTIONS = ("What is shown in the image?", "Please segment the polyp.")
GROUNDING = ("Please segment the polyp.", "Sure, it is [SEG].")


def _images(data: Path, n: int) -> list[np.ndarray]:
    from PIL import Image

    folder = data / "kvasir_seg" / "images"
    files = sorted(folder.glob("*.jpg"))[:n]
    if not files:
        raise SystemExit(f"no Kvasir-SEG images under {folder} (pass --data)")
    return [np.asarray(Image.open(f).convert("RGB")) for f in files]


def write_model(preset: str, folder: Path) -> None:
    from medplib.api import MedPLIB

    MedPLIB.from_preset(preset, seed=0).save_pretrained(folder)


def child(folder: Path, quantize: str | None, data: Path, n_images: int, tokens: int, repeats: int, out: Path) -> dict:
    """Load one variant and answer every question; the masks go to `out` (.npy), texts and figures are returned."""
    import dataclasses

    import torch

    from medplib.api import MedPLIB
    from medplib.data.schema import Turn

    torch.set_num_threads(1)
    images = _images(data, n_images)
    t0 = time.perf_counter()
    m = MedPLIB.from_pretrained(folder, quantize=quantize)
    load_s = time.perf_counter() - t0
    texts = [m.generate(img, q).text for img in images for q in QUESTIONS]
    masks = []
    for img in images:
        turns = [Turn(role="user", content=GROUNDING[0]), Turn(role="assistant", content=GROUNDING[1])]
        # the target only feeds the loss
        item = m.processor.encode(img, turns, target_masks=[np.zeros(img.shape[:2], bool)])
        with torch.no_grad():
            masks.append((m.model(**m.collate([item])).mask_logits[0][0] > m.config.mask_threshold).numpy())
    # Speed like for like: no id ends the answer, so both variants decode exactly `tokens` tokens.
    m.model.ids = dataclasses.replace(m.model.ids, eos=-1)
    best = float("inf")
    for _ in range(repeats):
        feats = m.image_features(images[0])
        start = time.perf_counter()
        n = len(m.generate(images[0], QUESTIONS[0], features=feats, max_new_tokens=tokens).token_ids)
        best = min(best, time.perf_counter() - start)
    np.save(out, np.stack(masks))
    llm_bytes = sum(t.numel() * t.element_size() for t in m.model.llm.state_dict().values()
                    if isinstance(t, torch.Tensor) and not t.is_quantized)
    return {"load_s": round(load_s, 2), "tokens_per_s": round(n / best, 1), "tokens": n,
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 3),
            "llm_full_precision_gb": round(llm_bytes / 1e9, 3), "texts": texts}


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum() + b.sum())
    return 1.0 if s == 0 else float(2 * (a & b).sum() / s)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", nargs="+", default=["small", "lite"])
    ap.add_argument("--images", type=int, default=8, help="Kvasir-SEG images (each asked every question)")
    ap.add_argument("--tokens", type=int, default=32, help="tokens decoded for the speed figure")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("MEDPLIB_DATA", "../shared/data")))
    ap.add_argument("--folder", type=Path, default=Path("runs/bench_quantize"), help="where the models are saved")
    ap.add_argument("--child", nargs=3, metavar=("FOLDER", "QUANTIZE", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--write", nargs=2, metavar=("PRESET", "FOLDER"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.write:
        write_model(args.write[0], Path(args.write[1]))
        return
    if args.child:
        folder, q, out = args.child
        print(json.dumps(child(Path(folder), None if q == "none" else q, args.data, args.images, args.tokens,
                               args.repeats, Path(out))))
        return
    common = ["--images", str(args.images), "--tokens", str(args.tokens), "--repeats", str(args.repeats),
              "--data", str(args.data)]
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            folder = args.folder / preset
            if not (folder / "config.json").is_file():
                subprocess.run([sys.executable, __file__, "--write", preset, str(folder)], check=True)
            rows, saved = {}, {}
            for variant in ("fp32", "int8"):
                out = Path(tmp) / f"{preset}_{variant}.npy"
                q = "none" if variant == "fp32" else variant
                res = subprocess.run([sys.executable, __file__, "--child", str(folder), q, str(out), *common],
                                     check=True, capture_output=True, text=True)
                rows[variant] = json.loads(res.stdout.strip().splitlines()[-1])
                saved[variant] = (rows[variant].pop("texts"), np.load(out))
                print(json.dumps({"bench": "quantize", "preset": preset, "variant": variant, **rows[variant]}))
            (ref_texts, ref_masks), (got_texts, got_masks) = saved["fp32"], saved["int8"]
            same = [a == b for a, b in zip(ref_texts, got_texts, strict=True)]
            dice = [_dice(a, b) for a, b in zip(ref_masks, got_masks, strict=True)]
            print(json.dumps({
                "bench": "quantize", "preset": preset, "compare": "int8_vs_fp32", "questions": len(same),
                "agreement": round(float(np.mean(same)), 3), "mask_dice_mean": round(float(np.mean(dice)), 4),
                "mask_dice_min": round(float(np.min(dice)), 4),
                "fp32_mask_foreground": round(float(ref_masks.mean()), 4),
                "speedup": round(rows["int8"]["tokens_per_s"] / rows["fp32"]["tokens_per_s"], 2),
                "peak_rss_ratio": round(rows["int8"]["peak_rss_gb"] / rows["fp32"]["peak_rss_gb"], 3),
            }))


if __name__ == "__main__":
    main()
