"""The PrometheusRule and every dashboard / KEDA expression through Prometheus' own tools:
`promtool check rules` parses them, `promtool test rules` replays synthetic series and
checks that the absent, throttling and SLO burn-rate alerts fire (and stay quiet) as
documented. promtool is Prometheus' CLI (Debian/Ubuntu: `apt-get install prometheus`);
without it these tests skip, and tests/ops still checks every series the rules use."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from k8s_helpers import K8S, needs_promtool, promtool, rule_groups_file

pytestmark = needs_promtool

SEL = 'namespace="mmsearch", job="search", grpc_service="mmsearch.search.v1.Search", grpc_method="Search", grpc_type="unary"'
COUNT = f"grpc_server_handling_seconds_count{{{SEL}}}"


@pytest.fixture
def rules_file(tmp_path: Path) -> Path:
    return rule_groups_file(K8S / "base" / "prometheusrule.yaml", tmp_path / "rules.yaml")


def test_rules_parse(rules_file: Path) -> None:
    out = promtool("check", "rules", str(rules_file))
    assert out.returncode == 0, out.stdout + out.stderr


def test_dashboard_and_keda_expressions_parse(tmp_path: Path) -> None:
    exprs = []
    for board in sorted((K8S / "base" / "dashboards").glob("*.json")):
        for panel in json.loads(board.read_text())["panels"]:
            exprs += [t["expr"].replace("$__rate_interval", "5m") for t in panel.get("targets", [])]
    scaled = yaml.safe_load((K8S / "components" / "autoscaling" / "embedder-scaledobject.yaml").read_text())
    exprs += [t["metadata"]["query"] for t in scaled["spec"]["triggers"]]
    path = tmp_path / "exprs.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "e", "rules": [
        {"record": f"check:expr{i}", "expr": e} for i, e in enumerate(exprs)]}]}))
    out = promtool("check", "rules", str(path))
    assert out.returncode == 0, out.stdout + out.stderr


def test_alerts_fire_on_synthetic_series(rules_file: Path, tmp_path: Path) -> None:
    calls = 'grpc_server_handled_total{%s, grpc_code="%s"}'
    bucket = 'grpc_server_handling_seconds_bucket{%s, le="%s"}'
    tests = {
        "rule_files": [str(rules_file)],
        "evaluation_interval": "1m",
        "tests": [
            {   # 5 % of Search calls fail: 50x the 0.1 % budget -> the fast burn pages; latency fine
                "interval": "1m",
                "input_series": [
                    {"series": calls % (SEL, "OK"), "values": "0+950x200"},
                    {"series": calls % (SEL, "Unavailable"), "values": "0+50x200"},
                    {"series": bucket % (SEL, "1.0"), "values": "0+1000x200"},
                    {"series": COUNT, "values": "0+1000x200"},
                    {"series": 'up{namespace="mmsearch", job="search", pod="search-0"}', "values": "1x200"},
                ],
                "alert_rule_test": [
                    {"eval_time": "70m", "alertname": "MmsearchSearchAvailabilityBudgetBurn", "exp_alerts": [{
                        "exp_labels": {"severity": "critical", "slo": "search-availability", "namespace": "mmsearch"},
                        "exp_annotations": {
                            "summary": "Search fails fast enough to spend the 30-day error budget (99.9 %) in days",
                            "runbook": "docs/operations.md#slos"},
                    }]},
                    {"eval_time": "70m", "alertname": "MmsearchSearchLatencyBudgetBurn", "exp_alerts": []},
                    {"eval_time": "70m", "alertname": "MmsearchSearchAbsent", "exp_alerts": []},
                ],
            },
            {   # 20 % of Search calls take over 1 s, no errors
                "interval": "1m",
                "input_series": [
                    {"series": calls % (SEL, "OK"), "values": "0+1000x200"},
                    {"series": bucket % (SEL, "1.0"), "values": "0+800x200"},
                    {"series": COUNT, "values": "0+1000x200"},
                ],
                "alert_rule_test": [
                    {"eval_time": "70m", "alertname": "MmsearchSearchLatencyBudgetBurn", "exp_alerts": [{
                        "exp_labels": {"severity": "critical", "slo": "search-latency", "namespace": "mmsearch"},
                        "exp_annotations": {
                            "summary": "Search calls over 1 s spend the 30-day latency budget (99 % within 1 s) in days",
                            "runbook": "docs/deployment.md#runbook-latency-or-queue-saturation"},
                    }]},
                    {"eval_time": "70m", "alertname": "MmsearchSearchAvailabilityBudgetBurn", "exp_alerts": []},
                ],
            },
            {   # nothing scraped for search (its pods are gone), one captioner pod throttled at 20 %
                "interval": "1m",
                "input_series": [
                    {"series": 'up{namespace="mmsearch", job="captioner", pod="captioner-0"}', "values": "1x30"},
                    {"series": 'up{namespace="mmsearch", job="embedder", pod="embedder-0"}', "values": "1x30"},
                    {"series": 'captioner_upstream_errors_total{namespace="mmsearch", job="captioner", pod="captioner-0", '
                               'backend="dashscope", kind="rate_limited"}', "values": "0+20x30"},
                    {"series": 'captioner_upstream_seconds_count{namespace="mmsearch", job="captioner", pod="captioner-0", '
                               'backend="dashscope"}', "values": "0+100x30"},
                ],
                "alert_rule_test": [
                    {"eval_time": "10m", "alertname": "MmsearchSearchAbsent", "exp_alerts": [{
                        "exp_labels": {"severity": "critical"},
                        "exp_annotations": {
                            "summary": "no search pod of namespace mmsearch is scraped and up: the public API is down or unobserved",
                            "runbook": "docs/deployment.md#runbook-a-pod-is-down-or-restarting"},
                    }]},
                    {"eval_time": "10m", "alertname": "MmsearchCaptionerAbsent", "exp_alerts": []},
                    {"eval_time": "20m", "alertname": "MmsearchCaptionerUpstreamThrottled", "exp_alerts": [{
                        "exp_labels": {"severity": "warning", "namespace": "mmsearch", "job": "captioner",
                                       "backend": "dashscope"},
                        "exp_annotations": {
                            "summary": "20% of the captioner's dashscope upstream attempts are throttled (429)",
                            "runbook": "docs/deployment.md#runbook-dashscope-throttling"},
                    }]},
                ],
            },
        ],
    }
    path = tmp_path / "tests.yaml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    out = promtool("test", "rules", str(path))
    assert out.returncode == 0, out.stdout + out.stderr
