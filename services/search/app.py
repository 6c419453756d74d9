"""Wires the search service: Milvus store, upstream clients, pipeline, engine, health."""
from __future__ import annotations

import asyncio
import contextlib
from functools import partial

from mmsearch.search.v1 import search_pb2, search_pb2_grpc
from services.common.errors import ServiceError
from services.common.intake import ImageIntake
from services.common.log import get_logger
from services.common.server import GrpcApp
from services.search.backfill import Backfiller
from services.search.binding import EmbedderBinding
from services.search.catalog import Catalog
from services.search.engine import SearchEngine
from services.search.ingest import IngestPipeline
from services.search.ingest_wire import decode_ingest_request
from services.search.milvus_store import MilvusStore
from services.search.pending import PendingImages
from services.search.servicer import SearchServicer
from services.search.settings import SearchSettings
from services.search.upstreams import CaptionerClient, EmbedderClient

log = get_logger(__name__)

_SERVICE = search_pb2.DESCRIPTOR.services_by_name["Search"].full_name
_INGEST_METHOD = f"/{_SERVICE}/Ingest"
# The scope each RPC needs with scoped tokens (SEARCH_AUTH_TOKEN_FILE; docs/security.md).
METHOD_SCOPES = {
    **{f"/{_SERVICE}/{m}": "search" for m in ("Search", "SearchAll", "Get", "Stats")},
    **{f"/{_SERVICE}/{m}": "ingest" for m in ("Ingest", "Backfill")},
    f"/{_SERVICE}/Delete": "delete",
}
AUDITED_METHODS = (f"/{_SERVICE}/Delete", f"/{_SERVICE}/Backfill")


# Health names besides "" / the service name (docs/operations.md, "Health"). The overall
# status is SERVING while Milvus answers: query_vector searches, Get, Delete and Stats work,
# so a pod stays in its Service however many upstreams are down.
HEALTH_SEARCH = "search"  # = overall; what the Kubernetes readiness probe asks
HEALTH_TEXT_SEARCH = "search.text"  # + the embedder: text / image / composed queries
HEALTH_INGEST = "ingest"  # + the embedder: Ingest with captions given (or deferred)
HEALTH_CAPTIONED_INGEST = "ingest.caption"  # + the captioner: Ingest that captions, backfill
HEALTH_FULL = "full"  # everything: SERVING overall but NOT_SERVING here means "degraded"
HEALTH_NAMES = (HEALTH_SEARCH, HEALTH_TEXT_SEARCH, HEALTH_INGEST, HEALTH_CAPTIONED_INGEST, HEALTH_FULL)


class SearchService:
    """Builds the search domain on its ports and hands it to the shared gRPC runtime.

    Starts without its upstreams: Milvus-only calls are served at once; a background task
    binds the embedder (learns its model, creates or checks the collection: the model
    guard) whenever it appears, however late, with no restart.
    """

    def __init__(self, settings: SearchSettings) -> None:
        self.settings = settings
        self.store = MilvusStore(settings)
        self.embedder = EmbedderClient(settings)
        self.captioner = CaptionerClient(settings)
        self.intake = ImageIntake(settings.images, settings.uris)
        self.binding = EmbedderBinding(self.embedder, self.store, settings.embedder_target)
        pending = PendingImages(settings.pending_images_dir) if settings.pending_images_dir else None
        self.catalog = Catalog(settings, self.store, self.binding, self.captioner)
        self.servicer = SearchServicer(
            SearchEngine(settings, self.store, self.embedder, self.intake, self.binding),
            IngestPipeline(settings, self.intake, self.captioner, self.embedder, self.store, self.binding, pending),
            self.catalog,
            Backfiller(settings, self.store, self.captioner, self.embedder, self.intake, self.binding, pending),
        )
        self._binder: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # Nothing here waits for an upstream or for Milvus: the server answers at once.
        with contextlib.suppress(ServiceError):
            await self.store.describe()
        self._binder = asyncio.create_task(self.binding.bind_forever())
        # An embedder that is up already is bound before the first SERVING (callers that
        # search right after start-up find text search ready); a missing one costs at
        # most this wait, then Milvus-only calls are served and binding goes on behind.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._binder), self.settings.embedder_start_wait_s)

    async def ready(self) -> dict[str, bool]:
        for client in (self.embedder, self.captioner):  # renewed TLS files (cert-manager)
            if client.reload_tls():
                log.info("upstream TLS files changed: new connections use them", upstream=type(client).__name__)
        milvus, embedder, captioner = await asyncio.gather(
            self.store.ping(), self.embedder.health(), self.captioner.health(), return_exceptions=True
        )
        self.binding.health = embedder if not isinstance(embedder, BaseException) else None
        self.catalog.captioner_health = captioner if not isinstance(captioner, BaseException) else None
        if milvus is True and self.store.info is None:
            with contextlib.suppress(ServiceError):
                await self.store.describe()
        store_ok = milvus is True
        embedder_ok = store_ok and self.binding.info is not None and self.binding.health is True
        captioner_ok = self.catalog.captioner_health is True
        return {
            "": store_ok,
            HEALTH_SEARCH: store_ok,
            HEALTH_TEXT_SEARCH: embedder_ok,
            HEALTH_INGEST: embedder_ok,
            HEALTH_CAPTIONED_INGEST: embedder_ok and captioner_ok,
            HEALTH_FULL: embedder_ok and captioner_ok,
        }

    async def stop(self) -> None:
        if self._binder is not None:
            self._binder.cancel()
            with contextlib.suppress(BaseException):
                await self._binder
        await self.embedder.close()
        await self.captioner.close()
        await self.intake.aclose()
        await self.store.close()

    def app(self) -> GrpcApp:
        return GrpcApp(
            name="search",
            service_names=[search_pb2.DESCRIPTOR.services_by_name["Search"].full_name],
            register=partial(search_pb2_grpc.add_SearchServicer_to_server, self.servicer),
            on_start=self.start,
            on_stop=self.stop,
            readiness=self.ready,
            # One item with invalid UTF-8 fails alone instead of ending the Ingest call.
            request_decoders={_INGEST_METHOD: decode_ingest_request},
            method_scopes=METHOD_SCOPES,
            audited_methods=AUDITED_METHODS,
        )
