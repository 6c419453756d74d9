"""The flush policy (services/search/flushing.py) on a real embedded Milvus Lite store, with
short settings: a stream that leaves >= N unflushed rows is flushed once after it ends;
small streams wait for the idle period; a long stream is flushed every max_rows; triggers coalesce, one flush at a time per
collection and at most one per interval; a failed flush is logged and retried and never
reaches an ingest; stop drops what is pending. The pipeline's call at the end of a stream:
test_ingest-style fakes."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import numpy as np
import pytest
import structlog

from bench.common import release_embedded_milvus
from services.common.errors import Unavailable
from services.search import flushing
from services.search.domain import ItemStatus
from services.search.flushing import Flusher
from services.search.metrics import MILVUS_FLUSHES
from services.search.milvus_store import LegQuery, MilvusStore, SearchOptions, StoredRow
from services.search.settings import SearchSettings
from tests.search.fakes import bound_ports, jpeg
from tests.search.test_ingest import ingest, item

DIM = 4


class Recorder:
    """The flush callable: flushes the real store, counts calls and how many overlap."""

    def __init__(self, store: MilvusStore, delay_s: float = 0.0, fail: int = 0) -> None:
        self.store, self.delay_s, self.fail = store, delay_s, fail
        self.calls: list[tuple[str, float]] = []
        self.active = self.max_active = 0

    async def __call__(self, name: str) -> None:
        self.calls.append((name, time.monotonic()))
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await asyncio.sleep(self.delay_s)
            if self.fail > 0:
                self.fail -= 1
                raise Unavailable("Milvus flush failed: injected")
            await self.store.flush()
        finally:
            self.active -= 1


@pytest.fixture(scope="module")
def milvus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MilvusStore]:
    """One collection for the module (creating one costs ~2 s): each test counts what it
    adds. The store's client and threads are not tied to an event loop."""
    uri = str(tmp_path_factory.mktemp("flushing") / "m.db")
    s = MilvusStore(SearchSettings(milvus_uri=uri, collection="flushing"))
    asyncio.run(s.ensure_collection("model", DIM))
    yield s
    asyncio.run(s.close())
    release_embedded_milvus(uri)


@pytest.fixture
def store(milvus: MilvusStore) -> Iterator[MilvusStore]:
    yield milvus
    milvus.connection.on_write = None


def flusher_on(store: MilvusStore, recorder: Recorder, **kw: float) -> Flusher:
    f = Flusher(recorder, int(kw.pop("min_rows", 10)), kw.pop("idle_s", 60.0), max_rows=int(kw.pop("max_rows", 0)),
                min_interval_s=kw.pop("min_interval_s", 0.0), retry_s=kw.pop("retry_s", 30.0))
    store.connection.on_write = f.wrote
    f.start()
    return f


_counter = 0


async def write(store: MilvusStore, n: int) -> None:
    global _counter
    rng = np.random.default_rng(_counter)
    rows = []
    for v in rng.normal(size=(n, DIM)).astype(np.float32):
        _counter += 1
        rows.append(StoredRow(f"item-{_counter}", "0" * 64, "0" * 64, "", "a caption", [], {}, "model", "", 0, v, v))
    await store.upsert(rows)


def flushes(reason: str, outcome: str = "ok") -> float:
    return MILVUS_FLUSHES.labels(reason, outcome)._value.get()


