"""When search flushes Milvus: the policy behind SEARCH_FLUSH_* (docs/search.md, "Flush
policy").

Rows Milvus has not flushed sit in a growing segment (Milvus Lite: its MemTable) that every
search scans by brute force, so a search right after a large ingest is slow until the rows
are sealed and indexed. Milvus advises against a flush per write (each one makes a small
segment to compact and index later; a Milvus server also rate-limits flushes per
collection), so `Flusher` flushes a collection in the background, one at a time, when

- an Ingest stream ends and the collection has at least `min_rows` unflushed rows
  (reason "ingest_end"), or
- rows stay unflushed for `idle_s` with no new write to that collection ("idle"), or
- a collection reaches `max_rows` unflushed rows, even while a stream is still writing
  ("max_rows": a long ingest leaves at most that many rows to scan, and to seal and index
  after it ends),

and never twice within `min_interval_s` for one collection (a trigger in that window waits
for its end: triggers coalesce, nothing is dropped). The stores report what they wrote
(`wrote`); the ingest pipeline calls `ingest_ended()` once per stream. Nothing here is on
an ingest's path: `wrote` and `ingest_ended` only note and wake the background task. A
failed flush is logged and retried after `retry_s` (at most `MAX_ATTEMPTS` times in a
row: the rows stay searchable either way, and Milvus seals them by itself eventually).

On stop, pending flushes are dropped and an in-flight one gets `stop_wait_s` to finish:
safe, since a flush only changes how rows are stored, not whether they are (they are in
Milvus' write-ahead log; embedded Milvus Lite also flushes when it is closed).
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from services.common.log import get_logger
from services.search.metrics import MILVUS_FLUSHES

log = get_logger(__name__)

INGEST_END, IDLE, MAX_ROWS = "ingest_end", "idle", "max_rows"
MAX_ATTEMPTS = 5


@dataclass
class _Collection:
    unflushed: int = 0
    last_write: float = 0.0
    last_flush: float = float("-inf")  # when the last successful flush started
    requested: str | None = None  # INGEST_END or MAX_ROWS: flush as soon as the interval allows
    in_flight: int = 0  # rows the running flush covers (still counted in `unflushed`)

    @property
    def waiting(self) -> int:
        """Unflushed rows no flush is covering yet."""
        return self.unflushed - self.in_flight
    retry_at: float = float("-inf")
    failures: int = 0


class Flusher:
    """Flushes collections in the background (see the module docstring). `flush` flushes
    one collection by its physical name."""

    def __init__(
        self, flush: Callable[[str], Awaitable[None]], min_rows: int, idle_s: float, *,
        max_rows: int = 0, min_interval_s: float = 10.0, retry_s: float = 30.0, stop_wait_s: float = 10.0,
    ) -> None:
        self._flush = flush
        self.min_rows = min_rows  # <= 0: no flush at the end of an Ingest stream
        self.idle_s = idle_s  # <= 0: no flush after a quiet period
        self.max_rows = max_rows  # <= 0: no flush while a stream is writing
        self.min_interval_s = min_interval_s
        self.retry_s = retry_s
        self.stop_wait_s = stop_wait_s
        self._state: dict[str, _Collection] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._current: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return self.min_rows > 0 or self.idle_s > 0 or self.max_rows > 0

    def unflushed(self, collection: str) -> int:
        state = self._state.get(collection)
        return state.unflushed if state is not None else 0

    # --- what the stores and the ingest pipeline report (no awaiting: never on their path) ---

    def wrote(self, collection: str, rows: int) -> None:
        """`rows` rows were written to `collection` (upserts)."""
        if rows <= 0 or not self.enabled:
            return
        state = self._state.setdefault(collection, _Collection())
        state.unflushed += rows
        state.last_write = time.monotonic()
        state.failures = 0
        if 0 < self.max_rows <= state.waiting and state.requested is None:
            state.requested = MAX_ROWS
            self._wake.set()
        elif self.idle_s > 0:
            self._wake.set()  # re-arm the idle timer

    def stream_ended(self) -> None:
        """An Ingest stream ended: flush what holds at least `min_rows` unflushed rows."""
        if self.min_rows <= 0:
            return
        for state in self._state.values():
            if state.waiting >= self.min_rows:
                state.requested = INGEST_END
                self._wake.set()

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        if self.enabled and self._task is None:
            self._task = asyncio.create_task(self._run(), name="milvus-flusher")
            _ACTIVE.add(self)

    async def stop(self) -> None:
        """Drops pending flushes; gives one in flight `stop_wait_s` to finish."""
        _ACTIVE.discard(self)
        task, self._task = self._task, None
        if task is None:
            return
        current = self._current
        if current is not None and not current.done():
            await asyncio.wait({current}, timeout=self.stop_wait_s)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if current is not None and not current.done():
            current.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await current
        pending = {name: s.unflushed for name, s in self._state.items() if s.unflushed}
        if pending:
            log.info("flusher stopped with unflushed rows (Milvus keeps them)", unflushed=pending)

    # --- the background task ------------------------------------------------------------

    def _due(self, now: float) -> tuple[list[tuple[str, str]], float | None]:
        """Collections to flush now (with the reason), and how long until the next one."""
        due: list[tuple[str, str]] = []
        wait: float | None = None
        for name, s in self._state.items():
            if s.unflushed <= 0 and not s.requested:
                continue
            if s.failures >= MAX_ATTEMPTS:
                continue
            allowed = max(s.last_flush + self.min_interval_s, s.retry_at)
            if s.requested is not None:
                at, reason = allowed, s.requested
            elif self.idle_s > 0:
                at, reason = max(allowed, s.last_write + self.idle_s), IDLE
            else:
                continue
            if at <= now:
                due.append((name, reason))
            else:
                wait = at - now if wait is None else min(wait, at - now)
        return due, wait

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            due, wait = self._due(time.monotonic())
            for name, reason in due:
                self._current = asyncio.create_task(self._flush_one(name, reason))
                await asyncio.shield(self._current)
                self._current = None
            if due:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=wait)

    async def _flush_one(self, name: str, reason: str) -> None:
        s = self._state[name]
        rows, s.requested = s.unflushed, None
        started = time.monotonic()
        s.in_flight = rows
        try:
            await self._flush(name)
        except Exception as e:  # noqa: BLE001 - a failed flush is retried; it never fails a caller
            s.in_flight = 0
            s.failures += 1
            s.retry_at = time.monotonic() + self.retry_s
            s.requested = s.requested or (reason if reason != IDLE else None)
            MILVUS_FLUSHES.labels(reason, "failed").inc()
            give_up = s.failures >= MAX_ATTEMPTS
            log.warning("Milvus flush failed; " + ("giving up until the next write" if give_up else "will retry"),
                        collection=name, reason=reason, rows=rows, attempt=s.failures,
                        retry_in_s=None if give_up else self.retry_s, error=getattr(e, "message", None) or repr(e))
            return
        s.unflushed, s.in_flight = max(0, s.unflushed - rows), 0  # rows written during the flush stay counted
        s.last_flush, s.failures, s.retry_at = started, 0, float("-inf")
        MILVUS_FLUSHES.labels(reason, "ok").inc()
        log.info("Milvus collection flushed", collection=name, reason=reason, rows=rows,
                 seconds=round(time.monotonic() - started, 3))


# The running flushers (one per search service; tests may run several in one process).
_ACTIVE: set[Flusher] = set()


def ingest_ended() -> None:
    """Called once when an Ingest stream ends (however it ends)."""
    for flusher in list(_ACTIVE):
        flusher.stream_ended()
