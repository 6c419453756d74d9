"""Clients of the Admin service (mmsearch.admin.v1): change the embedding model without downtime.

The search process serves Admin on the same port as Search; with scoped tokens every call
needs the "admin" scope. The steps of a model change::

    with AdminClient("127.0.0.1:50050", token=admin_token) as admin:
        admin.create_candidate("clip-vit-l-14")      # new items now go to both collections
        summary = admin.backfill_all(max_items_per_s=20)   # re-embed the live items
        result = admin.promote()                    # swap the alias (SearchError if counts differ)
        ...
        admin.rollback()                            # swap it back, instantly

Failed calls raise `SearchError` (the gRPC status code and the server's message), as the
search clients do: FAILED_PRECONDITION for a refused promote / rollback (the message gives
both counts; pass `force=True` to swap anyway), NOT_FOUND without a candidate or previous
collection, ABORTED while another backfill / promote / rollback runs.
"""
from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from mmsearch.admin.v1 import admin_pb2, admin_pb2_grpc
from mmsearch.client import _convert
from mmsearch.client._base import DEFAULT
from mmsearch.client.aio import AsyncClientBase
from mmsearch.client.sync import SyncClientBase
from mmsearch.client.types import (
    CollectionInfo,
    IndexBackfillSummary,
    IndexBackfillUpdate,
    IndexCollections,
    SwitchResult,
)

#: The admin service's name (health, reflection).
ADMIN_SERVICE = "mmsearch.admin.v1.Admin"


def _backfill_request(max_items_per_s: float, max_items: int) -> admin_pb2.BackfillRequest:
    return admin_pb2.BackfillRequest(max_items_per_s=max_items_per_s, max_items=max_items)


class AdminClient(SyncClientBase):
    """A blocking client for the Admin service (same options as `SearchClient`: address,
    `timeout`, `token`, TLS / mTLS, `retry_attempts`).

    Unary calls have the client's deadline (`timeout`, overridable per call); `promote` and
    `rollback` run a catch-up pass first, so give them room on a large index. `backfill`
    has no deadline unless given one.
    """

    def _make_stub(self, channel: Any) -> admin_pb2_grpc.AdminStub:
        return admin_pb2_grpc.AdminStub(channel)

    def list_collections(self, *, timeout: float | None = DEFAULT) -> IndexCollections:
        """The logical index (the alias) and every physical collection of it, with role."""
        response = self._call("ListCollections", self._stub.ListCollections, admin_pb2.ListCollectionsRequest(),
                              timeout)
        return _convert.index_collections_from_proto(response)

    def create_candidate(self, model_id: str, *, timeout: float | None = DEFAULT) -> CollectionInfo:
        """Creates the next version's collection for `model_id` as the candidate (the
        server maps the model to an embedder with SEARCH_MODEL_EMBEDDERS)."""
        request = admin_pb2.CreateCandidateRequest(embedder_model_id=model_id)
        response = self._call("CreateCandidate", self._stub.CreateCandidate, request, timeout)
        return _convert.collection_info_from_proto(response.candidate)

    def backfill(
        self, max_items_per_s: float = 0.0, max_items: int = 0, *, timeout: float | None = None
    ) -> Iterator[IndexBackfillUpdate]:
        """Re-embeds the live items into the candidate: yields per-item outcomes and running
        totals as they come (each update unpacks as `(outcomes, progress)`). Resumable and
        idempotent. `max_items_per_s`: pace (0: as fast as the embedder allows);
        `max_items`: stop after this many (0: all). Stopping iteration early cancels it."""
        request = _backfill_request(max_items_per_s, max_items)
        for response in self._stream("Backfill", self._stub.Backfill, request, timeout):
            yield _convert.index_backfill_update_from_proto(response)

    def backfill_all(
        self, max_items_per_s: float = 0.0, max_items: int = 0, *,
        on_update: Callable[[IndexBackfillUpdate], None] | None = None, timeout: float | None = None,
    ) -> IndexBackfillSummary:
        """`backfill`, drained: every outcome and the final totals (`.failures`, `.ok`)."""
        summary = IndexBackfillSummary()
        for update in self.backfill(max_items_per_s, max_items, timeout=timeout):
            summary.add(update)
            if on_update is not None:
                on_update(update)
        return summary

    def promote(self, force: bool = False, *, timeout: float | None = DEFAULT) -> SwitchResult:
        """Makes the candidate live (catch-up, count check, alias swap). Without `force` a
        count difference raises `SearchError` FAILED_PRECONDITION (the message gives both)."""
        response = self._call("Promote", self._stub.Promote, admin_pb2.PromoteRequest(force=force), timeout)
        return _convert.switch_result_from_proto(response)

    def rollback(self, force: bool = False, *, timeout: float | None = DEFAULT) -> SwitchResult:
        """Swaps the alias back to the previous collection (same catch-up and checks)."""
        response = self._call("Rollback", self._stub.Rollback, admin_pb2.RollbackRequest(force=force), timeout)
        return _convert.switch_result_from_proto(response)

    def drop_collection(self, name: str, *, timeout: float | None = DEFAULT) -> None:
        """Drops a collection that is not live (a failed candidate, an old version)."""
        self._call("DropCollection", self._stub.DropCollection, admin_pb2.DropCollectionRequest(name=name), timeout)


