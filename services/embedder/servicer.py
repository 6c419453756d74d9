"""gRPC servicer: protobuf <-> domain, nothing else.

Domain errors raised by the engine become status codes in the shared
ErrorMappingInterceptor; this module never calls `context.abort` for them.
"""

from __future__ import annotations

import grpc

from mmsearch.embedder.v1 import embedder_pb2, embedder_pb2_grpc
from services.common.content import Content
from services.common.convert import content_from_proto, embedding_to_proto
from services.common.deadline import deadline_of
from services.common.errors import ServiceError, at_index
from services.embedder.backends.base import Modality
from services.embedder.engine import EmbeddingEngine

_MODALITY_TO_PROTO = {
    Modality.TEXT: embedder_pb2.MODALITY_TEXT,
    Modality.IMAGE: embedder_pb2.MODALITY_IMAGE,
    Modality.COMPOSED: embedder_pb2.MODALITY_COMPOSED,
}


class EmbedderServicer(embedder_pb2_grpc.EmbedderServicer):
    def __init__(self, engine: EmbeddingEngine) -> None:
        self._engine = engine

    async def Embed(
        self, request: embedder_pb2.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> embedder_pb2.EmbedResponse:
        items: list[Content] = []
        for i, msg in enumerate(request.items):
            try:
                items.append(content_from_proto(msg))
            except ServiceError as e:
                raise at_index(i, e) from None
        vectors = await self._engine.embed(items, deadline_of(context))
        info = self._engine.info
        return embedder_pb2.EmbedResponse(
            embeddings=[embedding_to_proto(v) for v in vectors],
            model_id=info.model_id,
            dimension=info.dimension,
        )

    async def Info(
        self, request: embedder_pb2.InfoRequest, context: grpc.aio.ServicerContext
    ) -> embedder_pb2.InfoResponse:
        info = self._engine.info
        settings = self._engine.settings
        # The modalities callers may send: mixing backends compose from image + text.
        modalities = list(info.modalities)
        if Modality.COMPOSED not in modalities and {Modality.TEXT, Modality.IMAGE} <= set(modalities):
            modalities.append(Modality.COMPOSED)
        return embedder_pb2.InfoResponse(
            model_id=info.model_id,
            dimension=info.dimension,
            modalities=[_MODALITY_TO_PROTO[m] for m in modalities],
            composed_native=info.composed_native,
            max_batch_items=settings.max_batch_items,
            max_model_batch_size=settings.max_model_batch_size,
            max_text_chars=settings.max_text_chars,
            max_image_bytes=settings.images.max_bytes,
            max_image_pixels=settings.images.max_pixels,
            backend=info.backend,
        )
