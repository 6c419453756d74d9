"""The captioner's own Prometheus series (the standard gRPC ones come from services.common).

Module level, in the process-wide default registry: one process serves one backend.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from services.common.upstream import UpstreamError, UpstreamObserver

CAPTIONS = Counter(
    "captioner_captions_total",
    "Captions requested, by backend and outcome (ok or the gRPC status name, lower case).",
    ("backend", "outcome"),
)
UPSTREAM_SECONDS = Histogram(
    "captioner_upstream_seconds",
    "Duration of one upstream attempt (remote API call, or one lite model run).",
    ("backend",),
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60),
)
UPSTREAM_RETRIES = Counter(
    "captioner_upstream_retries_total",
    "Upstream attempts that failed with a retryable error and were retried.",
    ("backend",),
)
UPSTREAM_ERRORS = Counter(
    "captioner_upstream_errors_total",
    "Failed upstream attempts, by kind (rate_limited, server, timeout, connection, rejected, auth, malformed).",
    ("backend", "kind"),
)
UPSTREAM_INFLIGHT = Gauge("captioner_upstream_inflight", "Upstream attempts in flight.", ("backend",))
UPSTREAM_WAITING = Gauge(
    "captioner_upstream_waiting", "Calls waiting for a free upstream slot (max_concurrency).", ("backend",)
)
CACHE_HITS = Counter("captioner_cache_hits_total", "Captions served from the LRU cache.")
CACHE_MISSES = Counter("captioner_cache_misses_total", "Caption lookups that missed the cache.")
CACHE_ENTRIES = Gauge("captioner_cache_entries", "Captions held in the LRU cache.")
# An info metric (value 1) to join on, so captioner series can be split by model during a
# rollout: ... * on (namespace, pod) group_left (model_id) captioner_model_info
MODEL_INFO = Gauge(
    "captioner_model_info", "The model this process captions with (value 1): backend and model id.",
    ("backend", "model_id"),
)


def set_model_info(backend: str, model_id: str) -> None:
    """Publishes the served model (replacing any earlier one of this process)."""
    MODEL_INFO.clear()
    MODEL_INFO.labels(backend, model_id).set(1)


class UpstreamMetrics(UpstreamObserver):
    """The captioner_upstream_* series of one backend, fed by the shared UpstreamCaller."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self._seconds = UPSTREAM_SECONDS.labels(backend)
        self._retries = UPSTREAM_RETRIES.labels(backend)
        self._inflight = UPSTREAM_INFLIGHT.labels(backend)
        self._waiting = UPSTREAM_WAITING.labels(backend)

    def attempt_outcome(self, error: UpstreamError | None) -> None:
        if error is not None:
            UPSTREAM_ERRORS.labels(self.backend, error.kind).inc()

    def attempt_seconds(self, seconds: float) -> None:
        self._seconds.observe(seconds)

    def retrying(self, error: BaseException | None) -> None:
        self._retries.inc()

    def inflight(self, delta: int) -> None:
        self._inflight.inc(delta)

    def waiting(self, delta: int) -> None:
        self._waiting.inc(delta)
