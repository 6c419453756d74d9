"""Domain errors: what went wrong, as a kind, with a message safe for callers.

Domain code (batching, pipelines, engines, backends) raises these and never imports grpc;
the error-mapping interceptor (`services/common/interceptors.py`) owns the one table from
kind to gRPC status, and builds per-item errors from the same table.
"""
from __future__ import annotations

from enum import Enum


class ErrorKind(Enum):
    """What a caller may do about an error; the transport maps each kind to a status.

    The values are the `outcome` labels of metrics (stable: dashboards and alerts use them).
    """

    INVALID_INPUT = "invalid_argument"  # fix the request
    NOT_FOUND = "not_found"
    ALREADY_EXISTS = "already_exists"
    ABORTED = "aborted"  # a conflicting operation runs: retry later
    OVERLOADED = "resource_exhausted"  # a bounded queue or limit is full: back off
    UNAVAILABLE = "unavailable"  # a dependency cannot serve now: retry
    DEADLINE_EXCEEDED = "deadline_exceeded"
    FAILED_PRECONDITION = "failed_precondition"  # the system's state forbids it
    INTERNAL = "internal"


class ServiceError(Exception):
    """Base class: an error of a kind, with a message safe for callers."""

    kind: ErrorKind = ErrorKind.INTERNAL
    # Set when this service already spent its own retries on an upstream: callers should
    # not retry at once (the transport says so with gRFC A6 server pushback).
    no_retry: bool = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(ServiceError):
    """The caller sent something we cannot use (bad image, bad URI, bad field)."""

    kind = ErrorKind.INVALID_INPUT


class NotFound(ServiceError):
    kind = ErrorKind.NOT_FOUND


class AlreadyExists(ServiceError):
    """The thing the caller tried to create exists (e.g. an id used twice in one stream)."""

    kind = ErrorKind.ALREADY_EXISTS


class Aborted(ServiceError):
    """Refused because a conflicting operation runs (e.g. a second backfill): retry later."""

    kind = ErrorKind.ABORTED


class Overloaded(ServiceError):
    """A bounded queue or concurrency limit is full: retry later with backoff."""

    kind = ErrorKind.OVERLOADED


class Unavailable(ServiceError):
    """A dependency (model, upstream API, Milvus, another service) cannot serve now."""

    kind = ErrorKind.UNAVAILABLE


class UpstreamExhausted(Unavailable):
    """An upstream failed and this service already spent its own retries on it.

    Still UNAVAILABLE (the caller may retry later), but the reply tells gRPC clients'
    transparent retry policies not to retry at once: retries at two layers would multiply
    (4 x 4 calls per item) against an upstream that is already failing.
    """

    no_retry = True


class DeadlineExceeded(ServiceError):
    kind = ErrorKind.DEADLINE_EXCEEDED


class FailedPrecondition(ServiceError):
    """The system is not in a state to do this (e.g. a collection built by another model)."""

    kind = ErrorKind.FAILED_PRECONDITION


def at_index(index: int, error: ServiceError) -> ServiceError:
    """Returns an error of the same kind whose message names the batch item."""
    return type(error)(f"item {index}: {error.message}")