async def until(predicate, timeout_s: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_a_stream_that_writes_n_rows_is_flushed_once_after_it_ends(store: MilvusStore) -> None:
    rec = Recorder(store)
    f = flusher_on(store, rec, min_rows=10)
    before, rows = flushes(flushing.INGEST_END), await store.count()
    try:
        await write(store, 6)
        await write(store, 6)
        await asyncio.sleep(0.2)
        assert rec.calls == [] and f.unflushed(store.collection) == 12  # nothing while the stream runs
        flushing.ingest_ended()
        await until(lambda: flushes(flushing.INGEST_END) == before + 1)
        await asyncio.sleep(0.3)
        assert [name for name, _ in rec.calls] == [store.collection]
        assert f.unflushed(store.collection) == 0
        flushing.ingest_ended()  # nothing unflushed: no flush
        await asyncio.sleep(0.2)
        assert len(rec.calls) == 1
        # Flushed rows are all still there and searchable.
        assert await store.count() == rows + 12
        hits = await store.search(LegQuery("image_vector", np.ones(DIM, np.float32)), 1000, 0, SearchOptions())
        assert len(hits) == rows + 12
    finally:
        await f.stop()


async def test_small_streams_wait_for_the_idle_period(store: MilvusStore) -> None:
    rec = Recorder(store)
    f = flusher_on(store, rec, min_rows=10, idle_s=0.6)
    before = flushes(flushing.IDLE)
    try:
        for _ in range(3):  # three small streams, each re-arming the idle timer
            await write(store, 3)
            flushing.ingest_ended()
            await asyncio.sleep(0.25)
        assert rec.calls == [] and f.unflushed(store.collection) == 9
        started = time.monotonic()
        await until(lambda: len(rec.calls) == 1)
        assert time.monotonic() - started >= 0.2  # 0.6 s after the last write, not at a stream end
        await until(lambda: flushes(flushing.IDLE) == before + 1)
        assert f.unflushed(store.collection) == 0
        await asyncio.sleep(0.8)
        assert len(rec.calls) == 1  # nothing unflushed: the idle timer is not re-armed
    finally:
        await f.stop()


async def test_a_long_stream_is_flushed_every_max_rows_while_it_writes(store: MilvusStore) -> None:
    rec = Recorder(store)
    f = flusher_on(store, rec, min_rows=10, max_rows=20)
    before = flushes(flushing.MAX_ROWS)
    try:
        for _ in range(3):
            await write(store, 8)  # 24 rows: one flush at 24, before the stream ends
        await until(lambda: flushes(flushing.MAX_ROWS) == before + 1)
        await write(store, 12)
        await asyncio.sleep(0.2)
        assert len(rec.calls) == 1 and f.unflushed(store.collection) == 12  # the tail waits for the end
        flushing.ingest_ended()
        await until(lambda: len(rec.calls) == 2)
    finally:
        await f.stop()


async def test_rows_a_running_flush_covers_do_not_trigger_another(store: MilvusStore) -> None:
    rec = Recorder(store, delay_s=0.4)
    f = flusher_on(store, rec, min_rows=10, max_rows=20)
    try:
        await write(store, 20)
        await until(lambda: rec.active == 1)
        await write(store, 8)  # 28 unflushed, 20 of them being flushed: no second max_rows flush
        await until(lambda: rec.active == 0)
        await asyncio.sleep(0.3)
        assert len(rec.calls) == 1 and f.unflushed(store.collection) == 8
        await write(store, 12)  # 20 not covered by any flush: the next one
        await until(lambda: len(rec.calls) == 2)
    finally:
        await f.stop()


async def test_concurrent_triggers_coalesce_one_flush_at_a_time(store: MilvusStore) -> None:
    rec = Recorder(store, delay_s=0.3)
    f = flusher_on(store, rec, min_rows=5)
    try:
        await write(store, 8)
        for _ in range(5):  # five streams end together: one flush
            flushing.ingest_ended()
        await until(lambda: len(rec.calls) == 1)
        await write(store, 6)  # written during that flush, then more streams end
        for _ in range(5):
            flushing.ingest_ended()
        await until(lambda: len(rec.calls) == 2)
        await asyncio.sleep(0.8)
        assert len(rec.calls) == 2 and rec.max_active == 1
        assert f.unflushed(store.collection) == 0
    finally:
        await f.stop()


async def test_at_most_one_flush_per_interval(store: MilvusStore) -> None:
    rec = Recorder(store)
    f = flusher_on(store, rec, min_rows=5, min_interval_s=0.8)
    try:
        await write(store, 5)
        flushing.ingest_ended()
        await until(lambda: len(rec.calls) == 1)
        await write(store, 5)
        flushing.ingest_ended()  # within the interval: postponed, not dropped
        await until(lambda: len(rec.calls) == 2)
        assert rec.calls[1][1] - rec.calls[0][1] >= 0.75
    finally:
        await f.stop()


async def test_a_failed_flush_is_logged_and_retried_and_never_fails_an_ingest(store: MilvusStore) -> None:
    rec = Recorder(store, fail=2)
    f = flusher_on(store, rec, min_rows=5, retry_s=0.2)
    failed, rows = flushes(flushing.INGEST_END, "failed"), await store.count()
    try:
        with structlog.testing.capture_logs() as logs:
            await write(store, 6)  # the store's write path: not affected by the flusher's state
            flushing.ingest_ended()
            await until(lambda: len(rec.calls) == 3)
            await until(lambda: f.unflushed(store.collection) == 0)
        assert flushes(flushing.INGEST_END, "failed") == failed + 2
        warnings = [e for e in logs if e["log_level"] == "warning"]
        assert len(warnings) == 2 and "injected" in warnings[0]["error"]
        assert rec.calls[2][1] - rec.calls[1][1] >= 0.15  # retried after retry_s
        await write(store, 1)  # writes keep working throughout
        assert await store.count() == rows + 7
    finally:
        await f.stop()


async def test_the_pipeline_reports_every_stream_end_even_when_flushing_fails(
        monkeypatch: pytest.MonkeyPatch) -> None:
    ended: list[int] = []
    monkeypatch.setattr(flushing, "ingest_ended", lambda: ended.append(1))
    p = await bound_ports()
    out, progress = await ingest(p, [item(i, jpeg(i)) for i in range(3)])
    assert progress.stored == 3 and ended == [1]
    # A flusher whose every flush fails: the ingest is untouched.
    monkeypatch.undo()

    async def broken(name: str) -> None:
        raise Unavailable("down")

    f = Flusher(broken, 1, 0.0, min_interval_s=0.0)
    f.start()
    try:
        f.wrote("c", 3)
        out, progress = await ingest(p, [item(i, jpeg(i + 10)) for i in range(3)])
        assert {o.status for o in out.values()} == {ItemStatus.STORED}
    finally:
        await f.stop()


async def test_stop_drops_pending_flushes_and_waits_for_the_one_in_flight(store: MilvusStore) -> None:
    rec = Recorder(store, delay_s=0.3)
    f = flusher_on(store, rec, min_rows=5, min_interval_s=30.0)
    rows = await store.count()
    await write(store, 5)
    flushing.ingest_ended()
    await until(lambda: rec.active == 1)
    await write(store, 5)
    flushing.ingest_ended()  # pending until the interval ends: dropped by stop
    await f.stop()
    assert len(rec.calls) == 1 and rec.active == 0  # the one in flight finished
    assert f.unflushed(store.collection) == 5
    flushing.ingest_ended()  # a stopped flusher no longer listens
    await asyncio.sleep(0.1)
    assert len(rec.calls) == 1
    assert await store.count() == rows + 10


async def test_zero_or_negative_settings_disable_the_policy(store: MilvusStore) -> None:
    rec = Recorder(store)
    f = flusher_on(store, rec, min_rows=0, idle_s=-1)
    try:
        assert not f.enabled
        await write(store, 20)
        flushing.ingest_ended()
        await asyncio.sleep(0.2)
        assert rec.calls == [] and f.unflushed(store.collection) == 0
    finally:
        await f.stop()
    only_idle = Flusher(rec, 0, 0.2, min_interval_s=0.0)
    assert only_idle.enabled
    only_idle.wrote("x", 50)
    only_idle.stream_ended()  # no ingest_end trigger
    assert not only_idle._state["x"].requested


def test_the_settings_default_and_disable() -> None:
    s = SearchSettings()
    assert s.flush_min_rows > 0 and s.flush_idle_s > 0
    off = SearchSettings(flush_min_rows=0, flush_idle_s=0)
    assert not Flusher(lambda name: asyncio.sleep(0), off.flush_min_rows, off.flush_idle_s).enabled


def test_the_flush_interval_defaults_to_the_milvus_servers_rate_limit_and_to_1_s_embedded() -> None:
    assert SearchSettings(milvus_uri="http://milvus:19530").flush_interval_s() == 10.0
    assert SearchSettings(milvus_uri="/data/mmsearch.db").flush_interval_s() == 1.0
    assert SearchSettings(milvus_uri="/data/mmsearch.db", flush_min_interval_s=5).flush_interval_s() == 5.0
    assert SearchSettings().flush_max_rows == 2000  # a long stream is flushed while it writes
