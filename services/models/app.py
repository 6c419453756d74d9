"""The models process: the Embedder and the Captioner contracts on one port.

For the laptop shape (`mmsearch up` with both lite backends): one process loads torch,
EfficientNet-Lite0 and MiniLM once instead of twice, runs every forward on one model
thread, decodes an image once, and runs the classifier once per image for its caption
and its image vector (services/models/shared.py). Kubernetes keeps the two services
apart (production captioning is a VLM); this process is for one machine.

Health: "" and both service names are SERVING once both are ready (one process, one
verdict); reflection lists both services.
"""
from __future__ import annotations

import grpc

from mmsearch.captioner.v1 import captioner_pb2_grpc
from mmsearch.embedder.v1 import embedder_pb2_grpc
from services.captioner.servicer import SERVICE_NAME as CAPTIONER_SERVICE
from services.captioner.servicer import CaptionerServicer
from services.captioner.settings import CaptionerSettings
from services.common.log import get_logger
from services.common.server import GrpcApp
from services.embedder.app import SERVICE_NAME as EMBEDDER_SERVICE
from services.embedder.servicer import EmbedderServicer
from services.embedder.settings import EmbedderSettings
from services.models.backends import (
    SharedCaptionService,
    SharedEmbeddingEngine,
    SharedLiteCaptioner,
    SharedLiteEmbedder,
)
from services.models.settings import ModelsSettings
from services.models.shared import SharedClassifier

log = get_logger(__name__)


def build_app(
    settings: ModelsSettings,
    embedder_settings: EmbedderSettings | None = None,
    captioner_settings: CaptionerSettings | None = None,
) -> GrpcApp:
    emb = embedder_settings or EmbedderSettings()
    cap = captioner_settings or CaptionerSettings()
    if emb.backend != "lite" or cap.backend != "lite":
        raise ValueError(
            f"the models process serves the lite backends only (EMBEDDER_BACKEND={emb.backend}, "
            f"CAPTIONER_BACKEND={cap.backend}): run services.embedder and services.captioner instead"
        )
    shared = SharedClassifier(settings.probs_cache_size)
    embedder_backend = SharedLiteEmbedder(emb, shared)
    captioner_backend = SharedLiteCaptioner(cap, shared)
    # A known image skips decoding only when both contracts would decode it alike.
    skip_decode = emb.images == cap.images and embedder_backend.pixel_need == captioner_backend.pixel_need
    engine = SharedEmbeddingEngine(emb, embedder_backend, skip_decode)
    captions = SharedCaptionService(cap, captioner_backend, skip_decode)

    def register(server: grpc.aio.Server) -> None:
        embedder_pb2_grpc.add_EmbedderServicer_to_server(EmbedderServicer(engine), server)
        captioner_pb2_grpc.add_CaptionerServicer_to_server(CaptionerServicer(captions), server)

    async def on_start() -> None:
        await engine.start()  # loads both models (and the classifier the captioner shares), warms up
        shared.executor = engine.model_executor
        await captions.start()
        log.info("models ready", skip_decode=skip_decode, probs_cache_size=shared.cache_size)

    async def on_stop() -> None:
        await captions.aclose()
        await engine.stop()

    async def readiness() -> bool:
        return engine.ready and await captions.ready()

    return GrpcApp(
        name="models",
        service_names=(EMBEDDER_SERVICE, CAPTIONER_SERVICE),
        register=register,
        on_start=on_start,
        on_stop=on_stop,
        readiness=readiness,
        readiness_interval_s=1.0,
    )
