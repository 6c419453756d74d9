"""The retry policy of remote upstream calls, on tenacity.

Exponential backoff with full jitter, a bounded number of attempts and a total time
budget that never outlives the caller's deadline. `services/common/upstream.py`
(`UpstreamCaller`) is its one user; `RetrySettings` lives with the other shared settings.
"""
from __future__ import annotations

from collections.abc import Callable

from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, stop_before_delay, wait_random_exponential

from services.common.settings import RetrySettings

__all__ = ["RetrySettings", "upstream_retrying"]


def upstream_retrying(
    settings: RetrySettings,
    retryable: Callable[[BaseException], bool],
    deadline_s: float | None = None,
    before_sleep: Callable[..., None] | None = None,
) -> AsyncRetrying:
    """Use as `async for attempt in upstream_retrying(...): with attempt: ...`.

    `deadline_s`: seconds the caller has left (None: no deadline); the budget is the
    smaller of it and `settings.budget_s`.
    """
    budget = settings.budget_s if deadline_s is None else max(0.0, min(settings.budget_s, deadline_s))
    return AsyncRetrying(
        # stop_before_delay: never start a backoff sleep that would end past the budget.
        stop=stop_after_attempt(settings.max_attempts) | stop_before_delay(budget),
        wait=wait_random_exponential(multiplier=settings.initial_backoff_s, max=settings.max_backoff_s),
        retry=retry_if_exception(retryable),
        reraise=True,
        before_sleep=before_sleep,
    )
