"""The FastAPI app: OpenAI-compatible chat completions (plain and streamed), segmentation, model
list, health, an image preview for the web page, and the web page itself at `/`.

Every request is checked (API key, body bytes, schema, prompt length in characters, messages and
regions, image format and pixels, then the prompt as the model will get it: placeholders, regions
and tokens, `Processor.encode_prompt`) before it is queued, so bad input costs no
model time and gets a 4xx JSON error; the model runs on one thread behind a bounded queue
(`worker.py`), which decodes the chat and segment requests waiting for it together, up to
`max_batch` (padded; greedy answers equal one-at-a-time answers). The OpenAPI schema at
`/openapi.json` describes every request body."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Sequence, TypeVar

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from medplib.data.boxes import BoxFormat
from medplib.data.schema import Region, Turn
from medplib.errors import InputError, MedplibError
from medplib.inference import Prediction, Predictor, Query
from medplib.model.decoding import DECODE_MODES
from medplib.processing import Prompt
from medplib.retrieval.examples import Example
from medplib.serving import schemas
from medplib.serving.errors import ClientClosed, PromptTooLong, Unauthorized, UnknownModel, error_body, status_of
from medplib.serving.inputs import (
    decode_data_url,
    decode_image,
    examples_of,
    read_body,
    region_arrays,
    segment_question,
)
from medplib.serving.worker import ModelWorker

STATIC = Path(__file__).parent / "static"
log = logging.getLogger("medplib.serving")
M = TypeVar("M", bound=BaseModel)


@dataclass
class ServerSettings:
    model_name: str
    api_key: str | None = None  # when set, /v1/* needs "Authorization: Bearer <key>"
    max_upload_bytes: int = 20 << 20
    max_image_pixels: int = 4096 * 4096
    queue_size: int = 32
    max_new_tokens: int | None = None  # a cap on what a request may ask for
    # Prompt limits, checked before tokenising; the model's context is checked on the tokens after.
    max_prompt_chars: int = 32_000  # characters over every message's text
    max_messages: int = 64
    max_regions: int = 16
    # Volume uploads (/v1/volume/*): request body bytes, voxels, and files in a DICOM zip.
    max_volume_bytes: int = 256 << 20
    max_volume_voxels: int = 512 * 512 * 320
    max_volume_files: int = 4096
    # Concurrent chat/segment requests decoded together (1: one at a time), and how decoding steps
    # run: "eager", "static" (preallocated KV cache) or "compiled" (that step under torch.compile).
    max_batch: int = 8
    decode: str = "eager"


@dataclass
class Job:
    """A validated request, ready for the model thread."""

    rgb: np.ndarray  # (H, W, 3) uint8
    question: str
    regions: list[Region]
    arrays: list[np.ndarray | None]
    history: list[Turn]
    max_new_tokens: int | None
    temperature: float
    examples: list[Example] = field(default_factory=list)  # in-context examples, checked
    box_format: BoxFormat | None = None  # boxes in the answer decoded under this format's grammar


def _parse(model: type[M], body: bytes) -> M:
    try:
        return model.model_validate_json(body or b"{}")
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise InputError(f"{first['msg']}" + (f" (field '{where}')" if where else "")) from None


def _text_and_images(msg: schemas.Message) -> tuple[str, list[str]]:
    if msg.content is None or isinstance(msg.content, str):
        return msg.content or "", []
    texts, images = [], []
    for part in msg.content:
        if part.type == "text":
            texts.append(part.text or "")
        else:
            url = part.image_url.url if isinstance(part.image_url, schemas.ImageURL) else part.image_url
            if not url:
                raise InputError("an image_url part has no url")
            images.append(url)
    return "\n".join(texts), images


def chat_turns(messages: list[schemas.Message]) -> tuple[list[Turn], str, str]:
    """OpenAI messages -> (history turns, question, image data URL). System messages are dropped:
    the model keeps the system prompt it was trained with."""
    turns, images = [], []
    for msg in messages:
        if msg.role in ("system", "developer"):
            continue
        text, imgs = _text_and_images(msg)
        images += imgs
        turns.append(Turn(role=msg.role, content=text))
    if not turns or turns[-1].role != "user":
        raise InputError("the last message must be from the user")
    if turns[0].role != "user" or any(a.role == b.role for a, b in zip(turns, turns[1:])):
        raise InputError("user and assistant messages must alternate, starting with the user")
    if len(images) != 1:
        raise InputError(f"the conversation needs exactly one image (an image_url part), found {len(images)}")
    return turns[:-1], turns[-1].content, images[0]


class Server:
    """The state behind the routes: the predictor, its worker and the settings."""

    def __init__(self, predictor: Predictor, settings: ServerSettings):
        self.predictor, self.settings = predictor, settings
        self.worker = ModelWorker(settings.queue_size, settings.max_batch, self.run_batch)
        if settings.decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {', '.join(DECODE_MODES)}; got {settings.decode!r}")
        predictor.model.model.decode_mode = settings.decode
        self.created = int(time.time())

    # ---------------------------------------------------------------- checks
    def authorize(self, request: Request) -> None:
        key = self.settings.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        if (not given.lower().startswith("bearer ")
                or not secrets.compare_digest(given[7:].strip().encode(), key.encode())):
            raise Unauthorized("missing or wrong API key (send 'Authorization: Bearer <key>')")

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.settings.model_name:
            raise UnknownModel(f"model '{name}' is not served here (this server serves '{self.settings.model_name}')")

    def cap(self, asked: int | None) -> int | None:
        limit = self.settings.max_new_tokens
        return min(x for x in (asked, limit) if x is not None) if (asked or limit) else None

    def check_prompt(self, question: str, history: list[Turn], regions: list[Region]) -> None:
        """The prompt limits, cheapest first: a prompt past them never reaches the tokenizer or the
        model, so it costs neither model time nor the model's memory for a huge sequence."""
        s = self.settings
        if len(history) + 1 > s.max_messages:
            raise PromptTooLong(f"the conversation has {len(history) + 1} messages, over the limit of {s.max_messages}")
        chars = len(question) + sum(len(t.content) for t in history)
        if chars > s.max_prompt_chars:
            raise PromptTooLong(f"the conversation has {chars} characters, over the limit of {s.max_prompt_chars}")
        if len(regions) > s.max_regions:
            raise PromptTooLong(f"{len(regions)} regions are over the limit of {s.max_regions}")

    def check_context(self, prompt: Prompt) -> None:
        """The prompt's tokens (image and example tokens included) must leave room for one answer token."""
        context = getattr(self.predictor.model.model.llm.config, "max_position_embeddings", None)
        n = prompt.input_ids.numel()
        if context is not None and n >= context:
            raise PromptTooLong(f"the prompt has {n} tokens and fills the model's context of {context}")

    def job(self, image_url: str, question: str, regions: list[Region], history: list[Turn],
            max_new_tokens: int | None, temperature: float, examples: Sequence[schemas.ExamplePair] = (),
            box_format: BoxFormat | None = None) -> Job:
        """Decode and validate everything a request carries (runs off the event loop)."""
        self.check_prompt(question, history, regions)
        rgb = decode_image(decode_data_url(image_url), self.settings.max_image_pixels)
        hw = (int(rgb.shape[0]), int(rgb.shape[1]))
        arrays = region_arrays(regions, hw)
        # Encoded as the model thread will encode it, so a bad question, region count, region or example
        # count fails here, before the examples' images are decoded.
        prompt = self.predictor.model.processor.encode_prompt(question, hw, regions, arrays, history,
                                                              examples=len(examples))
        self.check_context(prompt)
        checked = examples_of(examples, self.settings.max_image_pixels)
        return Job(rgb, question, regions, arrays, history, self.cap(max_new_tokens), temperature, checked, box_format)

    def run_batch(self, items: list[tuple[Job, Callable[[str], None] | None]]) -> list[Prediction | Exception]:
        """On the model thread: (job, text callback) pairs decoded together, one result or exception each."""
        return self.predictor.ask_batch([Query(j.rgb, j.question, j.regions, j.arrays, j.history, j.max_new_tokens,
                                               j.temperature, on_text, j.examples, j.box_format)
                                         for j, on_text in items])

    # ---------------------------------------------------------------- routes
    async def chat(self, request: Request) -> Any:
        self.authorize(request)
        req = _parse(schemas.ChatRequest, await read_body(request, self.settings.max_upload_bytes))
        self.check_model(req.model)
        if len(req.messages) > self.settings.max_messages:  # system messages count: they are parsed too
            raise PromptTooLong(f"{len(req.messages)} messages are over the limit of {self.settings.max_messages}")
        history, question, url = chat_turns(req.messages)
        job = await run_in_threadpool(self.job, url, question, req.medplib.regions, history,
                                      req.max_completion_tokens or req.max_tokens, req.temperature or 0.0,
                                      req.medplib.examples, req.medplib.box_format)
        rid, created, png = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), req.medplib.return_png
        if not req.stream:
            pred = await self.worker.submit_batched((job, None))
            return JSONResponse(schemas.completion(pred, id=rid, model=self.settings.model_name, created=created,
                                                   return_png=png))

        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def on_text(delta: str) -> None:  # model thread -> event loop
            loop.call_soon_threadsafe(events.put_nowait, ("text", delta))

        fut = self.worker.submit_batched((job, on_text))  # raises QueueFull before any byte is sent
        fut.add_done_callback(lambda f: events.put_nowait(("done", f)))
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(self._sse(rid, created, events, png, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _sse(self, rid: str, created: int, events: asyncio.Queue[tuple[str, Any]], png: bool,
                   include_usage: bool) -> AsyncIterator[str]:
        name = self.settings.model_name

        def event(obj: dict[str, Any]) -> str:
            return f"data: {json.dumps(obj)}\n\n"

        yield event(schemas.chunk(id=rid, model=name, created=created, delta={"role": "assistant", "content": ""}))
        while True:
            kind, value = await events.get()
            if kind == "text":
                yield event(schemas.chunk(id=rid, model=name, created=created, delta={"content": value}))
                continue
            exc = value.exception()
            if exc is not None:
                status, code = status_of(exc) if isinstance(exc, MedplibError) else (500, "server_error")
                if status == 500:
                    log.error("request failed", exc_info=exc)
                yield event(error_body(str(exc) if status < 500 else "internal error", code))
                return
            pred: Prediction = value.result()
            yield event(schemas.chunk(id=rid, model=name, created=created, delta={}, finish_reason=pred.finish_reason,
                                      medplib=schemas.extension(pred, png)))
            if include_usage:  # as OpenAI does: one more chunk, with no choices
                yield event({"id": rid, "object": "chat.completion.chunk", "created": created, "model": name,
                             "choices": [], "usage": schemas.usage(pred)})
            yield "data: [DONE]\n\n"
            return

    async def segment(self, request: Request) -> JSONResponse:
        self.authorize(request)
        req = _parse(schemas.SegmentRequest, await read_body(request, self.settings.max_upload_bytes))
        self.check_model(req.model)
        question = segment_question(req.target, req.question)
        job = await run_in_threadpool(self.job, req.image, question, req.regions, [], req.max_tokens, 0.0, req.examples)
        pred = await self.worker.submit_batched((job, None))
        return JSONResponse({"id": f"seg-{uuid.uuid4().hex}", "object": "segmentation",
                             "model": self.settings.model_name, "text": pred.text,
                             **schemas.extension(pred, req.return_png)})

    async def preview(self, request: Request) -> JSONResponse:
        """The image as the model will see it: JSON with its size and a base64 PNG (browsers cannot
        show DICOM or most TIFFs)."""
        self.authorize(request)
        req = _parse(schemas.PreviewRequest, await read_body(request, self.settings.max_upload_bytes))
        rgb = await run_in_threadpool(lambda: decode_image(decode_data_url(req.image), self.settings.max_image_pixels))
        return JSONResponse({"width": int(rgb.shape[1]), "height": int(rgb.shape[0]),
                             "png_base64": await run_in_threadpool(schemas.png_base64, rgb)})

    async def models(self, request: Request) -> JSONResponse:
        self.authorize(request)
        return JSONResponse({"object": "list", "data": [
            {"id": self.settings.model_name, "object": "model", "created": self.created, "owned_by": "medplib"}]})

    async def health(self, request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "model": self.settings.model_name, "waiting": self.worker.waiting,
                             "queue_size": self.settings.queue_size, "auth": self.settings.api_key is not None})


def _error(status: int, message: str, code: str) -> JSONResponse:
    return JSONResponse(error_body(message, code), status_code=status)


def create_app(predictor: Predictor, settings: ServerSettings) -> FastAPI:
    server = Server(predictor, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await server.worker.start()
        yield
        await server.worker.stop()

    app = FastAPI(title="medplib", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server
    fastapi_openapi = app.openapi

    def openapi() -> dict[str, Any]:  # FastAPI's document (built once, then cached) plus the request bodies
        return app.openapi_schema or schemas.openapi_bodies(fastapi_openapi())

    app.openapi = openapi  # type: ignore[method-assign]

    @app.exception_handler(MedplibError)
    async def _medplib_error(request: Request, exc: MedplibError) -> JSONResponse:
        status, code = status_of(exc)
        if status >= 500:
            log.error("request failed", exc_info=exc)
        elif isinstance(exc, ClientClosed):  # the client's choice, not a failure: one line, no traceback
            log.info("%s %s: %s", request.method, request.url.path, exc)
        return _error(status, str(exc), code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(400, str(exc.errors()[0].get("msg", "invalid request")), "invalid_request_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail),
                      "not_found" if exc.status_code == 404 else "invalid_request_error")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("request failed", exc_info=exc)
        return _error(500, "internal error", "server_error")

    app.add_api_route("/v1/chat/completions", server.chat, methods=["POST"])
    app.add_api_route("/v1/segment", server.segment, methods=["POST"])
    app.add_api_route("/v1/preview", server.preview, methods=["POST"])
    app.add_api_route("/v1/models", server.models, methods=["GET"])
    from medplib.serving.volumes import register as register_volumes

    register_volumes(app, server)  # /v1/volume/segment and /v1/volume/preview
    app.add_api_route("/healthz", server.health, methods=["GET"])
    app.add_api_route("/", lambda: FileResponse(STATIC / "index.html"), methods=["GET"], include_in_schema=False)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def serve(model: str | Path, *, host: str = "127.0.0.1", port: int = 8000, device: str = "cpu",
          settings: ServerSettings | None = None, quantize: str | None = None) -> None:
    """Load the model and serve it until interrupted."""
    import uvicorn

    settings = settings or ServerSettings(model_name=Path(model).name)
    app = create_app(Predictor.from_pretrained(model, device=device, quantize=quantize), settings)
    if host not in ("127.0.0.1", "localhost", "::1") and settings.api_key is None:
        log.warning("serving on %s without an API key: anyone who can reach this port can use the model", host)
    uvicorn.run(app, host=host, port=port, log_level="info")
