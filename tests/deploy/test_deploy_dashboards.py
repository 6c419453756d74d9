"""Grafana dashboards (deploy/k8s/base/dashboards): valid dashboard JSON, one Prometheus
datasource variable used by every panel and query, no hard-coded namespace or cluster,
shipped as ConfigMaps Grafana's sidecar loads. That their queries hit exported series is
tests/ops/test_metrics_contract.py."""
from __future__ import annotations

import importlib.util
import json
import re

import jsonschema
import pytest
from k8s_helpers import K8S, OVERLAYS, kubectl, of_kind, overlay

BOARDS = K8S / "base" / "dashboards"
NAMES = ("overview.json", "embedder.json", "captioner.json", "search.json")
DS_REF = {"type": "prometheus", "uid": "${datasource}"}

_GRID = {
    "type": "object", "required": ["h", "w", "x", "y"],
    "properties": {k: {"type": "integer", "minimum": 0} for k in ("h", "w", "x", "y")},
}
_DS = {"type": "object", "required": ["type", "uid"], "properties": {"type": {"type": "string"}, "uid": {"type": "string"}}}
_TARGET = {
    "type": "object", "required": ["refId", "expr", "datasource"],
    "properties": {"refId": {"type": "string", "pattern": "^[A-Z]$"}, "expr": {"type": "string", "minLength": 1},
                   "legendFormat": {"type": "string"}, "datasource": _DS},
}
_PANEL = {
    "type": "object", "required": ["id", "type", "title", "gridPos"],
    "properties": {
        "id": {"type": "integer"},
        "type": {"enum": ["row", "timeseries", "stat", "gauge", "table", "bargauge", "heatmap", "text"]},
        "title": {"type": "string", "minLength": 1},
        "description": {"type": "string"},
        "gridPos": _GRID,
        "datasource": _DS,
        "targets": {"type": "array", "items": _TARGET},
        "fieldConfig": {"type": "object", "required": ["defaults"],
                        "properties": {"defaults": {"type": "object"}, "overrides": {"type": "array"}}},
        "options": {"type": "object"},
        "panels": {"type": "array"},
        "collapsed": {"type": "boolean"},
    },
}
_VARIABLE = {
    "type": "object", "required": ["name", "type"],
    "properties": {"name": {"type": "string", "pattern": r"^\w+$"},
                   "type": {"enum": ["datasource", "query", "custom", "constant", "interval", "textbox"]}},
}
# The fields Grafana needs to import a dashboard (its model: uid, title, panels with
# gridPos, templating), strict about their types.
DASHBOARD_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["uid", "title", "schemaVersion", "panels", "templating", "time", "tags"],
    "properties": {
        "uid": {"type": "string", "pattern": r"^[A-Za-z0-9_-]{1,40}$"},
        "title": {"type": "string", "minLength": 1},
        "schemaVersion": {"type": "integer", "minimum": 36},
        "version": {"type": "integer"},
        "editable": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "time": {"type": "object", "required": ["from", "to"]},
        "refresh": {"type": "string"},
        "templating": {"type": "object", "required": ["list"], "properties": {"list": {"type": "array", "items": _VARIABLE}}},
        "annotations": {"type": "object", "properties": {"list": {"type": "array"}}},
        "panels": {"type": "array", "minItems": 1, "items": _PANEL},
    },
}


def boards() -> dict[str, dict]:
    return {name: json.loads((BOARDS / name).read_text()) for name in NAMES}


def panels(board: dict) -> list[dict]:
    out = []
    for p in board["panels"]:
        out.append(p)
        out += p.get("panels", [])
    return out


def strings(node: object, key: str = "") -> list[tuple[str, str]]:
    """Every string in a JSON document with the key it sits under."""
    if isinstance(node, str):
        return [(key, node)]
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in strings(v, k)]
    if isinstance(node, list):
        return [s for v in node for s in strings(v, key)]
    return []


def test_the_schema_is_not_vacuous() -> None:
    board = boards()["overview.json"]
    jsonschema.validate(board, DASHBOARD_SCHEMA)
    for breakage in (lambda b: b.pop("uid"), lambda b: b["panels"][1].pop("gridPos"),
                     lambda b: b["panels"][1]["targets"][0].pop("expr"), lambda b: b.update(schemaVersion="39")):
        broken = json.loads(json.dumps(board))
        breakage(broken)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, DASHBOARD_SCHEMA)


