"""How much of the region-label answer the frozen vision features already hold: a linear probe.

For every region-label question of a `medplib demo` data folder (train and test splits), the region is
rasterised as the model sees it (`Processor.rasterize_region`) and the ImageNet EfficientNet-Lite0 maps at
strides 8, 16 and 32 (and the 1280-channel head map the `lite` region encoder reads) are sampled at the
region's pixels and mean-pooled, as `RegionEncoder` pools them; the region's geometry is the encoder's
`spatial` term. A logistic regression per feature set is fitted on the train questions and scored on the
test questions (all of them, and the first 50, which `medplib demo` scores). An upper bound for what the
region encoder can pass to the LLM from each level, without the LLM. Prints one JSON line per feature set:
    python benchmarks/probe_region_features.py --data runs/demo/data
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from medplib.config import preset
from medplib.data.loading import load_sample
from medplib.data.schema import read_jsonl
from medplib.model import packaged
from medplib.model.efficientnet import EfficientNetLite0, load_imagenet
from medplib.model.regions import RegionEncoder
from medplib.processing import Processor
from medplib.tokenizer import build_tokenizer

LEVELS = ("s8", "s16", "s32", "head")
FEATURE_SETS = (("geometry",), ("head",), ("head", "geometry"), ("s16", "geometry"), ("s8", "geometry"),
                ("s8", "s16", "head", "geometry"))
DEMO_SCORED = 50  # `medplib demo` scores the first 50 test questions of a kind


def region_features(data: Path) -> dict[str, list[tuple[dict[str, np.ndarray], str, str]]]:
    """split -> [(features by name, answer, modality)] for the region-label questions of data/demo.jsonl."""
    cfg = preset("lite")
    net = EfficientNetLite0()
    load_imagenet(net, packaged.resolve(cfg.vision.pretrained))
    net.eval()
    proc = Processor(cfg, build_tokenizer(cfg.tokenizer))
    maps: dict[str, tuple[object, tuple[int, int]]] = {}
    rows: dict[str, list] = {"train": [], "test": []}
    for s in read_jsonl(data / "demo.jsonl"):
        if s.task != "region_vqa" or s.meta.get("kind") != "label" or s.split not in rows:
            continue
        loaded = load_sample(s, data)
        if s.image not in maps:
            im = proc.prepare_image(loaded.image)
            with torch.no_grad():
                maps[s.image] = (net(im.vision_pixels[None]), im.original_hw)
        feats, hw = maps[s.image]
        mask = proc.rasterize_region(s.regions[0], hw, loaded.region_masks[0])
        ys, xs = torch.nonzero(mask, as_tuple=True)
        size = mask.shape[-1]
        pts = torch.stack([(xs.float() + 0.5) / size * 2 - 1, (ys.float() + 0.5) / size * 2 - 1], -1).view(1, 1, -1, 2)
        row = {"geometry": RegionEncoder._geometry(mask).numpy()}
        for name in LEVELS:
            g = getattr(feats, name)
            if name == "head":  # the vision tower layer-normalises the head map per position (model/vision.py)
                g = F.layer_norm(g.permute(0, 2, 3, 1), g.shape[1:2]).permute(0, 3, 1, 2)
            row[name] = F.grid_sample(g, pts, align_corners=False).view(g.shape[1], -1).mean(1).numpy()
        rows[s.split].append((row, s.conversations[1].content, s.modality or ""))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, required=True, help="the data folder of a `medplib demo` run")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = region_features(args.data)
    train, test = rows["train"], rows["test"]
    y_test = np.array([r[1] for r in test])

    def x(rs: list, names: tuple[str, ...]) -> np.ndarray:
        return np.stack([np.concatenate([r[0][n] for n in names]) for r in rs])

    for names in FEATURE_SETS:
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
        probe.fit(x(train, names), [r[1] for r in train])
        right = probe.predict(x(test, names)) == y_test
        ct = [ok for ok, r in zip(right, test) if r[2] == "ct"]
        print(json.dumps({"bench": "region_feature_probe", "features": "+".join(names), "n_train": len(train),
                          "n_test": len(test), "accuracy": round(float(right.mean()), 3),
                          f"accuracy_first_{DEMO_SCORED}": round(float(right[:DEMO_SCORED].mean()), 3),
                          "accuracy_ct": round(float(np.mean(ct)), 3) if ct else None}), flush=True)


if __name__ == "__main__":
    main()
