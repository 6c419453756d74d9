"""Writes the Grafana dashboards of the suite as JSON next to this file.

    python deploy/k8s/base/dashboards/generate.py

The JSON is what ships (base/kustomization.yaml turns each file into a ConfigMap labelled
`grafana_dashboard: "1"`, which Grafana's dashboard sidecar loads); this script is how it
is written, so every panel follows the same rules: a `${datasource}` Prometheus variable,
a `$namespace` variable instead of any hard-coded namespace or cluster, `$__rate_interval`.
tests/deploy/test_deploy_dashboards.py fails when the files differ from its output, and
tests/ops checks that every metric and label a panel uses is exported by the services.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DS = {"type": "prometheus", "uid": "${datasource}"}
NS = 'namespace="$namespace"'
RI = "$__rate_interval"
GRPC = f'{NS}, grpc_service=~"mmsearch[.].*"'


def _target(expr: str, legend: str, ref: str, instant: bool = False) -> dict[str, Any]:
    t: dict[str, Any] = {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref}
    if instant:
        t.update(instant=True, range=False, format="table")
    return t


class Board:
    def __init__(self, uid: str, title: str, description: str) -> None:
        self.uid, self.title, self.description = uid, title, description
        self.panels: list[dict[str, Any]] = []
        self._y = 0
        self._x = 0
        self._row_h = 0

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append({
            "type": "row", "title": title, "collapsed": False, "id": len(self.panels) + 1,
            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self._y}, "panels": [],
        })
        self._y += 1

    def _newline(self) -> None:
        if self._x:
            self._y += self._row_h
            self._x, self._row_h = 0, 0

    def panel(self, title: str, description: str, targets: list[tuple[str, str]], unit: str = "short",
              kind: str = "timeseries", width: int = 12, height: int = 8, instant: bool = False) -> None:
        if self._x + width > 24:
            self._newline()
        refs = "ABCDEFGH"
        self.panels.append({
            "type": kind,
            "title": title,
            "description": description,
            "id": len(self.panels) + 1,
            "datasource": DS,
            "gridPos": {"h": height, "w": width, "x": self._x, "y": self._y},
            "targets": [_target(e, legend, refs[i], instant) for i, (e, legend) in enumerate(targets)],
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {"legend": {"displayMode": "table", "placement": "bottom", "showLegend": True}}
            if kind == "timeseries" else {},
        })
        self._x += width
        self._row_h = max(self._row_h, height)

    def json(self, extra_vars: list[dict[str, Any]] = ()) -> dict[str, Any]:
        return {
            "uid": self.uid,
            "title": self.title,
            "description": self.description,
            "tags": ["mmsearch"],
            "editable": True,
            "graphTooltip": 1,
            "schemaVersion": 39,
            "version": 1,
            "time": {"from": "now-6h", "to": "now"},
            "refresh": "30s",
            "timezone": "browser",
            "annotations": {"list": []},
            "links": [{"type": "dashboards", "tags": ["mmsearch"], "asDropdown": True, "title": "mmsearch"}],
            "templating": {"list": [
                {
                    "type": "datasource", "name": "datasource", "label": "Prometheus", "query": "prometheus",
                    "current": {}, "hide": 0, "refresh": 1, "regex": "", "options": [],
                },
                {
                    "type": "query", "name": "namespace", "label": "namespace", "datasource": DS,
                    "query": {"query": "label_values(grpc_server_started_total, namespace)", "refId": "ns"},
                    "definition": "label_values(grpc_server_started_total, namespace)",
                    "current": {}, "hide": 0, "refresh": 2, "sort": 1, "regex": "", "options": [],
                    "includeAll": False, "multi": False,
                },
                *extra_vars,
            ]},
            "panels": self.panels,
        }


def _quantiles(metric: str, by: str, selector: str, qs: tuple[float, ...] = (0.5, 0.99)) -> list[tuple[str, str]]:
    legend_by = " ".join(f"{{{{{b.strip()}}}}}" for b in by.split(",") if b.strip() and b.strip() != "le")
    return [
        (f"histogram_quantile({q}, sum by ({by}) (rate({metric}_bucket{{{selector}}}[{RI}])))",
         f"p{int(q * 100)} {legend_by}".strip())
        for q in qs
    ]


def overview() -> dict[str, Any]:
    b = Board("mmsearch-overview", "mmsearch / Overview",
              "The three services at a glance: traffic, errors by gRPC code, latency per RPC, saturation, SLOs.")
    b.row("Traffic and errors")
    b.panel("Calls per second by service and RPC", "grpc_server_handled_total, every status.",
            [(f"sum by (job, grpc_method) (rate(grpc_server_handled_total{{{GRPC}}}[{RI}]))",
              "{{job}} {{grpc_method}}")], "reqps")
    b.panel("Errors by code (everything but OK)",
            "go-grpc-prometheus code names. InvalidArgument / NotFound / Unauthenticated are the caller's; "
            "Unavailable / Internal / DeadlineExceeded are ours; ResourceExhausted is refused load.",
            [(f'sum by (job, grpc_code) (rate(grpc_server_handled_total{{{GRPC}, grpc_code!="OK"}}[{RI}]))',
              "{{job}} {{grpc_code}}")], "reqps")
    b.panel("Server-side error ratio by service",
            "Share of calls ending Unknown, Internal, Unavailable, DeadlineExceeded, DataLoss or Unimplemented.",
            [((f'sum by (job) (rate(grpc_server_handled_total{{{GRPC}, '
              f'grpc_code=~"Unknown|Internal|Unavailable|DeadlineExceeded|DataLoss|Unimplemented"}}[{RI}]))'
              f" / clamp_min(sum by (job) (rate(grpc_server_handled_total{{{GRPC}}}[{RI}])), 1e-9)"), "{{job}}")],
            "percentunit")
    b.panel("Targets up", "Scraped pods per service that answer (up == 1).",
            [(f'sum by (job) (up{{{NS}, job=~"search|embedder|captioner"}})', "{{job}}")], "short")
    b.row("Latency per RPC")
    b.panel("p50 per RPC", "grpc_server_handling_seconds, median.",
            _quantiles("grpc_server_handling_seconds", "le, job, grpc_method", GRPC, (0.5,)), "s")
    b.panel("p99 per RPC", "grpc_server_handling_seconds, 99th percentile.",
            _quantiles("grpc_server_handling_seconds", "le, job, grpc_method", GRPC, (0.99,)), "s")
    b.row("Saturation")
    b.panel("Refused for overload (ResourceExhausted)",
            "Admission limits (search), a full batching queue (embedder), upstream slots (captioner).",
            [(f'sum by (job, grpc_method) (rate(grpc_server_handled_total{{{GRPC}, grpc_code="ResourceExhausted"}}[{RI}]))',
              "{{job}} {{grpc_method}}")], "reqps", width=8)
    b.panel("Embedder queue depth", "Items admitted and not yet in a model batch (KEDA scales on it).",
            [(f'sum by (pod) (embedder_queue_depth{{{NS}, job="embedder"}})', "{{pod}}")], "short", width=8)
    b.panel("Work waiting elsewhere", "Captions waiting for an upstream slot; ingest items without an outcome yet.",
            [(f'sum by (pod) (captioner_upstream_waiting{{{NS}, job="captioner"}})', "captioner {{pod}}"),
             (f'sum by (pod) (search_ingest_in_flight_items{{{NS}, job="search"}})', "search ingest {{pod}}")],
            "short", width=8)
    b.row("SLOs (docs/operations.md)")
    b.panel("Search availability: error ratio", "Recorded by the PrometheusRule; the SLO allows 0.1 % over 30 days.",
            [(f"mmsearch:slo_search_availability:error_ratio_rate1h{{{NS}}}", "1h"),
             (f"mmsearch:slo_search_availability:error_ratio_rate6h{{{NS}}}", "6h"),
             (f"mmsearch:slo_search_availability:error_ratio_rate3d{{{NS}}}", "3d")], "percentunit")
    b.panel("Search latency: share slower than 1 s", "Recorded by the PrometheusRule; the SLO allows 1 % over 30 days.",
            [(f"mmsearch:slo_search_latency:slow_ratio_rate1h{{{NS}}}", "1h"),
             (f"mmsearch:slo_search_latency:slow_ratio_rate6h{{{NS}}}", "6h"),
             (f"mmsearch:slo_search_latency:slow_ratio_rate3d{{{NS}}}", "3d")], "percentunit")
    return b.json()


def embedder() -> dict[str, Any]:
    sel = f'{NS}, job="embedder"'
    b = Board("mmsearch-embedder", "mmsearch / Embedder",
              "Dynamic batching (queue depth and wait, batch size), throughput by modality, model time, "
              "the served model, upstream API outcomes.")
    b.row("Model")
    b.panel("Served model per pod", "embedder_model_info: backend, model id and dimension of each pod.",
            [(f"embedder_model_info{{{sel}}}", "{{pod}} {{backend}} {{model_id}} dim {{dimension}}")],
            "short", kind="table", width=12, instant=True)
    b.panel("Items per second by model", "embedder_items_total joined with embedder_model_info: two models "
            "during a rollout show up side by side.",
            [((f"sum by (model_id) (rate(embedder_items_total{{{sel}}}[{RI}]) "
              f"* on (namespace, pod) group_left (model_id) embedder_model_info{{{sel}}})"), "{{model_id}}")],
            "ops")
    b.row("Queue")
    b.panel("Queue depth", "Items admitted and not yet in a model batch, per pod.",
            [(f"sum by (pod) (embedder_queue_depth{{{sel}}})", "{{pod}}")], "short")
    b.panel("Queue wait", "Enqueue to the start of the item's batch; the mean is KEDA's second signal.",
            [*_quantiles("embedder_queue_wait_seconds", "le", sel, (0.5, 0.95, 0.99)),
             ((f"sum(rate(embedder_queue_wait_seconds_sum{{{sel}}}[{RI}])) / "
              f"clamp_min(sum(rate(embedder_queue_wait_seconds_count{{{sel}}}[{RI}])), 1e-9)"), "mean")], "s")
    b.row("Batches and throughput")
    b.panel("Mean batch size by modality", "Items per model forward (bigger = better accelerator use).",
            [((f"sum by (modality) (rate(embedder_batch_size_sum{{{sel}}}[{RI}])) / "
              f"clamp_min(sum by (modality) (rate(embedder_batch_size_count{{{sel}}}[{RI}])), 1e-9)"), "{{modality}}")],
            "short", width=8)
    b.panel("Items per second by modality", "embedder_items_total by the modality the caller sent.",
            [(f"sum by (modality) (rate(embedder_items_total{{{sel}}}[{RI}]))", "{{modality}}")], "ops", width=8)
    b.panel("Inference time by modality", "One model batch (forward, or the upstream calls of a remote backend).",
            _quantiles("embedder_inference_seconds", "le, modality", sel), "s", width=8)
    b.row("RPCs and upstream")
    b.panel("Embed latency", "grpc_server_handling_seconds of the Embedder service.",
            _quantiles("grpc_server_handling_seconds", "le, grpc_method",
                       f'{sel}, grpc_service="mmsearch.embedder.v1.Embedder"'), "s")
    b.panel("Upstream API attempts by outcome (dashscope backend)",
            "throttled = HTTP 429. Empty with the local backends.",
            [(f"sum by (outcome) (rate(embedder_upstream_requests_total{{{sel}}}[{RI}]))", "{{outcome}}")], "reqps")
    return b.json()


def captioner() -> dict[str, Any]:
    sel = f'{NS}, job="captioner"'
    b = Board("mmsearch-captioner", "mmsearch / Captioner",
              "Caption outcomes, upstream (DashScope / OpenAI-compatible) attempts, 429s and retries, "
              "concurrency, the caption cache, the served model.")
    b.row("Captions")
    b.panel("Captions by outcome", "ok, or the gRPC status (lower case) the call ended with.",
            [(f"sum by (backend, outcome) (rate(captioner_captions_total{{{sel}}}[{RI}]))", "{{backend}} {{outcome}}")],
            "ops")
    b.panel("Served model per pod", "captioner_model_info: backend and model of each pod.",
            [(f"captioner_model_info{{{sel}}}", "{{pod}} {{backend}} {{model_id}}")],
            "short", kind="table", instant=True)
    b.row("Upstream")
    b.panel("Upstream errors by kind", "rate_limited = HTTP 429, server = 5xx, timeout, connection, rejected, auth, malformed.",
            [(f"sum by (backend, kind) (rate(captioner_upstream_errors_total{{{sel}}}[{RI}]))", "{{backend}} {{kind}}")],
            "reqps", width=8)
    b.panel("Throttled share (429s)", "Rate-limited attempts / all attempts (the alert fires above 10 %).",
            [((f'sum by (backend) (rate(captioner_upstream_errors_total{{{sel}, kind="rate_limited"}}[{RI}])) / '
              f"clamp_min(sum by (backend) (rate(captioner_upstream_seconds_count{{{sel}}}[{RI}])), 1e-9)"),
              "{{backend}}")], "percentunit", width=8)
    b.panel("Retries", "Attempts retried after a retryable error.",
            [(f"sum by (backend) (rate(captioner_upstream_retries_total{{{sel}}}[{RI}]))", "{{backend}}")],
            "ops", width=8)
    b.panel("Upstream attempt time", "One remote API call, or one lite model run.",
            _quantiles("captioner_upstream_seconds", "le, backend", sel), "s")
    b.panel("Upstream slots: in flight and waiting", "Waiting calls mean CAPTIONER_MAX_CONCURRENCY is the limit.",
            [(f"sum by (backend) (captioner_upstream_inflight{{{sel}}})", "in flight {{backend}}"),
             (f"sum by (backend) (captioner_upstream_waiting{{{sel}}})", "waiting {{backend}}")], "short")
    b.row("Cache")
    b.panel("Cache hit ratio", "Captions served from the LRU cache / all lookups.",
            [((f"sum(rate(captioner_cache_hits_total{{{sel}}}[{RI}])) / clamp_min("
              f"sum(rate(captioner_cache_hits_total{{{sel}}}[{RI}])) + "
              f"sum(rate(captioner_cache_misses_total{{{sel}}}[{RI}])), 1e-9)"), "hit ratio")], "percentunit")
    b.panel("Cache entries", "Captions held per pod.",
            [(f"sum by (pod) (captioner_cache_entries{{{sel}}})", "{{pod}}")], "short")
    return b.json()


def search() -> dict[str, Any]:
    sel = f'{NS}, job="search"'
    b = Board("mmsearch-search", "mmsearch / Search",
              "Query latency per mode split into the embed and the Milvus hop, Milvus operations, "
              "ingest outcomes and stages, admission refusals.")
    b.row("Queries")
    b.panel("Latency per mode", "search_query_seconds: embed + Milvus, after admission.",
            _quantiles("search_query_seconds", "le, mode", sel), "s")
    b.panel("Queries per second by mode", "", [
        (f"sum by (mode) (rate(search_query_seconds_count{{{sel}}}[{RI}]))", "{{mode}}")], "reqps")
    b.panel("Embed time per mode (p99)", "The query's Embed call (0 for vector queries).",
            [(f'histogram_quantile(0.99, sum by (le, mode) (rate(search_query_stage_seconds_bucket{{{sel}, stage="embed"}}[{RI}])))',
              "{{mode}}")], "s")
    b.panel("Milvus time per mode (p99)", "The vector search (two legs and fusion for hybrid).",
            [(f'histogram_quantile(0.99, sum by (le, mode) (rate(search_query_stage_seconds_bucket{{{sel}, stage="milvus"}}[{RI}])))',
              "{{mode}}")], "s")
    b.panel("Milvus operations (p99)", "search_milvus_seconds by operation (search, hybrid_search, upsert, get, ...).",
            _quantiles("search_milvus_seconds", "le, op", sel, (0.99,)), "s")
    b.panel("Admission refusals", "Calls refused with ResourceExhausted (SEARCH_MAX_CONCURRENT_SEARCHES + "
            "SEARCH_MAX_WAITING_SEARCHES full, or gRPC's own limits).",
            [(f'sum by (grpc_method) (rate(grpc_server_handled_total{{{sel}, grpc_code="ResourceExhausted"}}[{RI}]))',
              "{{grpc_method}}")], "reqps")
    b.row("Ingest")
    b.panel("Ingest outcomes", "stored / unchanged / duplicate / failed per item (failed is the one to watch).",
            [(f"sum by (outcome) (rate(search_ingest_items_total{{{sel}}}[{RI}]))", "{{outcome}}")], "ops", width=8)
    b.panel("Ingest stage time (p99)", "decode, check, caption, embed, upsert.",
            _quantiles("search_ingest_stage_seconds", "le, stage", sel, (0.99,)), "s", width=8)
    b.panel("Ingest items in flight", "Received, no outcome yet.",
            [(f"sum by (pod) (search_ingest_in_flight_items{{{sel}}})", "{{pod}}")], "short", width=8)
    b.row("API")
    b.panel("Search API calls by method and code", "", [
        (f'sum by (grpc_method, grpc_code) (rate(grpc_server_handled_total{{{sel}, grpc_service="mmsearch.search.v1.Search"}}[{RI}]))',
         "{{grpc_method}} {{grpc_code}}")], "reqps")
    b.panel("Search API latency", "", _quantiles("grpc_server_handling_seconds", "le, grpc_method",
                                                 f'{sel}, grpc_service="mmsearch.search.v1.Search"'), "s")
    return b.json()


BOARDS = {"overview.json": overview, "embedder.json": embedder, "captioner.json": captioner, "search.json": search}


def render() -> dict[str, str]:
    return {name: json.dumps(make(), indent=2, sort_keys=False) + "\n" for name, make in BOARDS.items()}


def main() -> int:
    for name, text in render().items():
        (HERE / name).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
