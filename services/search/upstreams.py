"""gRPC clients of the embedder and captioner: the `ports.Embedder` / `ports.Captioner`
that the search service runs with.

One long-lived channel per upstream (with gRPC's retry policy on UNAVAILABLE and CANCELLED); upstream
status codes become domain errors so the pipeline never handles grpc types.
"""
from __future__ import annotations

import asyncio
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


#: Bytes of images one CaptionBatch call carries at most (below the services' default
#: 64 MiB receive limit); a larger batch is sent as several calls.
CAPTION_BATCH_MAX_BYTES = 16 * 1024 * 1024
_STATUS_OF_NUMBER = {s.value[0]: s for s in grpc.StatusCode}


def _domain_error(who: str, e: grpc.aio.AioRpcError) -> ServiceError:
    return _error_of(who, e.code(), f"{e.details()}")


def _error_of(who: str, code: grpc.StatusCode, details: str) -> ServiceError:
    message = f"{who}: {code.name}: {details}"
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

    async def caption_batch(
        self, images: Sequence[bytes], deadline: Deadline = NO_DEADLINE
    ) -> list[CaptionResult | ServiceError]:
        """CaptionBatch calls (at most `CAPTION_BATCH_MAX_BYTES` of images each). A per-item
        error becomes the error a Caption call of that image would have raised; a batch
        refused as a whole for a limit of batches (INVALID_ARGUMENT, RESOURCE_EXHAUSTED:
        too many items, too many bytes) is sent again as Caption calls, so each image gets
        its own outcome; any other failure of the call raises."""
        out: list[CaptionResult | ServiceError] = []
        chunk: list[bytes] = []
        size = 0
        for data in images:
            if chunk and size + len(data) > CAPTION_BATCH_MAX_BYTES:
                out += await self._caption_batch_call(chunk, deadline)
                chunk, size = [], 0
            chunk.append(data)
            size += len(data)
        if chunk:
            out += await self._caption_batch_call(chunk, deadline)
        return out

    async def _caption_batch_call(
        self, images: list[bytes], deadline: Deadline
    ) -> list[CaptionResult | ServiceError]:
        request = captioner_pb2.CaptionBatchRequest(
            requests=[captioner_pb2.CaptionRequest(image=types_pb2.Image(data=d)) for d in images])
        try:
            reply = await self._stub.CaptionBatch(request, timeout=deadline.cap(self._timeout_s))
        except grpc.aio.AioRpcError as e:
            if len(images) > 1 and e.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED):
                return list(await asyncio.gather(*(self._caption_or_error(d, deadline) for d in images)))
            raise _domain_error("captioner", e) from None
        if len(reply.results) != len(images):
            raise Unavailable(f"captioner: CaptionBatch answered {len(reply.results)} results for {len(images)} images")
        out: list[CaptionResult | ServiceError] = []
        for i, result in enumerate(reply.results):
            if result.WhichOneof("outcome") == "caption":
                c = result.caption
                out.append(CaptionResult(c.description, list(c.keywords), c.model_id))
                continue
            code = _STATUS_OF_NUMBER.get(result.error.code, grpc.StatusCode.UNKNOWN)
            message = result.error.message
            prefix = f"item {i}: "  # services.common.errors.at_index: a single call has none
            out.append(_error_of("captioner", code, message[len(prefix):] if message.startswith(prefix) else message))
        return out

    async def _caption_or_error(self, data: bytes, deadline: Deadline) -> CaptionResult | ServiceError:
        try:
            return await self.caption(data, deadline)
        except ServiceError as e:
            return e

    async def model_id(self) -> str:
        try:
            return (await self._stub.Info(captioner_pb2.InfoRequest(), timeout=5.0)).model_id
        except grpc.aio.AioRpcError:
            return ""

