"""The Starlette application: the OpenAI-compatible routes, the answer endpoints, the page and the API key.

    GET  /                          the web page (page/)
    GET  /health                    {"status": "ok", "model", "waiting", "running", ..., "programs_compiled", ...}
    GET  /metrics                   Prometheus metrics (serving/observability.py; each request is also logged)
    GET  /v1/models                 the one model served
    POST /v1/chat/completions       OpenAI chat completions (a study: several image_url parts); `stream: true`
                                    answers with server-sent events
    POST /v1/report                 multipart form with `file` (PNG, JPEG or DICOM; several for a study, with
                                    `view`, `prior_file`, `prior_report`... : serving/requests.py) -> {"report": ...}
    POST /v1/differential-diagnosis the same -> {"differential_diagnosis": ...}
    POST /v1/preview                the image file as the body -> the 8-bit grayscale PNG the model's loader
                                    decodes (DICOM windowed as its tags say), for the page's viewer;
                                    `?depth=full`: the image's own values for the viewer's window (preview.py)

Every refusal is a 4xx JSON body in OpenAI's shape ({"error": {"message", "type", "param", "code"}}).
Request content lives in memory only.
"""

import asyncio
import contextlib
import dataclasses
import hmac
import importlib.resources
import io
import json
import logging
import time
import uuid

from python_multipart import create_form_parser
from python_multipart.multipart import parse_options_header
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from cxrllava_jax.serving import compiles, observability, preview, requests, uploads
from cxrllava_jax.serving.admission import Admission
from cxrllava_jax.serving.limits import Limits, RequestError
from cxrllava_jax.serving.scheduler import Failed, Finished, Job, QueueFull, Scheduler, TextDelta
from cxrllava_jax.domain.images import decode_grayscale
from cxrllava_jax.domain.radiograph_guard import LATERAL_VIEWS
from cxrllava_jax.domain.studies import study_tags
from cxrllava_jax.errors import InputError

PAGE_FILES = {"/": ("index.html", "text/html; charset=utf-8"), "/app.js": ("app.js", "text/javascript"),
              "/style.css": ("style.css", "text/css")}
PREVIEW_MAX_SIDE = 2048  # enough for a screen; the model sees its own preprocessing of the full image
OWNER = "cxrllava-jax"
log = logging.getLogger(__name__)


