"""`Predictor`: the segment-anything predictor pattern for MedPLIB. An image's features are computed
once (`set_image`) and reused by every question about it (`ask`), so a second question costs only
the language model's decoding.

    p = Predictor.from_pretrained("runs/demo/model")
    p.set_image(rgb)                               # (H, W, 3) uint8, a PIL image, ImageData or a path
    out = p.ask("Please segment the polyp.")
    out.text, out.masks[0], out.boxes[0], out.timings
    stream = p.stream("What is shown?")
    for piece in stream: ...                       # text deltas (str)
    stream.result()                                # then the whole Prediction
    out = p.ask("Segment the same structure.", examples=[(ex_rgb, ex_mask)])  # in-context examples
    out = p.ask("Where is the polyp?", box_format="med-grit")  # boxes under a grammar -> out.text_boxes

Features are cached by image content (a hash of the pixels) in a small LRU bounded by entries and
bytes, so a server that sees the same image again in a later request skips the vision towers.
In-context example images (overlays, or images and mask images) go through the same cache.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np
import torch

from medplib.api import Answer, MedPLIB
from medplib.data.boxes import BoxFormat
from medplib.data.builder import SEGMENT_QUESTION as SEGMENT_TEMPLATE
from medplib.data.images import as_rgb
from medplib.data.schema import Region, Turn
from medplib.errors import InputError
from medplib.model.medplib import ImageFeatures
from medplib.processing import ImageInputs

if TYPE_CHECKING:
    from medplib.data.volume import Volume
    from medplib.volume_inference import VolumePrediction, VolumeSlices, VoxelRegion


@dataclass
class Prediction(Answer):
    """An Answer from the Predictor, with what it cost: `timings` image_s (what `set_image` spent
    just before; 0 when the features were reused), generate_s, total_s and tokens_per_s, plus
    examples_s with in-context examples and batch (its size) from `ask_batch`."""

    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class Query:
    """One question for `ask_many` or `ask_batch`: an image, the question and its regions (the fields
    after `history` are read by `ask_batch`; `ask_many` takes them as keyword arguments)."""

    image: Any
    question: str
    regions: Sequence[Region] = ()
    region_arrays: Sequence[np.ndarray | None] | None = None
    history: Sequence[Turn] = ()
    max_new_tokens: int | None = None
    temperature: float = 0.0
    on_text: Callable[[str], None] | None = None  # text deltas as they are decoded
    examples: Sequence[Any] = ()  # in-context (image, mask) pairs or Examples, shown before the image
    box_format: BoxFormat | None = None  # boxes in the answer decoded under this format's grammar


@dataclass
class _Entry:
    image: ImageInputs
    features: ImageFeatures
    nbytes: int


def _prediction(ans: Answer, image_s: float, generate_s: float) -> Prediction:
    """`ans` with its timings: the image's features cost `image_s`, decoding `generate_s`."""
    n, dt = len(ans.token_ids), generate_s
    return Prediction(**{f.name: getattr(ans, f.name) for f in fields(Answer)},
                      timings={"image_s": image_s, "generate_s": dt, "total_s": image_s + dt,
                               "tokens_per_s": n / dt if dt > 0 else 0.0})


def _image_key(rgb: np.ndarray) -> str:
    """The feature cache's key: a hash of the pixels and the shape."""
    return hashlib.blake2b(rgb.tobytes(), digest_size=16, person=str(rgb.shape).encode()[:16]).hexdigest()


def _nbytes(img: ImageInputs, feats: ImageFeatures) -> int:
    tensors = [img.vision_pixels, img.pixel_values]
    return sum(t.numel() * t.element_size() for t in tensors) + feats.nbytes()


class TextStream:
    """Incremental detokeniser: feed token ids, get the new text. A byte-level BPE piece can end
    in the middle of a multi-byte character; that shows as U+FFFD, so it is held back until the
    next token completes it."""

    def __init__(self, decode: Callable[[list[int]], str], skip: Sequence[int] = ()):
        self._decode, self._skip = decode, set(skip)
        self._ids: list[int] = []
        self._sent = 0

    def push(self, token_id: int) -> str:
        if token_id in self._skip:
            return ""
        self._ids.append(token_id)
        text = self._decode(self._ids)
        if text.endswith("\ufffd"):
            return ""
        delta, self._sent = text[self._sent:], len(text)
        return delta


