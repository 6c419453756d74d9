"""Every metric and label that the dashboards, the PrometheusRule (alerts and recording
rules), the KEDA triggers and the HPAs use is exported by the services.

A real local suite (`real_suite`: embedder, captioner and search processes with the lite
models and Milvus Lite) serves real traffic (ingest, every search mode, a bad request),
its three /metrics endpoints are scraped, and every PromQL expression under deploy/k8s is
read (tests/ops/promql.py). A panel or an alert on a metric or label that does not exist
fails here. Series only emitted on rare paths (upstream 429s with a remote backend) are
declared with prometheus-client, so their HELP/TYPE lines are exported with no samples.
"""
from __future__ import annotations

import json
import re
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import RealSuite
from tests.ops.promql import legend_labels, parse, regex_alternatives

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
SERVICES = ("search", "embedder", "captioner")
# Labels Prometheus adds from the scrape target (ServiceMonitor: namespace, job = Service
# name, pod, ...), not the exporter.
TARGET_LABELS = {"namespace", "job", "pod", "instance", "service", "endpoint", "container"}
# Series from other exporters that the rules use (Prometheus itself, kube-state-metrics).
EXTERNAL = {
    "up": set(),
    "kube_deployment_status_replicas_available": {"deployment"},
    "kube_horizontalpodautoscaler_status_current_replicas": {"horizontalpodautoscaler"},
    "kube_horizontalpodautoscaler_spec_max_replicas": {"horizontalpodautoscaler"},
    "kube_pod_container_status_restarts_total": {"container"},
}
GO_CODES = {"OK", "Canceled", "Unknown", "InvalidArgument", "DeadlineExceeded", "NotFound", "AlreadyExists",
            "PermissionDenied", "ResourceExhausted", "FailedPrecondition", "Aborted", "OutOfRange",
            "Unimplemented", "Internal", "Unavailable", "DataLoss", "Unauthenticated"}
MINE = 'id like "ops-metrics-%"'


@dataclass
class Query:
    source: str
    expr: str
    legend: str = ""


@dataclass
class Exported:
    """What the services' /metrics pages declare: sample name -> label names, and the
    `le` bounds of each histogram."""

    labels: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    le: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    with_samples: set[str] = field(default_factory=set)
    raw: str = ""


# --- what queries exist ------------------------------------------------------------------

def dashboard_queries() -> list[Query]:
    out: list[Query] = []
    for path in sorted((K8S / "base" / "dashboards").glob("*.json")):
        board = json.loads(path.read_text())

        def panels(items: list[dict]) -> list[dict]:
            return [p for item in items for p in (item, *panels(item.get("panels", [])))]

        for panel in panels(board["panels"]):
            for t in panel.get("targets", []):
                out.append(Query(f"{path.name}: {panel['title']}", t["expr"], t.get("legendFormat", "")))
        for var in board["templating"]["list"]:
            if var["type"] == "query":
                q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
                m = re.fullmatch(r"label_values\(\s*(.+?)\s*,\s*([a-zA-Z_]\w*)\s*\)", q)
                assert m, f"{path.name}: variable {var['name']}: unsupported query {q!r}"
                out.append(Query(f"{path.name}: variable {var['name']}", m.group(1), f"{{{{{m.group(2)}}}}}"))
    return out


def manifest_objects() -> list[dict]:
    objs = []
    for path in sorted(K8S.rglob("*.yaml")):
        if "milvus" in path.parts or "examples" in path.parts:
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and "kind" in doc:
                doc["__file"] = str(path.relative_to(K8S))
                objs.append(doc)
    return objs


def manifest_queries() -> tuple[list[Query], dict[str, set[str]]]:
    """Queries of the PrometheusRules, ScaledObjects and HPAs, and the recorded series
    (name -> the labels their rule keeps)."""
    out: list[Query] = []
    recorded: dict[str, set[str]] = {}
    for obj in manifest_objects():
        where = f"{obj['__file']} {obj['kind']}/{obj.get('metadata', {}).get('name', '?')}"
        if obj["kind"] == "PrometheusRule":
            for group in obj.get("spec", {}).get("groups", []):
                for rule in group["rules"]:
                    name = rule.get("record") or rule.get("alert")
                    out.append(Query(f"{where} {name}", rule["expr"]))
                    if "record" in rule:
                        recorded[rule["record"]] = parse(rule["expr"]).grouping_labels
        elif obj["kind"] == "ScaledObject":
            for trigger in obj.get("spec", {}).get("triggers", []):
                if trigger["type"] == "prometheus":
                    out.append(Query(f"{where} trigger {trigger.get('name')}", trigger["metadata"]["query"]))
        elif obj["kind"] == "HorizontalPodAutoscaler":
            for metric in obj.get("spec", {}).get("metrics", []):
                source = metric.get(metric["type"][0].lower() + metric["type"][1:], {})
                if metric["type"] in ("Pods", "Object", "External"):
                    out.append(Query(f"{where} {metric['type']}", source["metric"]["name"]))
    return out, recorded


