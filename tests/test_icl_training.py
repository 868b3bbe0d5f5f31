"""The icl training task on real chest X-ray lung masks: episodes share source, split and label, draw
examples from other images and other patients, survive the JSONL round trip, load and train (the
example images reach the loss); the stage V recipe and its `icl` section."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medplib.api import MedPLIB
from medplib.data.builder import BuildConfig, Instance, LabelledImage, build_samples, split_of
from medplib.data.loading import load_sample
from medplib.data.schema import read_jsonl, write_jsonl
from medplib.errors import ConfigError
from medplib.training.pipeline import default_recipes_dir
from medplib.training.recipe import LossSection, RecipeError, load_recipe

CXR = "covid_cxr_lungs"


@pytest.fixture(scope="module")
def lungs(shared_data: Path) -> tuple[Path, list[LabelledImage]]:
    """Eight real chest X-rays with their lung masks; the first two share a patient (group)."""
    root = shared_data / CXR
    names = sorted(p.stem for p in (root / "images").glob("*.png"))[:8]
    items = []
    for i, n in enumerate(names):
        mask = np.asarray(Image.open(root / "lung_masks" / f"{n}_mask.png").convert("L")) > 0
        items.append(LabelledImage(image=f"images/{n}.png", modality="xray", source="covid_cxr",
                                   group="patient-a" if i < 2 else n,
                                   instances=[Instance("lungs", mask, path=f"lung_masks/{n}_mask.png")]))
    return root, items


def _episodes(root: Path, items: list[LabelledImage], **kw) -> list:
    cfg = BuildConfig(tasks=["icl"], seed=3, val_fraction=0.25, test_fraction=0.25, **kw)
    return list(build_samples(items, root, cfg))


def test_episodes_share_label_and_split_and_draw_other_patients(lungs) -> None:
    root, items = lungs
    samples = _episodes(root, items)
    split = {it.image: split_of(it.group, 3, 0.25, 0.25) for it in items}
    group = {it.image: it.group for it in items}
    assert len(set(split.values())) >= 2  # the test means something: the images span splits
    assert samples and all(s.task == "icl" for s in samples)
    for s in samples:
        assert 1 <= len(s.examples) <= 3 and s.meta["k"] == len(s.examples)
        assert s.split == split[s.image]
        assert all(split[e.image] == s.split for e in s.examples)  # leak-free: examples from the query's split
        assert all(e.image != s.image for e in s.examples)  # never the query itself
        assert len({e.image for e in s.examples}) == len(s.examples)
        assert all(e.label == "lungs" and s.targets[0].label == "lungs" for e in s.examples)
        others = [it.image for it in items if split[it.image] == s.split and group[it.image] != s.group]
        if others:  # another patient of the split exists: the query's own patient never serves as example
            assert all(group[e.image] != s.group for e in s.examples)
        assert "lungs" not in s.conversations[0].content  # the question does not name the structure
        assert "[SEG]" in s.conversations[1].content
    assert _episodes(root, items) == samples  # deterministic for a seed
    assert {len(s.examples) for s in _episodes(root, items, icl_examples=(2,))} <= {1, 2}
    with pytest.raises(ConfigError, match="icl_examples"):
        _episodes(root, items, icl_examples=(0,))


def test_default_build_has_no_icl_and_is_unchanged(lungs) -> None:
    root, items = lungs
    default = list(build_samples(items[:2], root, BuildConfig(seed=3)))
    assert default and not any(s.task == "icl" or s.examples for s in default)


def test_episodes_round_trip_load_and_train(lungs, tmp_path: Path) -> None:
    root, items = lungs
    samples = [s for s in _episodes(root, items) if len(s.examples) >= 2][:2]
    assert len(samples) == 2
    path = tmp_path / "icl.jsonl"
    write_jsonl(samples, path)
    assert list(read_jsonl(path)) == samples
    loaded = [load_sample(s, root) for s in samples]
    assert all(len(ls.examples) == len(s.examples) and ls.examples[0].mask.any() for ls, s in zip(loaded, samples))
    for encoding, per in (("overlay", 1), ("separate", 2)):
        m = MedPLIB.from_preset("tiny", seed=0, **{"icl.encoding": encoding})
        enc = [m.processor.encode_loaded(ls) for ls in loaded]
        assert [len(e.examples) for e in enc] == [per * len(s.examples) for s in samples]
        n_img = [(e.input_ids == m.processor.image_id).sum().item() for e in enc]
        assert n_img == [64 + 25 * per * len(s.examples) for s in samples]
        batch = m.collate(enc)
        out = m.model(**batch)
        loss = LossSection().combine(out.parts)
        assert torch.isfinite(loss) and out.parts["dice"] > 0  # the [SEG] answer grounds the query
        loss.backward()
        # The example images reach the loss through the vision tower (their only way in).
        assert m.model.vision.model.embeddings.patch_embedding.weight.grad.abs().sum() > 0
        m.model.zero_grad()
        without = dict(batch, example_pixels=None)
        with pytest.raises(Exception, match="image tokens"):
            m.model(**without)


def test_stage5_recipe_parses_and_sets_the_icl_prompt(tmp_path: Path) -> None:
    r = load_recipe(default_recipes_dir() / "stage5_icl.yaml")
    assert r.name == "stage5_icl" and r.model.path == "runs/stage4/model"
    assert {s.tasks[0] for s in r.data.sources} == {"icl", "grounding"}
    assert r.icl["encoding"] == "overlay"
    separate = load_recipe(default_recipes_dir() / "stage5_icl.yaml", ["icl.encoding=separate"])
    assert separate.icl["encoding"] == "separate"
    with pytest.raises(RecipeError, match="icl: unknown keys"):
        load_recipe(default_recipes_dir() / "stage5_icl.yaml", ["icl.colour=red"])
    from medplib.training.build import build_model

    folder = MedPLIB.from_preset("tiny").save_pretrained(tmp_path / "m")
    m = build_model(load_recipe(default_recipes_dir() / "stage5_icl.yaml",
                                [f"model.path={folder}", "icl.encoding=separate", "icl.example_token_grid=3",
                                 "lora.r=0"]))
    assert m.config.icl.encoding == "separate" and m.processor.config.num_example_tokens == 9
    with pytest.raises(RecipeError, match="example_token_grid"):
        build_model(load_recipe(default_recipes_dir() / "stage5_icl.yaml",
                                [f"model.path={folder}", "icl.example_token_grid=99", "lora.r=0"]))


def test_evaluation_asks_icl_samples_with_their_examples(lungs) -> None:
    """`medplib eval` on a data folder with icl samples scores them as grounding, examples in the prompt."""
    from medplib.evaluation.runner import predict

    root, items = lungs
    sample = _episodes(root, items)[0]
    m = MedPLIB.from_preset("tiny", seed=0)
    seen: list[int] = []

    class Spy:
        def generate(self, image, question, **kw):
            seen.append(len(kw["examples"]))
            return m.generate(image, question, max_new_tokens=3, **kw)

    rec = predict(Spy(), sample, root)
    assert seen == [len(sample.examples)] and rec["task"] == "grounding"
