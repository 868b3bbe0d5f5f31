"""Volumes over HTTP: `POST /v1/volume/segment` (a NIfTI file or a zip of one DICOM series in, the
mask volume out as NIfTI, with per-slice scores) and `POST /v1/volume/preview` (the slices as the
model sees them, for the web page's slice slider).

Uploads are checked before any model time is spent: the body's bytes (`max_volume_bytes`), the
voxel count from the NIfTI header or the DICOM headers (`max_volume_voxels`), and for a zip the
number of members (`max_volume_files`) and their unpacked size (4 x `max_volume_bytes`). Zip
members are written flat into a fresh temporary folder under generated names: a member's own
path (`../x`, `/etc/x`, links) is never followed. Error messages never show the server's paths.
"""

from __future__ import annotations

import base64
import io
import tempfile
import uuid
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional, Union

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from medplib.data.volume import Volume
from medplib.errors import InputError
from medplib.serving.errors import PayloadTooLarge
from medplib.serving.inputs import decode_data_url, read_body, segment_question
from medplib.volume_inference import POSTPROCESS, VolumePrediction, VolumeSlices, ask_volume, region_from_json

if TYPE_CHECKING:
    from medplib.serving.app import Server

_UNZIP_FACTOR = 4  # a zip may unpack to this many times the upload limit
_NIFTI_MAGIC = (b"n+1\x00", b"ni1\x00")  # at byte 344 of a NIfTI-1 header; NIfTI-2 has b"n+2\x00" at 4
_MAX_PREVIEW_SLICES = 1024


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VolumeRegion(_Strict):
    point: Optional[list[float]] = Field(None, description="[i, j, k] voxel indices")
    box: Optional[list[int]] = Field(None, description="[i1, j1, k1, i2, j2, k2] voxel indices, inclusive")


class VolumePreviewRequest(_Strict):
    volume: str = Field(description="a NIfTI file (.nii or .nii.gz) or a zip of one DICOM series, as a base64 data URL")
    axis: int = Field(2, ge=0, le=2, description="voxel axis to slice along")
    series_uid: Optional[str] = Field(None, description="the series to read when the zip holds several")


class VolumeSegmentRequest(VolumePreviewRequest):
    model: Optional[str] = None
    target: Optional[str] = Field(None, description='what to segment, e.g. "liver" (asks "Please segment the liver.")')
    question: Optional[str] = Field(None, description="any question instead of a target")
    slices: Union[Literal["all", "middle"], list[int], None] = Field(
        None, description="slices to ask: all, middle, indices; default: every slice for a grounding question, "
                          "the middle one (of those the regions touch) otherwise")
    regions: list[VolumeRegion] = Field(default_factory=list, description="region prompts in voxel coordinates")
    postprocess: list[Literal["largest_component", "consistency"]] = Field(default_factory=list)
    max_tokens: Optional[int] = Field(None, ge=1)
    return_slices: bool = Field(False, description="also send every slice and its mask as PNGs (for viewers)")
    response_format: Literal["json", "nifti"] = Field(
        "json", description="json: the mask as base64 NIfTI in JSON; nifti: the .nii.gz file itself")


def _parse(model: type[BaseModel], body: bytes) -> Any:
    from medplib.serving.app import _parse as parse

    return parse(model, body)


def _clean(message: str, folder: Path) -> str:
    return message.replace(f"{folder}/", "").replace(str(folder), "the upload")


def _nifti_volume(data: bytes, folder: Path, max_voxels: int) -> Volume:
    import nibabel as nib

    from medplib.data.nifti import read_nifti_volume

    gz = data[:2] == b"\x1f\x8b"
    path = folder / ("upload.nii.gz" if gz else "upload.nii")
    path.write_bytes(data)
    try:
        shape = nib.load(str(path)).shape  # the header only: the voxels are not read yet
    except Exception as exc:  # noqa: BLE001 - nibabel, gzip and zlib raise many types on a broken file
        raise InputError(f"the upload is not a readable NIfTI file ({_clean(str(exc), folder)})") from None
    voxels = int(np.prod(shape[:3])) if len(shape) >= 3 else 0
    if voxels > max_voxels:
        raise PayloadTooLarge(f"volume of {' x '.join(map(str, shape[:3]))} = {voxels} voxels "
                              f"is over the limit of {max_voxels}")
    try:
        return read_nifti_volume(path)
    except InputError as exc:
        raise InputError(f"the upload is not a readable NIfTI file ({_clean(str(exc), folder)})") from None


