"""Volumes over real HTTP: a NIfTI upload and a zipped DICOM series return the mask volume as
NIfTI on the input's grid (the same mask the Python API gives), and oversized or malformed uploads
get a 4xx JSON error while the server keeps serving."""

from __future__ import annotations

import base64
import gzip
import io
import tempfile
import zipfile
from pathlib import Path
from typing import Iterator

import httpx
import nibabel as nib
import numpy as np
import pytest
from conftest import KVASIR_QUESTION

from medplib.data.dicom_series import read_dicom_series
from medplib.data.nifti import read_nifti_volume
from medplib.data.phantoms3d import make_phantom_volume, write_phantom_volume
from medplib.inference import Predictor
from medplib.serving.app import ServerSettings, create_app
from medplib.serving.testing import background_server

KEY = "vol-key"
MAX_BYTES = 1 << 20
MAX_VOXELS = 100_000


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    phantom = make_phantom_volume("ct", seed=5, shape=(40, 36, 8))
    return write_phantom_volume(phantom, tmp_path_factory.mktemp("volcase"), dicom=True)


@pytest.fixture(scope="module")
def server(kvasir_model: Path) -> Iterator[str]:
    settings = ServerSettings(model_name="kvasir-tiny", api_key=KEY, max_volume_bytes=MAX_BYTES,
                              max_volume_voxels=MAX_VOXELS, max_volume_files=20)
    with background_server(create_app(Predictor.from_pretrained(kvasir_model), settings)) as base:
        yield base


def _url(data: bytes, mime: str = "application/gzip") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def _post(server: str, path: str, body: object = None, content: bytes | None = None) -> httpx.Response:
    return httpx.post(server + path, json=body, content=content, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=120)


def _zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


def _mask(b64: str) -> nib.Nifti1Image:
    return nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(b64)))


def test_nifti_upload_returns_the_mask_volume(server: str, case: dict[str, str], kvasir_model: Path) -> None:
    r = _post(server, "/v1/volume/segment", {"volume": _url(Path(case["image"]).read_bytes()),
                                             "question": KVASIR_QUESTION, "return_slices": True})
    assert r.status_code == 200, r.text
    out = r.json()
    vol = read_nifti_volume(case["image"])
    mask = _mask(out["mask_nifti_base64"])
    assert mask.shape == vol.shape and np.allclose(mask.affine, vol.affine)
    data = np.asarray(mask.dataobj) > 0
    assert out["shape"] == list(vol.shape) and out["voxels"] == int(data.sum()) > 0
    assert out["slices"] == list(range(8)) and len(out["scores"]) == 8 and len(out["slice_pngs"]) == 8
    assert [m is not None for m in out["mask_pngs"]] == list(data.any(axis=(0, 1)))
    # the same mask as the Python API on the same file
    p = Predictor.from_pretrained(kvasir_model)
    p.set_volume(case["image"])
    local = p.ask_volume(KVASIR_QUESTION)
    assert np.array_equal(local.mask, data)
    assert out["scores"] == [None if np.isnan(s) else pytest.approx(float(s), abs=1e-5) for s in local.scores]

    raw = _post(server, "/v1/volume/segment", {"volume": _url(Path(case["image"]).read_bytes()), "target": "polyp",
                                               "slices": [2], "response_format": "nifti"})
    assert raw.status_code == 200 and raw.headers["content-type"] == "application/gzip"
    only = np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(raw.content)).dataobj) > 0
    assert not np.delete(only, 2, axis=2).any()


def test_zipped_dicom_series_with_hostile_names_reads_flat(server: str, case: dict[str, str]) -> None:
    files = sorted(Path(case["dicom"]).iterdir())
    names = ["../../escape.dcm", "/abs/slice.dcm", "nested/dir/a.dcm", "b", "c.dcm", "d.dcm", "e.dcm", "f.dcm"]
    archive = _zip({n: f.read_bytes() for n, f in zip(names, files)} | {"__MACOSX/._b": b"junk", "DICOMDIR": b"x"})
    r = _post(server, "/v1/volume/segment", {"volume": _url(archive, "application/zip"), "question": KVASIR_QUESTION,
                                             "regions": [{"box": [5, 5, 1, 30, 30, 3]}]})
    assert r.status_code == 200, r.text
    series = read_dicom_series(case["dicom"])
    mask = _mask(r.json()["mask_nifti_base64"])
    assert mask.shape == series.shape and np.allclose(mask.affine, series.affine)  # the series' own voxel order
    assert r.json()["slices"] == [1, 2, 3]
    # unpacking happens under the temporary folder: a member path followed would have landed beside it
    assert not any((Path(tempfile.gettempdir()) / up / "escape.dcm").exists() for up in (".", ".."))

    pre = _post(server, "/v1/volume/preview", {"volume": _url(archive, "application/zip"), "axis": 0})
    assert pre.status_code == 200 and pre.json()["n"] == 40 and len(pre.json()["slice_pngs"]) == 40
    assert (pre.json()["height"], pre.json()["width"]) == (8, 36)  # axis 0: rows superior..inferior, columns y


def test_bad_volume_uploads_get_4xx_and_the_server_keeps_serving(server: str, case: dict[str, str]) -> None:
    good = {"volume": _url(Path(case["image"]).read_bytes()), "target": "liver", "slices": "middle"}

    def status(body: object = None, content: bytes | None = None, path: str = "/v1/volume/segment") -> tuple[int, str]:
        r = _post(server, path, body, content)
        assert r.headers["content-type"].startswith("application/json")
        return r.status_code, r.json()["error"]["message"]

    big = nib.Nifti1Image(np.zeros((64, 64, 64), dtype=np.uint8), np.eye(4))  # 262,144 voxels, a few kB gzipped
    cases = [
        (status(content=b"x" * (MAX_BYTES + 10)), 413, "over the limit"),
        (status({**good, "volume": _url(gzip.compress(big.to_bytes()))}), 413, "voxels is over the limit"),
        (status({**good, "volume": _url(b"not a volume at all")}), 400, "NIfTI file"),
        (status({**good, "volume": _url(Path(case["image"]).read_bytes()[:400])}), 400, "not a readable NIfTI"),
        (status({**good, "volume": _url(_zip({"notes.txt": b"hello"}))}), 400, "no DICOM"),
        (status({**good, "volume": _url(_zip({f"{i}.dcm": b"x" for i in range(25)}))}), 413, "25 files"),
        (status({**good, "volume": _url(_zip({"bomb.dcm": bytes(5 * MAX_BYTES)}))}), 413, "unpacks to more"),
        (status({**good, "volume": _url(b"PK\x03\x04broken")}), 400, "zip"),
        (status({**good, "target": None}), 400, "exactly one of"),
        (status({**good, "axis": 3}), 400, "axis"),
        (status({**good, "regions": [{"point": [99, 0, 0]}]}), 400, "outside the volume"),
        (status({**good, "slices": [8]}), 400, "out of range"),
        (status({**good, "postprocess": ["blur"]}), 400, "postprocess"),
        (status({**good, "surprise": 1}), 400, "surprise"),
    ]
    for (got, message), want, fragment in cases:
        assert got == want and fragment.lower() in message.lower(), (got, message, fragment)
        assert "/tmp" not in message and "medplib-volume" not in message  # no server paths in errors
    assert httpx.get(server + "/healthz", timeout=10).status_code == 200
    assert _post(server, "/v1/volume/segment", good).status_code == 200
    assert httpx.post(server + "/v1/volume/segment", json=good, timeout=30).status_code == 401  # no key
