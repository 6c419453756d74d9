"""Helm values for the zilliztech/milvus chart. Helm is not installed here, so the chart is
not rendered; these checks pin the decisions the services depend on."""
from __future__ import annotations

import re

import yaml
from k8s_helpers import K8S

VALUES = K8S / "milvus" / "values.yaml"
STANDALONE = K8S / "milvus" / "values-standalone.yaml"


def load(path):
    return yaml.safe_load(path.read_text())


def test_cluster_mode_components() -> None:
    v = load(VALUES)
    assert v["cluster"]["enabled"] is True
    assert re.fullmatch(r"v2\.\d+\.\d+", v["image"]["all"]["tag"])
    for component in ("proxy", "mixCoordinator", "queryNode", "dataNode"):
        assert v[component]["replicas"] >= 2, component
        assert v[component]["pdb"]["minAvailable"] >= 1, component  # chart makes a PDB when replicas > 1
        assert v[component]["resources"]["requests"], component
    assert v["mixCoordinator"]["activeStandby"]["enabled"] is True
    assert v["streaming"]["enabled"] is True and v["streamingNode"]["replicas"] >= 2
    assert v["indexNode"]["enabled"] is False  # merged into data nodes in Milvus 2.6


def test_dependencies_metrics_and_message_queue() -> None:
    v = load(VALUES)
    assert v["metrics"]["enabled"] and v["metrics"]["serviceMonitor"]["enabled"]
    assert v["etcd"]["replicaCount"] == 3 and v["etcd"]["pdb"]["create"]
    assert v["minio"]["mode"] == "distributed" and v["minio"]["podDisruptionBudget"]["enabled"]
    # exactly one message queue: Woodpecker embedded in the streaming nodes
    assert not any(v[k]["enabled"] for k in ("pulsar", "pulsarv3", "kafka", "woodpecker"))
    user = yaml.safe_load(v["extraConfigFiles"]["user.yaml"])
    assert user["mq"]["type"] == "woodpecker"
    assert user["common"]["security"]["authorizationEnabled"] is True


def test_no_secret_values() -> None:
    v = load(VALUES)
    assert v["minio"]["existingSecret"]
    assert "accessKey" not in v["minio"] and "secretKey" not in v["minio"]
    text = VALUES.read_text() + STANDALONE.read_text()
    assert "minioadmin" not in text and not re.search(r"(?i)password:\s*\S", text)


def test_standalone_for_dev() -> None:
    v = load(STANDALONE)
    assert v["cluster"]["enabled"] is False
    assert v["image"]["all"]["tag"] == load(VALUES)["image"]["all"]["tag"]
    assert yaml.safe_load(v["extraConfigFiles"]["user.yaml"])["etcd"]["use"]["embed"] is True


def test_services_address_the_release() -> None:
    """SEARCH_MILVUS_URI points at the proxy Service of release "milvus" in namespace "milvus"."""
    env = (K8S / "base" / "config" / "search.env").read_text()
    assert "SEARCH_MILVUS_URI=http://milvus.milvus.svc.cluster.local:19530" in env
    assert "helm upgrade --install milvus zilliztech/milvus -n milvus" in VALUES.read_text()
