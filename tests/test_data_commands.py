"""`medplib data` commands on the real datasets and on phantoms: build, validate, stats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medplib.data.commands import data_app
from medplib.data.converters import SOURCE_READERS, build_source
from medplib.data.schema import read_jsonl
from medplib.errors import InputError

runner = CliRunner()


@pytest.mark.parametrize("source,folder,extra", [
    ("vqa-rad", "vqa_rad", []),
    ("kvasir", "kvasir_seg", []),
    ("lvit", "monuseg_lvit_text", []),
    ("sa-med2d", "sam_med2d_demo", ["--modality", "ct"]),
])
def test_build_real_datasets(shared_data: Path, tmp_path: Path, source: str, folder: str, extra: list[str]) -> None:
    res = runner.invoke(data_app, ["build", str(shared_data / folder), "--source", source, "--out", str(tmp_path),
                                   *extra])
    assert res.exit_code == 0, res.output
    assert "task:" in res.output and "modality:" in res.output  # stats are printed
    samples = list(read_jsonl(tmp_path / "samples.jsonl"))
    assert samples and all(s.source for s in samples)
    checked = runner.invoke(data_app, ["validate", str(tmp_path / "samples.jsonl")])
    assert checked.exit_code == 0 and f"{len(samples)} samples valid" in checked.output
    if source == "kvasir":  # one caption per image, from its merged polyp mask
        captions = [s for s in samples if s.task == "caption"]
        assert len(captions) == len({s.image for s in samples})
        answers = {c.conversations[1].content for c in captions}
        assert "An endoscopy image showing the polyp." in answers and "An endoscopy image showing 2 polyps." in answers
        assert all(a.startswith("An endoscopy image showing ") for a in answers)
    if source == "sa-med2d":
        assert {s.split for s in samples} == {"train", "test"}
        groups = {}
        for s in samples:  # no volume in two splits
            groups.setdefault(s.group, set()).add(s.split)
        assert all(len(v) == 1 for v in groups.values())
        assert runner.invoke(data_app, ["validate", str(tmp_path / "samples.jsonl"), "--check-files"]).exit_code == 0


def test_build_phantoms_is_deterministic_and_stats_json(tmp_path: Path) -> None:
    args = ["build", "--source", "phantoms", "--n", "9", "--size", "96", "--seed", "4"]
    assert runner.invoke(data_app, [*args, "--out", str(tmp_path / "a")]).exit_code == 0
    assert runner.invoke(data_app, [*args, "--out", str(tmp_path / "b")]).exit_code == 0
    assert (tmp_path / "a" / "samples.jsonl").read_text() == (tmp_path / "b" / "samples.jsonl").read_text()
    res = runner.invoke(data_app, ["stats", str(tmp_path / "a" / "samples.jsonl"), "--json"])
    stats = json.loads(res.output)
    assert stats["images"] == 9 and set(stats["task"]) == {"vqa", "region_vqa", "grounding", "box_grounding", "caption"}
    assert runner.invoke(data_app, ["validate", str(tmp_path / "a" / "samples.jsonl"), "--check-files"]).exit_code == 0
    only = runner.invoke(data_app, [*args, "--tasks", "grounding", "--out", str(tmp_path / "c")])
    assert only.exit_code == 0 and "task: grounding=" in only.output


def test_errors_are_one_line_with_exit_1(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "image": "a.png", "conversations": [{"role": "user", "content": "hi"}]}\n')
    res = runner.invoke(data_app, ["validate", str(bad)])
    assert res.exit_code == 1 and "bad.jsonl:1" in res.output and "conversations" in res.output
    res = runner.invoke(data_app, ["build", str(tmp_path), "--source", "kvasir", "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "Kvasir-SEG layout" in res.output
    res = runner.invoke(data_app, ["build", "--source", "phantoms", "--out", str(tmp_path / "p"), "--tasks", "dance"])
    assert res.exit_code == 1 and "unknown task" in res.output


def test_source_choices_are_the_converters_table(tmp_path: Path) -> None:
    res = runner.invoke(data_app, ["build", str(tmp_path), "--source", "nope", "--out", str(tmp_path / "o")])
    text = " ".join(res.output.replace("│", " ").split())  # unwrap the error box
    assert res.exit_code == 2 and "'nope' is not one of " + ", ".join(f"'{n}'" for n in SOURCE_READERS) + "." in text
    with pytest.raises(InputError, match="unknown source 'nope'; choose from sa-med2d, kvasir, .*, volumes$"):
        build_source("nope", tmp_path, tmp_path)
