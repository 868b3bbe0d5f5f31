"""Converters: exact MeCoVQA and Med-GRIT round trips on fixtures in the published formats, and
the real-data layouts (VQA-RAD, Kvasir-SEG, LViT, SA-Med2D)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from medplib.data.commands import data_app
from medplib.data.converters import build_source
from medplib.data.converters.mecovqa import read_mecovqa
from medplib.data.converters.med_grit import read_med_grit
from medplib.data.converters.sa_med2d import group_of, label_from_mask_name
from medplib.data.schema import MaskRegion, write_jsonl

STEM = "ct_00--AbdomenCT1K--Case_00220--x_0359"
MECOVQA = [
    {"image": f"{STEM}.png", "conversations": [
        {"from": "human", "value": "<image>\nCan you segment the liver in this CT image?"},
        {"from": "gpt", "value": f"Sure, it is <SEG>.<mask>masks_merged/{STEM}--liver_merged.png</mask>"}],
     "answer_type": "open"},
    {"image": f"{STEM}.png", "conversations": [
        {"from": "human", "value": f"<image>\nWhat organ is in <region>masks/{STEM}--kidney_left_1.png</region>?"},
        {"from": "gpt", "value": "The left kidney."}], "answer_type": "open"},
    {"id": "q7", "image": "mr_t1--BraTS--BraTS_001--z_0080.png", "conversations": [
        {"from": "human", "value": "<image>\nIs there a tumor?"}, {"from": "gpt", "value": "Yes."},
        {"from": "human", "value": "Compare <region>a.png</region> with <region>b.png</region>."},
        {"from": "gpt",
         "value": "The first <SEG> <mask>m1.png</mask>is larger than<mask>m2.png</mask> the second <SEG>."}],
     "answer_type": "closed"},
]
MED_GRIT = [
    {"id": STEM, "conversations": [
        ["Please locate the liver in this image.", "The liver is at <box>(120,300),(480,640)</box>."],
        ["What is in <box>(500,410),(620,560)</box>?", "It is the left kidney."]]},
    {"id": "mr_00--BraTS--BraTS_002--z_0070", "conversations": [["Describe the image.", "An axial brain MRI."]]},
]


def test_mecovqa_round_trip_is_identical(tmp_path: Path) -> None:
    src = tmp_path / "published.json"
    src.write_text(json.dumps(MECOVQA, indent=2) + "\n")
    samples = list(read_mecovqa(src, tmp_path))
    assert [s.task for s in samples] == ["grounding", "region_vqa", "grounding"]
    assert samples[0].modality == "ct" and samples[2].modality == "mr"
    assert samples[0].conversations[1].content == "Sure, it is [SEG]."
    assert isinstance(samples[1].regions[0], MaskRegion) and samples[1].conversations[0].content.count("<region>") == 1
    write_jsonl(samples, tmp_path / "ours.jsonl")
    # exported next to the original, so paths come back exactly as written there
    res = CliRunner().invoke(data_app, ["export", str(tmp_path / "ours.jsonl"), "--to", "mecovqa",
                                        "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    back = json.loads((tmp_path / "mecovqa.json").read_text())
    assert json.dumps(back) == json.dumps(MECOVQA)  # same records, same key order
    moved = CliRunner().invoke(data_app, ["export", str(tmp_path / "ours.jsonl"), "--to", "mecovqa",
                                          "--out", str(tmp_path / "sub")])
    assert moved.exit_code == 0
    assert json.loads((tmp_path / "sub" / "mecovqa.json").read_text())[0]["image"] == f"../{STEM}.png"


def test_med_grit_round_trip_is_identical(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((100, 200, 3), np.uint8)).save(tmp_path / f"{STEM}.png")  # 200 wide, 100 high
    src = tmp_path / "published.json"
    src.write_text(json.dumps(MED_GRIT, indent=2) + "\n")
    samples = list(read_med_grit(src, tmp_path))
    assert samples[0].targets[0].box == (24.0, 30.0, 96.0, 64.0)  # 0..1000 grid -> pixels of the 200x100 image
    assert samples[1].targets == [] and samples[1].modality == "mr"
    write_jsonl(samples, tmp_path / "ours.jsonl")
    res = CliRunner().invoke(data_app, ["export", str(tmp_path / "ours.jsonl"), "--to", "med-grit",
                                        "--out", str(tmp_path / "back")])
    assert res.exit_code == 0, res.output
    back = json.loads((tmp_path / "back" / "med_grit.json").read_text())
    assert json.dumps(back) == json.dumps(MED_GRIT)


def test_built_samples_export_to_both_formats(tmp_path: Path) -> None:
    runner = CliRunner()
    built = runner.invoke(data_app, ["build", "--source", "phantoms", "--out", str(tmp_path),
                                     "--n", "4", "--size", "64"])
    assert built.exit_code == 0
    for fmt, name in (("mecovqa", "mecovqa.json"), ("med-grit", "med_grit.json")):
        res = runner.invoke(data_app, ["export", str(tmp_path / "samples.jsonl"), "--to", fmt,
                                       "--out", str(tmp_path / "x")])
        assert res.exit_code == 0, res.output
        records = json.loads((tmp_path / "x" / name).read_text())
        assert records
    text = json.dumps(records)
    assert "<box>(" in text and "[SEG]" not in text and "<region>" not in text


def test_in_context_samples_are_skipped_by_exports_with_a_reason(shared_data: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    built = runner.invoke(data_app, ["build", str(shared_data / "covid_cxr_lungs"), "--source", "covid-cxr",
                                     "--out", str(tmp_path), "--tasks", "grounding,icl"])
    assert built.exit_code == 0, built.output
    n_icl = sum(1 for line in (tmp_path / "samples.jsonl").read_text().splitlines() if '"task":"icl"' in line)
    assert n_icl > 0
    for fmt, name in (("mecovqa", "mecovqa.json"), ("med-grit", "med_grit.json")):
        res = runner.invoke(data_app, ["export", str(tmp_path / "samples.jsonl"), "--to", fmt,
                                       "--out", str(tmp_path / fmt)])
        assert res.exit_code == 0, res.output
        assert f"skipped {n_icl}" in res.output and "has no in-context examples" in res.output
        records = json.loads((tmp_path / fmt / name).read_text())
        assert records and "same structure" not in json.dumps(records)


def test_vqa_rad_split_and_answer_types(shared_data: Path, tmp_path: Path) -> None:
    samples = list(build_source("vqa-rad", shared_data / "vqa_rad", tmp_path))
    assert sum(s.split == "train" for s in samples) == 3064 and sum(s.split == "test" for s in samples) == 451
    assert {s.answer_type for s in samples} == {"open", "closed"}  # "CLOSED " with a space is normalised
    assert all((tmp_path / s.image).is_file() for s in samples[:50])


def test_kvasir_boxes_are_scaled_to_the_stored_images(shared_data: Path, tmp_path: Path) -> None:
    from medplib.data.converters.kvasir import read_kvasir

    table = json.loads((shared_data / "kvasir_seg" / "kavsir_bboxes.json").read_text())
    items = {Path(i.image).stem: i for _, i in zip(range(20), read_kvasir(shared_data / "kvasir_seg", tmp_path))}
    key = "cju0qkwl35piu0993l0dewei2"
    e = table[key]
    b = e["bbox"][0]
    want = (b["xmin"] * 256 / e["width"], b["ymin"] * 256 / e["height"],
            b["xmax"] * 256 / e["width"], b["ymax"] * 256 / e["height"])
    inst = items[key].instances[0]
    assert inst.box == want and inst.mask.shape == (256, 256)
    rows, cols = np.nonzero(inst.mask)
    assert abs(cols.min() - want[0]) < 3 and abs(rows.max() + 1 - want[3]) < 3  # the scaled box hugs the mask


def test_sa_med2d_names() -> None:
    assert label_from_mask_name("amos_0006_90_inferior_vena_cava_000", "amos_0006_90") == "inferior vena cava"
    assert label_from_mask_name("s0114_111_heart_ventricle_left_000", "s0114_111") == "left heart ventricle"
    assert label_from_mask_name(f"{STEM}--liver_3", STEM) == "liver"
    assert group_of(STEM) == "ct_00--AbdomenCT1K--Case_00220" and group_of("amos_0006_90") == "amos_0006"


def test_lvit_sentences_become_grounding(shared_data: Path, tmp_path: Path) -> None:
    samples = list(build_source("lvit", shared_data / "monuseg_lvit_text", tmp_path))
    assert len(samples) == 44 and {s.modality for s in samples} == {"histopathology"}
    assert {s.split: 0 for s in samples}.keys() == {"train", "val", "test"}
    first = next(s for s in samples if s.split == "train")
    assert "The nuclei are evenly distributed." in first.conversations[0].content
    assert first.conversations[1].content.count("[SEG]") == 1 and first.targets[0].label == "nuclei"
