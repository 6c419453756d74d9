"""Protobuf <-> domain for mmsearch.captioner.v1.Captioner; nothing else lives here."""

from __future__ import annotations

import grpc

from mmsearch.captioner.v1 import captioner_pb2, captioner_pb2_grpc
from mmsearch.common.v1 import types_pb2
from services.captioner.service import Caption, CaptionRequest, CaptionService
from services.common.convert import image_ref_from_proto
from services.common.deadline import deadline_of
from services.common.errors import InvalidInput, ServiceError, at_index
from services.common.interceptors import item_error

_LANGUAGES = {
    captioner_pb2.LANGUAGE_UNSPECIFIED: None,
    captioner_pb2.LANGUAGE_EN: "en",
    captioner_pb2.LANGUAGE_ZH: "zh",
}

SERVICE_NAME = captioner_pb2.DESCRIPTOR.services_by_name["Captioner"].full_name


def request_from_proto(msg: captioner_pb2.CaptionRequest) -> CaptionRequest:
    if not msg.HasField("image"):
        raise InvalidInput("image is missing (set image.data or image.uri)")
    if msg.language not in _LANGUAGES:
        raise InvalidInput(f"unknown language enum value {msg.language}")
    return CaptionRequest(
        image=image_ref_from_proto(msg.image),
        prompt=msg.prompt,
        language=_LANGUAGES[msg.language],
        max_words=msg.max_words,
    )


def caption_to_proto(caption: Caption) -> captioner_pb2.Caption:
    return captioner_pb2.Caption(
        description=caption.description,
        keywords=caption.keywords,
        raw_text=caption.raw_text,
        model_id=caption.model_id,
        cached=caption.cached,
    )


def _error_to_proto(error: ServiceError) -> types_pb2.ItemError:
    return item_error(error)


class CaptionerServicer(captioner_pb2_grpc.CaptionerServicer):
    def __init__(self, service: CaptionService) -> None:
        self.service = service

    async def Caption(
        self, request: captioner_pb2.CaptionRequest, context: grpc.aio.ServicerContext
    ) -> captioner_pb2.CaptionResponse:
        caption = await self.service.caption(request_from_proto(request), deadline_of(context))
        return captioner_pb2.CaptionResponse(caption=caption_to_proto(caption))

    async def CaptionBatch(
        self, request: captioner_pb2.CaptionBatchRequest, context: grpc.aio.ServicerContext
    ) -> captioner_pb2.CaptionBatchResponse:
        self.service.check_batch_size(len(request.requests))
        results: list[captioner_pb2.CaptionResult | None] = [None] * len(request.requests)
        valid: list[tuple[int, CaptionRequest]] = []
        for i, item in enumerate(request.requests):
            try:
                valid.append((i, request_from_proto(item)))
            except ServiceError as e:
                results[i] = captioner_pb2.CaptionResult(error=_error_to_proto(at_index(i, e)))
        outcomes = await self.service.caption_batch([r for _, r in valid], deadline_of(context)) if valid else []
        for (i, _), outcome in zip(valid, outcomes, strict=True):
            if isinstance(outcome, ServiceError):
                results[i] = captioner_pb2.CaptionResult(error=_error_to_proto(at_index(i, outcome)))
            else:
                results[i] = captioner_pb2.CaptionResult(caption=caption_to_proto(outcome))
        return captioner_pb2.CaptionBatchResponse(results=results)

    async def Info(
        self, request: captioner_pb2.InfoRequest, context: grpc.aio.ServicerContext
    ) -> captioner_pb2.InfoResponse:
        info = self.service.info()
        return captioner_pb2.InfoResponse(
            backend=info.backend,
            model_id=info.model_id,
            max_batch_items=info.max_batch_items,
            max_image_bytes=info.max_image_bytes,
        )
