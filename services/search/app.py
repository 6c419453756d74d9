"""Wires the search service: Milvus store, upstream clients, pipeline, engine, health."""
from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from mmsearch.search.v1 import search_pb2, search_pb2_grpc
from services.common.errors import FailedPrecondition, ServiceError, Unavailable
from services.common.intake import ImageIntake
from services.common.log import get_logger
from services.common.server import GrpcApp
from services.search.backfill import Backfiller
from services.search.engine import SearchEngine
from services.search.ingest import IngestPipeline
from services.search.ingest_wire import decode_ingest_request
from services.search.milvus_store import MilvusStore
from services.search.pending import PendingImages
from services.search.servicer import SearchServicer
from services.search.settings import SearchSettings
from services.search.upstreams import CaptionerClient, EmbedderClient, EmbedderInfo

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
    """Owns the long-lived clients; `app()` hands them to the shared runtime.

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
        self.info: EmbedderInfo | None = None  # set once the embedder is bound (model guard passed)
        self.bind_error = "the embedder has not answered yet"
        self.guard_failed = False
        # Last probe: True SERVING, False answers but not SERVING, None unreachable.
        self.embedder_health: bool | None = None
        self.captioner_health: bool | None = None
        model_id = lambda: self.info.model_id if self.info else ""
        self.pending_images = PendingImages(settings.pending_images_dir) if settings.pending_images_dir else None
        self.pipeline = IngestPipeline(
            settings, self.intake, self.captioner, self.embedder, self.store, model_id, self.pending_images
        )
        self.backfiller = Backfiller(settings, self.store, self.captioner, self.embedder, self.intake, model_id,
                                     self.pending_images)
        self.engine = SearchEngine(settings, self.store, self.embedder, self.intake, self.embedder_gate, model_id)
        self._servicer: SearchServicer | None = None
        self._binder: asyncio.Task[None] | None = None

    def embedder_gate(self) -> None:
        """Raises when a query cannot be embedded now, so the call fails fast."""
        if self.info is None:
            if self.guard_failed:  # the embedder answers, with another model: not transient
                raise FailedPrecondition(self.bind_error)
            raise Unavailable(f"embedder {self.settings.embedder_target}: not available: {self.bind_error}")
        if self.embedder_health is None:
            raise Unavailable(f"embedder {self.settings.embedder_target}: unreachable")

    async def start(self) -> None:
        # Nothing here waits for an upstream or for Milvus: the server answers at once.
        with contextlib.suppress(ServiceError):
            await self.store.describe()
        self._binder = asyncio.create_task(self._bind_embedder())
        # An embedder that is up already is bound before the first SERVING (callers that
        # search right after start-up find text search ready); a missing one costs at
        # most this wait, then Milvus-only calls are served and binding goes on behind.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._binder), self.settings.embedder_start_wait_s)

    async def _bind_embedder(self) -> None:
        """Learns the embedder's model and binds the collection to it, retrying forever."""
        # One Info call a second while the embedder is away: cheap, and text search is back
        # about a second after the embedder serves again.
        delay, attempt = 0.25, 0
        while self.info is None:
            attempt += 1
            try:
                info = await self.embedder.info()
                await self.store.ensure_collection(info.model_id, info.dimension)
            except FailedPrecondition as e:  # the model guard: stays unbound, says why
                if e.message != self.bind_error:
                    log.error("embedder does not match the collection", error=e.message)
                self.bind_error, self.guard_failed = e.message, True
            except ServiceError as e:
                if attempt % 30 == 5:
                    log.info("waiting for the embedder", target=self.settings.embedder_target, error=e.message)
                self.bind_error, self.guard_failed = e.message, False
            else:
                self.info = info
                self.embedder_health = True
                log.info("collection ready", collection=self.settings.collection, model=info.model_id,
                         dimension=info.dimension, milvus=self.store.mode)
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def ready(self) -> dict[str, bool]:
        for client in (self.embedder, self.captioner):  # renewed TLS files (cert-manager)
            if client.reload_tls():
                log.info("upstream TLS files changed: new connections use them", upstream=type(client).__name__)
        milvus, embedder, captioner = await asyncio.gather(
            self.store.ping(), self.embedder.health(), self.captioner.health(), return_exceptions=True
        )
        self.embedder_health = embedder if not isinstance(embedder, BaseException) else None
        self.captioner_health = captioner if not isinstance(captioner, BaseException) else None
        if milvus is True and self.store.info is None:
            with contextlib.suppress(ServiceError):
                await self.store.describe()
        store_ok = milvus is True
        embedder_ok = store_ok and self.info is not None and self.embedder_health is True
        captioner_ok = self.captioner_health is True
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

    async def stats_extra(self) -> dict[str, Any]:
        collection = await self.store.require()
        return {
            "embedder_model_id": collection.model_id,
            "dimension": collection.dimension,
            # An unreachable captioner costs Stats nothing (no wait for its timeout).
            "captioner_model_id": await self.captioner.model_id() if self.captioner_health is not None else "",
        }

    def app(self) -> GrpcApp:
        self._servicer = SearchServicer(self.engine, self.pipeline, self.store, self.stats_extra, self.backfiller)
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
            method_scopes=METHOD_SCOPES,
            audited_methods=AUDITED_METHODS,
        )
