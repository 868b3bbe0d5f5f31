"""Malformed samples and files (generated with hypothesis, 1,000+ cases) end in a clear medplib
error: never another exception, never a hang."""

from __future__ import annotations

import json
import signal
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medplib.data.images import read_image
from medplib.data.masks import read_mask, rle_decode
from medplib.data.schema import parse_sample, read_jsonl
from medplib.errors import DataValidationError, InputError, MedplibError

GOOD = {
    "id": "s1", "image": "a.png",
    "conversations": [{"role": "user", "content": "<image>\nWhat is <region>?"},
                      {"role": "assistant", "content": "The liver [SEG]."}],
    "regions": [{"kind": "box", "box": [1, 2, 3, 4]}], "targets": [{"mask": "m.png", "box": [1, 2, 3, 4]}],
    "modality": "ct", "task": "region_vqa", "answer_type": "open", "split": "train",
}
junk = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True), st.text(max_size=5),
                 st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@contextmanager
def deadline(seconds: int = 5):
    """Fail instead of hanging."""
    def _raise(*_: object) -> None:
        raise TimeoutError("hang")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@st.composite
def broken_samples(draw) -> dict:
    s = json.loads(json.dumps(GOOD))
    how = draw(st.sampled_from(["drop", "junk", "roles", "regions", "seg", "box", "extra", "empty_turns"]))
    if how == "drop":
        s.pop(draw(st.sampled_from(["id", "image", "conversations"])))
    elif how == "junk":
        key = draw(st.sampled_from(
            ["id", "image", "conversations", "regions", "targets", "split", "task", "answer_type"]))
        value = draw(junk)
        allowed = {"split": ("train", "val", "test"), "task": (None, "region_vqa"),
                   "answer_type": (None, "open", "closed")}
        if key in ("id", "image") and isinstance(value, str) and value:
            value = 0  # any non-empty string is a valid id or image
        elif key in allowed and value in allowed[key]:
            value = 3
        s[key] = value
    elif how == "roles":
        s["conversations"][0]["role"] = draw(st.sampled_from(["assistant", "system", "", "USER"]))
    elif how == "regions":
        s["regions"] = s["regions"] * draw(st.integers(2, 4))  # more regions than placeholders
    elif how == "seg":
        s["conversations"][1]["content"] += " [SEG]" * draw(st.integers(1, 3))  # more [SEG] than mask targets
    elif how == "box":
        x1, x2 = draw(st.integers(5, 50)), draw(st.integers(0, 4))
        s["regions"] = [{"kind": "box", "box": [x1, 0, x2, 1]}]  # x2 < x1
    elif how == "extra":
        s[draw(st.text(min_size=1, max_size=6).filter(lambda k: k not in GOOD and k not in (
            "source", "group", "meta", "modality", "task", "answer_type", "split", "regions", "targets")))] = 1
    else:
        s["conversations"] = s["conversations"][:draw(st.integers(0, 1))]
    return s


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(obj=broken_samples())
def test_malformed_samples_raise_data_validation_errors(obj: dict) -> None:
    with deadline():
        try:
            parse_sample(obj, path="f.jsonl", line=3)
        except DataValidationError as exc:
            assert str(exc).startswith("f.jsonl:3: ")
        else:
            raise AssertionError(f"accepted a malformed sample: {obj}")


SUFFIXES = [".png", ".jpg", ".tif", ".dcm", ".nii", ".nii.gz", ".npz", ".jsonl"]
HEADERS = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"II*\x00", b"\x00" * 128 + b"DICM", b"\x5c\x01\x00\x00",
           b"PK\x03\x04", b"\x1f\x8b", b'{"id": "x", "image": 1}\n']


@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(suffix=st.sampled_from(SUFFIXES), header=st.sampled_from(HEADERS), body=st.binary(max_size=600))
def test_malformed_files_raise_medplib_errors(tmp_path: Path, suffix: str, header: bytes, body: bytes) -> None:
    path = tmp_path / f"f{suffix}"
    path.write_bytes(header + body)
    with deadline():
        for read in (lambda: read_image(path), lambda: read_mask(str(path)), lambda: list(read_jsonl(path))):
            try:
                read()
            except MedplibError as exc:
                assert str(exc)
            # a file that happens to parse is fine; any other exception fails the test


@settings(max_examples=200, deadline=None)
@given(size=st.lists(st.integers(-3, 40), min_size=2, max_size=2),
       counts=st.one_of(st.lists(st.integers(-5, 200), max_size=8), st.text(max_size=12)))
def test_malformed_rle_raises_input_error(size: list[int], counts) -> None:
    with deadline():
        try:
            mask = rle_decode({"size": size, "counts": counts})
        except InputError:
            return
        assert mask.shape == tuple(size) and mask.dtype == np.bool_