@pytest.mark.parametrize("name", NAMES)
def test_dashboard_is_valid_grafana_json(name: str) -> None:
    board = boards()[name]
    jsonschema.validate(board, DASHBOARD_SCHEMA)
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels(board):
        pos = p["gridPos"]
        assert pos["x"] + pos["w"] <= 24, p["title"]
        if p["type"] != "row":
            assert p.get("targets"), f"{p['title']}: no query"


def test_uids_are_unique_and_stable() -> None:
    uids = [b["uid"] for b in boards().values()]
    assert len(set(uids)) == len(uids)
    assert all(u.startswith("mmsearch-") for u in uids)


@pytest.mark.parametrize("name", NAMES)
def test_every_panel_and_query_uses_the_datasource_variable(name: str) -> None:
    board = boards()[name]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    for p in panels(board):
        if p["type"] == "row":
            continue
        assert p["datasource"] == DS_REF, p["title"]
        for t in p["targets"]:
            assert t["datasource"] == DS_REF, f"{p['title']} {t['refId']}"
    for v in board["templating"]["list"]:
        if v["type"] == "query":
            assert v["datasource"] == DS_REF, v["name"]


@pytest.mark.parametrize("name", NAMES)
def test_no_hard_coded_cluster_or_namespace(name: str) -> None:
    board = boards()[name]
    text = json.dumps(board)
    exprs = [t["expr"] for p in panels(board) for t in p.get("targets", [])]
    for expr in exprs:
        # the namespace comes from the $namespace variable; no cluster / region / env is named
        assert 'namespace="$namespace"' in expr, expr
        assert not re.search(r'(?<![$\w])(cluster|region|env|environment|k8s_cluster)\s*=~?\s*"[^$"]', expr), expr
        assert "mmsearch.svc" not in expr
    # the namespace name appears only as a tag / link title, never as a value a query uses
    assert [where for where, value in strings(board) if value == "mmsearch" and where not in ("tags", "title")] == []
    assert not re.search(r"(?i)\b(prod|production|staging|eu-west|us-east|us-west|gke_|arn:aws)", text)
    # No datasource pinned by name or uid anywhere.
    assert not re.search(r'"uid":\s*"(?!\$\{datasource\}|mmsearch-)', text)


def test_files_are_what_the_generator_writes() -> None:
    spec = importlib.util.spec_from_file_location("generate_dashboards", BOARDS / "generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rendered = module.render()
    assert sorted(rendered) == sorted(NAMES)
    for name, text in rendered.items():
        assert (BOARDS / name).read_text() == text, f"{name} is stale: run python deploy/k8s/base/dashboards/generate.py"


@pytest.mark.skipif(kubectl() is None, reason="kubectl (with built-in kustomize) is not installed")
@pytest.mark.parametrize("overlay_name", OVERLAYS)
def test_shipped_as_sidecar_configmaps(overlay_name: str) -> None:
    cms = [c for c in of_kind(overlay(overlay_name), "ConfigMap")
           if c["metadata"].get("labels", {}).get("grafana_dashboard") == "1"]
    assert sorted(c["metadata"]["name"] for c in cms) == sorted(f"mmsearch-dashboard-{n[:-5]}" for n in NAMES)
    for cm in cms:
        (key, value), = cm["data"].items()
        assert key in NAMES and json.loads(value) == boards()[key]
        # client-side `kubectl apply` keeps a copy in an annotation (256 KiB for all of them)
        assert len(value) < 100_000


@pytest.mark.skipif(kubectl() is None, reason="kubectl (with built-in kustomize) is not installed")
@pytest.mark.parametrize("overlay_name", OVERLAYS)
def test_prometheus_objects_carry_the_release_label(overlay_name: str) -> None:
    """kube-prometheus-stack selects PrometheusRules and ServiceMonitors by `release`."""
    objs = overlay(overlay_name)
    monitoring = [o for o in objs if o["apiVersion"].startswith("monitoring.coreos.com/")]
    assert {o["kind"] for o in monitoring} == {"PrometheusRule", "ServiceMonitor"}
    for o in monitoring:
        assert o["metadata"]["labels"]["release"] == "kube-prometheus-stack", o["metadata"]["name"]
