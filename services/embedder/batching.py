"""Dynamic batching (Triton / infinity style) in plain asyncio.

Many concurrent calls each bring a few items; the model is fastest on batches. The
batcher keeps one FIFO queue per modality (text and image towers cannot share a
forward) and, whenever the model has a free slot, sends it the modality whose oldest
item has waited longest: up to `max_batch_size` items (or the modality's own smaller
cap), merged across calls. While the
model is idle a partial batch waits at most `max_queue_delay_s` for company; while it is
busy, arrivals pile up and the next batch is simply larger.

Regathering: with closed-loop callers (each sends its next request when the last one is
answered, as the search service does) batches would split in two halves for good: when a
batch ends, only the callers that were *not* in it are queued, and they start at once
while the ones just answered are still on their way back. So after a batch of several
callers, a partial next batch waits up to `regather_s` (counted from that batch's end)
for them. A lone caller never waits: its batch had one caller.

Bounds: callers first `admit` their items. Admission counts items from the moment they
are accepted (decoding and preprocessing included) until they enter a model batch, and
refuses at once with `Overloaded` beyond `max_queue_items`, so memory and latency stay
bounded and clients back off. A request whose deadline has passed when its turn comes
is failed with `DeadlineExceeded` and never computed; one whose caller went away
(cancelled) is dropped the same way.

No gRPC here: the servicer maps the errors to status codes.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

import numpy as np
from prometheus_client import Counter, Gauge, Histogram

from services.common.deadline import NO_DEADLINE, Deadline
from services.common.errors import DeadlineExceeded, Overloaded, Unavailable
from services.common.log import get_logger

log = get_logger(__name__)

_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_TIME_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

BATCH_SIZE = Histogram(
    "embedder_batch_size", "Items per model batch (merged across calls).", ("modality",), buckets=_SIZE_BUCKETS
)
QUEUE_DEPTH = Gauge("embedder_queue_depth", "Items admitted and not yet in a model batch (preprocessing or queued).")
QUEUE_WAIT_SECONDS = Histogram(
    "embedder_queue_wait_seconds", "Time from enqueue to the start of the item's model batch.", buckets=_TIME_BUCKETS
)
INFERENCE_SECONDS = Histogram(
    "embedder_inference_seconds",
    "Time of one model batch (forward or upstream calls).",
    ("modality",),
    buckets=_TIME_BUCKETS,
)
ITEMS_TOTAL = Counter("embedder_items_total", "Items embedded, by the modality the caller sent.", ("modality",))

# (modality, items, deadline) -> float32 [len(items), dim].
ForwardFn = Callable[[str, list[Any], Deadline], Awaitable[np.ndarray]]


def _passed(deadline: Deadline, now: float) -> bool:
    """Whether `deadline` is at or before `now` (one `time.monotonic()` for a whole scan)."""
    return deadline.at is not None and deadline.at <= now


def _latest(deadlines: Sequence[Deadline]) -> Deadline:
    """The deadline of a merged batch: the latest of its callers' (none if any has none)."""
    if any(d.at is None for d in deadlines):
        return NO_DEADLINE
    return max(deadlines, key=lambda d: d.at or 0.0)


@dataclass(eq=False)
class _Pending:
    """One caller's items of one modality, waiting in a queue."""

    items: Sequence[Any]
    deadline: Deadline
    future: asyncio.Future[np.ndarray]
    admission: Admission
    enqueued_at: float = field(default_factory=time.monotonic)
    taken: int = 0  # items already sent to a batch
    done_items: int = 0
    out: np.ndarray | None = None
    failed: bool = False

    @property
    def left(self) -> int:
        return len(self.items) - self.taken

    def fail(self, error: BaseException) -> None:
        self.failed = True
        if not self.future.done():
            self.future.set_exception(error)


@dataclass(eq=False)
class _Slice:
    pending: _Pending
    start: int
    stop: int


