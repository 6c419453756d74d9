"""The one way every mmsearch service runs: `run(settings, app)`.

It builds a grpc.aio server with metrics, auth and error-mapping interceptors, health
(grpc.health.v1) and reflection, a Prometheus /metrics endpoint, loads the app (models,
connections) before reporting SERVING, polls the app's readiness, and on SIGTERM turns
NOT_SERVING and lets in-flight calls finish within the grace period.
"""
from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from services.common.interceptors import (
    BearerTokenInterceptor,
    ErrorMappingInterceptor,
    ScopedAuthInterceptor,
    StartupGate,
)
from services.common.log import configure_logging, get_logger, service_name
from services.common.memory import return_large_frees_to_the_os
from services.common.metrics import MetricsInterceptor, start_metrics_server
from services.common.security import server_credentials
from services.common.settings import ServerSettings
from services.common.tokens import TokenRegistry

log = get_logger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
# A health name that stays SERVING while the process runs: liveness probes use it, so a
# dependency outage (NOT_SERVING readiness) never makes Kubernetes restart the pod.
LIVENESS = "liveness"
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


# --- reflection: the contract with its .proto comments ---------------------------------------


class _FileWithSource:
    """A file descriptor whose `CopyToProto` yields the descriptor-set copy (with source
    info) when there is one: the upb backend's `CopyToProto` drops comments."""

    def __init__(self, descriptor: Any, sources: Mapping[str, descriptor_pb2.FileDescriptorProto]) -> None:
        self._descriptor, self._sources = descriptor, sources
        self.name: str = descriptor.name

    @property
    def dependencies(self) -> list[_FileWithSource]:
        return [_FileWithSource(d, self._sources) for d in self._descriptor.dependencies]

    def CopyToProto(self, proto: descriptor_pb2.FileDescriptorProto) -> None:
        if self.name in self._sources:
            proto.CopyFrom(self._sources[self.name])
        else:
            self._descriptor.CopyToProto(proto)


class SourceInfoPool:
    """What grpc_reflection's servicer needs of a `DescriptorPool`: a pool built from
    mmsearch/descriptors.binpb (scripts/gen_protos.sh: every contract file and its
    imports, with the .proto comments), plus the files of the other services served here
    (health, reflection) from the default pool. Reflection clients (`grpcurl describe`)
    see the limits and error semantics the comments document."""

    def __init__(self, descriptor_set: descriptor_pb2.FileDescriptorSet,
                 extra_services: Sequence[str] = ()) -> None:
        self._pool = descriptor_pool.DescriptorPool()
        self._sources = {f.name: f for f in descriptor_set.file}
        for f in descriptor_set.file:  # --include_imports writes dependencies first
            self._pool.Add(f)
        default = descriptor_pool.Default()
        for name in extra_services:
            if not self._has(self._pool.FindFileContainingSymbol, name):
                self._add_from_default(default.FindFileContainingSymbol(name))

    @staticmethod
    def _has(find: Callable[[str], Any], name: str) -> bool:
        try:
            find(name)
        except KeyError:
            return False
        return True

    def _add_from_default(self, file: Any) -> None:
        if self._has(self._pool.FindFileByName, file.name):
            return
        for dep in file.dependencies:
            self._add_from_default(dep)
        self._pool.AddSerializedFile(file.serialized_pb)

    def FindFileByName(self, name: str) -> _FileWithSource:
        return _FileWithSource(self._pool.FindFileByName(name), self._sources)

    def FindFileContainingSymbol(self, symbol: str) -> _FileWithSource:
        return _FileWithSource(self._pool.FindFileContainingSymbol(symbol), self._sources)

    def __getattr__(self, name: str) -> Any:  # extension lookups: the plain pool
        return getattr(self._pool, name)


def contract_descriptor_set() -> descriptor_pb2.FileDescriptorSet | None:
    """mmsearch/descriptors.binpb (shipped in the wheel), or None when it is missing."""
    try:
        data = importlib.resources.files("mmsearch").joinpath("descriptors.binpb").read_bytes()
    except OSError:
        return None
    return descriptor_pb2.FileDescriptorSet.FromString(data)


