"""An on-disk index of annotated images for in-context examples (image RAG), searched with faiss.

An index folder holds:
- `index.json`: format, kind (`flat` exact or `hnsw` approximate), dimension, HNSW settings, the model's
  folder and the fingerprint of its vision tower;
- `entries.jsonl`: one record per vector: image and mask paths (relative to the index folder), label,
  sample id, modality, source, split and the image's content hash;
- `embeddings.safetensors`: the (N, D) float32 unit vectors, readable without faiss;
- `vectors.faiss`: the faiss index (faiss's own binary format, no pickle).
Vectors are unit length, so inner product is cosine similarity. Exact search (IndexFlatIP) is the default;
HNSW (IndexHNSWFlat, inner product) answers in sub-linear time for libraries of millions.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors import safe_open
from safetensors.numpy import save_file

from medplib.api import MedPLIB
from medplib.errors import InputError, MedplibError
from medplib.retrieval.embed import ImageEmbedder, image_hash
from medplib.retrieval.examples import Example, load_example
from medplib.retrieval.library import LibraryItem, load_item, read_library

try:
    import faiss
except ImportError:  # an optional extra
    raise MedplibError("retrieval needs faiss-cpu: pip install 'medplib[retrieval]'") from None

FORMAT, VERSION = "medplib-index", 1
MANIFEST, ENTRIES, EMBEDDINGS, VECTORS = "index.json", "entries.jsonl", "embeddings.safetensors", "vectors.faiss"
Kind = Literal["flat", "hnsw"]


class IndexFolderError(MedplibError):
    """An index folder that is missing, inconsistent or made with another model."""


class IndexEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    image: str
    mask: str | dict[str, Any]
    label: str | None
    sample: str
    modality: str | None
    source: str
    split: str
    hash: str


@dataclass(frozen=True)
class HNSWParams:
    """m: graph degree; ef_construction / ef_search: candidate-list lengths when adding / searching
    (larger: better recall, slower)."""

    m: int = 32
    ef_construction: int = 200
    ef_search: int = 128


@dataclass(frozen=True)
class Hit:
    """One retrieved example. image/mask: resolved paths (mask may be an RLE dict); score: cosine."""

    score: float
    image: str
    mask: str | dict[str, Any]
    label: str | None
    sample: str
    hash: str
    position: int


@dataclass
class AddReport:
    added: int = 0
    duplicates: int = 0  # (image, label) pairs already in the index
    skipped: list[str] = field(default_factory=list)  # one message per unusable example


def _new_faiss(kind: Kind, dim: int, hnsw: HNSWParams) -> faiss.Index:
    if kind == "flat":
        return faiss.IndexFlatIP(dim)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, hnsw.m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = hnsw.ef_construction
        return index
    raise InputError(f"unknown index kind {kind!r} (flat or hnsw)")


class ExampleIndex:
    """Unit vectors with one IndexEntry each, in a folder. Build with `create`, open with `load`, grow with
    `add` (or `add_library`) and `save`; `search` a vector or `query` an image."""

    def __init__(self, folder: Path, kind: Kind, dim: int, fingerprint: str, model: str | None,
                 hnsw: HNSWParams, vectors: faiss.Index, entries: list[IndexEntry]):
        self.folder, self.kind, self.dim, self.fingerprint, self.model = folder, kind, dim, fingerprint, model
        self.hnsw, self._faiss, self.entries = hnsw, vectors, entries
        self._keys = {(e.hash, e.label) for e in entries}

    # ------------------------------------------------------------------ folders
    @classmethod
    def create(cls, folder: str | Path, *, dim: int, fingerprint: str, model: str | Path | None = None,
               kind: Kind = "flat", hnsw: HNSWParams = HNSWParams(), overwrite: bool = False) -> "ExampleIndex":
        """An empty index for `folder` (written by `save`). Refuses a folder that already holds an index
        unless `overwrite`."""
        folder = Path(folder)
        if (folder / MANIFEST).exists() and not overwrite:
            raise IndexFolderError(f"{folder} already holds an index: add to it, or overwrite it")
        folder.mkdir(parents=True, exist_ok=True)
        model_ref = os.path.relpath(Path(model).resolve(), folder.resolve()) if model is not None else None
        return cls(folder, kind, dim, fingerprint, model_ref, hnsw, _new_faiss(kind, dim, hnsw), [])

    @classmethod
    def load(cls, folder: str | Path) -> "ExampleIndex":
        """Open an index folder; its four files must agree on the number of vectors."""
        folder = Path(folder)
        if not (folder / MANIFEST).is_file():
            raise IndexFolderError(f"{folder} is not a medplib index (no {MANIFEST}; "
                                   "make one with `medplib index build`)")
        try:
            manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
            if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
                raise IndexFolderError(f"{folder / MANIFEST}: not a {FORMAT} version {VERSION} manifest")
            hnsw = HNSWParams(**manifest["hnsw"])
            kind, dim = manifest["kind"], int(manifest["dim"])
            entries = []
            with (folder / ENTRIES).open(encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, start=1):
                    if line.strip():
                        try:
                            entries.append(IndexEntry.model_validate_json(line))
                        except ValidationError as exc:
                            raise IndexFolderError(f"{folder / ENTRIES}:{lineno}: {exc.errors()[0]['msg']}") from None
            vectors = faiss.read_index(str(folder / VECTORS))
            with safe_open(str(folder / EMBEDDINGS), framework="numpy") as fh:
                rows = fh.get_slice("embeddings").get_shape()[0]
        except IndexFolderError:
            raise
        except (OSError, KeyError, TypeError, ValueError, RuntimeError) as exc:  # faiss raises RuntimeError
            raise IndexFolderError(f"{folder}: cannot read the index ({type(exc).__name__}: {exc})") from None
        if not (vectors.ntotal == rows == len(entries) == manifest.get("count")) or vectors.d != dim:
            raise IndexFolderError(f"{folder}: files disagree ({len(entries)} entries, {rows} embeddings, "
                                   f"{vectors.ntotal} faiss vectors of {vectors.d}-d, manifest {manifest.get('count')} "
                                   f"of {dim}-d); rebuild the index")
        return cls(folder, kind, dim, manifest["fingerprint"], manifest.get("model"), hnsw, vectors, entries)

    def save(self) -> None:
        """Write the four files (each to a temporary name, then renamed; the manifest last)."""
        n = len(self.entries)
        tmp = {name: self.folder / f".{name}.tmp" for name in (MANIFEST, ENTRIES, EMBEDDINGS, VECTORS)}
        # faiss keeps the vectors; reading them back avoids a second copy in memory between saves
        save_file({"embeddings": self._faiss.reconstruct_n(0, n) if n else np.zeros((0, self.dim), np.float32)},
                  str(tmp[EMBEDDINGS]))
        faiss.write_index(self._faiss, str(tmp[VECTORS]))
        with tmp[ENTRIES].open("w", encoding="utf-8") as fh:
            for e in self.entries:
                fh.write(e.model_dump_json() + "\n")
        manifest = {"format": FORMAT, "version": VERSION, "kind": self.kind, "dim": self.dim, "count": n,
                    "metric": "cosine", "fingerprint": self.fingerprint, "model": self.model, "hnsw": asdict(self.hnsw)}
        tmp[MANIFEST].write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        for name in (EMBEDDINGS, VECTORS, ENTRIES, MANIFEST):
            os.replace(tmp[name], self.folder / name)

    @property
    def model_path(self) -> Path | None:
        """The model folder the index was built with, if it was recorded."""
        return None if self.model is None else Path(os.path.normpath(self.folder / self.model))

    def __len__(self) -> int:
        return len(self.entries)

    # ------------------------------------------------------------------ content
    def check_model(self, embedder: ImageEmbedder) -> None:
        if embedder.dim != self.dim or embedder.fingerprint != self.fingerprint:
            raise IndexFolderError(f"{self.folder} was built with another vision tower ({self.dim}-d, fingerprint "
                                   f"{self.fingerprint[:12]}); this model gives {embedder.dim}-d, "
                                   f"{embedder.fingerprint[:12]}: use the index's model or rebuild")

    def contains(self, hash_: str, label: str | None) -> bool:
        return (hash_, label) in self._keys

    def add(self, vectors: np.ndarray, entries: list[IndexEntry]) -> None:
        """Append (n, D) unit vectors with their entries (in memory; `save` writes them)."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape != (len(entries), self.dim):
            raise InputError(f"expected ({len(entries)}, {self.dim}) vectors, got {vectors.shape}")
        if len(entries):
            self._faiss.add(vectors)
        self.entries.extend(entries)
        self._keys.update((e.hash, e.label) for e in entries)

    def search(self, vector: np.ndarray, k: int = 3, *, label: str | None = None,
               exclude: Iterable[str] = ()) -> list[Hit]:
        """The k entries nearest to a (D,) unit vector, best first, skipping images whose hash is in
        `exclude` and, with `label`, entries of other labels. Fewer than k if the index has fewer."""
        if k < 1:
            raise InputError(f"k must be at least 1, got {k}")
        exclude = set(exclude)
        n = len(self.entries)
        query = np.ascontiguousarray(np.asarray(vector, dtype=np.float32).reshape(1, self.dim))
        fetch = min(n, k + len(exclude) + 8)
        while fetch:
            if self.kind == "hnsw":
                self._faiss.hnsw.efSearch = max(self.hnsw.ef_search, fetch)
            scores, ids = self._faiss.search(query, fetch)
            hits = [self._hit(int(i), float(s)) for s, i in zip(scores[0], ids[0])
                    if i >= 0 and self._wanted(int(i), label, exclude)]
            if len(hits) >= k or fetch >= n:
                return hits[:k]
            fetch = min(n, fetch * 4)  # filters removed too many: look further down the ranking
        return []

    def _wanted(self, i: int, label: str | None, exclude: set[str]) -> bool:
        e = self.entries[i]
        return e.hash not in exclude and (label is None or e.label == label)

    def _hit(self, i: int, score: float) -> Hit:
        e = self.entries[i]
        mask = e.mask if isinstance(e.mask, dict) else _resolve(self.folder, e.mask)
        return Hit(score=score, image=_resolve(self.folder, e.image), mask=mask, label=e.label, sample=e.sample,
                   hash=e.hash, position=i)


