"""Wires the embedder into the shared runtime: servicer, lifecycle, readiness."""

from __future__ import annotations

import grpc

from mmsearch.embedder.v1 import embedder_pb2, embedder_pb2_grpc
from services.common.server import GrpcApp
from services.embedder.backends import create_backend
from services.embedder.engine import EmbeddingEngine
from services.embedder.servicer import EmbedderServicer
from services.embedder.settings import EmbedderSettings

SERVICE_NAME = embedder_pb2.DESCRIPTOR.services_by_name["Embedder"].full_name


def create_app(settings: EmbedderSettings, engine: EmbeddingEngine | None = None) -> GrpcApp:
    """The embedder as a `GrpcApp`.

    Health stays NOT_SERVING until `on_start` has loaded the weights and run a warm-up
    batch; it turns NOT_SERVING again when the model fails for good (readiness).
    Tests pass an `engine` around an already loaded backend to skip reloading weights.
    """
    if engine is None:
        engine = EmbeddingEngine(settings, create_backend(settings))

    def register(server: grpc.aio.Server) -> None:
        embedder_pb2_grpc.add_EmbedderServicer_to_server(EmbedderServicer(engine), server)

    async def readiness() -> bool:
        return engine.ready

    return GrpcApp(
        name="embedder",
        service_names=(SERVICE_NAME,),
        register=register,
        on_start=engine.start,
        on_stop=engine.stop,
        readiness=readiness,
        readiness_interval_s=1.0,
    )
