"""gRPC clients of the embedder and captioner: the `ports.Embedder` / `ports.Captioner`
that the search service runs with.

One long-lived channel per upstream (with gRPC's retry policy on UNAVAILABLE); upstream
status codes become domain errors so the pipeline never handles grpc types.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mmsearch.captioner.v1 import captioner_pb2, captioner_pb2_grpc
from mmsearch.common.v1 import types_pb2
from mmsearch.embedder.v1 import embedder_pb2, embedder_pb2_grpc
from services.common.channels import ReloadingChannel
from services.common.content import Content
from services.common.convert import content_to_proto
from services.common.deadline import NO_DEADLINE, Deadline
from services.common.errors import DeadlineExceeded, InvalidInput, Overloaded, ServiceError, Unavailable
from services.search.domain import CaptionResult, EmbedderInfo
from services.search.settings import SearchSettings


def _domain_error(who: str, e: grpc.aio.AioRpcError) -> ServiceError:
    message = f"{who}: {e.code().name}: {e.details()}"
    code = e.code()
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidInput(message)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return Overloaded(message)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(message)
    return Unavailable(message)


async def _health(channel: grpc.aio.Channel, timeout_s: float) -> bool | None:
    """True: SERVING; False: answers, but NOT_SERVING (e.g. one replica draining);
    None: nothing answers (no replica reachable)."""
    try:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
    except grpc.aio.AioRpcError:
        return None
    return reply.status == health_pb2.HealthCheckResponse.SERVING


async def _serving(channel: grpc.aio.Channel, timeout_s: float) -> bool:
    return await _health(channel, timeout_s) is True


class _UpstreamClient:
    """A channel to one upstream service (rebuilt when its TLS files change) and its stub."""

    _stub_type: Any

    def __init__(self, settings: SearchSettings, target: str) -> None:
        self._rc = ReloadingChannel(
            target, settings.upstream_tls, settings.max_send_message_bytes, settings.upstream_attempts
        )
        self._stub = self._stub_type(self._channel)
        self._timeout_s = settings.upstream_timeout_s

    async def serving(self) -> bool:
        return await _serving(self._channel, 2.0)

    async def health(self) -> bool | None:
        return await _health(self._channel, 2.0)

    @property
    def _channel(self) -> grpc.aio.Channel:
        return self._rc.channel

    def reload_tls(self) -> bool:
        """New connections use renewed certificate files (calls in flight keep theirs)."""
        if not self._rc.reload_if_changed():
            return False
        self._stub = self._stub_type(self._rc.channel)
        return True

    async def close(self) -> None:
        await self._rc.close()


class EmbedderClient(_UpstreamClient):
    _stub_type = embedder_pb2_grpc.EmbedderStub

    def __init__(self, settings: SearchSettings, target: str | None = None) -> None:
        super().__init__(settings, target or settings.embedder_target)

    async def info(self) -> EmbedderInfo:
        try:
            r = await self._stub.Info(embedder_pb2.InfoRequest(), timeout=self._timeout_s)
        except grpc.aio.AioRpcError as e:
            raise _domain_error("embedder", e) from None
        return EmbedderInfo(r.model_id, r.dimension, r.composed_native, r.max_batch_items)

    async def embed(self, items: Sequence[Content], deadline: Deadline = NO_DEADLINE) -> tuple[np.ndarray, str]:
        """Returns (vectors [N, dim] float32, model id); the caller's deadline goes along."""
        try:
            reply = await self._stub.Embed(
                embedder_pb2.EmbedRequest(items=[content_to_proto(c) for c in items]),
                timeout=deadline.cap(self._timeout_s),
            )
        except grpc.aio.AioRpcError as e:
            raise _domain_error("embedder", e) from None
        vectors = np.array([e.values for e in reply.embeddings], dtype=np.float32)
        return vectors, reply.model_id


class CaptionerClient(_UpstreamClient):
    _stub_type = captioner_pb2_grpc.CaptionerStub

    def __init__(self, settings: SearchSettings) -> None:
        super().__init__(settings, settings.captioner_target)

    async def caption(self, image_bytes: bytes, deadline: Deadline = NO_DEADLINE) -> CaptionResult:
        try:
            reply = await self._stub.Caption(
                captioner_pb2.CaptionRequest(image=types_pb2.Image(data=image_bytes)),
                timeout=deadline.cap(self._timeout_s),
            )
        except grpc.aio.AioRpcError as e:
            raise _domain_error("captioner", e) from None
        c = reply.caption
        return CaptionResult(c.description, list(c.keywords), c.model_id)

    async def model_id(self) -> str:
        try:
            return (await self._stub.Info(captioner_pb2.InfoRequest(), timeout=5.0)).model_id
        except grpc.aio.AioRpcError:
            return ""

