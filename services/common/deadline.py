"""One deadline type for every service: an instant on the monotonic clock, or none.

Servicers build it from the caller's gRPC deadline (`deadline_of(context)`, duck-typed so
this module needs no grpc); domain code only asks how long is left.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

from services.common.errors import DeadlineExceeded


@dataclass(frozen=True, slots=True)
class Deadline:
    """When the caller stops waiting (`time.monotonic()` seconds); `at=None`: never."""

    at: float | None = None

    @classmethod
    def after(cls, seconds: float | None) -> Deadline:
        """A deadline `seconds` from now (None: no deadline)."""
        return cls(None if seconds is None else time.monotonic() + seconds)

    @property
    def bounded(self) -> bool:
        return self.at is not None

    def remaining(self) -> float | None:
        """Seconds left (may be <= 0), or None without a deadline."""
        return None if self.at is None else self.at - time.monotonic()

    def expired(self) -> bool:
        return self.at is not None and self.at <= time.monotonic()

    def cap(self, seconds: float | None, floor: float = 0.001) -> float | None:
        """`seconds` shortened to what is left (never below `floor`); None when both are open."""
        left = self.remaining()
        if left is None:
            return seconds
        left = max(floor, left)
        return left if seconds is None else min(seconds, left)

    def sooner(self, seconds: float | None) -> Deadline:
        """This deadline or one `seconds` from now, whichever comes first."""
        other = Deadline.after(seconds)
        if other.at is None:
            return self
        if self.at is None:
            return other
        return self if self.at <= other.at else other

    def check(self, what: str) -> None:
        """Raises DeadlineExceeded naming `what` when no time is left."""
        if self.expired():
            raise DeadlineExceeded(f"the deadline passed before {what}")


NO_DEADLINE = Deadline()


class _Call(Protocol):
    def time_remaining(self) -> float | None: ...


def deadline_of(call: _Call) -> Deadline:
    """The caller's deadline of a call (a `grpc.aio.ServicerContext`), on our clock."""
    return Deadline.after(call.time_remaining())