class Admission:
    """Items a caller was allowed in. Release what is left with `close` (or `with`)."""

    def __init__(self, batcher: DynamicBatcher, items: int) -> None:
        self._batcher = batcher
        self._held = items

    def _release(self, n: int) -> None:
        n = min(n, self._held)
        if n > 0:
            self._held -= n
            self._batcher._release(n)

    async def run(self, modality: str, items: Sequence[Any], deadline: Deadline = NO_DEADLINE) -> np.ndarray:
        """Queues admitted items for the model and returns their vectors, in order."""
        return await self._batcher._enqueue(self, modality, items, deadline)

    def close(self) -> None:
        self._release(self._held)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


class DynamicBatcher:
    def __init__(
        self,
        forward: ForwardFn,
        *,
        max_batch_size: int,
        max_queue_delay_s: float,
        max_queue_items: int,
        max_in_flight: int = 1,
        batch_size_by_modality: dict[str, int] | None = None,
        regather_s: float = 0.0,
    ) -> None:
        self._forward = forward
        self.max_batch_size = max_batch_size
        # Smaller caps for modalities whose model prefers smaller batches.
        self._batch_size_by_modality = {
            m: max(1, min(n, max_batch_size)) for m, n in (batch_size_by_modality or {}).items()
        }
        self.max_queue_delay_s = max_queue_delay_s
        self.regather_s = regather_s
        # When the last batch of each modality ended, and how many calls it answered.
        self._last_end: dict[str, tuple[float, int]] = {}
        self.max_queue_items = max_queue_items
        self._slots = asyncio.Semaphore(max_in_flight)
        self._queues: dict[str, deque[_Pending]] = {}
        self._queued_items: dict[str, int] = {}
        self._admitted = 0
        self._changed = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._closed = False

    # --- public --------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Items admitted and not yet in a batch."""
        return self._admitted

    @property
    def in_flight(self) -> int:
        """Batches handed to the model and not finished."""
        return len(self._running)

    def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.create_task(self._schedule(), name="embedder-batcher")

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Fails what is queued (UNAVAILABLE) and waits (bounded) for batches in flight."""
        self._closed = True
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
            self._loop_task = None
        for queue in self._queues.values():
            while queue:
                pending = queue.popleft()
                pending.admission._release(pending.left)
                pending.fail(Unavailable("the embedder is shutting down"))
        self._queued_items = dict.fromkeys(self._queued_items, 0)
        if self._running:
            # A hung model (a stuck CUDA kernel) must not hang shutdown: its callers
            # get UNAVAILABLE after the timeout, the thread is abandoned.
            _done, late = await asyncio.wait(set(self._running), timeout=timeout_s)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    def admit(self, items: int) -> Admission:
        """Reserves room for `items`, or raises `Overloaded` at once when there is none."""
        if self._closed:
            raise Unavailable("the embedder is shutting down")
        if self._admitted + items > self.max_queue_items:
            raise Overloaded(
                f"embedding queue is full ({self._admitted} items waiting, limit {self.max_queue_items});"
                " retry with backoff"
            )
        self._admitted += items
        QUEUE_DEPTH.inc(items)
        return Admission(self, items)

    # --- internals -----------------------------------------------------------------------

    def _release(self, n: int) -> None:
        self._admitted -= n
        QUEUE_DEPTH.dec(n)

    async def _enqueue(
        self, admission: Admission, modality: str, items: Sequence[Any], deadline: Deadline
    ) -> np.ndarray:
        if not items:
            return np.zeros((0, 0), dtype=np.float32)
        if self._closed:
            raise Unavailable("the embedder is shutting down")
        if deadline.expired():
            raise DeadlineExceeded("deadline exceeded before the items were queued")
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        pending = _Pending(items, deadline, future, admission)
        self._queues.setdefault(modality, deque()).append(pending)
        self._queued_items[modality] = self._queued_items.get(modality, 0) + len(items)
        self._changed.set()
        return await future  # cancelled with the caller: the scheduler then skips it

    def _oldest_queue(self) -> str | None:
        best, best_t = None, float("inf")
        for modality, queue in self._queues.items():
            if queue and queue[0].enqueued_at < best_t:
                best, best_t = modality, queue[0].enqueued_at
        return best

    def _drop(self, modality: str, pending: _Pending, error: BaseException | None) -> None:
        self._queued_items[modality] -= pending.left
        pending.admission._release(pending.left)
        if error is not None:
            pending.fail(error)

    def _prune_heads(self, now: float) -> None:
        """Drops cancelled and expired calls at the queue heads (they are never computed)."""
        for modality, queue in self._queues.items():
            while queue:
                head = queue[0]
                if head.future.done() or head.failed:
                    queue.popleft()
                    self._drop(modality, head, None)
                elif _passed(head.deadline, now):
                    queue.popleft()
                    self._drop(modality, head, DeadlineExceeded("deadline exceeded while queued for the model"))
                else:
                    break

    def batch_size(self, modality: str) -> int:
        return self._batch_size_by_modality.get(modality, self.max_batch_size)

    def _take(self, modality: str, now: float) -> list[_Slice]:
        queue = self._queues[modality]
        slices: list[_Slice] = []
        room = self.batch_size(modality)
        while queue and room > 0:
            pending = queue[0]
            if pending.future.done() or pending.failed:
                queue.popleft()
                self._drop(modality, pending, None)
                continue
            if _passed(pending.deadline, now):
                queue.popleft()
                self._drop(modality, pending, DeadlineExceeded("deadline exceeded while queued for the model"))
                continue
            n = min(room, pending.left)
            start = pending.taken
            slices.append(_Slice(pending, start, start + n))
            if pending.taken == 0:
                QUEUE_WAIT_SECONDS.observe(now - pending.enqueued_at)
            pending.taken += n
            room -= n
            self._queued_items[modality] -= n
            pending.admission._release(n)
            if pending.left == 0:
                queue.popleft()
        return slices

    async def _next_batch(self) -> tuple[str, list[_Slice]]:
        while True:
            now = time.monotonic()
            self._prune_heads(now)
            modality = self._oldest_queue()
            if modality is None:
                self._changed.clear()
                await self._changed.wait()
                continue
            wait = self._queues[modality][0].enqueued_at + self.max_queue_delay_s - now
            ended_at, callers = self._last_end.get(modality, (0.0, 0))
            if callers > 1:
                wait = max(wait, ended_at + self.regather_s - now)
            if self._queued_items[modality] < self.batch_size(modality) and wait > 0:
                self._changed.clear()
                try:
                    await asyncio.wait_for(self._changed.wait(), wait)
                except TimeoutError:
                    pass
                continue
            slices = self._take(modality, now)
            if slices:
                return modality, slices

    async def _schedule(self) -> None:
        while True:
            await self._slots.acquire()
            try:
                modality, slices = await self._next_batch()
            except BaseException:
                self._slots.release()
                raise
            task = asyncio.create_task(self._execute(modality, slices))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _execute(self, modality: str, slices: list[_Slice]) -> None:
        try:
            items: list[Any] = []
            for s in slices:
                items.extend(s.pending.items[s.start : s.stop])
            # The latest deadline bounds the batch: one impatient caller must not cut
            # the retry budget of the others (its own future fails on its own timer).
            deadline = _latest([s.pending.deadline for s in slices])
            BATCH_SIZE.labels(modality).observe(len(items))
            started = time.perf_counter()
            try:
                vectors = await self._forward(modality, items, deadline)
                if vectors.shape[0] != len(items):
                    raise RuntimeError(f"model returned {vectors.shape[0]} vectors for {len(items)} items")
            except BaseException as e:  # every caller in the batch learns the outcome
                error: BaseException = e
                if isinstance(e, asyncio.CancelledError):
                    error = Unavailable("the embedder is shutting down")
                for s in slices:
                    s.pending.fail(error)
                if isinstance(e, asyncio.CancelledError):
                    raise
                return
            finally:
                INFERENCE_SECONDS.labels(modality).observe(time.perf_counter() - started)
            self._last_end[modality] = (time.monotonic(), len(slices))
            offset = 0
            for s in slices:
                pending, n = s.pending, s.stop - s.start
                if pending.out is None:
                    pending.out = np.empty((len(pending.items), vectors.shape[1]), dtype=np.float32)
                pending.out[s.start : s.stop] = vectors[offset : offset + n]
                offset += n
                pending.done_items += n
                if pending.done_items == len(pending.items) and not pending.future.done():
                    pending.future.set_result(pending.out)
        finally:
            self._slots.release()