class AsyncAdminClient(AsyncClientBase):
    """The grpc.aio variant of `AdminClient` (same methods, awaited; `backfill` is an
    async iterator). Create it inside the event loop that uses it."""

    def _make_stub(self, channel: Any) -> admin_pb2_grpc.AdminStub:
        return admin_pb2_grpc.AdminStub(channel)

    async def list_collections(self, *, timeout: float | None = DEFAULT) -> IndexCollections:
        response = await self._call("ListCollections", self._stub.ListCollections,
                                    admin_pb2.ListCollectionsRequest(), timeout)
        return _convert.index_collections_from_proto(response)

    async def create_candidate(self, model_id: str, *, timeout: float | None = DEFAULT) -> CollectionInfo:
        request = admin_pb2.CreateCandidateRequest(embedder_model_id=model_id)
        response = await self._call("CreateCandidate", self._stub.CreateCandidate, request, timeout)
        return _convert.collection_info_from_proto(response.candidate)

    async def backfill(
        self, max_items_per_s: float = 0.0, max_items: int = 0, *, timeout: float | None = None
    ) -> AsyncIterator[IndexBackfillUpdate]:
        request = _backfill_request(max_items_per_s, max_items)
        async for response in self._stream("Backfill", self._stub.Backfill, request, timeout):
            yield _convert.index_backfill_update_from_proto(response)

    async def backfill_all(
        self, max_items_per_s: float = 0.0, max_items: int = 0, *,
        on_update: Callable[[IndexBackfillUpdate], None] | None = None, timeout: float | None = None,
    ) -> IndexBackfillSummary:
        summary = IndexBackfillSummary()
        async for update in self.backfill(max_items_per_s, max_items, timeout=timeout):
            summary.add(update)
            if on_update is not None:
                on_update(update)
        return summary

    async def promote(self, force: bool = False, *, timeout: float | None = DEFAULT) -> SwitchResult:
        response = await self._call("Promote", self._stub.Promote, admin_pb2.PromoteRequest(force=force), timeout)
        return _convert.switch_result_from_proto(response)

    async def rollback(self, force: bool = False, *, timeout: float | None = DEFAULT) -> SwitchResult:
        response = await self._call("Rollback", self._stub.Rollback, admin_pb2.RollbackRequest(force=force), timeout)
        return _convert.switch_result_from_proto(response)

    async def drop_collection(self, name: str, *, timeout: float | None = DEFAULT) -> None:
        await self._call("DropCollection", self._stub.DropCollection,
                         admin_pb2.DropCollectionRequest(name=name), timeout)
