"""The user-facing front ends of the Predictor as `medplib` commands: `ask` (one question from
the shell) and `serve` (the HTTP API and web page). Registered in `medplib.cli`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np
import typer

from medplib.errors import InputError

QUANTIZE_HELP = ("int8 or nf4: the LLM's Linear layers quantised (int8 on the CPU: torch dynamic int8; on CUDA: "
                 "bitsandbytes int8 / nf4); vision, pixel encoder, mask decoder and [SEG] projection "
                 "stay full precision")


def _numbers(text: str, n: int, what: str) -> tuple[float, ...]:
    parts = text.replace(" ", "").split(",")
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != n:
        raise InputError(f"--{what} {text!r} must be {n} comma-separated numbers")
    return values


def _image_ref(image: Path, slice_index: Optional[int], axis: int) -> str:
    """The file plus the reader options: a NIfTI slice, or a DICOM/TIFF frame."""
    nifti = image.name.lower().endswith((".nii", ".nii.gz"))
    if nifti:
        return f"{image}#axis={axis}" + (f",index={slice_index}" if slice_index is not None else "")
    return f"{image}#frame={slice_index}" if slice_index is not None else str(image)


def _example_pair(text: str) -> tuple[Path, Path]:
    """`--example IMG:MASK` -> (image path, mask path); split at the last colon."""
    image, sep, mask = text.rpartition(":")
    if not sep or not image or not mask:
        raise InputError(f"--example {text!r} must be IMAGE:MASK (an image file and its mask file)")
    return Path(image), Path(mask)


def _examples(example: list[str], retrieve: Optional[Path], k: int, label: Optional[str], rgb: np.ndarray,
              model: Any) -> list[Any]:
    """The hand-given examples (checked, in order), then the index's top-k for the image (never itself)."""
    from medplib.retrieval.examples import as_example

    out = [as_example(_example_pair(e), where=f"--example {e}") for e in example]
    if retrieve is not None:
        from medplib.retrieval.index import ExampleIndex, embedder_for, retrieve_examples

        index = ExampleIndex.load(retrieve)
        hits = retrieve_examples(index, embedder_for(index, model), rgb, k, label=label)
        if not hits:
            raise InputError(f"the index {retrieve} has no example" + (f" labelled {label!r}" if label else "")
                             + " other than the image itself")
        out += hits
    return out


def _mask_paths(path: Path, n: int) -> list[Path]:
    """out.png for the first mask, out_2.png, out_3.png ... for the others."""
    return [path if k == 0 else path.with_name(f"{path.stem}_{k + 1}{path.suffix}") for k in range(n)]