# --- what the services export ---------------------------------------------------------------

def metrics_port(suite: RealSuite, name: str) -> int:
    """The bound /metrics port, from the service's own start-up log line. In the local
    suite's laptop shape one "models" process serves the embedder and the captioner (and
    exports both services' metrics); Kubernetes runs them apart."""
    log = suite.data_dir / "logs" / f"{name}.log"
    if not log.exists() and name in ("embedder", "captioner"):
        log = suite.data_dir / "logs" / "models.log"
    for line in log.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("metrics_port"):
            return int(record["metrics_port"])
    raise AssertionError(f"{name} logged no metrics port (is the suite started with metrics on?)")


def read_exported(texts: list[str]) -> Exported:
    ex = Exported(raw="\n".join(texts))
    for text in texts:
        for family in text_string_to_metric_families(text):
            names = {
                "counter": [family.name + "_total"],
                "histogram": [family.name + s for s in ("_bucket", "_sum", "_count")],
                "summary": [family.name + s for s in ("_sum", "_count", "")],
            }.get(family.type, [family.name])
            for n in names:
                ex.labels.setdefault(n, set())
            for s in family.samples:
                ex.labels[s.name].update(k for k in s.labels if k != "le")
                ex.with_samples.add(s.name)
                if s.name.endswith("_bucket"):
                    ex.le[s.name].add(s.labels["le"])
    # Label names of families that have no samples yet (declared, not emitted): from the
    # same modules' collectors in this process' registry.
    from prometheus_client import REGISTRY

    import services.captioner.metrics
    import services.common.metrics
    import services.embedder.batching
    import services.embedder.metrics
    import services.search.metrics  # noqa: F401

    for collector in list(REGISTRY._collector_to_names):
        for sample_name in REGISTRY._collector_to_names[collector]:
            if sample_name in ex.labels:
                ex.labels[sample_name].update(getattr(collector, "_labelnames", ()))
    return ex


def send_traffic(suite: RealSuite) -> None:
    from mmsearch.client import IngestItem, SearchClient, SearchError
    from services.lite_models.sample_photos import load_sample_photos

    photos = load_sample_photos(["cat", "rocket"])
    import io

    def jpeg(p) -> bytes:  # type: ignore[no-untyped-def]
        buf = io.BytesIO()
        p.image.convert("RGB").save(buf, format="JPEG", quality=90)
        return buf.getvalue()

    images = [jpeg(p) for p in photos]
    with SearchClient(suite.address, timeout=120.0, token=suite.token) as c:
        summary = c.ingest_all([IngestItem(image=data, id=f"ops-metrics-{i}") for i, data in enumerate(images)])
        assert summary.stored + summary.unchanged == 2, summary
        c.search_text("a cat", filter=MINE, top_k=2)
        c.search_text("a cat", target="caption", filter=MINE, top_k=2)
        c.search_image(images[0], filter=MINE, top_k=2)
        c.search_image(images[1], target="hybrid", fusion="rrf", filter=MINE, top_k=2)
        c.search_composed(images[0], "at night", filter=MINE, top_k=2)
        c.get(["ops-metrics-0"])
        with pytest.raises(SearchError) as bad:
            c.search_text("a cat", top_k=0)  # InvalidArgument
        assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def exported(real_suite: RealSuite) -> Exported:
    send_traffic(real_suite)
    texts = []
    for name in SERVICES:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port(real_suite, name)}/metrics", timeout=10) as r:
            texts.append(r.read().decode())
    return read_exported(texts)


# --- the check ------------------------------------------------------------------------------

def problems(query: Query, ex: Exported, recorded: dict[str, set[str]]) -> list[str]:
    """Everything `query` uses that nobody exports."""
    where = f"{query.source}: "
    try:
        parsed = parse(query.expr)
    except (ValueError, IndexError) as e:
        return [f"{where}unreadable PromQL ({e}): {query.expr!r}"]
    found: list[str] = []
    if not parsed.selectors:
        found.append(f"{where}no metric in {query.expr!r}")
    usable: set[str] = set(TARGET_LABELS)
    for sel in parsed.selectors:
        if sel.metric in recorded:
            allowed = recorded[sel.metric] | TARGET_LABELS
        elif sel.metric in EXTERNAL:
            allowed = EXTERNAL[sel.metric] | TARGET_LABELS
        elif sel.metric in ex.labels:
            allowed = ex.labels[sel.metric] | TARGET_LABELS | ({"le"} if sel.metric.endswith("_bucket") else set())
        else:
            found.append(f"{where}metric {sel.metric!r} is exported by no service")
            continue
        usable |= allowed
        for label, op, value in sel.matchers:
            if label not in allowed:
                found.append(f"{where}{sel.metric} has no label {label!r} (it has {sorted(allowed - TARGET_LABELS)})")
            values = [value] if op in ("=", "!=") else regex_alternatives(value)
            if label == "grpc_code":
                found += [f"{where}grpc_code {v!r} is not a go-grpc-prometheus code name"
                          for v in values if v not in GO_CODES]
            if label == "le" and sel.metric in ex.with_samples:
                found += [f"{where}{sel.metric} has no bucket le={v!r} (it has {sorted(ex.le[sel.metric])})"
                          for v in values if v not in ex.le[sel.metric]]
            if label == "job":
                found += [f"{where}job {v!r} is none of the services" for v in values if v not in SERVICES]
    for label in parsed.grouping_labels | legend_labels(query.legend):
        if label not in usable:
            found.append(f"{where}label {label!r} is on none of the series of {query.expr!r}")
    return found


