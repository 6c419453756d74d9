"""Domain errors and their gRPC status codes.

Domain code (batching, pipelines, backends) raises these and never imports grpc; the
error-mapping interceptor in `interceptors.py` turns them into status codes in one place.
"""
from __future__ import annotations

import grpc


class ServiceError(Exception):
    """Base class: an error with a gRPC status code and a message safe for callers."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(ServiceError):
    """The caller sent something we cannot use (bad image, bad URI, bad field)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ServiceError):
    """The thing the caller tried to create exists (e.g. an id used twice in one stream)."""

    code = grpc.StatusCode.ALREADY_EXISTS


class Aborted(ServiceError):
    """Refused because a conflicting operation runs (e.g. a second backfill): retry later."""

    code = grpc.StatusCode.ABORTED


class Overloaded(ServiceError):
    """A bounded queue or concurrency limit is full: retry later with backoff."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ServiceError):
    """A dependency (model, upstream API, Milvus, another service) cannot serve now."""

    code = grpc.StatusCode.UNAVAILABLE


class UpstreamExhausted(Unavailable):
    """An upstream failed and this service already spent its own retries on it.

    Still UNAVAILABLE (the caller may retry later), but the reply tells gRPC clients'
    transparent retry policies not to retry at once (server pushback, gRFC A6): retries
    at two layers would multiply (4 x 4 calls per item) against an upstream that is
    already failing.
    """


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class FailedPrecondition(ServiceError):
    """The system is not in a state to do this (e.g. a collection built by another model)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


def at_index(index: int, error: ServiceError) -> ServiceError:
    """Returns an error of the same kind whose message names the batch item."""
    return type(error)(f"item {index}: {error.message}")
