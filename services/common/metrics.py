"""Prometheus metrics: the standard gRPC server series and the /metrics endpoint.

Series and labels follow go-grpc-prometheus / grpc-ecosystem so existing dashboards and
alerts work unchanged: grpc_server_started_total, grpc_server_handled_total (grpc_code, with
Go's code names: OK, InvalidArgument, ResourceExhausted, ...),
grpc_server_handling_seconds, grpc_server_msg_received_total, grpc_server_msg_sent_total,
all labelled grpc_type, grpc_service, grpc_method. Metrics live in the process-wide
default registry (one process = one service in production).
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from prometheus_client import Counter, Histogram, start_http_server

from services.common.interceptors import HandlerCache, wrap_handler

_LABELS = ("grpc_type", "grpc_service", "grpc_method")

STARTED = Counter("grpc_server_started_total", "RPCs started on the server.", _LABELS)
HANDLED = Counter(
    "grpc_server_handled_total", "RPCs completed on the server, by status code.", (*_LABELS, "grpc_code")
)
HANDLING_SECONDS = Histogram(
    "grpc_server_handling_seconds",
    "Time from the start of an RPC to its completion on the server.",
    _LABELS,
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
MSG_RECEIVED = Counter("grpc_server_msg_received_total", "Stream messages received by the server.", _LABELS)
MSG_SENT = Counter("grpc_server_msg_sent_total", "Stream messages sent by the server.", _LABELS)


def _rpc_type(req_stream: bool, resp_stream: bool) -> str:
    if req_stream and resp_stream:
        return "bidi_stream"
    if req_stream:
        return "client_stream"
    return "server_stream" if resp_stream else "unary"


def _split_method(full: str) -> tuple[str, str]:
    # "/mmsearch.search.v1.Search/Ingest" -> ("mmsearch.search.v1.Search", "Ingest")
    service, _, method = full.lstrip("/").rpartition("/")
    return service, method


# grpc_code values exactly as go-grpc-prometheus writes them: Go's codes.Code.String()
# (CamelCase, and Go's spelling "Canceled"), not Python's enum names. Dashboards and
# alerts written for Go services (grpc_code="ResourceExhausted") then work unchanged.
GO_CODE_NAMES: dict[grpc.StatusCode, str] = {
    grpc.StatusCode.OK: "OK",
    grpc.StatusCode.CANCELLED: "Canceled",
    grpc.StatusCode.UNKNOWN: "Unknown",
    grpc.StatusCode.INVALID_ARGUMENT: "InvalidArgument",
    grpc.StatusCode.DEADLINE_EXCEEDED: "DeadlineExceeded",
    grpc.StatusCode.NOT_FOUND: "NotFound",
    grpc.StatusCode.ALREADY_EXISTS: "AlreadyExists",
    grpc.StatusCode.PERMISSION_DENIED: "PermissionDenied",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "ResourceExhausted",
    grpc.StatusCode.FAILED_PRECONDITION: "FailedPrecondition",
    grpc.StatusCode.ABORTED: "Aborted",
    grpc.StatusCode.OUT_OF_RANGE: "OutOfRange",
    grpc.StatusCode.UNIMPLEMENTED: "Unimplemented",
    grpc.StatusCode.INTERNAL: "Internal",
    grpc.StatusCode.UNAVAILABLE: "Unavailable",
    grpc.StatusCode.DATA_LOSS: "DataLoss",
    grpc.StatusCode.UNAUTHENTICATED: "Unauthenticated",
}
_BY_NUMBER = {c.value[0]: name for c, name in GO_CODE_NAMES.items()}


def code_label(code: grpc.StatusCode | int) -> str:
    """The grpc_code label value of a status (go-grpc-prometheus' name)."""
    if isinstance(code, grpc.StatusCode):
        return GO_CODE_NAMES[code]
    return _BY_NUMBER.get(code, "Unknown")


def _code_name(context: grpc.aio.ServicerContext, error: BaseException | None) -> str:
    if isinstance(error, asyncio.CancelledError):
        return code_label(grpc.StatusCode.CANCELLED)
    code = context.code()
    if isinstance(code, grpc.StatusCode | int):  # the aio context may return the raw number
        return code_label(code)
    return code_label(grpc.StatusCode.UNKNOWN if error is not None else grpc.StatusCode.OK)


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Records the standard gRPC server metrics for every call, including failures."""

    def __init__(self) -> None:
        self._cache = HandlerCache()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        service, method = _split_method(handler_call_details.method)

        def wrapper(behaviour: Callable[..., Any], req_stream: bool, resp_stream: bool) -> Callable[..., Any]:
            labels = (_rpc_type(req_stream, resp_stream), service, method)
            received, sent = MSG_RECEIVED.labels(*labels), MSG_SENT.labels(*labels)

            def count_requests(request: Any) -> Any:
                if not req_stream:
                    received.inc()
                    return request

                async def counted() -> AsyncIterator[Any]:
                    async for item in request:
                        received.inc()
                        yield item

                return counted()

            def finish(context: grpc.aio.ServicerContext, start: float, error: BaseException | None) -> None:
                HANDLED.labels(*labels, _code_name(context, error)).inc()
                HANDLING_SECONDS.labels(*labels).observe(time.perf_counter() - start)

            if resp_stream:

                async def streaming(request: Any, context: grpc.aio.ServicerContext) -> Any:
                    STARTED.labels(*labels).inc()
                    start, error = time.perf_counter(), None
                    try:
                        async for item in behaviour(count_requests(request), context):
                            sent.inc()
                            yield item
                    except BaseException as e:
                        error = e
                        raise
                    finally:
                        finish(context, start, error)

                return streaming

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                STARTED.labels(*labels).inc()
                start, error = time.perf_counter(), None
                try:
                    response = await behaviour(count_requests(request), context)
                    sent.inc()
                    return response
                except BaseException as e:
                    error = e
                    raise
                finally:
                    finish(context, start, error)

            return unary

        return self._cache.wrap(handler_call_details.method, handler, lambda h: wrap_handler(h, wrapper))


def start_metrics_server(port: int, host: str = "0.0.0.0") -> tuple[Any, int]:
    """Serves /metrics on its own port (0 = any free port); returns (server, bound port)."""
    server, _thread = start_http_server(port, addr=host)
    return server, server.server_port
