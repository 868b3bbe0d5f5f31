"""`medplib eval` end to end on real data (Kvasir-SEG, VQA-RAD) with the trained tiny Kvasir model:
artefacts and their content, resume, bad samples, and clear errors for bad arguments."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import kvasir_images
from PIL import Image
from typer.testing import CliRunner

from medplib.api import Answer
from medplib.cli import app
from medplib.errors import InputError
from medplib.evaluation.benchmarks import BENCHMARK_READERS
from medplib.evaluation.masks import mask_overlap
from medplib.evaluation.report import run_report
from medplib.evaluation.runner import exchange_task, predict, select_samples, text_boxes

runner = CliRunner()
ARTEFACTS = ("metrics.json", "predictions.jsonl", "report.md", "per_modality.png")


def _eval(model: Path, benchmark: str, data: Path, out: Path, *extra: str):
    return runner.invoke(app, ["eval", "--model", str(model), "--benchmark", benchmark, "--data", str(data),
                               "--out", str(out), "--device", "cpu", *extra])


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def _png(path: Path) -> np.ndarray:
    img = Image.open(path)
    img.load()  # a truncated or corrupt PNG fails here
    return np.asarray(img.convert("RGB")).astype(int)


def test_kvasir_eval_writes_report_scores_real_masks_and_resumes(kvasir_model, shared_data, tmp_path, monkeypatch):
    data, out = shared_data / "kvasir_seg", tmp_path / "kvasir"
    res = _eval(kvasir_model, "kvasir-seg", data, out, "--split", "all", "--limit", "6")
    assert res.exit_code == 0, res.output
    for name in (*ARTEFACTS, "gallery.png"):
        assert (out / name).is_file(), name

    m = json.loads((out / "metrics.json").read_text())
    assert m["benchmark"] == "kvasir-seg" and m["n"] == 6 and m["split"] == "all"
    assert (m["generated"], m["reused"], m["failed"]) == (6, 0, 0)
    assert m["samples_per_s"] > 0 and m["per_question_type"] == {}
    assert m["per_modality"]["endoscopy"]["grounding"]["n"] == 6

    # --limit takes the first images in name order: the 4 training images, then 2 unseen ones.
    recs = _records(out)
    first = kvasir_images(shared_data, 6)
    assert [r["id"] for r in recs] == [f"{i}:polyp" for i, _, _ in first]
    # Dice recomputed from the saved prediction PNGs against the original JPEG masks.
    dice = [mask_overlap(_png(out / r["pred_mask"])[..., 0] > 127, gt).dice[0] for r, (_, _, gt) in zip(recs, first)]
    assert min(dice[:4]) >= 0.9  # trained images are grounded
    assert m["metrics"]["grounding"]["dice"]["value"] == pytest.approx(float(np.mean(dice)), abs=1e-9)

    md = (out / "report.md").read_text()
    assert "| grounding.dice |" in md and "![Dice per modality](per_modality.png)" in md and "(gallery.png)" in md
    assert "6 generated, 0 reused" in md
    gallery, chart = _png(out / "gallery.png"), _png(out / "per_modality.png")
    assert gallery.shape[1] > 600 and gallery.shape[0] > 400 and chart.shape[1] > 300
    green = (gallery[..., 1] > 200) & (gallery[..., 0] < 80)  # ground-truth outlines
    red = (gallery[..., 0] > 150) & (gallery[..., 0] > gallery[..., 1] + 60)  # predicted masks
    assert green.sum() > 500 and red.sum() > 5000

    # Resume: a larger --limit generates only the new samples ...
    res = _eval(kvasir_model, "kvasir-seg", data, out, "--split", "all", "--limit", "8")
    m2 = json.loads((out / "metrics.json").read_text())
    assert res.exit_code == 0 and (m2["n"], m2["generated"], m2["reused"]) == (8, 2, 6)
    before = (out / "predictions.jsonl").read_bytes()

    # ... and when everything is stored the model is not even loaded.
    def no_model(*args, **kwargs):
        raise AssertionError("a fully resumed run must not load the model")

    monkeypatch.setattr("medplib.api.MedPLIB.from_pretrained", no_model)
    res = _eval(kvasir_model, "kvasir-seg", data, out, "--split", "all", "--limit", "8")
    m3 = json.loads((out / "metrics.json").read_text())
    assert res.exit_code == 0, res.output
    assert (m3["n"], m3["generated"], m3["reused"]) == (8, 0, 8)
    assert (out / "predictions.jsonl").read_bytes() == before
    assert m3["metrics"] == m2["metrics"] and m3["samples_per_s"] == m2["samples_per_s"]


def test_vqa_rad_eval_uses_the_test_split_with_question_types(kvasir_model, shared_data, tmp_path):
    out = tmp_path / "vqa"
    res = _eval(kvasir_model, "vqa-rad", shared_data / "vqa_rad", out, "--limit", "10")
    assert res.exit_code == 0, res.output
    for name in ARTEFACTS:
        assert (out / name).is_file(), name
    assert not (out / "gallery.png").exists()  # no grounding, no gallery

    test = json.loads((shared_data / "vqa_rad" / "testset.json").read_text())[:10]
    m = json.loads((out / "metrics.json").read_text())
    assert m["n"] == 10 and m["failed"] == 0
    assert [r["id"] for r in _records(out)] == [f"vqa-rad:test:{r['qid']}" for r in test]
    closed = sum(r["answer_type"].strip() == "CLOSED" for r in test)
    assert m["metrics"]["vqa"]["closed"]["n"] == closed and m["metrics"]["vqa"]["open"]["n"] == 10 - closed
    assert set(m["per_question_type"]) == {r["question_type"] for r in test}
    assert set(m["per_modality"]) == {r["image_organ"].lower() for r in test}
    assert "## VQA per question type" in (out / "report.md").read_text()
    assert _png(out / "per_modality.png").shape[1] > 300


def test_bad_samples_are_reported_and_counted_not_fatal(kvasir_model, shared_data, tmp_path):
    kv = shared_data / "kvasir_seg"
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    ids = [i for i, _, _ in kvasir_images(shared_data, 2)]
    lines = [{"id": f"good-{i}", "image": str(kv / "images" / f"{i}.jpg"), "split": "test", "task": "grounding",
              "conversations": [{"role": "user", "content": "Please segment the polyp."},
                                {"role": "assistant", "content": "Sure, it is [SEG]."}],
              "targets": [{"mask": str(kv / "masks" / f"{i}.jpg")}], "modality": "endoscopy"} for i in ids]
    lines += [dict(lines[0], id="missing", image="no_such_image.jpg"),
              dict(lines[0], id="corrupt", image="corrupt.jpg")]
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    res = _eval(kvasir_model, "jsonl", tmp_path / "s.jsonl", tmp_path / "out")
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert (m["n"], m["failed"]) == (2, 2) and [f["id"] for f in m["failures"]] == ["missing", "corrupt"]
    assert "no_such_image.jpg" in m["failures"][0]["error"]
    assert "failed `corrupt`" in (tmp_path / "out" / "report.md").read_text()


class _NoSeg:
    """A model that answers without [SEG]."""

    def generate(self, image, question, regions=(), region_arrays=None, examples=(), box_format=None) -> Answer:
        return Answer(text="I cannot find it.")


def test_an_answer_without_seg_is_an_empty_mask_that_scores_zero(shared_data, tmp_path):
    chosen = select_samples("sa-med2d", shared_data / "sam_med2d_demo", limit=1)
    rec = predict(_NoSeg(), chosen.samples[0], chosen.root)
    assert rec["pred_mask"].shape == rec["gt_mask"].shape and not rec["pred_mask"].any() and rec["gt_mask"].any()
    out = run_report([rec], tmp_path, "sa-med2d", "no-seg")
    assert out["metrics"]["grounding"]["dice"]["value"] == 0.0 and out["metrics"]["grounding"]["n"] == 1


def test_boxes_are_read_from_answer_text_on_their_grid():
    assert text_boxes("at <box>(100,200),(500,1000)</box>", "med-grit", 256, 128) == [[25.6, 25.6, 128.0, 128.0]]
    assert text_boxes("{<10><20><50><100>}", "minigpt", 200, 100) == [[20.0, 20.0, 100.0, 100.0]]
    # off the grid or corners swapped: not a box the model placed on the image
    assert text_boxes("<box>(0,0),(1200,10)</box> <box>(500,0),(100,10)</box>", "med-grit", 256, 256) == []


def test_the_first_exchange_decides_the_task():
    from medplib.data.schema import Sample

    conv = [{"role": "user", "content": "What is in <region>?"}, {"role": "assistant", "content": "The liver."},
            {"role": "user", "content": "Where is it?"}, {"role": "assistant", "content": "<box>(1,2),(3,4)</box>"}]
    s = Sample.model_validate({"id": "x", "image": "a.png", "conversations": conv, "task": "box_grounding",
                               "regions": [{"kind": "point", "point": [1, 1]}]})
    assert exchange_task(s) == "region_vqa"


@pytest.mark.parametrize("args, message", [
    (["--limit", "0"], "--limit"),
    (["--benchmark", "kvasir"], "--benchmark"),
    (["--data", "no/such/folder"], "does not exist"),
    (["--split", "holdout"], "--split"),
    (["--benchmark", "vqa-rad"], "testset.json"),  # the Kvasir folder is not a VQA-RAD layout
])
def test_bad_arguments_exit_2_with_a_message(shared_data, tmp_path, args, message):
    base = {"--benchmark": "kvasir-seg", "--data": str(shared_data / "kvasir_seg")}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    extra = [x for pair in base.items() for x in pair]
    res = runner.invoke(app, ["eval", "--model", str(tmp_path), "--out", str(tmp_path / "o"), *extra])
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output


def test_benchmark_choices_are_the_readers_table_then_volumes(tmp_path):
    res = runner.invoke(app, ["eval", "--model", str(tmp_path), "--benchmark", "nope", "--data", str(tmp_path),
                              "--out", str(tmp_path / "o")])
    text = " ".join(res.output.replace("│", " ").split())  # unwrap the error box
    names = [*BENCHMARK_READERS, "volumes"]
    assert res.exit_code == 2 and "'nope' is not one of " + ", ".join(f"'{n}'" for n in names) + "." in text
    with pytest.raises(InputError, match="unknown benchmark 'nope'; choose from vqa-rad, kvasir-seg, .*, jsonl$"):
        select_samples("nope", tmp_path)


def test_a_folder_that_is_not_a_model_and_a_foreign_out_folder_are_clear_errors(shared_data, tmp_path):
    res = _eval(tmp_path, "kvasir-seg", shared_data / "kvasir_seg", tmp_path / "o", "--split", "all", "--limit", "1")
    assert res.exit_code == 2 and "not a medplib model folder" in res.output
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "metrics.json").write_text(json.dumps({"benchmark": "vqa-rad"}))
    res = _eval(tmp_path, "kvasir-seg", shared_data / "kvasir_seg", tmp_path / "o", "--limit", "1")
    assert res.exit_code == 2 and "choose another --out" in res.output


class _BoxWriter:
    """Answers every question with one box on the format it is asked for (the grammar's job in a real model)."""

    def __init__(self) -> None:
        self.formats: list[str | None] = []

    def generate(self, image, question, regions=(), region_arrays=None, examples=(), box_format=None) -> Answer:
        self.formats.append(box_format)
        return Answer(text="{<10><20><50><60>}" if box_format == "minigpt" else "<box>(100,200),(500,600)</box>")


@pytest.mark.parametrize("fmt", ["med-grit", "minigpt"])
def test_box_questions_are_decoded_under_their_samples_format(shared_data, tmp_path, fmt):
    from medplib.data.boxes import box_grid, box_to_grid, format_med_grit, format_minigpt, mask_to_box
    from medplib.data.schema import Sample

    (i, img, mask), = kvasir_images(shared_data, 1)
    h, w = mask.shape
    text = (format_minigpt if fmt == "minigpt" else format_med_grit)(box_to_grid(mask_to_box(mask), w, h,
                                                                                  box_grid(fmt)))
    image = str(shared_data / "kvasir_seg" / "images" / f"{i}.jpg")
    box_q = Sample.model_validate({
        "id": "box", "image": image, "task": "box_grounding", "meta": {"box_format": fmt}, "split": "test",
        "conversations": [{"role": "user", "content": "Where is the polyp? Answer with a box."},
                          {"role": "assistant", "content": f"The polyp is at {text}."}]})
    seg_q = Sample.model_validate({
        "id": "seg", "image": image, "task": "grounding", "split": "test",
        "targets": [{"mask": str(shared_data / "kvasir_seg" / "masks" / f"{i}.jpg")}],
        "conversations": [{"role": "user", "content": "Please segment the polyp."},
                          {"role": "assistant", "content": "Sure, it is [SEG]."}]})
    model = _BoxWriter()
    rec = predict(model, box_q, tmp_path)
    predict(model, seg_q, tmp_path)
    assert model.formats == [fmt, None]  # a [SEG] question is not held to a box grammar
    assert rec["task"] == "box_grounding" and rec["pred_boxes"] == [[0.1 * w, 0.2 * h, 0.5 * w, 0.6 * h]]
    x1, y1, x2, y2 = rec["gt_boxes"][0]
    assert mask[int(y1):int(y2) + 1, int(x1):int(x2) + 1].sum() == mask.sum()  # the reference box holds the polyp
