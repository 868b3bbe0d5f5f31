"""run_report on real Kvasir-SEG images and masks with deterministic derived predictions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from medplib.errors import InputError
from medplib.evaluation.masks import mask_overlap
from medplib.evaluation.predictions import PredictionStore
from medplib.evaluation.report import record_task, run_report


def _kvasir_records(shared_data: Path, n: int = 9) -> list[dict]:
    root = shared_data / "kvasir_seg"
    ids = sorted(p.stem for p in (root / "images").glob("*.jpg"))[:n]
    recs = []
    for i, sid in enumerate(ids):
        gt = np.asarray(Image.open(root / "masks" / f"{sid}.jpg").convert("L")) > 127
        # Three kinds of prediction: slightly eroded (good), shifted right (poor), empty (zero).
        pred = [ndimage.binary_erosion(gt, iterations=3), np.roll(gt, 60, axis=1), np.zeros_like(gt)][i % 3]
        recs.append({
            "id": sid, "task": "grounding", "modality": "endoscopy" if i < 6 else "colonoscopy-b",
            "image": str(root / "images" / f"{sid}.jpg"), "gt_mask": str(root / "masks" / f"{sid}.jpg"),
            "pred_mask": pred,
        })
    return recs


def _vqa_records(shared_data: Path, n: int = 12) -> list[dict]:
    qa = json.loads((shared_data / "vqa_rad" / "testset.json").read_text())[:n]
    return [{
        "id": f"vqa-{r['qid']}", "modality": r["image_organ"].lower(), "question": r["question"],
        "question_type": r["question_type"], "answer_type": r["answer_type"].strip().lower(),
        "reference": str(r["answer"]), "prediction": str(r["answer"]).upper() + "." if k % 2 == 0 else "unsure",
    } for k, r in enumerate(qa)]


def test_report_writes_all_artefacts_and_scores_correctly(shared_data, tmp_path):
    recs = _kvasir_records(shared_data)
    vqa = _vqa_records(shared_data)
    out = run_report(recs + vqa, tmp_path, "kvasir-seg", "derived-masks", samples_per_s=12.5, meteor_backend="nltk")
    for name in ("metrics.json", "predictions.jsonl", "report.md", "per_modality.png", "gallery.png"):
        assert (tmp_path / name).is_file(), name
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["benchmark"] == "kvasir-seg" and saved["model"] == "derived-masks" and saved["n"] == 21
    assert saved["samples_per_s"] == 12.5 and set(saved) >= {"metrics", "per_modality", "per_question_type"}

    # Dice in the report equals Dice computed directly from the same masks.
    direct = []
    for r in recs:
        gt = np.asarray(Image.open(r["gt_mask"]).convert("L")) > 127
        direct.append(mask_overlap(r["pred_mask"], gt).dice[0])
    assert out["metrics"]["grounding"]["dice"]["value"] == pytest.approx(float(np.mean(direct)))
    assert direct[0] > 0.8 and direct[2] == 0.0  # eroded is good, empty scores zero
    assert out["per_modality"]["endoscopy"]["grounding"]["n"] == 6

    closed = out["metrics"]["vqa"]["closed"]
    n_closed = sum(r["answer_type"] == "closed" for r in vqa)
    n_closed_right = sum(r["answer_type"] == "closed" and r["prediction"] != "unsure" for r in vqa)
    assert closed["n"] == n_closed
    assert closed["accuracy_medplib"]["value"] == pytest.approx(n_closed_right / n_closed)
    assert closed["exact_match"]["value"] == 0.0  # "YES." is never exactly "yes"
    assert set(out["per_question_type"]) == {str(r["question_type"]) for r in vqa}

    md = (tmp_path / "report.md").read_text()
    assert "![Dice per modality](per_modality.png)" in md and "(gallery.png)" in md
    assert "| grounding.dice |" in md and "## VQA per question type" in md

    gallery = Image.open(tmp_path / "gallery.png")
    chart = Image.open(tmp_path / "per_modality.png")
    assert gallery.size[0] > 800 and chart.size[0] > 300


def test_resume_appends_only_new_predictions_and_survives_a_torn_line(shared_data, tmp_path):
    recs = _kvasir_records(shared_data, 4)
    run_report(recs[:3], tmp_path, "kvasir-seg", "m", meteor_backend="nltk")
    store = PredictionStore(tmp_path / "predictions.jsonl")
    assert store.done_ids() == {r["id"] for r in recs[:3]}
    with (tmp_path / "predictions.jsonl").open("a") as fh:
        fh.write('{"id": "half-writ')  # a crash in the middle of a write
    assert store.done_ids() == {r["id"] for r in recs[:3]}
    out = run_report(recs, tmp_path, "kvasir-seg", "m", meteor_backend="nltk")
    lines = (tmp_path / "predictions.jsonl").read_text().splitlines()
    assert out["n"] == 4 and len([ln for ln in lines if ln.startswith('{"id": "c')]) == 4
    stored = {r["id"]: r for r in store.read()}
    assert stored[recs[0]["id"]]["pred_mask"].startswith("masks/")
    assert (tmp_path / stored[recs[0]["id"]]["pred_mask"]).is_file()


def test_task_inference_and_errors(tmp_path):
    assert record_task({"id": "a", "gt_boxes": [[0, 0, 1, 1]]}) == "box_grounding"
    assert record_task({"id": "a", "answer_type": "CLOSED ", "reference": "yes"}) == "vqa"
    assert record_task({"id": "a", "reference": "The heart is normal."}) == "text"
    with pytest.raises(InputError, match="cannot tell its task"):
        record_task({"id": "a"})
    with pytest.raises(InputError, match="non-empty 'id'"):
        PredictionStore(tmp_path / "p.jsonl").append({"prediction": "x"})
    with pytest.raises(InputError, match="no prediction records"):
        run_report([], tmp_path / "empty", "b", "m")


def test_box_and_text_records(tmp_path):
    recs = [
        {"id": "b1", "modality": "xray", "pred_boxes": [[0, 0, 10, 10]], "gt_boxes": [[0, 0, 10, 10]]},
        {"id": "b2", "modality": "ct", "pred_boxes": [], "gt_boxes": [[0, 0, 10, 10]]},
        {"id": "t1", "task": "report", "prediction": "the heart is normal", "reference": "the heart is normal in size"},
    ]
    out = run_report(recs, tmp_path, "med-grit", "m", meteor_backend="nltk")
    boxes = out["metrics"]["box_grounding"]
    assert boxes["miou"]["value"] == pytest.approx(0.5) and boxes["acc@0.5"]["value"] == pytest.approx(0.5)
    assert boxes["bird_recall@0.5_macro"] == pytest.approx(0.5)
    assert out["metrics"]["text"]["n"] == 1 and 0 < out["metrics"]["text"]["rouge_l"] < 1
    assert (tmp_path / "per_modality.png").is_file() and not (tmp_path / "gallery.png").exists()
    saved = json.loads((tmp_path / "metrics.json").read_text())  # strict JSON: no NaN tokens
    assert saved["per_modality"]["xray"]["box_grounding"]["miou"]["low"] is None  # one sample, no interval
