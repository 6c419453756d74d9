"""The asyncio client: `AsyncSearchClient` (grpc.aio), same methods as `SearchClient`."""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any, Self, TypeVar, Unpack

import grpc
from grpc_health.v1 import health_pb2

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


class AsyncClientBase(ClientBase):
    """A grpc.aio channel and the plumbing every asyncio client shares (see `SyncClientBase`)."""

    def _open(self, config: ConnectionConfig) -> grpc.aio.Channel:
        return config.aio_channel()

    async def _call(self, method: str, fn: Callable[..., Awaitable[T]], request: Any, timeout: float | None) -> T:
        try:
            return await fn(
                request,
                timeout=self._timeout(timeout),
                metadata=self.config.call_metadata(),
            )
        except grpc.RpcError as e:
            raise _convert.rpc_error(e, method) from e

    async def _stream(self, method: str, fn: Callable[..., Any], request: Any, timeout: float | None
                      ) -> AsyncIterator[Any]:
        """A server-streaming call's messages; errors become `SearchError`; leaving early cancels it."""
        call = fn(request, timeout=timeout, metadata=self.config.call_metadata())
        try:
            async for response in call:
                yield response
        except grpc.RpcError as e:
            raise _convert.rpc_error(e, method) from e
        finally:
            call.cancel()

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncSearchClient(AsyncClientBase):
    """A grpc.aio client for the Search service, for asyncio backends.

    Same options and semantics as `SearchClient` (deadlines, retries on UNAVAILABLE and CANCELLED,
    TLS, bearer token). Create it inside the event loop that uses it::

        async with AsyncSearchClient("search:50050", tls=True, root_cert="ca.pem", token=tok) as client:
            result = await client.search(text="a cup of coffee", target="hybrid")
    """

    async def search(
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
        """See `SearchClient.search`. A local image path is read in a worker thread."""
        request = await asyncio.to_thread(
            _convert.build_search_request,
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
        response = await self._call("Search", self._stub.Search, request, timeout)
        return _convert.search_result_from_proto(response)

    async def search_all(
        self, text: str | None = None, *, limit: int = 0, batch_size: int = 0,
        on_progress: ProgressCallback | None = None, timeout: float | None = None, **query: Unpack[StreamQuery],
    ) -> AsyncIterator[Hit]:
        """See `SearchClient.search_all`: an async iterator of hits in rank order."""
        request = await asyncio.to_thread(
            _convert.build_search_all_request, text, limit=limit, batch_size=batch_size, **query)
        async for response in self._stream("SearchAll", self._stub.SearchAll, request, timeout):
            for hit in _convert.search_all_hits(response, on_progress):
                yield hit

    async def search_text(self, text: str, **kwargs: Any) -> SearchResult:
        return await self.search(text, **kwargs)

    async def search_image(self, image: ImageInput, **kwargs: Any) -> SearchResult:
        return await self.search(image=image, **kwargs)

    async def search_composed(self, image: ImageInput, instruction: str, **kwargs: Any) -> SearchResult:
        return await self.search(image=image, instruction=instruction, **kwargs)

    async def ingest(
        self,
        items: Iterable[IngestItem | ImageInput] | AsyncIterable[IngestItem | ImageInput],
        *,
        chunk_size: int = 8,
        max_chunk_bytes: int = 8 * MiB,
        timeout: float | None = None,
    ) -> AsyncIterator[IngestUpdate]:
        """See `SearchClient.ingest`. Files are read in a worker thread, never on the loop."""
        tracker = _convert.IngestTracker(chunk_size, max_chunk_bytes)

        async def requests() -> AsyncIterator[search_pb2.IngestRequest]:
            if isinstance(items, AsyncIterable):
                index = 0
                async for item in items:
                    msg = await asyncio.to_thread(tracker.encode, index, item)
                    if msg is not None and (ready := tracker.push(index, msg)) is not None:
                        yield ready
                    index += 1
                if (ready := tracker.finish()) is not None:
                    yield ready
                return
            # A plain iterable may itself do I/O (walking folders): step it off the loop too.
            gen = tracker.requests(items)
            done = object()
            while (request := await asyncio.to_thread(next, gen, done)) is not done:
                yield request  # type: ignore[misc]

        call = self._stub.Ingest(requests(), timeout=timeout, metadata=self.config.call_metadata())
        try:
            async for response in call:
                yield tracker.on_response(response)
        except grpc.RpcError as e:
            raise _convert.rpc_error(e, "Ingest") from e
        finally:
            call.cancel()
        last = tracker.flush()
        if last is not None:
            yield last

    async def ingest_all(
        self,
        items: Iterable[IngestItem | ImageInput] | AsyncIterable[IngestItem | ImageInput],
        *,
        on_update: Callable[[IngestUpdate], None] | None = None,
        **kwargs: Any,
    ) -> IngestSummary:
        summary = IngestSummary()
        async for update in self.ingest(items, **kwargs):
            summary.add(update)
            if on_update is not None:
                on_update(update)
        summary.outcomes.sort(key=lambda o: o.index)
        return summary

    async def get(self, ids: Sequence[str] | str, *, timeout: float | None = DEFAULT) -> GetResult:
        response = await self._call("Get", self._stub.Get, search_pb2.GetRequest(ids=_convert.id_list(ids)), timeout)
        return _convert.get_result_from_proto(response)

    async def delete(self, ids: Sequence[str] | str, *, timeout: float | None = DEFAULT) -> int:
        response = await self._call(
            "Delete", self._stub.Delete, search_pb2.DeleteRequest(ids=_convert.id_list(ids)), timeout)
        return int(response.deleted_count)

    async def backfill(
        self, *, max_items: int = 0, max_items_per_s: float = 0.0, timeout: float | None = None
    ) -> AsyncIterator[BackfillUpdate]:
        """See `SearchClient.backfill`."""
        request = search_pb2.BackfillRequest(max_items=max_items, max_items_per_s=max_items_per_s)
        async for response in self._stream("Backfill", self._stub.Backfill, request, timeout):
            yield _convert.backfill_update_from_proto(response)

    async def stats(self, *, timeout: float | None = DEFAULT) -> Stats:
        response = await self._call("Stats", self._stub.Stats, search_pb2.StatsRequest(), timeout)
        return _convert.stats_from_proto(response)

    async def health(self, service: str = "", *, timeout: float | None = 5.0) -> str:
        try:
            response = await self._health.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout, metadata=self.config.call_metadata()
            )
        except grpc.RpcError as e:
            return _convert.health_error_status(e)
        return _convert.health_status_name(response)

    async def wait_until_ready(self, timeout: float = 60.0, service: str = "") -> None:
        deadline = time.monotonic() + timeout
        last = "no answer"
        while True:
            try:
                last = await self.health(service, timeout=max(0.2, min(2.0, deadline - time.monotonic())))
                if last == "SERVING":
                    return
            except SearchError as e:
                last = f"{e.code.name}: {e.details}"
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{self.address} not SERVING after {timeout:.0f}s (last: {last})")
            await asyncio.sleep(0.2)
