"""The embedder's model identity and upstream series (the batching series live in
batching.py, the standard gRPC ones in services.common.metrics).

Module level, in the process-wide default registry: one process serves one model.
"""
from __future__ import annotations

from prometheus_client import Counter, Gauge

# An info metric (value 1) to join on, so every embedder series can be split by model
# during a rollout without a model label on each of them:
#   sum by (model_id) (rate(embedder_items_total[5m])
#     * on (namespace, pod) group_left (model_id) embedder_model_info)
MODEL_INFO = Gauge(
    "embedder_model_info",
    "The model this process serves (value 1): backend, model id and vector dimension.",
    ("backend", "model_id", "dimension"),
)

# Declared here (not in the dashscope backend) so every embedder exports the series, with
# no samples until a remote backend makes a call: alerts and dashboards on it then refer
# to a metric that exists whatever the backend.
UPSTREAM_REQUESTS = Counter(
    "embedder_upstream_requests_total",
    "HTTP attempts to the upstream embedding API, by outcome"
    " (ok, throttled, server_error, client_error, network_error, bad_response).",
    ("outcome",),
)


def set_model_info(backend: str, model_id: str, dimension: int) -> None:
    """Publishes the served model (replacing any earlier one of this process)."""
    MODEL_INFO.clear()
    MODEL_INFO.labels(backend, model_id, str(dimension)).set(1)