def _dicom_zip_volume(data: bytes, folder: Path, max_bytes: int, max_files: int, max_voxels: int,
                      series_uid: str | None) -> Volume:
    import pydicom

    from medplib.data.dicom_series import read_dicom_series

    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = [m for m in archive.infolist() if not m.is_dir()]
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise InputError(f"the upload is not a readable zip file ({exc})") from None
    if not members:
        raise InputError("the zip holds no files: send a zip of one DICOM series")
    if len(members) > max_files:
        raise PayloadTooLarge(f"the zip holds {len(members)} files, over the limit of {max_files}")
    limit = _UNZIP_FACTOR * max_bytes
    if sum(m.file_size for m in members) > limit:
        raise PayloadTooLarge(f"the zip unpacks to more than {limit} bytes")
    series = folder / "series"
    series.mkdir()
    total = 0
    for n, member in enumerate(members):
        name = Path(member.filename).name
        if name.startswith(".") or name.upper() == "DICOMDIR":
            continue  # hidden files (macOS __MACOSX/._x) and the index are not slices
        # A generated name (the member's path is never used); .dcm kept so a corrupt slice is named, not skipped.
        target = series / (f"{n:05d}" + (".dcm" if name.lower().endswith((".dcm", ".dicom")) else ""))
        try:
            with archive.open(member) as src, open(target, "wb") as dst:
                while chunk := src.read(1 << 20):
                    total += len(chunk)
                    if total > limit:  # declared sizes can lie
                        raise PayloadTooLarge(f"the zip unpacks to more than {limit} bytes")
                    dst.write(chunk)
        except (zipfile.BadZipFile, NotImplementedError, RuntimeError, OSError, EOFError) as exc:
            raise InputError(f"zip member {member.filename!r} cannot be unpacked ({exc})") from None
    voxels = 0
    for path in series.iterdir():  # headers only, before any pixel is decoded
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            voxels += (int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0)
                       * int(ds.get("NumberOfFrames", 1) or 1))
        except Exception:  # noqa: BLE001 - not DICOM: the series reader skips or names it
            continue
    if voxels > max_voxels:
        raise PayloadTooLarge(f"the series has {voxels} voxels, over the limit of {max_voxels}")
    try:
        return read_dicom_series(series, series_uid)
    except InputError as exc:
        raise InputError(_clean(str(exc), series)) from None


def decode_volume(data: bytes, *, max_bytes: int, max_files: int, max_voxels: int,
                  series_uid: str | None = None) -> Volume:
    """Upload bytes (NIfTI, gzipped NIfTI, or a zip of a DICOM series) -> Volume, within the limits."""
    with tempfile.TemporaryDirectory(prefix="medplib-volume-") as tmp:
        folder = Path(tmp)
        if data[:4] == b"PK\x03\x04":
            vol = _dicom_zip_volume(data, folder, max_bytes, max_files, max_voxels, series_uid)
        elif data[:2] == b"\x1f\x8b" or data[344:348] in _NIFTI_MAGIC or data[4:8] == b"n+2\x00":
            vol = _nifti_volume(data, folder, max_voxels)
        else:
            raise InputError("a volume upload must be a NIfTI file (.nii, .nii.gz) or a zip of one DICOM series")
    if vol.voxels.size > max_voxels:  # a header that understated the size
        raise PayloadTooLarge(f"volume of {vol.voxels.size} voxels is over the limit of {max_voxels}")
    return vol


def _nifti_bytes(pred: VolumePrediction) -> bytes:
    with tempfile.TemporaryDirectory(prefix="medplib-mask-") as tmp:
        return pred.save_nifti(Path(tmp) / "mask.nii.gz").read_bytes()


