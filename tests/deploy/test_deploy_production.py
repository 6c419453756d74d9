"""production-gpu specifics: KEDA on the embedder's queue, CPU HPAs, TLS everywhere."""
from __future__ import annotations

import re

import pytest
from k8s_helpers import (
    GRPC_PORTS,
    configmap_for,
    container,
    kubectl,
    matches,
    of_kind,
    one,
    overlay,
    pod_spec,
)

pytestmark = pytest.mark.skipif(kubectl() is None, reason="kubectl (with built-in kustomize) is not installed")
PROD = "production-gpu"


def test_scaled_object_targets_the_embedder_and_reads_its_queue() -> None:
    objs = overlay(PROD)
    so = one(objs, "ScaledObject", "embedder")
    ref = so["spec"]["scaleTargetRef"]
    dep = one(objs, ref.get("kind", "Deployment"), ref["name"])
    assert dep["metadata"]["name"] == "embedder" and ref.get("apiVersion", "apps/v1") == "apps/v1"
    assert so["spec"]["minReplicaCount"] >= 1 and so["spec"]["maxReplicaCount"] > so["spec"]["minReplicaCount"]
    queries = {t["name"]: t["metadata"]["query"] for t in so["spec"]["triggers"]}
    assert all(t["type"] == "prometheus" for t in so["spec"]["triggers"])
    assert "embedder_queue_depth" in queries["queue-depth"]
    assert "embedder_queue_wait_seconds_sum" in queries["queue-wait"]
    # The series' job label is the Service name the embedder ServiceMonitor scrapes, and
    # that ServiceMonitor's Service selects the pods of the scaled Deployment.
    svc = one(objs, "Service", "embedder")
    sm = one(objs, "ServiceMonitor", "embedder")
    assert matches(sm["spec"]["selector"], svc["metadata"]["labels"])
    assert matches({"matchLabels": svc["spec"]["selector"]}, dep["spec"]["template"]["metadata"]["labels"])
    assert dep["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    for q in queries.values():
        assert re.search(r'job="embedder"', q) and re.search(r'namespace="mmsearch"', q)
    # Fallback only works for AverageValue triggers (KEDA docs): at least one must be.
    assert any(t.get("metricType", "AverageValue") == "AverageValue" for t in so["spec"]["triggers"])


def test_no_gpu_utilisation_trigger() -> None:
    so = one(overlay(PROD), "ScaledObject", "embedder")
    for t in so["spec"]["triggers"]:
        assert "DCGM" not in t["metadata"].get("query", "") and t["type"] not in ("cpu", "memory")


def test_cpu_hpas_for_search_captioner_and_gateway() -> None:
    objs = overlay(PROD)
    hpas = {h["spec"]["scaleTargetRef"]["name"]: h for h in of_kind(objs, "HorizontalPodAutoscaler")}
    assert set(hpas) == {"search", "captioner", "gateway"}
    for name, h in hpas.items():
        one(objs, "Deployment", name)
        assert h["apiVersion"] == "autoscaling/v2"
        (metric,) = h["spec"]["metrics"]
        assert metric["resource"]["name"] == "cpu"
        assert container(one(objs, "Deployment", name))["resources"]["requests"]["cpu"]
    assert hpas["search"]["spec"]["minReplicas"] >= 3  # several search replicas


def test_autoscaled_deployments_leave_replicas_to_the_autoscaler() -> None:
    for d in of_kind(overlay(PROD), "Deployment"):
        assert "replicas" not in d["spec"], d["metadata"]["name"]


def test_tls_on_every_grpc_port_with_mtls_between_services() -> None:
    objs = overlay(PROD)
    for name, port in GRPC_PORTS.items():
        w = one(objs, "Deployment", name)
        c, env = container(w), configmap_for(objs, w)
        prefix = name.upper()
        mount = next(m for m in c["volumeMounts"] if m["name"] == "tls")
        assert mount["readOnly"] is True
        vol = next(v for v in pod_spec(w)["volumes"] if v["name"] == "tls")
        assert vol["secret"]["secretName"] == f"mmsearch-{name}-tls"
        for key in ("TLS__CERT_FILE", "TLS__KEY_FILE"):
            assert env[f"{prefix}_{key}"].startswith(mount["mountPath"] + "/")
        if name != "search":  # internal services demand a client certificate
            assert env[f"{prefix}_TLS__CLIENT_CA_FILE"].startswith(mount["mountPath"] + "/")
        # probes speak TLS through the exec script (the kubelet's grpc probe cannot)
        for probe in ("startupProbe", "readinessProbe"):
            cmd = c[probe]["exec"]["command"]
            assert cmd[1] == "/opt/mmsearch/bin/grpc_health_check.py" and "--tls" in cmd
            assert f"127.0.0.1:{port}" in cmd
            assert cmd[cmd.index("--cert-file") + 1] == env[f"{prefix}_TLS__CERT_FILE"]
            assert c[probe]["timeoutSeconds"] >= 3
    search_env = configmap_for(objs, one(objs, "Deployment", "search"))
    assert search_env["SEARCH_UPSTREAM_TLS__ENABLED"] == "true"
    for key in ("CA_FILE", "CERT_FILE", "KEY_FILE"):
        assert search_env[f"SEARCH_UPSTREAM_TLS__{key}"].startswith("/etc/mmsearch/tls/")


def test_probe_script_is_shipped_in_the_images() -> None:
    from k8s_helpers import K8S

    dockerfile = (K8S / "docker" / "Dockerfile").read_text()
    assert "COPY deploy/k8s/docker/grpc_health_check.py /opt/mmsearch/bin/grpc_health_check.py" in dockerfile
    assert (K8S / "docker" / "grpc_health_check.py").is_file()