class PredictionStream(Iterator[str]):
    """One answer being decoded: iterating yields its text deltas (str) in order; `result()` waits
    for the end and returns the Prediction (or raises what decoding raised, as iterating does)."""

    def __init__(self, run: Callable[[Callable[[str], None]], Prediction]):
        self._pieces: queue.Queue[str | None] = queue.Queue()  # None: decoding has ended
        self._done = threading.Event()
        self._prediction: Prediction | None = None
        self._error: BaseException | None = None
        threading.Thread(target=self._work, args=(run,), name="medplib-stream", daemon=True).start()

    def _work(self, run: Callable[[Callable[[str], None]], Prediction]) -> None:
        try:
            self._prediction = run(self._pieces.put)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            self._error = exc
        finally:
            self._done.set()
            self._pieces.put(None)

    def __next__(self) -> str:
        piece = self._pieces.get()
        if piece is None:
            self._pieces.put(None)  # a later call ends too
            if self._error is not None:
                raise self._error
            raise StopIteration
        return piece

    def result(self, timeout: float | None = None) -> Prediction:
        """The Prediction once decoding has ended (waits at most `timeout` seconds; None: as long as it takes)."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"the answer was not finished within {timeout} s")
        if self._error is not None:
            raise self._error
        assert self._prediction is not None
        return self._prediction


class Predictor:
    """Answers questions about one image at a time, reusing its features (thread-safe: one
    question runs at a time)."""

    def __init__(self, model: MedPLIB, *, cache_entries: int = 16, cache_bytes: int = 256 << 20):
        self.model = model
        self.cache_entries, self.cache_bytes = cache_entries, cache_bytes
        self._cache: OrderedDict[str, _Entry] = OrderedDict()
        self._key: str | None = None
        self._image_s = 0.0  # what set_image spent, reported by the next question
        self._volume: VolumeSlices | None = None  # what set_volume made current
        self._lock = threading.RLock()

    @classmethod
    def from_pretrained(cls, folder: str | Path, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None, quantize: str | None = None,
                        **kwargs: Any) -> "Predictor":
        """`quantize`: None, "int8" (CPU or CUDA) or "nf4" (CUDA), see `MedPLIB.from_pretrained`."""
        return cls(MedPLIB.from_pretrained(folder, device=device, dtype=dtype, quantize=quantize), **kwargs)

    # ------------------------------------------------------------------ image
    @property
    def original_hw(self) -> tuple[int, int]:
        """(H, W) of the current image."""
        return self._current().image.original_hw

    def _current(self) -> _Entry:
        if self._key is None or self._key not in self._cache:
            raise InputError("no image is set: call set_image() first")
        return self._cache[self._key]

    def set_image(self, image: Any) -> float:
        """Make `image` current, computing its vision and pixel features unless they are cached.
        Returns the seconds spent computing (0.0 on a cache hit)."""
        rgb = as_rgb(image)
        key = _image_key(rgb)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                self._key, self._image_s = key, 0.0
                return 0.0
            t0 = time.perf_counter()
            img, feats = self.model.image_features(rgb)
            with torch.no_grad():
                # Computed now rather than at the first [SEG], so every question after this one is cheap.
                feats.pixel = self.model.model.encode_pixels(img.pixel_values[None].to(self.model.device))
            self._cache[key] = _Entry(img, feats, _nbytes(img, feats))
            self._key, self._image_s = key, time.perf_counter() - t0
            self._evict()
            return self._image_s

    def _example_features(self, examples: Sequence[Any]) -> list[torch.Tensor]:
        """In-context examples (Examples or (image, mask) pairs, checked) -> their prompt images' vision
        features (1, N, Dv), in prompt order, through the per-image cache. The current image stays current."""
        out = []
        for rgb in self.model.processor.example_images(examples):
            key = _image_key(rgb)
            entry = self._cache.get(key)
            if entry is None:
                # Vision features only: the pixel encoder runs on the query (computed lazily should
                # this image become one).
                img, feats = self.model.image_features(rgb)
                entry = self._cache[key] = _Entry(img, feats, _nbytes(img, feats))
            self._cache.move_to_end(key)
            out.append(entry.features.vision)
        if self._key in self._cache:
            self._cache.move_to_end(self._key)  # eviction drops the oldest: never the current image
        self._evict()
        return out

    def _evict(self) -> None:
        # Least recently used first; the current image always stays.
        while len(self._cache) > 1 and (len(self._cache) > self.cache_entries
                                        or sum(e.nbytes for e in self._cache.values()) > self.cache_bytes):
            self._cache.popitem(last=False)

    def region_masks(self, regions: Sequence[Region],
                     region_arrays: Sequence[np.ndarray | None] | None = None) -> list[np.ndarray]:
        """The regions as the model sees them, mapped back to (H, W) bool masks of the current
        image (for drawing outlines). Raises InputError for a region outside the image."""
        return self.model.processor.region_footprints(regions, region_arrays, self.original_hw)

    # ------------------------------------------------------------------ questions
    def ask(
        self,
        question: str,
        regions: Sequence[Region] = (),
        region_arrays: Sequence[np.ndarray | None] | None = None,
        history: Sequence[Turn] = (),
        *,
        max_new_tokens: int | None = None,
        use_cache: bool = True,
        temperature: float = 0.0,
        on_text: Callable[[str], None] | None = None,
        examples: Sequence[Any] = (),
        box_format: BoxFormat | None = None,
    ) -> Prediction:
        """Answer `question` about the current image. Regions are in original pixels, one per
        `<region>` (appended when the conversation has none); `on_text` receives text deltas.
        `examples`: in-context (image, mask) pairs (or `retrieval.examples.Example`s) shown before the
        image, encoded per the model's `icl.encoding`; the masks answer for the current image.
        `timings["image_s"]` is what `set_image` spent on this image just before (0 when reused);
        `timings["examples_s"]` what the examples' features cost (0 when all were cached).
        `box_format` ("med-grit" or "minigpt"): boxes in the answer are decoded under that format's
        grammar and read into `text_boxes` (`MedPLIB.generate`); None: unconstrained."""
        with self._lock:
            entry = self._current()
            t_ex = time.perf_counter()
            example_feats = self._example_features(examples)
            examples_s = time.perf_counter() - t_ex
            t0 = time.perf_counter()
            ans = self.model.generate(
                None, question, regions, region_arrays, history, features=(entry.image, entry.features),
                max_new_tokens=max_new_tokens, use_cache=use_cache, temperature=temperature,
                on_token=self._on_token(on_text), example_features=example_feats, box_format=box_format,
            )
            dt = time.perf_counter() - t0
            entry.nbytes = _nbytes(entry.image, entry.features)
            image_s, self._image_s = self._image_s, 0.0
        pred = _prediction(ans, image_s, dt)
        if examples:
            pred.timings["examples_s"] = examples_s
        return pred

    def ask_batch(self, queries: Sequence[Query]) -> list[Prediction | Exception]:
        """Answer several questions, each about its own image with its own regions, history, token
        limit, text callback and box format, decoded together in one padded batch (`MedPLIB.generate_batch`).

        Returns per query its Prediction or the exception it alone raised (a bad image, region or
        prompt, a failing callback): the others are answered as if it had not been there, and greedy
        answers equal `ask`'s. An error of the batch as a whole is raised. `timings["generate_s"]`
        is the batch's decoding time, shared by its answers; `timings["batch"]` its size."""
        out: list[Prediction | Exception | None] = [None] * len(queries)
        with self._lock:
            ready: list[tuple[int, _Entry, float, Any]] = []
            for i, q in enumerate(queries):
                try:
                    image_s = self.set_image(q.image)
                    entry = self._current()  # held here: a later image of the batch may evict it from the cache
                    self._image_s = 0.0
                    req = self.model.decode_request(q.question, q.regions, q.region_arrays, q.history,
                                                    features=(entry.image, entry.features),
                                                    max_new_tokens=q.max_new_tokens, temperature=q.temperature,
                                                    on_token=self._on_token(q.on_text),
                                                    examples=self._example_features(q.examples),
                                                    box_format=q.box_format)
                except Exception as exc:  # noqa: BLE001 - this query's own failure
                    out[i] = exc
                    continue
                ready.append((i, entry, image_s, req))
            t0 = time.perf_counter()
            answers = self.model.generate_batch([r[3] for r in ready]) if ready else []
            dt = time.perf_counter() - t0
            for (i, entry, image_s, _req), ans in zip(ready, answers):
                entry.nbytes = _nbytes(entry.image, entry.features)
                if isinstance(ans, Exception):
                    out[i] = ans
                    continue
                pred = _prediction(ans, image_s, dt)
                pred.timings["batch"] = float(len(ready))
                out[i] = pred
        return out  # type: ignore[return-value]

    def _on_token(self, on_text: Callable[[str], None] | None) -> Callable[[int], None] | None:
        """A token callback that detokenises incrementally and hands on the text deltas."""
        if on_text is None:
            return None
        proc = self.model.processor
        stream = TextStream(proc.decode, skip=(proc.tokenizer.eos_token_id, proc.tokenizer.pad_token_id))

        def on_token(tid: int) -> None:
            delta = stream.push(tid)
            if delta:
                on_text(delta)

        return on_token

    def segment(self, target: str, regions: Sequence[Region] = (), **kwargs: Any) -> Prediction:
        """Ground `target` ("polyp", "liver", ...) with the grounding question the model was trained on."""
        return self.ask(SEGMENT_TEMPLATE.format(target=target.strip()), regions, **kwargs)

    def stream(self, question: str, regions: Sequence[Region] = (), **kwargs: Any) -> PredictionStream:
        """Like `ask`, but the answer's text arrives piece by piece: iterate the returned stream for
        the text deltas (str) as they are decoded, then read the whole Prediction from its `result()`.
        Decoding starts at once, on a helper thread; an error there is raised by both."""
        return PredictionStream(lambda on_text: self.ask(question, regions, on_text=on_text, **kwargs))

    def ask_many(self, queries: Sequence[Query], **kwargs: Any) -> list[Prediction]:
        """Answer a batch, in the given order. Questions on the same image share its features
        (queries are grouped by image content); decoding is one sample at a time."""
        rgbs = [as_rgb(q.image) for q in queries]
        order = sorted(range(len(queries)), key=lambda i: hashlib.blake2b(rgbs[i].tobytes(), digest_size=8).digest())
        results: dict[int, Prediction] = {}
        with self._lock:
            for i in order:
                q = queries[i]
                self.set_image(rgbs[i])
                results[i] = self.ask(q.question, q.regions, q.region_arrays, q.history, **kwargs)
        return [results[i] for i in range(len(queries))]

    # ------------------------------------------------------------------ volumes
    def prefetch(self, images: Sequence[Any]) -> float:
        """Compute the features of the images not yet cached in one batched forward pass per tower
        and cache them (the last one stays current). Returns the seconds spent."""
        rgbs = [as_rgb(im) for im in images]
        with self._lock:
            keys = [_image_key(rgb) for rgb in rgbs]
            todo = {k: rgb for k, rgb in zip(keys, rgbs) if k not in self._cache}
            if not todo:
                return 0.0
            t0 = time.perf_counter()
            model, dev = self.model, self.model.device
            dtype = next(model.model.parameters()).dtype
            prepared = [model.processor.prepare_image(rgb) for rgb in todo.values()]
            with torch.no_grad():
                vision = model.model.encode_vision(torch.stack([p.vision_pixels for p in prepared]).to(dev, dtype))
                pixel = model.model.encode_pixels(torch.stack([p.pixel_values for p in prepared]).to(dev))
            for b, (key, img) in enumerate(zip(todo, prepared)):
                # clone: a cached slice must not keep the whole batch's storage alive
                feats = ImageFeatures(vision=vision[b:b + 1].clone(), pixel=pixel[b:b + 1].clone())
                self._cache[key] = _Entry(img, feats, _nbytes(img, feats))
            self._key = keys[-1]
            self._evict()
            return time.perf_counter() - t0

    def set_volume(self, volume: "Volume | str | Path", axis: int = 2, *, window: tuple[float, float] | None = None
                   ) -> "VolumeSlices":
        """Make a volume current for `ask_volume`: a Volume, a NIfTI file or a DICOM series folder,
        cut along voxel axis `axis`; `window` (low, high) overrides the per-volume percentile
        window. See medplib.volume_inference for how slices are shown to the model."""
        from medplib.volume_inference import VolumeSlices, as_volume

        with self._lock:
            self._volume = VolumeSlices(as_volume(volume), axis, window)
            return self._volume

    def ask_volume(self, question: str, regions: "Sequence[VoxelRegion]" = (), **kwargs: Any) -> "VolumePrediction":
        """Answer `question` about the current volume, slice by slice: a mask volume aligned with
        the input and per-slice scores (keywords: slices, postprocess, batch_size, verbose,
        max_new_tokens; see medplib.volume_inference.ask_volume)."""
        from medplib.volume_inference import ask_volume

        if self._volume is None:
            raise InputError("no volume is set: call set_volume() first")
        return ask_volume(self, self._volume, question, regions, **kwargs)

    def segment_volume(self, target: str, regions: "Sequence[VoxelRegion]" = (), **kwargs: Any) -> "VolumePrediction":
        """Ground `target` on every slice of the current volume (or every slice the regions touch)."""
        kwargs.setdefault("slices", "all")
        return self.ask_volume(SEGMENT_TEMPLATE.format(target=target.strip()), regions, **kwargs)
