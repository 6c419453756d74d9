"""The blocking client: `SearchClient`."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Self, TypeVar, Unpack

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mmsearch.client import _convert
from mmsearch.client._base import DEFAULT, ClientBase
from mmsearch.client._channel import ConnectionConfig, MiB
from mmsearch.client.types import (
    BackfillUpdate,
    Fusion,
    FusionMethod,
    GetResult,
    Hit,
    ImageInput,
    IngestItem,
    IngestSummary,
    IngestUpdate,
    ProgressCallback,
    SearchError,
    SearchFeatures,
    SearchResult,
    Stats,
    StreamQuery,
    Target,
)
from mmsearch.search.v1 import search_pb2

T = TypeVar("T")


class SyncClientBase(ClientBase):
    """A blocking channel and the plumbing every blocking client shares: unary calls with
    the client's deadline, server streams, errors as `SearchError`, close / `with`."""

    def _open(self, config: ConnectionConfig) -> grpc.Channel:
        return config.sync_channel()

    def _call(self, method: str, fn: Callable[..., T], request: Any, timeout: float | None | object) -> T:
        try:
            return fn(request, timeout=self._timeout(timeout), metadata=self.config.call_metadata())
        except grpc.RpcError as e:
            raise _convert.rpc_error(e, method) from e

    def _stream(self, method: str, fn: Callable[..., Any], request: Any, timeout: float | None) -> Iterator[Any]:
        """A server-streaming call's messages; errors become `SearchError`; leaving early cancels it."""
        call = fn(request, timeout=timeout, metadata=self.config.call_metadata())
        try:
            yield from call
        except grpc.RpcError as e:
            raise _convert.rpc_error(e, method) from e
        finally:
            call.cancel()

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SearchClient(SyncClientBase):
    """A blocking client for the mmsearch Search service.

    One client holds one long-lived channel: create it once and share it (it is thread
    safe); close it with `close()` or use it as a context manager.

    Every unary call has a deadline (`timeout`, seconds; overridable per call). Calls
    that fail with UNAVAILABLE are retried by gRPC (up to `retry_attempts`, exponential
    backoff with jitter). Failed calls raise `SearchError` with the status code.

    Example::

        with SearchClient("127.0.0.1:50050", token="s3cret") as client:
            for hit in client.search(text="a cat", top_k=5):
                print(hit.rank, hit.score, hit.id, hit.caption)
    """

    # -- search

    def search(
        self,
        text: str | None = None,
        *,
        image: ImageInput | None = None,
        instruction: str | None = None,
        instruction_weight: float = 0.0,
        vector: Sequence[float] | None = None,
        target: Target | str | None = None,
        fusion: Fusion | FusionMethod | str | None = None,
        top_k: int = 10,
        offset: int = 0,
        filter: str = "",
        output_fields: Sequence[str] = (),
        timeout: float | None = DEFAULT,
        **features: Unpack[SearchFeatures],
    ) -> SearchResult:
        """Searches by `text`, `image`, `image` + `instruction` (composed), a ready `vector`,
        a stored item (`like="id"`: more like this, the item itself is never a hit) or
        weighted `examples` (texts, images, `ExampleId("id")`, `Example(...)` or
        `(example, weight)` pairs; negative weights push results away).

        `target`: "image" (image vectors, the default), "caption" (caption vectors),
        "keyword" (BM25 over captions and keywords, text only) or "hybrid" (legs fused
        with `fusion`: "rrf" or "weighted", or a `Fusion`). `legs` picks the hybrid legs
        and their weights, e.g. `{"image": 0.5, "caption": 0.3, "keyword": 0.2}` (implies
        target hybrid; weights imply weighted fusion unless `fusion` says otherwise).
        `filter` is a Milvus boolean expression, e.g. `metadata["label"] == "cat"`.
        `min_score` drops hits scoring below it (higher is better; see docs/search.md
        for its meaning per metric). `group_by` + `group_size`: at most that many hits
        per value of an indexed field. `decay=Decay(...)` boosts by closeness of a
        numeric field to an origin; `boost_recency="7d"` (or ms, or a `timedelta`) is
        `Decay(field="ingested_at", scale=...)` with gauss.
        """
        request = _convert.build_search_request(
            text,
            image=image,
            instruction=instruction,
            instruction_weight=instruction_weight,
            vector=vector,
            target=target,
            fusion=fusion,
            top_k=top_k,
            offset=offset,
            filter=filter,
            output_fields=output_fields,
            **features,
        )
        response = self._call("Search", self._stub.Search, request, timeout)
        return _convert.search_result_from_proto(response)

    def search_text(self, text: str, **kwargs: Any) -> SearchResult:
        """Text -> image by default; `target="caption"` for text -> text."""
        return self.search(text, **kwargs)

    def search_image(self, image: ImageInput, **kwargs: Any) -> SearchResult:
        """Image -> image by default; `target="caption"` for image -> text."""
        return self.search(image=image, **kwargs)

    def search_composed(self, image: ImageInput, instruction: str, **kwargs: Any) -> SearchResult:
        """A reference image modified by a text instruction ("the same style in black")."""
        return self.search(image=image, instruction=instruction, **kwargs)

    def search_all(
        self, text: str | None = None, *, limit: int = 0, batch_size: int = 0,
        on_progress: ProgressCallback | None = None, timeout: float | None = None, **query: Unpack[StreamQuery],
    ) -> Iterator[Hit]:
        """Every hit of a search in rank order, streamed (SearchAll: beyond `search`'s
        window of 16,384; exports), ranked exactly. One vector target (image or caption;
        no keyword, legs, grouping or decay); the query and `filter` / `min_score` as in
        `search`.
        `limit`: stop after this many hits (0: all that match); `batch_size` hits per
        message (0: the server's 256); `on_progress` gets the running count per batch.
        `timeout` (default: none) bounds the whole call; stopping early cancels it.
        """
        request = _convert.build_search_all_request(text, limit=limit, batch_size=batch_size, **query)
        for response in self._stream("SearchAll", self._stub.SearchAll, request, timeout):
            yield from _convert.search_all_hits(response, on_progress)

    # -- ingest

    def ingest(
        self,
        items: Iterable[IngestItem | ImageInput],
        *,
        chunk_size: int = 8,
        max_chunk_bytes: int = 8 * MiB,
        timeout: float | None = None,
    ) -> Iterator[IngestUpdate]:
        """Streams `items` to the server and yields outcomes and running totals as they come.

        Items are read lazily (a generator of paths is fine for any number of files) and
        sent `chunk_size` at a time (fewer when a chunk would pass `max_chunk_bytes`).
        Items that cannot be read locally are reported as FAILED outcomes with
        `local=True`; the call goes on. `timeout` (default: none) bounds the whole call.
        Stopping iteration early cancels the call.
        """
        tracker = _convert.IngestTracker(chunk_size, max_chunk_bytes)
        call = self._stub.Ingest(tracker.requests(items), timeout=timeout, metadata=self.config.call_metadata())
        try:
            for response in call:
                yield tracker.on_response(response)
        except grpc.RpcError as e:
            raise _convert.rpc_error(e, "Ingest") from e
        finally:
            call.cancel()  # no-op when finished; stops the server's work when the caller broke off
        last = tracker.flush()
        if last is not None:
            yield last

    def ingest_all(
        self,
        items: Iterable[IngestItem | ImageInput],
        *,
        on_update: Callable[[IngestUpdate], None] | None = None,
        **kwargs: Any,
    ) -> IngestSummary:
        """Like `ingest`, collected: every outcome (sorted by index) and the final totals."""
        summary = IngestSummary()
        for update in self.ingest(items, **kwargs):
            summary.add(update)
            if on_update is not None:
                on_update(update)
        summary.outcomes.sort(key=lambda o: o.index)
        return summary

    # -- records

    def get(self, ids: Sequence[str] | str, *, timeout: float | None = DEFAULT) -> GetResult:
        response = self._call("Get", self._stub.Get, search_pb2.GetRequest(ids=_convert.id_list(ids)), timeout)
        return _convert.get_result_from_proto(response)

    def delete(self, ids: Sequence[str] | str, *, timeout: float | None = DEFAULT) -> int:
        """Deletes by id; returns how many were stored (unknown ids are ignored)."""
        response = self._call(
            "Delete", self._stub.Delete, search_pb2.DeleteRequest(ids=_convert.id_list(ids)), timeout)
        return int(response.deleted_count)

    def backfill(
        self, *, max_items: int = 0, max_items_per_s: float = 0.0, timeout: float | None = None
    ) -> Iterator[BackfillUpdate]:
        """Captions the items whose caption is pending (deferred at ingest): yields per-item
        outcomes and running totals (the first update carries only `progress.total`).
        Resumable and idempotent; `max_items_per_s` paces it (0: the server's ceiling)."""
        request = search_pb2.BackfillRequest(max_items=max_items, max_items_per_s=max_items_per_s)
        for response in self._stream("Backfill", self._stub.Backfill, request, timeout):
            yield _convert.backfill_update_from_proto(response)

    def stats(self, *, timeout: float | None = DEFAULT) -> Stats:
        response = self._call("Stats", self._stub.Stats, search_pb2.StatsRequest(), timeout)
        return _convert.stats_from_proto(response)

    # -- health

    def health(self, service: str = "", *, timeout: float | None = 5.0) -> str:
        """grpc.health.v1 status name: "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN", ...

        Raises `SearchError` (UNAVAILABLE) when the server cannot be reached.
        """
        return check_health_on(self._health, service, timeout, self.config.call_metadata())

    def wait_until_ready(self, timeout: float = 60.0, service: str = "") -> None:
        """Blocks until health is SERVING; raises TimeoutError with the last status seen."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while True:
            try:
                last = self.health(service, timeout=max(0.2, min(2.0, deadline - time.monotonic())))
                if last == "SERVING":
                    return
            except SearchError as e:
                last = f"{e.code.name}: {e.details}"
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{self.address} not SERVING after {timeout:.0f}s (last: {last})")
            time.sleep(0.2)


def check_health_on(
    stub: health_pb2_grpc.HealthStub,
    service: str,
    timeout: float | None,
    metadata: Sequence[tuple[str, str]] | None = None,
) -> str:
    try:
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout, metadata=metadata)
    except grpc.RpcError as e:
        return _convert.health_error_status(e)
    return _convert.health_status_name(response)


def check_health(config: ConnectionConfig, service: str = "", timeout: float | None = 5.0) -> str:
    """Health of any mmsearch service (embedder, captioner, search) at `config.address`."""
    with config.sync_channel() as channel:
        return check_health_on(health_pb2_grpc.HealthStub(channel), service, timeout, config.call_metadata())
