"""The gateway's Prometheus metrics (served on their own port like every service's).

HTTP series use the names and labels of prometheus-fastapi-instrumentator (handler =
the route template, never the raw path, so ids in URLs cannot explode cardinality);
calls to search use go-grpc-prometheus' client names and Go code names, like the
services' server-side series.
"""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

HTTP_REQUESTS = Counter(
    "http_requests_total", "HTTP requests answered, by route template and status.", ("method", "handler", "status")
)
HTTP_SECONDS = Histogram(
    "http_request_duration_seconds",
    "Time from the request to the end of the response (streams included).",
    ("method", "handler"),
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
HTTP_IN_FLIGHT = Gauge("http_requests_in_progress", "HTTP requests being answered.", ("method", "handler"))
CLIENT_HANDLED = Counter(
    "grpc_client_handled_total",
    "Calls from the gateway to search, by gRPC status code (Go names).",
    ("grpc_type", "grpc_service", "grpc_method", "grpc_code"),
)
THUMBNAILS = Counter(
    "gateway_thumbnails_total",
    "Thumbnail requests by outcome: served, no_file (the item has no file:// URI), "
    "refused (outside the file root / no root), missing (item or file not found), invalid (undecodable).",
    ("outcome",),
)
