"""Wires the search service: Milvus store, upstream clients, pipeline, engine, health."""
from __future__ import annotations

import asyncio
from typing import Any

from mmsearch.search.v1 import search_pb2, search_pb2_grpc
from services.common.intake import ImageIntake
from services.common.log import get_logger
from services.common.server import GrpcApp
from services.search.engine import SearchEngine
from services.search.ingest import IngestPipeline
from services.search.ingest_wire import decode_ingest_request
from services.search.milvus_store import MilvusStore
from services.search.servicer import SearchServicer
from services.search.settings import SearchSettings
from services.search.upstreams import CaptionerClient, EmbedderClient, EmbedderInfo

log = get_logger(__name__)

_INGEST_METHOD = f"/{search_pb2.DESCRIPTOR.services_by_name['Search'].full_name}/Ingest"


class SearchService:
    """Owns the long-lived clients; `app()` hands them to the shared runtime."""

    def __init__(self, settings: SearchSettings) -> None:
        self.settings = settings
        self.store = MilvusStore(settings)
        self.embedder = EmbedderClient(settings)
        self.captioner = CaptionerClient(settings)
        self.intake = ImageIntake(settings.images, settings.uris)
        self.info: EmbedderInfo | None = None
        self.engine: SearchEngine | None = None
        self.pipeline = IngestPipeline(
            settings, self.intake, self.captioner, self.embedder, self.store, lambda: self.info.model_id if self.info else ""
        )
        self._servicer: SearchServicer | None = None

    async def start(self) -> None:
        # The collection is bound to the embedding model: learn it before serving.
        for attempt in range(60):
            try:
                self.info = await self.embedder.info()
                break
            except Exception as e:
                if attempt == 59:
                    raise
                log.info("waiting for the embedder", target=self.settings.embedder_target, error=str(e))
                await asyncio.sleep(1.0)
        assert self.info is not None
        await self.store.ensure_collection(self.info.model_id, self.info.dimension)
        self.engine = SearchEngine(self.settings, self.store, self.embedder, self.intake, self.info.dimension)
        assert self._servicer is not None
        self._servicer.engine = self.engine
        log.info("collection ready", collection=self.settings.collection, model=self.info.model_id,
                 dimension=self.info.dimension, milvus=self.store.mode)

    async def ready(self) -> bool:
        checks = await asyncio.gather(
            self.store.ping(), self.embedder.serving(), self.captioner.serving(), return_exceptions=True
        )
        return all(c is True for c in checks)

    async def stop(self) -> None:
        await self.embedder.close()
        await self.captioner.close()
        await self.intake.aclose()
        await self.store.close()

    async def stats_extra(self) -> dict[str, Any]:
        assert self.info is not None
        return {
            "embedder_model_id": self.info.model_id,
            "dimension": self.info.dimension,
            "captioner_model_id": await self.captioner.model_id(),
        }

    def app(self) -> GrpcApp:
        self._servicer = SearchServicer(self.engine, self.pipeline, self.store, self.stats_extra)  # type: ignore[arg-type]
        servicer = self._servicer
        return GrpcApp(
            name="search",
            service_names=[search_pb2.DESCRIPTOR.services_by_name["Search"].full_name],
            register=lambda server: search_pb2_grpc.add_SearchServicer_to_server(servicer, server),
            on_start=self.start,
            on_stop=self.stop,
            readiness=self.ready,
            # One item with invalid UTF-8 fails alone instead of ending the Ingest call.
            request_decoders={_INGEST_METHOD: decode_ingest_request},
        )