def _resolve(folder: Path, ref: str) -> str:
    name, sep, frag = ref.partition("#")
    path = Path(name) if Path(name).is_absolute() else Path(os.path.normpath(folder / name))
    return str(path) + sep + frag


def add_library(index: ExampleIndex, embedder: ImageEmbedder, data: str | Path, *, splits: Iterable[str] | None = None,
                chunk: int = 256, log: Callable[[str], None] | None = None) -> AddReport:
    """Embed and add every annotated (image, label) of a data folder that the index lacks. Unusable
    examples (missing file, mask of another size, empty mask) are skipped and reported, never indexed."""
    index.check_model(embedder)
    report = AddReport()
    images: list[np.ndarray] = []
    entries: list[IndexEntry] = []

    def flush() -> None:
        if entries:
            index.add(embedder.embed(images), list(entries))
            report.added += len(entries)
            if log:
                log(f"embedded {report.added} examples")
            images.clear()
            entries.clear()

    pending: set[tuple[str, str | None]] = set()
    for item in read_library(data, splits):
        try:
            rgb, hash_ = load_item(item)
        except InputError as exc:
            report.skipped.append(str(exc))
            continue
        if index.contains(hash_, item.label) or (hash_, item.label) in pending:
            report.duplicates += 1
            continue
        pending.add((hash_, item.label))
        images.append(rgb)
        entries.append(_entry(item, index.folder, hash_))
        if len(entries) >= chunk:
            flush()
    flush()
    return report