def all_queries() -> tuple[list[Query], dict[str, set[str]]]:
    rules, recorded = manifest_queries()
    return dashboard_queries() + rules, recorded


def test_there_is_something_to_check() -> None:
    queries, recorded = all_queries()
    sources = {q.source.split(":")[0].split()[0] for q in queries}
    assert {"overview.json", "embedder.json", "captioner.json", "search.json"} <= sources
    assert "base/prometheusrule.yaml" in sources and "components/autoscaling/embedder-scaledobject.yaml" in sources
    assert len(queries) > 60 and len(recorded) >= 10


def test_every_queried_metric_and_label_is_exported(exported: Exported) -> None:
    queries, recorded = all_queries()
    found = [p for q in queries for p in problems(q, exported, recorded)]
    assert not found, "\n".join(found)


def test_the_traffic_reached_the_series_the_dashboards_show(exported: Exported) -> None:
    """Not just declared: the main series carry samples after real traffic."""
    for name in ("grpc_server_handled_total", "grpc_server_handling_seconds_bucket", "embedder_queue_wait_seconds_bucket",
                 "embedder_batch_size_bucket", "embedder_items_total", "embedder_inference_seconds_bucket",
                 "embedder_model_info", "captioner_model_info", "captioner_captions_total",
                 "captioner_upstream_seconds_bucket", "search_query_seconds_bucket", "search_query_stage_seconds_bucket",
                 "search_milvus_seconds_bucket", "search_ingest_items_total", "search_ingest_stage_seconds_bucket"):
        assert name in exported.with_samples, name
    text = exported.raw
    assert re.search(r'grpc_server_handled_total\{[^}]*grpc_code="InvalidArgument"[^}]*grpc_method="Search"', text)
    assert 'grpc_code="OK"' in text and "INVALID_ARGUMENT" not in text
    assert re.search(r'embedder_model_info\{backend="lite",dimension="\d+",model_id="[^"]+"\} 1\.0', text)
    assert re.search(r'search_query_stage_seconds_count\{mode="text->image",stage="embed"\}', text)


def test_rare_path_series_are_declared_with_help_and_type(exported: Exported) -> None:
    """The upstream-throttling alerts use counters the lite backends never increment: they
    are exported (HELP and TYPE) with no samples, so the alert expressions are valid."""
    for family, kind in (("embedder_upstream_requests", "counter"), ("captioner_upstream_errors", "counter")):
        assert f"# HELP {family}_total " in exported.raw, family
        assert f"# TYPE {family}_total {kind}" in exported.raw, family
    assert exported.labels["embedder_upstream_requests_total"] >= {"outcome"}
    assert exported.labels["captioner_upstream_errors_total"] >= {"backend", "kind"}


def test_the_check_catches_a_missing_metric_or_label(exported: Exported) -> None:
    """The checker itself: a new panel or alert on a series nobody exports fails."""
    _, recorded = all_queries()
    bad = [
        Query("new panel", "sum(rate(search_queries_total[5m]))"),
        Query("new panel", 'sum by (tenant) (rate(search_query_seconds_count{namespace="x"}[5m]))'),
        Query("new alert", 'rate(grpc_server_handled_total{grpc_code="RESOURCE_EXHAUSTED"}[5m]) > 1'),
        Query("new alert", 'rate(search_query_seconds_bucket{le="0.3"}[5m])'),
        Query("new alert", 'rate(embedder_items_total{model="x"}[5m])'),
        Query("new panel", "sum(rate(search_query_seconds_count[5m]))", "{{model}}"),
    ]
    for q in bad:
        assert problems(q, exported, recorded), q
    good = Query("panel", 'sum by (mode) (rate(search_query_seconds_bucket{le="0.5", job="search"}[5m]))', "{{mode}}")
    assert problems(good, exported, recorded) == []