def ask(
    image: Path = typer.Argument(..., help="PNG/JPG/TIFF, DICOM, or NIfTI (with --slice) image file; or a volume: "
                                 "a NIfTI file or a DICOM series folder (see --volume)"),
    question: str = typer.Argument(..., help="the question; <region> marks where a region goes (appended if absent)"),
    model: Path = typer.Option(..., "--model", help="a saved medplib model folder"),
    point: list[str] = typer.Option([], "--point", help="x,y in pixels; i,j,k voxels on a volume (repeatable)"),
    box: list[str] = typer.Option([], "--box", help="x1,y1,x2,y2 in pixels; i1,j1,k1,i2,j2,k2 voxels (inclusive) "
                                  "on a volume (repeatable)"),
    region_mask: list[Path] = typer.Option([], "--region-mask", help="free-form region as a mask image (repeatable)"),
    slice_index: Optional[int] = typer.Option(None, "--slice",
                                              help="NIfTI slice index (default: middle) or DICOM/TIFF frame"),
    axis: int = typer.Option(2, help="NIfTI slice axis: 0 sagittal, 1 coronal, 2 axial"),
    mask_out: Optional[Path] = typer.Option(None, "--mask-out", help="write the mask as PNG (more masks: NAME_2.png, "
                                            "...); a .nii/.nii.gz name writes a volume's mask"),
    overlay_out: Optional[Path] = typer.Option(None, "--overlay-out",
                                               help="write the image with masks and regions drawn"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object instead of text"),
    volume: bool = typer.Option(False, "--volume", help="treat IMAGE as a volume and answer slice by slice along "
                                "--axis (implied by a folder, a NIfTI --mask-out or --dicom-seg-out); --slice then "
                                "names the slice to ask"),
    dicom_seg_out: Optional[Path] = typer.Option(None, "--dicom-seg-out", help="write a volume's mask as DICOM SEG "
                                                 "over the input DICOM series"),
    postprocess: list[str] = typer.Option([], "--postprocess", help="3-D post-processing of a volume's mask: "
                                          "largest_component, consistency (repeatable, in order)"),
    example: list[str] = typer.Option([], "--example", help="an in-context example IMAGE:MASK shown before the image "
                                      "(repeatable, up to the model's icl.max_examples)"),
    retrieve: Optional[Path] = typer.Option(None, "--retrieve", help="an index folder (`medplib index build`): add "
                                            "its --k nearest examples (never the image itself)"),
    k: int = typer.Option(3, "--k", help="examples to retrieve with --retrieve"),
    retrieve_label: Optional[str] = typer.Option(None, "--retrieve-label", help="retrieve only examples of this label"),
    max_new_tokens: Optional[int] = typer.Option(None, help="answer length limit"),
    box_format: Optional[str] = typer.Option(None, "--box-format", help="decode boxes in the answer under a grammar "
                                             "(always well formed, on the grid, closed within the length limit): "
                                             "med-grit <box>(x1,y1),(x2,y2)</box> on 0-1000 or minigpt "
                                             "{<x1><y1><x2><y2>} on 0-100; --json gives them in pixels"),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:1, mps"),
    quantize: Optional[str] = typer.Option(None, "--quantize", help=QUANTIZE_HELP),
) -> None:
    """Ask one question about one image. Regions are used in this order: points, boxes, masks. In-context
    examples (--example, --retrieve) come before the image; the answer's masks are the image's."""
    from PIL import Image
    from pydantic import ValidationError

    from medplib.data.boxes import check_box_format
    from medplib.data.images import read_image
    from medplib.data.masks import read_mask_image, rle_encode, write_mask_png
    from medplib.data.schema import BoxRegion, MaskRegion, PointRegion
    from medplib.inference import Predictor
    from medplib.outputs import prepare_outputs
    from medplib.visualize import overlay
    from medplib.volume_commands import ask_volume_command, is_volume_request

    prepare_outputs({"--mask-out": mask_out, "--overlay-out": overlay_out, "--dicom-seg-out": dicom_seg_out})
    fmt = check_box_format(box_format) if box_format is not None else None  # before the model loads
    if is_volume_request(image, mask_out, dicom_seg_out, volume):
        if example or retrieve is not None:
            raise InputError("in-context examples (--example, --retrieve) are for 2-D images, not volumes")
        if fmt is not None:
            raise InputError("--box-format is for 2-D images: a volume's answer is masks, slice by slice")
        ask_volume_command(image, question, model=model, point=point, box=box, region_mask=region_mask,
                           slice_index=slice_index, axis=axis, mask_out=mask_out, dicom_seg_out=dicom_seg_out,
                           overlay_out=overlay_out, postprocess=postprocess, as_json=as_json,
                           max_new_tokens=max_new_tokens, device=device, quantize=quantize)
        return
    regions: list[Any] = [PointRegion(point=_numbers(p, 2, "point")) for p in point]
    try:
        regions += [BoxRegion(box=_numbers(b, 4, "box")) for b in box]
    except ValidationError as exc:  # x2 < x1 or y2 < y1
        raise InputError(f"--box: {exc.errors()[0]['msg']}") from None
    regions += [MaskRegion(mask=str(m)) for m in region_mask]
    arrays: list[np.ndarray | None] = [None] * (len(point) + len(box)) + [read_mask_image(m) for m in region_mask]

    if k < 1:
        raise InputError(f"--k must be at least 1, got {k}")
    data = read_image(_image_ref(image, slice_index, axis))
    predictor = Predictor.from_pretrained(model, device=device, quantize=quantize)
    examples = _examples(example, retrieve, k, retrieve_label, data.rgb, predictor.model)
    predictor.set_image(data.rgb)
    if as_json:
        pred = predictor.ask(question, regions, arrays, max_new_tokens=max_new_tokens, examples=examples,
                             box_format=fmt)
    else:
        stream = predictor.stream(question, regions, region_arrays=arrays, max_new_tokens=max_new_tokens,
                                  examples=examples, box_format=fmt)
        for piece in stream:
            typer.echo(piece, nl=False)
        typer.echo("")
        pred = stream.result()

    written: list[str] = []
    if mask_out is not None:
        if pred.masks:
            for mask, path in zip(pred.masks, _mask_paths(mask_out, len(pred.masks))):
                write_mask_png(mask, path)
                written.append(str(path))
        else:
            typer.echo(f"the answer has no [SEG]: no mask written to {mask_out}", err=True)
    if overlay_out is not None:
        drawn = overlay(data.rgb, pred.masks, regions=predictor.region_masks(regions, arrays))
        Image.fromarray(drawn).save(overlay_out)

    if as_json:
        typer.echo(json.dumps({
            "text": pred.text,
            "masks": [{"rle": rle_encode(m).model_dump(), "box": list(b) if b else None, "score": s}
                      for m, b, s in zip(pred.masks, pred.boxes, pred.scores)],
            "text_boxes": [list(b) for b in pred.text_boxes],
            "mask_files": written,
            "overlay_file": str(overlay_out) if overlay_out is not None else None,
            "timings": pred.timings,
            "examples": len(examples),
        }))
        return
    for k, (mask, b, s) in enumerate(zip(pred.masks, pred.boxes, pred.scores)):
        where = f"box ({', '.join(f'{v:g}' for v in b)})" if b else "empty"
        typer.echo(f"mask {k + 1}: {int(mask.sum())} pixels, {where}, score {s:.3f}"
                   + (f" -> {written[k]}" if written else ""))
    if overlay_out is not None:
        typer.echo(f"overlay -> {overlay_out}")
    t = pred.timings
    typer.echo(f"image {t['image_s']:.2f} s, answer {t['generate_s']:.2f} s ({t['tokens_per_s']:.1f} tokens/s)",
               err=True)


def serve(
    model: Path = typer.Option(..., "--model", help="a saved medplib model folder"),
    host: str = typer.Option("127.0.0.1", help="address to bind (loopback by default)"),
    port: int = typer.Option(8000),
    api_key: Optional[str] = typer.Option(None, envvar="MEDPLIB_API_KEY",
                                          help="require 'Authorization: Bearer KEY' on /v1/*"),
    model_name: Optional[str] = typer.Option(None, help="the id clients send as 'model' (default: the folder name)"),
    max_upload_mb: float = typer.Option(20.0, help="largest request body, in MiB (413 beyond)"),
    max_image_pixels: int = typer.Option(4096 * 4096, help="largest image, width x height (413 beyond)"),
    queue_size: int = typer.Option(32, help="requests that may wait for the model (429 beyond)"),
    max_new_tokens: Optional[int] = typer.Option(None, help="cap on answer length"),
    max_prompt_chars: int = typer.Option(32_000, help="largest conversation text, in characters (400 beyond)"),
    max_messages: int = typer.Option(64, help="most messages in a conversation (400 beyond)"),
    max_regions: int = typer.Option(16, help="most region prompts in a request (400 beyond)"),
    max_batch: int = typer.Option(8, help="concurrent chat/segment requests decoded together (1: one at a time)"),
    decode: str = typer.Option("eager", help="decoding steps: eager, static (preallocated KV cache) or compiled "
                               "(that step under torch.compile; compiles once per batch size and length bucket)"),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:1, mps"),
    quantize: Optional[str] = typer.Option(None, "--quantize", help=QUANTIZE_HELP),
) -> None:
    """Serve the model over HTTP: OpenAI-compatible chat API, /v1/segment and a web page at /."""
    try:
        from medplib.serving.app import ServerSettings
        from medplib.serving.app import serve as run_server
    except ImportError as exc:
        typer.echo(f"error: serving needs the 'serve' extra (pip install 'medplib[serve]'): {exc}", err=True)
        sys.exit(2)
    if not (model / "config.json").is_file():
        raise InputError(f"{model} is not a medplib model folder (needs config.json)")
    from medplib.api import check_device, parse_device
    from medplib.model.quantize import check_quantize

    # A bad --device or --quantize fails here, before the model loads.
    check_quantize(quantize, parse_device(device), None)
    check_device(parse_device(device))
    from medplib.model.decoding import DECODE_MODES

    if decode not in DECODE_MODES or max_batch < 1:  # before the model loads
        raise InputError(f"--decode must be one of {', '.join(DECODE_MODES)} and --max-batch at least 1")
    settings = ServerSettings(model_name=model_name or model.resolve().name, api_key=api_key,
                              max_upload_bytes=int(max_upload_mb * (1 << 20)), max_image_pixels=max_image_pixels,
                              queue_size=queue_size, max_new_tokens=max_new_tokens, max_prompt_chars=max_prompt_chars,
                              max_messages=max_messages, max_regions=max_regions,
                              max_batch=max_batch, decode=decode)
    typer.echo(f"serving {settings.model_name} on http://{host}:{port}/ (API at /v1, web page at /)", err=True)
    run_server(model, host=host, port=port, device=device, settings=settings, quantize=quantize)