def reflection_pool(service_names: Sequence[str]) -> SourceInfoPool | None:
    """The pool reflection serves from; None (the default pool, no comments) when the
    descriptor set is missing or does not describe every service served here."""
    descriptor_set = contract_descriptor_set()
    if descriptor_set is None:
        log.warning("no descriptor set: reflection serves descriptors without comments")
        return None
    try:
        pool = SourceInfoPool(descriptor_set, service_names)
        for name in service_names:
            pool.FindFileContainingSymbol(name)
    except (KeyError, TypeError, ValueError) as e:
        log.warning("descriptor set unusable: reflection serves descriptors without comments", error=str(e))
        return None
    return pool


async def _always_ready() -> bool:
    return True


async def _nothing() -> None:
    return None


@dataclass
class GrpcApp:
    """What a service plugs into the shared runtime.

    `register` adds servicers to the server; `on_start` loads models or opens
    connections (health stays NOT_SERVING until it returns); `readiness` is polled every
    `readiness_interval_s` and drives health (e.g. Milvus reachable, model not failed).
    It returns a bool (the overall status: `""` and every service name) or a mapping of
    health names to bools: `""` in it is the overall status, every other key is published
    as its own health name (per-capability health, e.g. search's "can text search");
    `on_stop` runs after the server has drained; `request_decoders` (full method name ->
    decoder) replace generated request parsers (see `ErrorMappingInterceptor`).
    """

    name: str
    service_names: Sequence[str]
    register: Callable[[grpc.aio.Server], None]
    on_start: Callable[[], Awaitable[None]] = _nothing
    on_stop: Callable[[], Awaitable[None]] = _nothing
    readiness: Callable[[], Awaitable[bool | Mapping[str, bool]]] = _always_ready
    readiness_interval_s: float = 1.0
    request_decoders: Mapping[str, Callable[[bytes], Any]] = field(default_factory=dict)
    # Full method name -> scope it needs with scoped tokens (others: "search"), and the
    # methods whose every call is audited (see `ScopedAuthInterceptor`).
    method_scopes: Mapping[str, str] = field(default_factory=dict)
    audited_methods: Sequence[str] = ()


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    metrics_port: int | None
    health: HealthServicer
    app: GrpcApp
    _tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    _metrics_http: Any = None
    # Set once the first readiness verdict is published (SERVING or NOT_SERVING).
    _first_verdict: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def set_serving(self, serving: bool) -> None:
        status = SERVING if serving else NOT_SERVING
        for name in ("", *self.app.service_names):
            await self.health.set(name, status)

    async def set_health(self, name: str, serving: bool) -> None:
        await self.health.set(name, SERVING if serving else NOT_SERVING)

    async def stop(self, grace_s: float) -> None:
        """NOT_SERVING first (so load balancers drain us), then wait for in-flight calls."""
        for task in self._tasks:
            task.cancel()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)
        await self.app.on_stop()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        log.info("server stopped", app=self.app.name)


async def _watch_readiness(running: RunningServer) -> None:
    app, last = running.app, None
    last_names: dict[str, bool] = {}
    while True:
        try:
            verdict = await asyncio.wait_for(app.readiness(), timeout=max(app.readiness_interval_s, 1.0) * 5)
        except Exception as e:  # noqa: BLE001 - a failing probe means not ready, never a dead loop
            log.warning("readiness probe failed", app=app.name, error=str(e))
            verdict = {name: False for name in ("", *last_names)}
        names = dict(verdict) if not isinstance(verdict, bool) else {"": verdict}
        ready = bool(names.pop("", False))
        if ready != last:
            await running.set_serving(ready)
            log.info("health changed", app=app.name, serving=ready)
            last = ready
        for name, serving in names.items():
            if last_names.get(name) != serving:
                await running.set_health(name, serving)
                log.info("health changed", app=app.name, capability=name, serving=serving)
        last_names.update(names)
        running._first_verdict.set()
        await asyncio.sleep(app.readiness_interval_s)