def create_app(model, model_id: str, *, limits: Limits = Limits(), api_key: str | None = None,
               max_batch_size: int = 16, max_queue: int = 64, cache_bytes: int | None = None) -> Starlette:
    """`model`: a loaded `inference.api.CXRLLaVA`; `model_id`: the name clients pass as `model`; `cache_bytes`:
    the bound of the prefix and image cache (None: the engine's default)."""
    scheduler = Scheduler(model, max_batch_size=max_batch_size, max_queue=max_queue, cache_bytes=cache_bytes)
    admission = Admission(limits.max_decode_bytes, max_queue, lambda: scheduler.stats()["waiting"])
    programs = compiles.counter()
    created = int(time.time())
    page = _page(model_id, limits)

    def authorize(request: Request):
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise RequestError(401, "missing API key: send the header 'Authorization: Bearer KEY'",
                               code="invalid_api_key")
        if not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise RequestError(401, "wrong API key", code="invalid_api_key")

    async def serve_page(request: Request):
        body, kind = page[request.url.path]
        return Response(body, media_type=kind, headers={"Cache-Control": "no-cache"})

    async def health(request: Request):
        return JSONResponse({"status": "ok", "model": model_id, **scheduler.stats(), **programs.stats()})

    async def models(request: Request):
        authorize(request)
        return JSONResponse({"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                                         "owned_by": OWNER}]})

    async def chat_completions(request: Request):
        authorize(request)
        parsed = requests.read_json(await _read_body(request, limits.max_body_bytes))
        generation = requests.parse_chat(parsed, model_id, limits)
        job, sink, prompt_tokens = await submit(request, generation)
        reply = _ChatReply(model_id, prompt_tokens, model.provenance)
        if generation.stream:
            return StreamingResponse(_chat_events(job, sink, scheduler, reply, generation.include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return JSONResponse(reply.completion(await _final(request, job, sink, scheduler)))

    def answer_endpoint(kind: str):
        async def answer(request: Request):
            authorize(request)
            fields, files = await _read_form(request, limits)
            job, sink, prompt_tokens = await submit(request, requests.parse_answer_form(kind, fields, files, limits))
            finished = await _final(request, job, sink, scheduler)
            return JSONResponse({"model": model_id, kind: finished.text, "finish_reason": finished.finish_reason,
                                 "usage": _usage(prompt_tokens, finished.completion_tokens),
                                 "provenance": _provenance(model.provenance, finished)})

        return answer

    async def preview_image(request: Request):
        authorize(request)
        data = await _read_body(request, limits.max_image_bytes)
        image = uploads.from_upload(data, request.query_params.get("filename", ""), "body", limits)
        allow = requests.form_flag(request.query_params, "allow_non_frontal")
        in_study = requests.form_flag(request.query_params, "in_study")
        depth = request.query_params.get("depth", "8")
        if depth not in ("8", "full"):
            raise RequestError(400, f"depth must be 8 (the model's view, a PNG) or full (the image's values), got "
                                    f"{depth[:20]!r}", "depth")
        # The full-depth view decodes the file a second time beside the 8-bit result: it is priced at two decodes.
        priced = dataclasses.replace(image, decode_bytes=2 * image.decode_bytes) if depth == "full" else image
        return await admission.run(priced.decode_bytes, "body", _preview, image, allow, in_study, depth == "full")

    async def submit(request: Request, generation: requests.Generation):
        prepared = await admission.run(generation.decode_bytes, generation.largest_field, requests.prepare,
                                       generation, model, limits)
        sink = _Sink(asyncio.get_running_loop())
        job = Job(prepared.prompt, prepared.pixels, generation.sampling, sink, stream=generation.stream)
        observability.watch(request, job, len(prepared.prompt))
        try:
            scheduler.submit(job)
        except QueueFull as error:
            raise RequestError(503, f"the server is busy: {error}; retry later", code="queue_full") from None
        return job, sink, len(prepared.prompt)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        scheduler.close()

    routes = [Route(path, serve_page) for path in PAGE_FILES] + [
        Route("/health", health),
        Route("/v1/models", models),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/report", answer_endpoint("report"), methods=["POST"]),
        Route("/v1/differential-diagnosis", answer_endpoint("differential_diagnosis"), methods=["POST"]),
        Route("/v1/preview", preview_image, methods=["POST"]),
    ]
    metrics = observability.Metrics(scheduler, programs)
    routes.append(Route("/metrics", metrics.endpoint))
    logged = Middleware(observability.AccessLog, metrics=metrics, routes={route.path for route in routes})
    app = Starlette(routes=routes, lifespan=lifespan, middleware=[logged],
                    exception_handlers={RequestError: _refusal, HTTPException: _http_error})
    app.state.scheduler = scheduler
    return app


def _page(model_id: str, limits: Limits) -> dict[str, tuple[bytes, str]]:
    """path -> (body, media type); the HTML carries what the script needs: the model id, the answer prompts and the
    guard's lateral view names (the page labels a study's views and refuses a lateral alone by the same rule)."""
    files = importlib.resources.files("cxrllava_jax.serving") / "page"
    page = {path: ((files / name).read_bytes(), kind) for path, (name, kind) in PAGE_FILES.items()}
    config = {"model": model_id, "max_output_tokens": limits.max_output_tokens, "prompts": requests.ANSWER_QUESTIONS,
              "lateral_views": LATERAL_VIEWS}
    html, kind = page["/"]
    page["/"] = (html.replace(b"__SERVER_CONFIG__", json.dumps(config).replace("</", "<\\/").encode()), kind)
    return page


class _Sink:
    """Events from the worker thread -> an asyncio queue on the server's loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.queue = loop, asyncio.Queue()

    def __call__(self, event):
        with contextlib.suppress(RuntimeError):  # the loop has closed: the server is shutting down
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    async def get(self):
        return await self.queue.get()


class _ChatReply:
    """OpenAI's chat.completion and chat.completion.chunk objects for one request."""

    def __init__(self, model_id: str, prompt_tokens: int, provenance: dict):
        self.model_id, self.prompt_tokens, self.provenance = model_id, prompt_tokens, provenance
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def completion(self, finished: Finished) -> dict:
        return {**self._head("chat.completion"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": finished.text},
                             "finish_reason": finished.finish_reason}],
                "usage": _usage(self.prompt_tokens, finished.completion_tokens),
                "provenance": _provenance(self.provenance, finished)}

    def chunk(self, delta: dict, finish_reason: str | None = None) -> dict:
        return {**self._head("chat.completion.chunk"),
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}

    def usage_chunk(self, finished: Finished) -> dict:
        return {**self._head("chat.completion.chunk"), "choices": [],
                "usage": _usage(self.prompt_tokens, finished.completion_tokens),
                "provenance": _provenance(self.provenance, finished)}

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model_id,
                "system_fingerprint": self.provenance["fingerprint"]}


async def _chat_events(job: Job, sink: _Sink, scheduler: Scheduler, reply: _ChatReply, include_usage: bool):
    """Server-sent events; when the client goes, Starlette cancels this generator and the job is cancelled."""
    try:
        yield _event(reply.chunk({"role": "assistant", "content": ""}))
        while True:
            event = await sink.get()
            if isinstance(event, TextDelta):
                yield _event(reply.chunk({"content": event.text}))
            elif isinstance(event, Finished):
                yield _event(reply.chunk({}, event.finish_reason))
                if include_usage:
                    yield _event(reply.usage_chunk(event))
                break
            else:
                yield _event(_server_error(event).body())
                break
        yield "data: [DONE]\n\n"
    finally:
        scheduler.cancel(job)


async def _final(request: Request, job: Job, sink: _Sink, scheduler: Scheduler) -> Finished:
    """The job's answer; if the client disconnects first, the job is cancelled."""

    async def until_disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    answer, gone = asyncio.ensure_future(_last_event(sink)), asyncio.ensure_future(until_disconnected())
    hung_up = True
    try:
        await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        hung_up = not answer.done()
        if hung_up:
            answer.cancel()
            scheduler.cancel(job)
    if hung_up:
        raise RequestError(400, "the client disconnected before the answer was written")
    event = answer.result()
    if isinstance(event, Failed):
        raise _server_error(event)
    return event


async def _last_event(sink: _Sink):
    while isinstance(event := await sink.get(), TextDelta):
        pass
    return event


def _server_error(event: Failed) -> RequestError:
    return RequestError(500, f"generation failed: {type(event.error).__name__}: {event.error}", code="server_error")


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _provenance(model: dict, finished: Finished) -> dict:
    """Which weights wrote the answer (checkpoint, fingerprint, adapter), with what settings, and why it ended."""
    return {**model, **finished.answer.record()}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"the request body is {int(declared):,} bytes; the server accepts at most {limit:,}",
                           code="request_too_large")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise RequestError(413, f"the request body is larger than the server's limit of {limit:,} bytes",
                                   code="request_too_large")
    except ClientDisconnect:  # nobody is left to answer: one line in the log, no traceback
        client = f"{request.client.host}:{request.client.port}" if request.client else "a client"
        log.warning("%s %s: %s hung up after %s of the request body's bytes", request.method, request.url.path,
                    client, f"{len(body):,}")
        raise RequestError(400, "the client disconnected while sending the request body") from None
    return bytes(body)


async def _read_form(request: Request, limits: Limits) -> tuple[dict, dict]:
    """multipart/form-data (or urlencoded) -> ({field: [text]}, {field: [(filename, bytes)]}), held in memory."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        raise RequestError(400, f"expected a multipart/form-data upload with a 'file' field, got content type "
                                f"{content_type or 'none'!r}")
    body = await _read_body(request, limits.max_body_bytes)
    fields, files = {}, {}

    def counted(name: bytes | None, into: dict) -> list:
        if sum(map(len, fields.values())) + sum(map(len, files.values())) >= requests.MAX_FORM_PARTS:
            raise RequestError(400, f"the form has more than {requests.MAX_FORM_PARTS} fields")
        return into.setdefault((name or b"").decode(errors="replace"), [])

    def on_field(field):
        counted(field.field_name, fields).append((field.value or b"").decode(errors="replace"))

    def on_file(file):
        file.file_object.seek(0)
        counted(file.field_name, files).append(((file.file_name or b"").decode(errors="replace"),
                                                file.file_object.read()))

    try:
        # Files stay in memory up to the body limit, which `body` is already within: nothing reaches the disk.
        parser = create_form_parser({"Content-Type": content_type}, on_field, on_file,
                                    config={"MAX_MEMORY_FILE_SIZE": limits.max_body_bytes + 1})
        parser.write(body)
        parser.finalize()
    except RequestError:
        raise
    except Exception as error:  # python-multipart raises several types for malformed bodies
        raise RequestError(400, f"the form could not be parsed ({type(error).__name__}: {error})") from None
    kind, options = parse_options_header(content_type)
    if kind == b"multipart/form-data" and b"--" + options[b"boundary"] + b"--" not in body:
        raise RequestError(400, "the form ends before its closing boundary: the upload was cut short")
    return fields, files


def _preview(image: uploads.UploadedImage, allow_non_frontal: bool, in_study: bool, full_depth: bool) -> Response:
    """The image as the loader decodes it, with the DICOM tags that place it in its study as headers (X-View,
    X-Study-Date, X-Study-UID; empty for other files). `in_study`: a lateral view passes, as it does beside a frontal
    one of its study (the request that reads the study checks that there is one)."""
    try:
        gray = decode_grayscale(image.read_bytes(), image, allow_non_frontal, allow_lateral=in_study)
        tags = study_tags(image)
    except InputError as error:
        raise requests.image_refusal(error, "body") from error
    placed = {"X-View": tags["ViewPosition"], "X-Study-Date": tags["StudyDate"],
              "X-Study-UID": tags["StudyInstanceUID"]}
    if full_depth:
        values = preview.full_depth(image.read_bytes(), image.name, gray, PREVIEW_MAX_SIDE)
        return Response(values.body(), media_type="application/octet-stream", headers={**values.headers(), **placed})
    gray.thumbnail((PREVIEW_MAX_SIDE, PREVIEW_MAX_SIDE))
    out = io.BytesIO()
    gray.save(out, format="PNG")
    return Response(out.getvalue(), media_type="image/png", headers=placed)


async def _refusal(request: Request, error: RequestError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
    message = f"{request.method} {request.url.path}: {error.detail}"
    return JSONResponse(RequestError(error.status_code, message).body(), status_code=error.status_code,
                        headers=error.headers)  # a 405's Allow among them
