"""Wires the search service: Milvus store, upstream clients, pipeline, engine, health."""
from __future__ import annotations

import asyncio
import contextlib

import grpc

from mmsearch.admin.v1 import admin_pb2, admin_pb2_grpc
from mmsearch.search.v1 import search_pb2, search_pb2_grpc
from services.common.errors import ServiceError
from services.common.intake import ImageIntake
from services.common.log import get_logger
from services.common.server import GrpcApp
from services.search.admin_servicer import AdminServicer
from services.search.backfill import Backfiller
from services.search.binding import EmbedderBinding
from services.search.catalog import Catalog
from services.search.engine import SearchEngine
from services.search.flushing import Flusher
from services.search.ingest import IngestPipeline
from services.search.ingest_wire import decode_ingest_request
from services.search.model_change import ModelChange
from services.search.originals import originals_from
from services.search.pending import PendingImages
from services.search.servicer import SearchServicer
from services.search.settings import SearchSettings
from services.search.upstreams import CaptionerClient, EmbedderClient
from services.search.versions import IndexVersions

log = get_logger(__name__)

_SERVICE = search_pb2.DESCRIPTOR.services_by_name["Search"].full_name
_ADMIN = admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name
_INGEST_METHOD = f"/{_SERVICE}/Ingest"
# The scope each RPC needs with scoped tokens (SEARCH_AUTH_TOKEN_FILE; docs/security.md).
METHOD_SCOPES = {
    **{f"/{_SERVICE}/{m}": "search" for m in ("Search", "SearchAll", "Get", "Stats")},
    **{f"/{_SERVICE}/{m}": "ingest" for m in ("Ingest", "Backfill")},
    f"/{_SERVICE}/Delete": "delete",
    **{f"/{_ADMIN}/{m.name}": "admin" for m in admin_pb2.DESCRIPTOR.services_by_name["Admin"].methods},
}
AUDITED_METHODS = (f"/{_SERVICE}/Delete", f"/{_SERVICE}/Backfill",
                   *(f"/{_ADMIN}/{m}" for m in ("CreateCandidate", "Backfill", "Promote", "Rollback", "DropCollection")))


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
        self.index = IndexVersions(settings)
        # The flush policy (SEARCH_FLUSH_*): the stores report their writes to it.
        self.flusher = Flusher(lambda name: self.index.store(name).flush(), settings.flush_min_rows,
                               settings.flush_idle_s, max_rows=settings.flush_max_rows,
                               min_interval_s=settings.flush_interval_s(),
                               stop_wait_s=settings.milvus_timeout_s)
        self.index.connection.on_write = self.flusher.wrote
        self.embedder = EmbedderClient(settings)
        # More embedders by model (a model change's candidate): SEARCH_MODEL_EMBEDDERS.
        self.mapped = {model: EmbedderClient(settings, target) for model, target in settings.model_embedders.items()}
        self.captioner = CaptionerClient(settings)
        self.intake = ImageIntake(settings.images, settings.uris)
        self.binding = EmbedderBinding(
            self.embedder, self.index, settings.embedder_target,
            {model: (client, settings.model_embedders[model]) for model, client in self.mapped.items()},
        )
        pending = PendingImages(settings.pending_images_dir) if settings.pending_images_dir else None
        originals = originals_from(settings.originals)
        self.catalog = Catalog(settings, self.index, self.binding, self.captioner)
        self.servicer = SearchServicer(
            SearchEngine(settings, self.index, self.intake, self.binding),
            IngestPipeline(settings, self.intake, self.captioner, self.index, self.binding, pending, originals),
            self.catalog,
            Backfiller(settings, self.index, self.captioner, self.intake, self.binding, pending, originals),
        )
        self.admin = AdminServicer(ModelChange(settings, self.index, self.binding, self.intake, originals))
        self._binder: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # Nothing here waits for an upstream or for Milvus: the server answers at once.
        with contextlib.suppress(ServiceError):
            await self.index.resolve(max_age_s=0)
        self.flusher.start()
        self._binder = asyncio.create_task(self.binding.bind_forever())
        # An embedder that is up already is bound before the first SERVING (callers that
        # search right after start-up find text search ready); a missing one costs at
        # most this wait, then Milvus-only calls are served and binding goes on behind.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._binder), self.settings.embedder_start_wait_s)

    async def ready(self) -> dict[str, bool]:
        for client in (self.embedder, self.captioner, *self.mapped.values()):  # renewed TLS files (cert-manager)
            if client.reload_tls():
                log.info("upstream TLS files changed: new connections use them", upstream=type(client).__name__)
        milvus, embedder, captioner = await asyncio.gather(
            self.index.front.ping(), self.embedder.health(), self.captioner.health(), return_exceptions=True
        )
        self.binding.health = embedder if not isinstance(embedder, BaseException) else None
        self.catalog.captioner_health = captioner if not isinstance(captioner, BaseException) else None
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
        for client in (self.embedder, self.captioner, *self.mapped.values()):
            await client.close()
        await self.intake.aclose()
        await self.flusher.stop()  # drops pending flushes (Milvus keeps the rows), waits for one in flight
        await self.index.close()

    def _register(self, server: grpc.aio.Server) -> None:
        search_pb2_grpc.add_SearchServicer_to_server(self.servicer, server)
        admin_pb2_grpc.add_AdminServicer_to_server(self.admin, server)

    def app(self) -> GrpcApp:
        return GrpcApp(
            name="search",
            service_names=[_SERVICE, _ADMIN],
            register=self._register,
            on_start=self.start,
            on_stop=self.stop,
            readiness=self.ready,
            # One item with invalid UTF-8 fails alone instead of ending the Ingest call.
            request_decoders={_INGEST_METHOD: decode_ingest_request},
            method_scopes=METHOD_SCOPES,
            audited_methods=AUDITED_METHODS,
        )
