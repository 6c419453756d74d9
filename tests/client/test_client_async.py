"""AsyncSearchClient (grpc.aio) against the real suite (`real_suite` in tests/conftest.py);
retries and deadlines against a server that fails on demand."""
from __future__ import annotations

import io
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from mmsearch.client import AsyncSearchClient, IngestItem, ItemStatus, SearchError
from services.lite_models.sample_photos import load_sample_photos
from tests.client.fault_server import FaultServer
from tests.conftest import RealSuite, png_bytes

MINE = 'id like "client-async-%"'


@pytest.fixture
def faults() -> Iterator[FaultServer]:
    server = FaultServer()
    yield server
    server.stop()


async def test_async_round_trip(real_suite: RealSuite, tmp_path: Path) -> None:
    path = tmp_path / "cat.jpg"
    load_sample_photos(["cat"])[0].image.convert("RGB").save(path, format="JPEG", quality=92)
    rocket = io.BytesIO()
    load_sample_photos(["rocket"])[0].image.convert("RGB").save(rocket, format="JPEG", quality=92)
    async with AsyncSearchClient(real_suite.address, timeout=60.0, token=real_suite.token) as client:
        assert await client.health() == "SERVING"
        before = (await client.stats()).item_count
        items = [
            IngestItem(image=path, id="client-async-cat", metadata={"label": "cat"}),
            IngestItem(image=tmp_path / "missing.png", id="client-async-gone"),
            IngestItem(image=rocket.getvalue(), id="client-async-rocket"),
        ]
        summary = await client.ingest_all(items, chunk_size=1)
        assert [o.status for o in summary.outcomes] == [ItemStatus.STORED, ItemStatus.FAILED, ItemStatus.STORED]
        assert summary.progress.received == 3

        result = await client.search(text="a cat", top_k=1, filter=MINE)
        assert result[0].id == "client-async-cat"
        assert (await client.search_image(path, top_k=1, target="caption", filter=MINE)).hits
        assert (await client.search_composed(path, "a cat", top_k=1, filter=MINE))[0].id == "client-async-cat"
        assert (await client.get("client-async-cat")).records[0].metadata == {"label": "cat"}
        assert (await client.stats()).item_count == before + 2
        assert await client.delete(["client-async-cat"]) == 1

        with pytest.raises(SearchError) as err:
            await client.search(text="x", top_k=0)
        assert err.value.code is grpc.StatusCode.INVALID_ARGUMENT


async def test_async_ingest_from_async_iterable(real_suite: RealSuite) -> None:
    async def items() -> AsyncIterator[IngestItem]:
        for i in range(5):
            yield IngestItem(image=png_bytes(color=(i, 99, 3)), id=f"client-async-iter-{i}")

    async with AsyncSearchClient(real_suite.address, timeout=60.0, token=real_suite.token) as client:
        summary = await client.ingest_all(items(), chunk_size=2)
        assert summary.stored == 5 and [o.index for o in summary.outcomes] == [0, 1, 2, 3, 4]
        got = await client.get([f"client-async-iter-{i}" for i in range(5)])
        assert len(got.records) == 5 and not got.missing_ids


async def test_async_retries_and_deadline(faults: FaultServer) -> None:
    faults.knobs.unavailable_calls = 2
    async with AsyncSearchClient(faults.address) as client:
        assert (await client.stats()).collection == "faults"
        assert faults.knobs.calls == 3
        faults.knobs.delay_s = 0.5
        with pytest.raises(SearchError) as err:
            await client.stats(timeout=0.1)
        assert err.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
