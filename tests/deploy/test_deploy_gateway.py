"""The HTTP gateway's manifests: ports and probes agree with GatewaySettings, the ConfigMap
loads into it, its flows (anyone -> gateway:8080, gateway -> search:50050, Prometheus ->
9103 and nothing more), its ServiceMonitor, and TLS toward search in production. The
generic invariants (non-root, resources, PDB, rollouts, pinned images) cover it with the
other Deployments in test_deploy_invariants.py and test_deploy_rollout.py."""
from __future__ import annotations

import pytest
import yaml
from k8s_helpers import (
    GRPC_PORTS,
    K8S,
    METRICS_PORTS,
    OVERLAYS,
    Peer,
    allowed,
    configmap_for,
    container,
    kubectl,
    matches,
    of_kind,
    one,
    overlay,
    pod_spec,
)

from services.gateway.settings import GatewaySettings

pytestmark = pytest.mark.skipif(kubectl() is None, reason="kubectl (with built-in kustomize) is not installed")

HTTP_PORT = 8080
OTHER_APP = Peer("shop", {"app": "checkout"})
PROMETHEUS = Peer("monitoring", {"app.kubernetes.io/name": "prometheus"})
MILVUS_PROXY = Peer("milvus", {"app.kubernetes.io/name": "milvus", "component": "proxy"})


@pytest.fixture(params=OVERLAYS)
def o(request: pytest.FixtureRequest) -> str:
    return request.param


def labels(o: str, name: str) -> dict[str, str]:
    return one(overlay(o), "Deployment", name)["spec"]["template"]["metadata"]["labels"]


def test_ports_and_probes_match_the_settings(o: str) -> None:
    objs = overlay(o)
    w = one(objs, "Deployment", "gateway")
    env, c = configmap_for(objs, w), container(w)
    assert GatewaySettings.model_fields["http_port"].default == HTTP_PORT == int(env["GATEWAY_HTTP_PORT"])
    assert GatewaySettings.model_fields["metrics_port"].default == METRICS_PORTS["gateway"]
    assert int(env["GATEWAY_METRICS_PORT"]) == METRICS_PORTS["gateway"]
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"http": HTTP_PORT, "metrics": 9103}
    assert c["command"] == ["python", "-m", "services.gateway"]
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert all(c[p]["httpGet"]["port"] == "http" for p in ("startupProbe", "readinessProbe", "livenessProbe"))
    svc = one(objs, "Service", "gateway")
    assert matches({"matchLabels": svc["spec"]["selector"]}, w["spec"]["template"]["metadata"]["labels"])
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == {"http": HTTP_PORT, "metrics": 9103}


def test_the_configmap_loads_into_the_settings(o: str, monkeypatch: pytest.MonkeyPatch) -> None:
    objs = overlay(o)
    env = configmap_for(objs, one(objs, "Deployment", "gateway"))
    fields = {f"GATEWAY_{name.upper()}" for name in GatewaySettings.model_fields}
    for key, value in env.items():
        assert key.partition("__")[0] in fields, f"{key} is not a gateway setting"
        monkeypatch.setenv(key, value)
    settings = GatewaySettings()
    # Every search pod, by the name search's certificate carries.
    assert settings.search_target == "dns:///search-headless.mmsearch.svc.cluster.local:50050"
    certs = list(yaml.safe_load_all((K8S / "examples" / "certificates.example.yaml").read_text()))
    search_cert = next(c for c in certs if c and c["metadata"]["name"] == "mmsearch-search")
    assert "search-headless.mmsearch.svc.cluster.local" in search_cert["spec"]["dnsNames"]


def test_flows(o: str) -> None:
    pols = of_kind(overlay(o), "NetworkPolicy")
    gw = labels(o, "gateway")
    assert allowed(pols, "Ingress", gw, OTHER_APP, HTTP_PORT)
    assert not allowed(pols, "Ingress", gw, OTHER_APP, METRICS_PORTS["gateway"])
    assert allowed(pols, "Ingress", gw, PROMETHEUS, METRICS_PORTS["gateway"])
    me = Peer("mmsearch", gw)
    assert allowed(pols, "Egress", gw, Peer("mmsearch", labels(o, "search")), GRPC_PORTS["search"])
    assert allowed(pols, "Ingress", labels(o, "search"), me, GRPC_PORTS["search"])
    for upstream in ("embedder", "captioner"):
        assert not allowed(pols, "Egress", gw, Peer("mmsearch", labels(o, upstream)), GRPC_PORTS[upstream])
        assert not allowed(pols, "Ingress", labels(o, upstream), me, GRPC_PORTS[upstream])
    assert not allowed(pols, "Egress", gw, MILVUS_PROXY, 19530)
    assert not allowed(pols, "Egress", gw, Peer(ip="47.88.1.1"), 443)


def test_scraped_once(o: str) -> None:
    objs = overlay(o)
    monitor = one(objs, "ServiceMonitor", "gateway")
    assert matches(monitor["spec"]["selector"], one(objs, "Service", "gateway")["metadata"]["labels"])
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]


def test_production_verifies_search_over_tls_and_keeps_two_replicas() -> None:
    objs = overlay("production-gpu")
    w = one(objs, "Deployment", "gateway")
    env, c = configmap_for(objs, w), container(w)
    assert env["GATEWAY_SEARCH_TLS__ENABLED"] == "true"
    mount = next(m for m in c["volumeMounts"] if m["name"] == "tls")
    assert mount["readOnly"] is True and env["GATEWAY_SEARCH_TLS__CA_FILE"].startswith(mount["mountPath"] + "/")
    volume = next(v for v in pod_spec(w)["volumes"] if v["name"] == "tls")
    assert volume["secret"]["secretName"] == "mmsearch-gateway-tls"
    hpa = next(h for h in of_kind(objs, "HorizontalPodAutoscaler") if h["spec"]["scaleTargetRef"]["name"] == "gateway")
    assert hpa["spec"]["minReplicas"] >= 2 and "replicas" not in w["spec"]
    dev = overlay("dev")
    assert configmap_for(dev, one(dev, "Deployment", "gateway"))["GATEWAY_SEARCH_TLS__ENABLED"] == "false"