def _slice_pngs(vs: VolumeSlices) -> list[str]:
    from medplib.serving.schemas import png_base64

    return [png_base64(vs.image(k)) for k in range(vs.n)]


def register(app: FastAPI, server: "Server") -> None:
    """Add the volume routes to the app."""
    settings = server.settings

    async def _volume(request: Request, model: type[BaseModel]) -> tuple[Any, Volume]:
        server.authorize(request)
        req = _parse(model, await read_body(request, settings.max_volume_bytes))
        data = decode_data_url(req.volume)
        vol = await run_in_threadpool(decode_volume, data, max_bytes=settings.max_volume_bytes,
                                      max_files=settings.max_volume_files, max_voxels=settings.max_volume_voxels,
                                      series_uid=req.series_uid)
        return req, vol

    async def preview(request: Request) -> JSONResponse:
        req, vol = await _volume(request, VolumePreviewRequest)
        vs = await run_in_threadpool(VolumeSlices, vol, req.axis)
        if vs.n > _MAX_PREVIEW_SLICES:
            raise PayloadTooLarge(f"{vs.n} slices along axis {req.axis} "
                                  f"are over the preview limit of {_MAX_PREVIEW_SLICES}")
        return JSONResponse({"shape": list(vol.shape), "axis": req.axis, "n": vs.n, "spacing": list(vol.spacing),
                             "orientation": vol.orientation, "width": int(vs.hw[1]), "height": int(vs.hw[0]),
                             "slice_pngs": await run_in_threadpool(_slice_pngs, vs)})

    async def segment(request: Request) -> Response:
        req, vol = await _volume(request, VolumeSegmentRequest)
        server.check_model(req.model)
        question = segment_question(req.target, req.question)
        server.check_prompt(question, [], list(req.regions))
        regions = [region_from_json(r.model_dump(exclude_none=True)) for r in req.regions]
        vs = await run_in_threadpool(VolumeSlices, vol, req.axis)
        cap = server.cap(req.max_tokens)

        def run() -> VolumePrediction:  # on the model thread
            return ask_volume(server.predictor, vs, question, regions, slices=req.slices,
                              postprocess=req.postprocess, max_new_tokens=cap)

        pred = await server.worker.submit(run)
        nifti = await run_in_threadpool(_nifti_bytes, pred)
        if req.response_format == "nifti":
            return Response(nifti, media_type="application/gzip",
                            headers={"Content-Disposition": 'attachment; filename="mask.nii.gz"'})
        body: dict[str, Any] = {
            "id": f"volseg-{uuid.uuid4().hex}", "object": "volume_segmentation", "model": settings.model_name,
            "text": pred.text, "texts": {str(k): t for k, t in pred.texts.items()}, "reference": pred.reference,
            "slices": pred.slices, "axis": pred.axis, "shape": list(vol.shape), "affine": vol.affine.tolist(),
            "scores": [None if np.isnan(s) else float(s) for s in pred.scores],
            "voxels": int(pred.mask.sum()), "volume_ml": float(pred.mask.sum() * np.prod(vol.spacing) / 1000.0),
            "postprocess": list(pred.postprocess), "timings": pred.timings,
            "mask_nifti_base64": base64.b64encode(nifti).decode("ascii"),
        }
        if req.return_slices:
            def pngs() -> tuple[list[str], list[str | None]]:
                from medplib.serving.schemas import png_base64

                masks = [vs.view(pred.mask, k) for k in range(vs.n)]
                return _slice_pngs(vs), [png_base64(m) if m.any() else None for m in masks]

            body["slice_pngs"], body["mask_pngs"] = await run_in_threadpool(pngs)
        return JSONResponse(body)

    app.add_api_route("/v1/volume/segment", segment, methods=["POST"])
    app.add_api_route("/v1/volume/preview", preview, methods=["POST"])


__all__ = ["POSTPROCESS", "VolumePreviewRequest", "VolumeSegmentRequest", "decode_volume", "register"]
