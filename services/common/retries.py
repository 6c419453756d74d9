"""Retry policy for HTTP upstreams (DashScope, OpenAI-compatible endpoints).

Built on tenacity: exponential backoff with full jitter, a bounded number of attempts
and a total time budget that never outlives the caller's deadline.
"""
from __future__ import annotations

from collections.abc import Callable

from pydantic import BaseModel
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, stop_before_delay, wait_random_exponential


class RetrySettings(BaseModel):
    max_attempts: int = 4
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 5.0
    # Total time for all attempts of one call; also capped by the caller's deadline.
    budget_s: float = 30.0


def upstream_retrying(
    settings: RetrySettings,
    retryable: Callable[[BaseException], bool],
    deadline_s: float | None = None,
    before_sleep: Callable[..., None] | None = None,
) -> AsyncRetrying:
    """Use as `async for attempt in upstream_retrying(...): with attempt: ...`."""
    budget = settings.budget_s if deadline_s is None else max(0.0, min(settings.budget_s, deadline_s))
    return AsyncRetrying(
        # stop_before_delay: never start a backoff sleep that would end past the budget.
        stop=stop_after_attempt(settings.max_attempts) | stop_before_delay(budget),
        wait=wait_random_exponential(multiplier=settings.initial_backoff_s, max=settings.max_backoff_s),
        retry=retry_if_exception(retryable),
        reraise=True,
        before_sleep=before_sleep,
    )
