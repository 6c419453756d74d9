"""The HTTP/JSON gateway: every public Search RPC over HTTP, a search page, thumbnails.

A separate process (its own Deployment) calling search over gRPC, so the public gRPC API
keeps its own process, limits and rollouts, and the gateway scales and fails on its own:
it holds no state and no model, only one long-lived channel to search.

Routes (one per RPC, built from the proto descriptor: new RPCs appear without code here):
- unary RPCs (Search, Get, Delete, Stats): POST /v1/<method> with the request message as
  JSON, the response message as JSON (a request without fields may also be a GET);
- server-streaming RPCs (Backfill, SearchAll): POST, the answer is NDJSON, one
  `{"result": message}` per line and, when the call fails after it started,
  a last `{"error": status}` line (grpc-gateway's streaming format);
- Ingest (bidirectional): POST /v1/ingest with NDJSON lines (each an `IngestItem`, or an
  `IngestRequest` with `items`), and POST /v1/ingest/upload with multipart files; per-item
  outcomes stream back as NDJSON while the body is still being sent.
The caller's `Authorization` header is forwarded: search decides. Errors have grpc-gateway's
HTTP status and a `{"code", "message", "details"}` body with search's message.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from mmsearch.common.v1 import types_pb2
from mmsearch.search.v1 import search_pb2
from services.common.channels import ReloadingChannel
from services.common.log import get_logger
from services.common.metrics import code_label
from services.gateway import metrics
from services.gateway.rpc import METHODS, SERVICE, HttpError, Method, from_rpc_error, json_schemas, parse_json, to_json
from services.gateway.settings import GatewaySettings
from services.gateway.thumbnails import NoThumbnail, Thumbnailer

log = get_logger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
NDJSON = "application/x-ndjson"
# Items per IngestRequest when a multipart upload is sent on to search.
UPLOAD_CHUNK_ITEMS = 8


@dataclass
class Gateway:
    """What the routes share: the channel to search and the settings."""

    settings: GatewaySettings
    channel: ReloadingChannel | None = None
    thumbnailer: Thumbnailer | None = None
    _tasks: list[asyncio.Task[Any]] = field(default_factory=list)

    async def start(self) -> None:
        s = self.settings
        self.channel = ReloadingChannel(s.search_target, s.search_tls, s.max_message_bytes)
        self.thumbnailer = Thumbnailer(s)
        self._tasks.append(asyncio.create_task(self._reload_tls()))
        log.info("gateway started", search_target=s.search_target, file_root=str(s.file_root or ""))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self.channel is not None:
            await self.channel.close()

    async def _reload_tls(self) -> None:
        """Renewed certificate files are used for new connections (like search's upstreams)."""
        while True:
            await asyncio.sleep(1.0)
            assert self.channel is not None
            if self.channel.reload_if_changed():
                log.info("search channel rebuilt with renewed TLS files")

    # -- calls toward search

    def callable(self, method: Method) -> Any:
        assert self.channel is not None
        ch = self.channel.channel
        factory = {
            (False, False): ch.unary_unary,
            (False, True): ch.unary_stream,
            (True, False): ch.stream_unary,
            (True, True): ch.stream_stream,
        }[(method.client_streaming, method.server_streaming)]
        return factory(
            method.path,
            request_serializer=method.request_cls.SerializeToString,
            response_deserializer=method.response_cls.FromString,
        )

    def timeout(self, method: Method) -> float | None:
        if method.client_streaming or method.server_streaming:
            return self.settings.stream_timeout_s or None
        return self.settings.search_timeout_s

    async def search_health(self) -> str:
        assert self.channel is not None
        try:
            reply = await health_pb2_grpc.HealthStub(self.channel.channel).Check(
                health_pb2.HealthCheckRequest(service=SERVICE.full_name), timeout=1.0
            )
        except grpc.aio.AioRpcError as e:
            return "UNREACHABLE" if e.code() == grpc.StatusCode.UNAVAILABLE else e.code().name
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def _metadata(request: Request) -> tuple[tuple[str, str], ...]:
    auth = request.headers.get("authorization")
    return (("authorization", auth),) if auth else ()


def _count(method: Method, code: grpc.StatusCode) -> None:
    kind = {(False, False): "unary", (False, True): "server_stream", (True, False): "client_stream",
            (True, True): "bidi_stream"}[(method.client_streaming, method.server_streaming)]
    metrics.CLIENT_HANDLED.labels(kind, SERVICE.full_name, method.name, code_label(code)).inc()


# --- bodies -------------------------------------------------------------------------------


def _check_declared_length(request: Request, limit: int, what: str, setting: str) -> None:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise HttpError.too_large(f"{what} is {declared} bytes, more than the limit of {limit} bytes ({setting})")


async def read_body(request: Request, limit: int, setting: str = "GATEWAY_MAX_BODY_BYTES") -> bytes:
    """The whole body, refused with 413 as soon as it passes `limit` (declared or sent)."""
    _check_declared_length(request, limit, "request body", setting)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HttpError.too_large(f"request body is more than the limit of {limit} bytes ({setting})")
    return bytes(body)


def limited(request: Request, limit: int, setting: str) -> Request:
    """The same request whose body reading raises 413 past `limit` (for the form parser)."""
    _check_declared_length(request, limit, "upload", setting)
    received = 0

    async def receive() -> dict[str, Any]:
        nonlocal received
        message = await request.receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise HttpError.too_large(f"upload is more than the limit of {limit} bytes ({setting})")
        return message  # type: ignore[return-value]

    return Request(request.scope, receive)


async def ndjson_lines(request: Request, max_line: int) -> AsyncIterator[tuple[int, bytes]]:
    """(line number from 1, line) for every non-blank line of a streamed body."""
    buffer = bytearray()
    number = 0
    async for chunk in request.stream():
        buffer += chunk
        while True:
            cut = buffer.find(b"\n")
            if cut < 0:
                break
            line, buffer = bytes(buffer[:cut]), buffer[cut + 1:]
            number += 1
            if line.strip():
                yield number, line
        if len(buffer) > max_line:
            raise HttpError.too_large(
                f"line {number + 1} is more than the limit of {max_line} bytes (GATEWAY_MAX_BODY_BYTES)"
            )
    if buffer.strip():
        yield number + 1, bytes(buffer)


def ingest_request_from_line(number: int, line: bytes) -> search_pb2.IngestRequest:
    """A line is an `IngestItem`, or an `IngestRequest` (an object with `items`)."""
    try:
        value = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HttpError.invalid(f"line {number} is not valid JSON: {e}") from None
    if isinstance(value, dict) and "items" in value:
        return parse_json(line, search_pb2.IngestRequest, f"line {number}")  # type: ignore[return-value]
    item = parse_json(line, search_pb2.IngestItem, f"line {number}")
    return search_pb2.IngestRequest(items=[item])  # type: ignore[list-item]


# --- calls --------------------------------------------------------------------------------


def _result_line(message: Message) -> bytes:
    return json.dumps({"result": to_json(message)}, separators=(",", ":")).encode() + b"\n"


def _error_line(error: HttpError) -> bytes:
    return json.dumps({"error": error.body()}, separators=(",", ":")).encode() + b"\n"


class DuplexStreamingResponse(StreamingResponse):
    """A streaming answer while the request body may still be arriving (Ingest).

    Starlette's StreamingResponse (under ASGI spec < 2.4, which uvicorn declares) reads
    `receive()` in a second task to notice a disconnect: that task would take body chunks
    from under the request reader. Here only the request reader calls `receive()`; the
    disconnect is watched once the body is complete (`_watch_disconnect`)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.stream_response(send)
        except OSError:
            raise ClientDisconnect() from None


async def _stream_response(
    gw: Gateway,
    method: Method,
    call: Any,
    request_errors: list[HttpError],
    duplex: bool = False,
) -> Response:
    """Waits for the first message (so a refused call gets its HTTP status), then streams."""
    try:
        first = await call.read()
    except grpc.aio.AioRpcError as e:
        _count(method, e.code())
        if request_errors:  # the body was bad before anything was answered: that is the error
            raise request_errors[0] from None
        raise from_rpc_error(e) from None
    if first is grpc.aio.EOF:
        code = await call.code()
        _count(method, code)
        if request_errors:
            raise request_errors[0]
        if code != grpc.StatusCode.OK:
            raise HttpError.from_grpc(code, await call.details() or code.name)
        return Response(b"", media_type=NDJSON)

    async def lines() -> AsyncIterator[bytes]:
        code = grpc.StatusCode.OK
        try:
            yield _result_line(first)
            while True:
                message = await call.read()
                if message is grpc.aio.EOF:
                    break
                yield _result_line(message)
            code = await call.code()
        except grpc.aio.AioRpcError as e:
            code = e.code()
            yield _error_line(from_rpc_error(e))
        finally:
            if code == grpc.StatusCode.OK and not call.done():
                call.cancel()  # the HTTP client went away: stop the work upstream
                code = grpc.StatusCode.CANCELLED
            _count(method, code)
        if request_errors:
            yield _error_line(request_errors[0])

    return (DuplexStreamingResponse if duplex else StreamingResponse)(lines(), media_type=NDJSON)


async def call_unary(gw: Gateway, method: Method, request: Request, message: Message) -> Response:
    try:
        reply = await gw.callable(method)(message, metadata=_metadata(request), timeout=gw.timeout(method))
    except grpc.aio.AioRpcError as e:
        _count(method, e.code())
        raise from_rpc_error(e) from None
    _count(method, grpc.StatusCode.OK)
    return JSONResponse(to_json(reply))


# The request writers of calls in progress: the loop keeps only weak references to tasks.
_WRITERS: set[asyncio.Task[None]] = set()


async def _watch_disconnect(request: Request, call: Any) -> None:
    """Once the body is complete the next message can only be the client's disconnect:
    then the call is cancelled, so items not yet stored are not written."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    call.cancel()


async def _write_requests(
    call: Any, request: Request, messages: AsyncIterator[Message], request_errors: list[HttpError]
) -> None:
    """Sends the body's messages as they arrive and half-closes; a bad line ends the
    request stream there (it is reported after the answers to the lines before it)."""
    try:
        async for message in messages:
            await call.write(message)
    except HttpError as e:
        request_errors.append(e)
    except ClientDisconnect:
        call.cancel()
        return
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
        return  # search ended the call: the response side reports its status
    await call.done_writing()
    if not request_errors:
        await _watch_disconnect(request, call)


def _start_writer(call: Any, request: Request, messages: AsyncIterator[Message],
                  request_errors: list[HttpError]) -> None:
    """Runs `_write_requests` beside the call, until the call ends."""
    writer = asyncio.get_running_loop().create_task(_write_requests(call, request, messages, request_errors))
    _WRITERS.add(writer)
    writer.add_done_callback(lambda task: _writer_done(task, call))
    # No write may still be pending once search has answered: grpc.aio replaces the status
    # of a call whose pending write fails because the call ended with INTERNAL "Internal
    # error from Core" (grpc/grpc#36066), so an Ingest that search refused at once (no
    # token) answered 500 instead of 401 about once in ten. Done callbacks run as search's
    # status is set; the cancelled writer then never handles the failed write.
    call.add_done_callback(lambda _call: writer.cancel())


def _writer_done(writer: asyncio.Task[None], call: Any) -> None:
    _WRITERS.discard(writer)
    if writer.cancelled() or writer.exception() is None:
        return
    # Unexpected: without it search would wait for the rest of the request stream.
    log.warning("ingest request stream failed", error=repr(writer.exception()))
    call.cancel()


async def call_client_stream(
    gw: Gateway, method: Method, request: Request, messages: AsyncIterator[Message]
) -> Response:
    """Ingest: the body's messages go to search as they arrive; outcomes come back as
    they are decided. A bad line ends the request stream there: the items before it are
    still answered, then an `{"error"}` line names the bad one."""
    request_errors: list[HttpError] = []
    # Written from our own task (not a request iterator handed to grpc) so that the
    # writing stops the moment the call ends (`_start_writer`).
    call = gw.callable(method)(metadata=_metadata(request), timeout=gw.timeout(method))
    _start_writer(call, request, messages, request_errors)
    if not method.server_streaming:  # no such RPC today; kept for completeness
        try:
            reply = await call
        except grpc.aio.AioRpcError as e:
            _count(method, e.code())
            raise (request_errors[0] if request_errors else from_rpc_error(e)) from None
        _count(method, grpc.StatusCode.OK)
        if request_errors:
            raise request_errors[0]
        return JSONResponse(to_json(reply))
    return await _stream_response(gw, method, call, request_errors, duplex=True)


async def call_server_stream(gw: Gateway, method: Method, request: Request, message: Message) -> Response:
    call = gw.callable(method)(message, metadata=_metadata(request), timeout=gw.timeout(method))
    return await _stream_response(gw, method, call, [])


# --- the app ------------------------------------------------------------------------------


def _route_for(gw: Gateway, method: Method) -> Callable[[Request], Awaitable[Response]]:
    limit = gw.settings.max_body_bytes

    if method.client_streaming:

        async def streaming_in(request: Request) -> Response:
            async def messages() -> AsyncIterator[Message]:
                async for number, line in ndjson_lines(request, limit):
                    yield ingest_request_from_line(number, line)

            return await call_client_stream(gw, method, request, messages())

        return streaming_in

    async def endpoint(request: Request) -> Response:
        body = b"" if request.method == "GET" else await read_body(request, limit)
        message = parse_json(body, method.request_cls)
        if method.server_streaming:
            return await call_server_stream(gw, method, request, message)
        return await call_unary(gw, method, request, message)

    return endpoint


def _openapi_bodies(method: Method) -> dict[str, Any]:
    req = {"$ref": f"#/components/schemas/{method.request_cls.DESCRIPTOR.full_name}"}
    resp = {"$ref": f"#/components/schemas/{method.response_cls.DESCRIPTOR.full_name}"}
    error = {"description": "gRPC status as HTTP (grpc-gateway's mapping)",
             "content": {"application/json": {"schema": {"$ref": "#/components/schemas/google.rpc.Status"}}}}
    if method.client_streaming:
        body = {"required": True, "content": {NDJSON: {"schema": {"oneOf": [
            {"$ref": "#/components/schemas/mmsearch.search.v1.IngestItem"}, req]}}},
            "description": "NDJSON: one IngestItem (or an IngestRequest with `items`) per line"}
    else:
        body = {"required": False, "content": {"application/json": {"schema": req}}}
    if method.server_streaming:
        ok = {"description": "NDJSON: one {\"result\": message} per line; a last {\"error\": status} line "
                             "when the call fails after it started",
              "content": {NDJSON: {"schema": {"type": "object", "properties": {
                  "result": resp, "error": {"$ref": "#/components/schemas/google.rpc.Status"}}}}}}
    else:
        ok = {"description": "OK", "content": {"application/json": {"schema": resp}}}
    return {"requestBody": body, "responses": {"200": ok, "default": error}}


def _error_response(error: HttpError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


_STATUS_TO_CODE = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
                   403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.NOT_FOUND,
                   405: grpc.StatusCode.UNIMPLEMENTED, 413: grpc.StatusCode.INVALID_ARGUMENT,
                   429: grpc.StatusCode.RESOURCE_EXHAUSTED}


_FIXED_PATHS = {"/", "/openapi.json", "/healthz", "/readyz"}


def _handler_label(scope: Scope) -> str:
    """The route template (bounded cardinality): never a raw path with ids in it."""
    route_path = getattr(scope.get("route"), "path", None)
    if route_path:
        return str(route_path)
    path = scope.get("path", "")
    if path in _FIXED_PATHS:
        return path
    return "/static" if path.startswith("/static/") else "none"


class MetricsMiddleware:
    """http_requests_total / http_request_duration_seconds by route template."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500
        method = scope.get("method", "")

        async def sending(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)  # type: ignore[arg-type]

        metrics.HTTP_IN_FLIGHT.labels(method, "all").inc()
        try:
            await self.app(scope, receive, sending)  # type: ignore[arg-type]
        finally:
            metrics.HTTP_IN_FLIGHT.labels(method, "all").dec()
            handler = _handler_label(scope)
            metrics.HTTP_REQUESTS.labels(method, handler, str(status)).inc()
            metrics.HTTP_SECONDS.labels(method, handler).observe(time.perf_counter() - start)


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    settings = settings or GatewaySettings()
    gw = Gateway(settings)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await gw.start()
        try:
            yield
        finally:
            await gw.stop()

    app = FastAPI(
        title="mmsearch HTTP/JSON API",
        version="v1",
        description=(
            "Every public Search RPC over HTTP. Bodies are the protobuf messages of "
            "mmsearch.search.v1 in the protobuf JSON mapping; errors are gRPC status codes "
            "mapped to HTTP as grpc-gateway does, with a {code, message, details} body. "
            "Authorization: Bearer <token> is forwarded to the search service."
        ),
        lifespan=lifespan,
        docs_url=None,  # Swagger UI loads its assets from a CDN: not on a closed network
        redoc_url=None,
    )
    app.state.gateway = gw
    app.add_middleware(MetricsMiddleware)

    @app.exception_handler(HttpError)
    async def _http_error(_request: Request, e: HttpError) -> JSONResponse:
        return _error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _starlette_error(_request: Request, e: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_TO_CODE.get(e.status_code, grpc.StatusCode.UNKNOWN)
        return JSONResponse({"code": code.value[0], "message": str(e.detail), "details": []},
                            status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, e: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg')}" for err in e.errors()]
        return _error_response(HttpError.invalid("; ".join(parts)))

    for method in METHODS.values():
        endpoint = _route_for(gw, method)
        verbs = ["POST"]
        if not method.request_cls.DESCRIPTOR.fields and not method.client_streaming:
            verbs.append("GET")  # e.g. GET /v1/stats
        for verb in verbs:
            app.add_api_route(
                method.http_path, endpoint, methods=[verb], name=method.name, summary=method.name,
                description=method.doc, tags=["Search"], openapi_extra=_openapi_bodies(method),
                response_class=JSONResponse, operation_id=f"{method.name}" + ("" if verb == "POST" else "_get"),
            )

    ingest = METHODS["Ingest"]

    @app.post("/v1/ingest/upload", tags=["Search"], summary="Ingest (multipart upload)", openapi_extra={
        "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
            "type": "object", "properties": {
                "file": {"type": "array", "items": {"type": "string", "format": "binary"}},
                "metadata_json": {"type": "string", "description": "metadata JSON object for every file"}}}}}},
        "responses": {"200": {"description": "NDJSON: {\"result\": IngestResponse} lines; outcome `index` is "
                                             "the file's position in the upload"}}})
    async def ingest_upload(request: Request) -> Response:
        """Multipart files (field `file`, repeated), each ingested as inline bytes;
        `metadata_json` applies to every file. Outcomes stream back as with /v1/ingest."""
        s = gw.settings
        form = await limited(request, s.max_upload_bytes, "GATEWAY_MAX_UPLOAD_BYTES").form(
            max_files=s.max_upload_files, max_fields=100, max_part_size=s.max_body_bytes)
        files = [v for k, v in form.multi_items() if k == "file" and isinstance(v, UploadFile)]
        if not files:
            raise HttpError.invalid("no files: send one or more multipart parts named 'file'")
        metadata = form.get("metadata_json")
        metadata_json = metadata if isinstance(metadata, str) else ""

        async def messages() -> AsyncIterator[Message]:
            try:
                chunk: list[search_pb2.IngestItem] = []
                for upload in files:
                    data = await upload.read()
                    chunk.append(search_pb2.IngestItem(image=types_pb2.Image(data=data), metadata_json=metadata_json))
                    if len(chunk) >= UPLOAD_CHUNK_ITEMS:
                        yield search_pb2.IngestRequest(items=chunk)
                        chunk = []
                if chunk:
                    yield search_pb2.IngestRequest(items=chunk)
            finally:
                await form.close()

        return await call_client_stream(gw, ingest, request, messages())

    @app.get("/v1/thumbnail", tags=["Page"], summary="A stored item's thumbnail (JPEG)", responses={
        200: {"content": {"image/jpeg": {}}},
        404: {"description": "no such item, or it has no file:// URI (inline bytes), or the file is gone"},
        403: {"description": "the stored URI is outside the gateway's file root"}})
    async def thumbnail(request: Request, id: str, size: int = 256) -> Response:
        """The item is fetched from search with the caller's token (search's auth decides);
        only its stored file:// URI is read, confined to GATEWAY_FILE_ROOT."""
        get = METHODS["Get"]
        try:
            reply = await gw.callable(get)(search_pb2.GetRequest(ids=[id]), metadata=_metadata(request),
                                           timeout=gw.settings.search_timeout_s)
        except grpc.aio.AioRpcError as e:
            _count(get, e.code())
            raise from_rpc_error(e) from None
        _count(get, grpc.StatusCode.OK)
        if not reply.records:
            metrics.THUMBNAILS.labels("missing").inc()
            raise HttpError.from_grpc(grpc.StatusCode.NOT_FOUND, f"no stored item with id {id!r}")
        assert gw.thumbnailer is not None
        try:
            jpeg = await asyncio.to_thread(gw.thumbnailer.render, reply.records[0].uri, size)
        except NoThumbnail as e:
            metrics.THUMBNAILS.labels(e.outcome).inc()
            code = grpc.StatusCode.PERMISSION_DENIED if e.status == 403 else grpc.StatusCode.NOT_FOUND
            raise HttpError(e.status, code, e.message) from None
        metrics.THUMBNAILS.labels("served").inc()
        return Response(jpeg, media_type="image/jpeg",
                        headers={"Cache-Control": f"private, max-age={gw.settings.thumbnail_cache_s}"})

    @app.get("/healthz", tags=["Health"], summary="Liveness: the process answers")
    async def healthz() -> dict[str, str]:
        return {"status": "SERVING"}

    @app.get("/readyz", tags=["Health"], summary="Readiness, and search's health as the gateway sees it")
    async def readyz() -> JSONResponse:
        """Ready while the gateway runs, whatever search's state: with search down, calls
        answer 503 with search's message instead of refused connections, and one dead
        upstream never takes the HTTP front out of the load balancer."""
        return JSONResponse({"status": "SERVING", "search": await gw.search_health(),
                             "search_target": gw.settings.search_target})

    if settings.page:
        app.mount("/static", StaticFiles(directory=STATIC), name="static")

        @app.get("/", include_in_schema=False)
        async def page() -> FileResponse:
            return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            schema.setdefault("components", {}).setdefault("schemas", {}).update(json_schemas())
            schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            schema["security"] = [{"bearer": []}, {}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
