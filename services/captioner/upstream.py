"""Calls a backend the bounded way: a concurrency limit, retries, and a hard deadline.

- At most `max_concurrency` attempts are in flight toward the upstream; up to
  `max_waiting` more calls wait for a slot, beyond that a call fails at once with
  RESOURCE_EXHAUSTED (backpressure instead of an unbounded queue). A slot is held per
  attempt, never while sleeping between attempts.
- Retryable failures (429, 5xx, timeouts, connection errors) are retried with
  exponential backoff and full jitter (`services.common.retries`), within the attempt
  limit and the retry time budget.
- Everything (waiting, attempts, backoff) ends at the call's deadline: the smaller of
  `call_deadline_s` and the caller's gRPC deadline. Each attempt's own timeout is the
  smaller of `request_timeout_s` and the time left.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from tenacity import RetryCallState

from services.captioner import metrics
from services.captioner.backends.base import UpstreamError
from services.common.errors import DeadlineExceeded, Overloaded
from services.common.log import get_logger
from services.common.retries import RetrySettings, upstream_retrying

log = get_logger(__name__)
T = TypeVar("T")


def _retryable(error: BaseException) -> bool:
    return isinstance(error, UpstreamError) and error.retryable


class UpstreamRunner:
    def __init__(
        self,
        backend: str,
        retry: RetrySettings,
        max_concurrency: int,
        max_waiting: int,
        request_timeout_s: float,
    ) -> None:
        self.backend = backend
        self.retry = retry
        self.max_concurrency = max_concurrency
        self.max_waiting = max_waiting
        self.request_timeout_s = request_timeout_s
        self._semaphore = asyncio.Semaphore(max_concurrency)
        self._waiting = 0
        self._inflight = metrics.UPSTREAM_INFLIGHT.labels(backend)
        self._waiting_gauge = metrics.UPSTREAM_WAITING.labels(backend)
        self._seconds = metrics.UPSTREAM_SECONDS.labels(backend)
        self._retries = metrics.UPSTREAM_RETRIES.labels(backend)

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        if self._semaphore.locked():
            if self._waiting >= self.max_waiting:
                raise Overloaded(
                    f"captioner is at its upstream concurrency limit ({self.max_concurrency} in flight, "
                    f"{self._waiting} waiting); retry later"
                )
            self._waiting += 1
            self._waiting_gauge.inc()
            try:
                await self._semaphore.acquire()
            finally:
                self._waiting -= 1
                self._waiting_gauge.dec()
        else:
            await self._semaphore.acquire()
        self._inflight.inc()
        try:
            yield
        finally:
            self._inflight.dec()
            self._semaphore.release()

    def _before_sleep(self, state: RetryCallState) -> None:
        self._retries.inc()
        error = state.outcome.exception() if state.outcome else None
        log.warning(
            "upstream attempt failed; retrying",
            backend=self.backend,
            attempt=state.attempt_number,
            error_kind=getattr(error, "kind", type(error).__name__),
            status=getattr(error, "status", None),
            sleep_s=round(state.upcoming_sleep, 3),
        )

    async def run(self, attempt: Callable[[float], Awaitable[T]], deadline_at: float, retries: bool = True) -> T:
        """Runs `attempt(timeout_s)` until it succeeds, a non-retryable error, or the end.

        `deadline_at` is in `loop.time()` units. Raises services.common errors only.
        """
        loop = asyncio.get_running_loop()
        remaining = deadline_at - loop.time()
        if remaining <= 0:
            raise DeadlineExceeded("deadline exceeded before the upstream call started")
        settings = self.retry if retries else self.retry.model_copy(update={"max_attempts": 1})
        attempts = 0
        result: Any = None
        try:
            async with asyncio.timeout_at(deadline_at):
                # Gives up with the upstream's error rather than sleep past the deadline.
                retrying = upstream_retrying(settings, _retryable, remaining, self._before_sleep)
                async for try_ in retrying:
                    with try_:
                        async with self._slot():
                            attempts += 1
                            timeout_s = max(0.001, min(self.request_timeout_s, deadline_at - loop.time()))
                            start = time.perf_counter()
                            try:
                                result = await attempt(timeout_s)
                            except UpstreamError as e:
                                metrics.UPSTREAM_ERRORS.labels(self.backend, e.kind).inc()
                                raise
                            finally:
                                self._seconds.observe(time.perf_counter() - start)
        except TimeoutError:
            raise DeadlineExceeded(
                f"{self.backend} did not produce a caption before the deadline "
                f"({attempts} attempt{'s' if attempts != 1 else ''})"
            ) from None
        except UpstreamError as e:
            raise e.to_service_error(self.backend, attempts) from None
        return result
