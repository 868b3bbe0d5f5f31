"""The example index on real chest X-rays with lung masks (and Kvasir polyps), embedded by a random `tiny`
model's vision tower: never the query itself, incremental adds equal one build, exact and HNSW agree,
malformed examples skipped with a reason, and the `medplib index` command end to end."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file
from typer.testing import CliRunner

from medplib.api import MedPLIB
from medplib.data.images import read_image
from medplib.retrieval.commands import index_app
from medplib.retrieval.embed import ImageEmbedder, image_hash
from medplib.retrieval.index import ExampleIndex, IndexFolderError, add_library, query

runner = CliRunner()


def _cxr_pairs(root: Path) -> list[tuple[Path, Path]]:
    """(image, lung mask) of the chest X-rays, smallest first (the largest are 12 MP: slow on a CPU)."""
    folder = root / "covid_cxr_lungs"
    area = {p: Image.open(p).size[0] * Image.open(p).size[1] for p in (folder / "images").iterdir()}
    images = sorted(area, key=lambda p: (area[p], p.name))
    return [(p, folder / "lung_masks" / f"{p.stem}_mask.png") for p in images]


def _write_library(out: Path, pairs: list[tuple[Path, Path | str]], label: str = "lungs", split: str = "train") -> Path:
    """A medplib data folder: one grounding sample per (image, mask), paths relative to the folder."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / "samples.jsonl").open("w", encoding="utf-8") as fh:
        for image, mask in pairs:
            fh.write(json.dumps({
                "id": f"{label}:{Path(image).stem}", "image": os.path.relpath(image, out), "source": "covid-cxr",
                "split": split,
                "conversations": [{"role": "user", "content": f"<image>\nSegment the {label}."},
                                  {"role": "assistant", "content": "Sure, [SEG]."}],
                "targets": [{"mask": os.path.relpath(mask, out), "label": label}]}) + "\n")
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return MedPLIB.from_preset("tiny", seed=0).save_pretrained(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def embedder(tiny: Path) -> ImageEmbedder:
    return ImageEmbedder(MedPLIB.from_pretrained(tiny), batch_size=8)


@pytest.fixture(scope="module")
def cxr(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """20 chest X-rays as a library (and in two halves), 3 more as outside queries."""
    pairs = _cxr_pairs(shared_data)
    assert len(pairs) >= 23
    base = tmp_path_factory.mktemp("cxr")
    return {"all": _write_library(base / "all", pairs[:20]), "first": _write_library(base / "first", pairs[:10]),
            "second": _write_library(base / "second", pairs[10:20]),
            "outside": [p for p, _ in pairs[20:23]], "pairs": pairs}


@pytest.fixture(scope="module")
def flat(embedder: ImageEmbedder, cxr, tmp_path_factory: pytest.TempPathFactory) -> ExampleIndex:
    """The 20-image library built at once, exact search."""
    return _build(tmp_path_factory.mktemp("flat") / "idx", embedder, cxr["all"])


def _build(folder: Path, embedder: ImageEmbedder, data: Path, kind: str = "flat") -> ExampleIndex:
    index = ExampleIndex.create(folder, dim=embedder.dim, fingerprint=embedder.fingerprint, kind=kind)
    report = add_library(index, embedder, data)
    assert not report.skipped
    index.save()
    return index


def test_embeddings_are_unit_vectors_of_the_tower_width(embedder: ImageEmbedder, cxr) -> None:
    images = [read_image(p).rgb for p, _ in cxr["pairs"][:4]]
    vecs = embedder.embed(images)
    assert vecs.shape == (4, 64) and vecs.dtype == np.float32
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert np.allclose(embedder.embed(images[2:3])[0], vecs[2], atol=1e-5)  # batch composition does not matter
    assert not np.allclose(vecs[0], vecs[1])


def test_the_query_image_is_never_returned(embedder: ImageEmbedder, flat: ExampleIndex, tmp_path: Path) -> None:
    index = flat
    assert len(index) == 20
    stored = load_file(str(index.folder / "embeddings.safetensors"))["embeddings"]
    assert stored.shape == (20, 64)
    for i, entry in enumerate(index.entries):
        rgb = read_image(index.folder / entry.image).rgb
        raw = index.search(stored[i], 3)
        assert raw[0].position == i and raw[0].score == pytest.approx(1.0, abs=1e-4)  # unfiltered, it is top-1
        hits = query(index, embedder, rgb, 3)
        assert len(hits) == 3 and all(h.hash != image_hash(rgb) for h in hits)
        assert [h.position for h in hits[:2]] == [h.position for h in raw[1:]]  # the rest of the ranking kept
        assert hits[0].score >= hits[1].score >= hits[2].score
    # a lossless copy under another name and format is the same image: matched by decoded pixels
    src = index.folder / index.entries[0].image
    copy = tmp_path / "renamed_copy.png"
    Image.fromarray(read_image(src).rgb).save(copy)
    assert all(h.position != 0 for h in query(index, embedder, read_image(copy).rgb, 19))
    assert len(query(index, embedder, read_image(copy).rgb, 50)) == 19


def test_a_duplicate_in_the_library_is_excluded_too(embedder: ImageEmbedder, cxr, tmp_path: Path) -> None:
    image, mask = cxr["pairs"][0]
    copy = tmp_path / "copy" / f"dup{image.suffix}"
    copy.parent.mkdir()
    shutil.copy(image, copy)
    lib = _write_library(tmp_path / "lib", cxr["pairs"][:5] + [(copy, mask)])
    index = ExampleIndex.create(tmp_path / "idx", dim=embedder.dim, fingerprint=embedder.fingerprint)
    report = add_library(index, embedder, lib)
    assert report.added == 5 and report.duplicates == 1  # same pixels and label: indexed once
    hits = query(index, embedder, read_image(image).rgb, 5)
    assert len(hits) == 4 and image_hash(read_image(image).rgb) not in {h.hash for h in hits}


def test_adding_and_reloading_gives_the_same_top_k(embedder: ImageEmbedder, flat: ExampleIndex, cxr,
                                                   tmp_path: Path) -> None:
    grown = _build(tmp_path / "grown", embedder, cxr["first"])
    grown = ExampleIndex.load(tmp_path / "grown")
    assert len(grown) == 10
    report = add_library(grown, embedder, cxr["second"])
    assert report.added == 10 and report.duplicates == 0
    grown.save()
    grown = ExampleIndex.load(tmp_path / "grown")
    once = ExampleIndex.load(flat.folder)
    assert len(grown) == len(once) == 20
    queries = [read_image(p).rgb for p in cxr["outside"]] + [read_image(p).rgb for p, _ in cxr["pairs"][:20:4]]
    for rgb in queries:
        a, b = query(once, embedder, rgb, 3), query(grown, embedder, rgb, 3)
        assert [h.sample for h in a] == [h.sample for h in b]
        assert [h.image for h in a] == [h.image for h in b] and [h.mask for h in a] == [h.mask for h in b]
        assert np.allclose([h.score for h in a], [h.score for h in b], atol=1e-5)
    again = add_library(grown, embedder, cxr["all"])  # adding what is there adds nothing
    assert again.added == 0 and again.duplicates == 20


def test_exact_and_hnsw_agree_on_a_small_library(embedder: ImageEmbedder, flat: ExampleIndex, cxr,
                                                 tmp_path: Path) -> None:
    hnsw = ExampleIndex.load(_build(tmp_path / "hnsw", embedder, cxr["all"], kind="hnsw").folder)
    assert hnsw.kind == "hnsw" and json.loads((tmp_path / "hnsw" / "index.json").read_text())["kind"] == "hnsw"
    images = [read_image(p).rgb for p in cxr["outside"] + [p for p, _ in cxr["pairs"][:20]]]
    for rgb, vec in zip(images, embedder.embed(images)):
        a, b = (index.search(vec, 3, exclude=[image_hash(rgb)]) for index in (flat, hnsw))
        assert len(a) == 3
        assert [h.position for h in a] == [h.position for h in b]
        assert np.allclose([h.score for h in a], [h.score for h in b], atol=1e-5)


def test_label_filter_returns_only_that_label(embedder: ImageEmbedder, cxr, shared_data: Path, tmp_path: Path) -> None:
    kvasir = sorted((shared_data / "kvasir_seg" / "images").glob("*.jpg"))[:4]
    polyps = _write_library(tmp_path / "polyps", [(p, shared_data / "kvasir_seg" / "masks" / p.name) for p in kvasir],
                            label="polyp")
    index = _build(tmp_path / "idx", embedder, cxr["first"])
    add_library(index, embedder, polyps)
    rgb = read_image(cxr["outside"][0]).rgb
    assert {h.label for h in query(index, embedder, rgb, 3, label="polyp")} == {"polyp"}
    assert len(query(index, embedder, rgb, 10, label="polyp")) == 4  # the search widened past the lungs
    assert {h.label for h in query(index, embedder, rgb, 14)} == {"lungs", "polyp"}
    assert query(index, embedder, rgb, 3, label="liver") == []


def test_malformed_examples_are_skipped_with_a_reason(embedder: ImageEmbedder, cxr, tmp_path: Path) -> None:
    pairs = cxr["pairs"]
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "empty_mask.png")
    small = read_image(pairs[1][0]).rgb.shape[:2]
    Image.fromarray(np.zeros(small, np.uint8)).save(tmp_path / "blank.png")
    bad = [(pairs[0][0], tmp_path / "missing_mask.png"),  # missing file
           (pairs[1][0], pairs[2][1]),  # a mask of another image (another size)
           (pairs[1][0], tmp_path / "blank.png")]  # right size, nothing marked
    assert read_image(pairs[1][0]).size != read_image(pairs[2][0]).size
    lib = _write_library(tmp_path / "lib", bad + pairs[3:6])
    index = ExampleIndex.create(tmp_path / "idx", dim=embedder.dim, fingerprint=embedder.fingerprint)
    report = add_library(index, embedder, lib)
    assert report.added == 3 and len(report.skipped) == 3
    missing, size, empty = report.skipped
    assert "mask file not found" in missing and "missing_mask.png" in missing
    assert "but the image is" in size and pairs[1][0].name in size
    assert "mask is empty" in empty


def test_another_model_and_broken_folders_are_refused(embedder: ImageEmbedder, cxr, tmp_path: Path) -> None:
    index = _build(tmp_path / "idx", embedder, cxr["first"])
    other = ImageEmbedder(MedPLIB.from_preset("tiny", seed=1))
    with pytest.raises(IndexFolderError, match="another vision tower"):
        query(index, other, read_image(cxr["outside"][0]).rgb)
    with pytest.raises(IndexFolderError, match="already holds an index"):
        ExampleIndex.create(tmp_path / "idx", dim=64, fingerprint="x")
    lines = (tmp_path / "idx" / "entries.jsonl").read_text().splitlines()
    (tmp_path / "idx" / "entries.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(IndexFolderError, match="files disagree"):
        ExampleIndex.load(tmp_path / "idx")
    (tmp_path / "idx" / "vectors.faiss").write_bytes(b"not a faiss index")
    with pytest.raises(IndexFolderError, match="cannot read the index"):
        ExampleIndex.load(tmp_path / "idx")
    with pytest.raises(IndexFolderError, match="not a medplib index"):
        ExampleIndex.load(tmp_path)


def test_cli_build_add_query_info(tiny: Path, cxr, tmp_path: Path) -> None:
    out = tmp_path / "idx"
    res = runner.invoke(index_app, ["build", str(cxr["first"]), "--out", str(out), "--model", str(tiny),
                                    "--kind", "hnsw", "--hnsw-m", "16"])
    assert res.exit_code == 0, res.output
    assert "added 10 examples" in res.output
    assert json.loads((out / "index.json").read_text())["hnsw"]["m"] == 16
    res = runner.invoke(index_app, ["add", str(out), str(cxr["second"] / "samples.jsonl")])  # model from the index
    assert res.exit_code == 0, res.output
    assert "added 10 examples (0 already indexed, 0 skipped); 20 in" in res.output
    query_image = cxr["pairs"][5][0]
    res = runner.invoke(index_app, ["query", str(out), str(query_image), "--k", "3", "--json"])
    assert res.exit_code == 0, res.output
    hits = json.loads(res.stdout)
    assert len(hits) == 3 and all(Path(h["image"]) != query_image for h in hits)
    assert all(Path(h["image"]).is_file() and Path(h["mask"]).is_file() for h in hits)  # paths resolve from anywhere
    assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
    res = runner.invoke(index_app, ["info", str(out), "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["labels"] == {"lungs": 20}
    res = runner.invoke(index_app, ["build", str(cxr["first"]), "--out", str(out), "--model", str(tiny)])
    assert res.exit_code == 1 and "error:" in res.output and "already holds an index" in res.output
    res = runner.invoke(index_app, ["query", str(out), str(tmp_path / "nope.png")])
    assert res.exit_code == 1 and "image file not found" in res.output


def test_medplib_index_through_the_installed_command(flat: ExampleIndex, tiny: Path, cxr) -> None:
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "medplib.cli", "index", "query", str(flat.folder), str(cxr["outside"][0]), "--k", "2",
           "--model", str(tiny)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("1. ") and " lungs " in lines[0]


def test_rle_masks_are_kept_inline(embedder: ImageEmbedder, cxr, tmp_path: Path) -> None:
    from medplib.data.masks import read_mask, rle_decode, rle_encode

    image, mask_file = cxr["pairs"][0]
    rle = rle_encode(read_mask(mask_file)).model_dump()
    lib = _write_library(tmp_path / "lib", [cxr["pairs"][1]])
    with (lib / "samples.jsonl").open("a", encoding="utf-8") as fh:
        fh.write(json.dumps({"id": "rle", "image": os.path.relpath(image, lib),
                             "targets": [{"mask": rle, "label": "lungs"}],
                             "conversations": [{"role": "user", "content": "<image>\nSegment the lungs."},
                                               {"role": "assistant", "content": "[SEG]"}]}) + "\n")
    index = _build(tmp_path / "idx", embedder, lib)
    index = ExampleIndex.load(index.folder)
    (hit,) = [h for h in index.search(np.zeros(64, np.float32) + 0.125, 2) if h.sample == "rle"]
    assert isinstance(hit.mask, dict) and np.array_equal(rle_decode(hit.mask), read_mask(mask_file))


def test_a_cnn_tower_with_batchnorm_buffers_embeds_and_fingerprints(cxr) -> None:
    """The lite preset's EfficientNet tower holds 0-d BatchNorm counters; the fingerprint reads them too."""
    m = MedPLIB.from_preset("tiny", seed=0, **{"vision.kind": "efficientnet",
                                               "vision.hf": {"image_size": 128, "patch_size": 32}})
    assert any(t.dim() == 0 for t in m.model.vision.state_dict().values())
    emb = ImageEmbedder(m)
    vecs = emb.embed([read_image(p).rgb for p, _ in cxr["pairs"][:2]])
    assert vecs.shape == (2, emb.dim) and np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert ImageEmbedder(MedPLIB.from_preset("tiny", seed=1, **{"vision.kind": "efficientnet", "vision.hf": {
        "image_size": 128, "patch_size": 32}})).fingerprint != emb.fingerprint