def _entry(item: LibraryItem, folder: Path, hash_: str) -> IndexEntry:
    return IndexEntry(**item.relative_to(folder), hash=hash_)


def query(index: ExampleIndex, embedder: ImageEmbedder, image: np.ndarray, k: int = 3, *,
          label: str | None = None) -> list[Hit]:
    """Top-k examples for an (H, W, 3) uint8 image by cosine similarity; the image itself (any entry with
    the same decoded pixels) is never returned."""
    index.check_model(embedder)
    return index.search(embedder.embed([image])[0], k, label=label, exclude=[image_hash(image)])


def embedder_for(index: ExampleIndex, model: MedPLIB) -> ImageEmbedder:
    """An embedder whose vectors compare with the index's: `model`'s own vision tower when its fingerprint
    matches the index, else the model the index was built with (recorded in its manifest)."""
    embedder = ImageEmbedder(model)
    if embedder.fingerprint == index.fingerprint and embedder.dim == index.dim:
        return embedder
    path = index.model_path
    if path is None or not path.is_dir():
        index.check_model(embedder)  # raises, naming both fingerprints
    embedder = ImageEmbedder(MedPLIB.from_pretrained(path, device=model.device))
    index.check_model(embedder)
    return embedder


def retrieve_examples(index: ExampleIndex, embedder: ImageEmbedder, image: np.ndarray, k: int = 3, *,
                      label: str | None = None) -> list[Example]:
    """The top-k examples for an (H, W, 3) uint8 query image (never the image itself), read and checked
    (`load_example`: a library file gone since indexing is an InputError naming it), best first."""
    return [load_example(h.image, h.mask, label=h.label) for h in query(index, embedder, image, k, label=label)]
