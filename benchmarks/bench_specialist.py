"""The specialist baseline for Kvasir-SEG grounding: a compact U-Net trained on the same split, with the
same flips, for a CPU-minute budget, and its held-out mDice at several budgets. Prints JSON lines.
Not a CI test.

    OMP_NUM_THREADS=1 python benchmarks/bench_specialist.py --data ../shared/data/kvasir_seg --work runs/q_kvasir_aug \\
        --minutes 5,10,20,30

`--model pixel` trains medplib's grounding path alone instead (the `small` preset's pixel encoder and
mask decoder, one learned prompt in place of the LLM's [SEG]) with the same loss, data and budget: it
separates what the from-scratch SAM-style path can learn from what the LLM and stages add or cost.

The split is the one `medplib data build --source kvasir` writes (the data folder of
`bench_quality.py kvasir`, reused when it exists): 802 train / 91 test grounding images. Dice is
computed on the thresholded mask at the mask's resolution, as in `bench_quality.py kvasir`; the
minutes count this process's CPU time spent training (evaluation excluded).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medplib.config import preset
from medplib.data.augment import augment
from medplib.data.loading import load_sample
from medplib.data.schema import read_jsonl
from medplib.evaluation.masks import mask_overlap
from medplib.model.mask_decoder import MaskDecoder
from medplib.model.pixel_encoder import PixelEncoder


# A plain 4-level U-Net written here (about 30 lines) rather than pulled from a segmentation library:
# the baseline should not add a dependency to the project.
class _Block(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class UNet(nn.Module):
    """(B, 3, S, S) normalised RGB -> (B, 1, S, S) mask logits; S a multiple of 16."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        w = [width * 2**i for i in range(5)]
        self.down = nn.ModuleList([_Block(3, w[0])] + [_Block(w[i], w[i + 1]) for i in range(4)])
        self.up = nn.ModuleList([nn.ConvTranspose2d(w[i + 1], w[i], 2, stride=2) for i in reversed(range(4))])
        self.merge = nn.ModuleList([_Block(2 * w[i], w[i]) for i in reversed(range(4))])
        self.head = nn.Conv2d(w[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for k, block in enumerate(self.down):
            x = block(x if k == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for up, merge, skip in zip(self.up, self.merge, reversed(skips[:-1])):
            x = merge(torch.cat([up(x), skip], dim=1))
        return self.head(x)


class PixelPath(nn.Module):
    """medplib's grounding path without the LLM: (B, 3, S, S) -> (B, 1, S, S) mask logits (S = 256)."""

    def __init__(self) -> None:
        super().__init__()
        cfg = preset("small")
        self.encoder, self.decoder = PixelEncoder(cfg.pixel), MaskDecoder(cfg.decoder)
        self.prompt = nn.Parameter(0.02 * torch.randn(1, 1, cfg.decoder.transformer_dim))  # stands in for [SEG]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits, _ = self.decoder(self.encoder(x), self.prompt.expand(x.shape[0], -1, -1))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def _tensors(images: list[np.ndarray], masks: list[np.ndarray], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (H, W, 3) images and bool masks -> (B, 3, S, S) normalised, (B, 1, S, S) float, resized to S."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(np.stack(masks)).float()[:, None]
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        y = F.interpolate(y, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return (x - 0.5) / 0.25, y


def _loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE + soft Dice per image (the pipeline's stage III uses the same two terms)."""
    p = logits.sigmoid().flatten(1)
    g = target.flatten(1)
    dice = 1 - (2 * (p * g).sum(1) + 1) / (p.sum(1) + g.sum(1) + 1)
    return F.binary_cross_entropy_with_logits(logits, target) + dice.mean()


@torch.no_grad()
def _mdice(model: nn.Module, test: list, data: Path, size: int) -> float:
    model.eval()
    dices = []
    for s in test:
        loaded = load_sample(s, data)
        gt = loaded.target_masks[0]
        x, _ = _tensors([loaded.image], [gt], size)
        logits = model(x)
        pred = F.interpolate(logits, size=gt.shape, mode="bilinear", align_corners=False)[0, 0] > 0
        dices.append(float(mask_overlap(pred[None], gt[None]).dice[0]))
    model.train()
    return float(np.mean(dices))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="the raw Kvasir-SEG folder")
    ap.add_argument("--work", type=Path, required=True, help="folder holding (or receiving) the built data/")
    ap.add_argument("--minutes", default="5,10,20,30", help="CPU-minute budgets at which to evaluate (ascending)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--model", choices=["unet", "pixel"], default="unet")
    ap.add_argument("--size", type=int, default=None,
                    help="input side, a multiple of 16 (default 128 for the U-Net, 256 for the pixel path); "
                         "masks are scored at full size")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--augment", default="hflip,vflip,transpose", help="flips, as the pipeline's data.augment")
    args = ap.parse_args()
    budgets = [float(m) for m in args.minutes.split(",")]
    size = args.size or (128 if args.model == "unet" else 256)
    name = f"kvasir_specialist_{args.model}"

    data = args.work / "data"
    if not (data / "samples.jsonl").is_file():
        subprocess.run([sys.executable, "-m", "medplib.cli", "data", "build", str(args.data), "--source", "kvasir",
                        "--out", str(data)], check=True, capture_output=True)
    grounding = [s for s in read_jsonl(data / "samples.jsonl") if s.task == "grounding"]
    train = [load_sample(s, data) for s in grounding if s.split == "train"]
    test = [s for s in grounding if s.split == "test"]
    names = [a for a in args.augment.split(",") if a]

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = UNet() if args.model == "unet" else PixelPath()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    print(json.dumps({"bench": name, "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
                      "n_train": len(train), "n_test": len(test), "augment": names, "lr": args.lr}), flush=True)
    train_cpu, step, order = 0.0, 0, rng.permutation(len(train))
    for budget in budgets:
        while train_cpu < budget * 60:
            t0 = time.process_time()
            if len(order) < args.batch:
                order = rng.permutation(len(train))
            idx, order = order[: args.batch], order[args.batch:]
            batch = [augment(train[i], names, rng) for i in idx]
            x, y = _tensors([b.image for b in batch], [b.target_masks[0] for b in batch], size)
            loss = _loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            train_cpu += time.process_time() - t0
        print(json.dumps({"bench": name, "train_cpu_minutes": round(train_cpu / 60, 1), "steps": step,
                          "batch": args.batch, "size": size, "last_loss": round(loss.item(), 4),
                          "mdice": round(_mdice(model, test, data, size), 4)}),
              flush=True)


if __name__ == "__main__":
    main()
