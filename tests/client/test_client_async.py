"""AsyncSearchClient (grpc.aio) against the in-memory Search server on loopback."""
from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from mmsearch.client import AsyncSearchClient, IngestItem, ItemStatus, SearchError
from tests.client.search_double import RunningDouble, start_double
from tests.conftest import png_bytes


@pytest.fixture
def double() -> Iterator[RunningDouble]:
    running = start_double()
    yield running
    running.stop()


async def test_async_round_trip(double: RunningDouble, tmp_path: Path) -> None:
    path = tmp_path / "cat.png"
    path.write_bytes(png_bytes(color=(9, 9, 9)))
    async with AsyncSearchClient(double.address, timeout=5.0, token="t") as client:
        assert await client.health() == "SERVING"
        items = [
            IngestItem(image=path, id="cat", metadata={"label": "cat"}, caption="a cat"),
            IngestItem(image=tmp_path / "missing.png"),
            png_bytes(color=(1, 1, 1)),
        ]
        summary = await client.ingest_all(items, chunk_size=1)
        assert [o.status for o in summary.outcomes] == [ItemStatus.STORED, ItemStatus.FAILED, ItemStatus.STORED]
        assert summary.progress.received == 3
        assert double.servicer.knobs.last_metadata["authorization"] == "Bearer t"

        result = await client.search(text="cat", top_k=1)
        assert result[0].id == "cat"
        assert (await client.search_image(path, top_k=1, target="caption")).hits
        assert (await client.search_composed(path, "cat", top_k=1))[0].id == "cat"
        assert (await client.get("cat")).records[0].metadata == {"label": "cat"}
        assert (await client.stats()).item_count == 2
        assert await client.delete(["cat"]) == 1

        with pytest.raises(SearchError) as err:
            await client.search(text="x", top_k=0)
        assert err.value.code is grpc.StatusCode.INVALID_ARGUMENT


async def test_async_ingest_from_async_iterable(double: RunningDouble) -> None:
    async def items() -> AsyncIterator[bytes]:
        for i in range(5):
            yield png_bytes(color=(i, 0, 0))

    async with AsyncSearchClient(double.address) as client:
        summary = await client.ingest_all(items(), chunk_size=2)
    assert summary.stored == 5 and double.servicer.knobs.ingest_chunks == [2, 2, 1]


async def test_async_retries_and_deadline(double: RunningDouble) -> None:
    double.servicer.knobs.unavailable_calls = 2
    async with AsyncSearchClient(double.address) as client:
        assert (await client.stats()).collection == "test"
        assert double.servicer.knobs.calls["Stats"] == 3
        double.servicer.knobs.delay_s = 0.5
        with pytest.raises(SearchError) as err:
            await client.stats(timeout=0.1)
        assert err.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
