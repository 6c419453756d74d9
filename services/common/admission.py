"""Admission control: a bounded number of active calls plus a bounded wait line.

Beyond both bounds a call is refused at once with RESOURCE_EXHAUSTED (`Overloaded`)
instead of queueing without limit, so latency stays bounded and clients back off.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from services.common.errors import Overloaded


class AdmissionLimiter:
    def __init__(self, max_active: int, max_waiting: int, what: str = "calls") -> None:
        self._semaphore = asyncio.Semaphore(max_active)
        self._max_waiting = max_waiting
        self._waiting = 0
        self._active = 0
        self._what = what

    @property
    def active(self) -> int:
        return self._active

    @property
    def waiting(self) -> int:
        return self._waiting

    @asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        if self._semaphore.locked() and self._waiting >= self._max_waiting:
            raise Overloaded(f"too many concurrent {self._what} ({self._active} active, {self._waiting} waiting); retry with backoff")
        self._waiting += 1
        try:
            await self._semaphore.acquire()
        finally:
            self._waiting -= 1
        self._active += 1
        try:
            yield
        finally:
            self._active -= 1
            self._semaphore.release()