async def start_server(settings: ServerSettings, app: GrpcApp) -> RunningServer:
    """Starts serving; returns once `on_start` finished and health says SERVING."""
    interceptors: list[grpc.aio.ServerInterceptor] = [MetricsInterceptor()]
    if settings.auth_token_file is not None:
        registry = TokenRegistry(settings.auth_token_file, [t.get_secret_value() for t in settings.auth_tokens])
        interceptors.append(ScopedAuthInterceptor(registry, app.method_scopes, app.audited_methods,
                                                  settings.tenant_metrics))
    elif settings.auth_tokens:
        interceptors.append(BearerTokenInterceptor(settings.auth_tokens))
    gate = StartupGate(app.name)  # UNAVAILABLE until on_start has finished
    interceptors += [gate, ErrorMappingInterceptor(app.request_decoders)]
    options: list[tuple[str, int]] = [
        ("grpc.max_receive_message_length", settings.max_receive_message_bytes),
        ("grpc.max_send_message_length", settings.max_send_message_bytes),
        # Clients re-resolve and rebalance when connections age out, so new replicas get
        # traffic; calls in flight finish on the old connection (unbounded unless a grace
        # is set: a long Ingest stream must not be cut because its connection is old).
        ("grpc.max_connection_age_ms", settings.max_connection_age_s * 1000),
    ]
    if settings.max_connection_age_grace_s is not None:
        options.append(("grpc.max_connection_age_grace_ms", int(settings.max_connection_age_grace_s * 1000)))
    server = grpc.aio.server(
        interceptors=interceptors,
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
        options=options,
    )
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    app.register(server)
    reflected = (*app.service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                 reflection.SERVICE_NAME)
    reflection.enable_server_reflection(reflected, server, pool=reflection_pool(reflected))
    address = f"{settings.host}:{settings.grpc_port}"
    creds = server_credentials(settings.tls)
    port = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
    metrics_http, metrics_port = None, None
    if settings.metrics_port >= 0:
        metrics_http, metrics_port = start_metrics_server(settings.metrics_port, settings.host)
    running = RunningServer(server, port, metrics_port, health, app, _metrics_http=metrics_http)
    await running.set_serving(False)
    await health.set(LIVENESS, SERVING)
    await server.start()  # health answers NOT_SERVING while models load
    log.info("loading", app=app.name, port=port, metrics_port=metrics_port, tls=creds is not None)
    try:
        await app.on_start()
    except BaseException:
        # A failed start leaves nothing listening behind (port, gRPC threads, /metrics).
        await server.stop(0)
        with contextlib.suppress(Exception):
            await app.on_stop()
        if metrics_http is not None:
            metrics_http.shutdown()
            metrics_http.server_close()
        raise
    gate.open = True
    running._tasks.append(asyncio.create_task(_watch_readiness(running)))
    # Wait for the first readiness verdict so callers see the real health once we return.
    await running._first_verdict.wait()
    log.info("started", app=app.name, port=port)
    return running


async def serve(settings: ServerSettings, app: GrpcApp) -> None:
    """Runs until SIGTERM / SIGINT, then drains gracefully."""
    running = await start_server(settings, app)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down", app=app.name, grace_s=settings.shutdown_grace_s)
    await running.stop(settings.shutdown_grace_s)


def run(settings: ServerSettings, app_factory: Callable[[], GrpcApp]) -> None:
    """Entry point for `python -m services.<name>`."""
    if settings.return_freed_memory:
        return_large_frees_to_the_os()  # see memory.py: decoded images must not stay resident
    configure_logging(settings.log_level, settings.log_json, service=service_name(settings))

    async def main() -> None:
        # Build the app inside the running loop: grpc.aio channels and other loop-bound
        # objects created in a constructor (search's upstream channels) must belong to
        # the loop that serves, not to a default loop made before asyncio.run.
        await serve(settings, app_factory())

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
