"""Helm values for the zilliztech/milvus chart, pinned to chart 5.0.19. Helm is not
installed here, so the chart is not rendered; instead every key is checked against a copy
of that version's values.yaml and of the `.Values` paths its templates read
(tests/deploy/data/milvus-chart-5.0.19, README there), and these checks pin the decisions
the services depend on."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from k8s_helpers import K8S

VALUES = K8S / "milvus" / "values.yaml"
STANDALONE = K8S / "milvus" / "values-standalone.yaml"
PDBS = K8S / "milvus" / "pdbs.yaml"
CHART_VERSION = "5.0.19"
CHART = Path(__file__).parent / "data" / f"milvus-chart-{CHART_VERSION}"
# Subcharts whose values we set, with the copy of their values.yaml we have. Keys of other
# subcharts (etcd: bitnami) must be keys the Milvus chart's values.yaml itself lists.
SUBCHARTS = {"minio": "minio-8.0.17"}
# Components that run Milvus itself (and so read milvus.yaml / the MinIO credentials).
MILVUS_COMPONENTS = {"proxy": "proxy", "mixCoordinator": "mixcoord", "queryNode": "querynode",
                     "dataNode": "datanode", "streamingNode": "streamingnode"}


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def chart_values() -> dict:
    return load(CHART / "values.yaml")


def template_refs(name: str) -> list[str]:
    return (CHART / f"{name}-templates-values-refs.txt").read_text().split()


def unknown_keys(ours: Any, theirs: Any, path: str = "") -> list[str]:
    """Keys of `ours` that `theirs` does not define. A map that is empty or not a map in
    `theirs` (resources: {}, extraEnv: [], labels: {}) is free-form: anything under it goes."""
    if not isinstance(ours, dict) or not isinstance(theirs, dict) or not theirs:
        return []
    missing = []
    for key, value in ours.items():
        where = f"{path}.{key}" if path else key
        if key not in theirs:
            missing.append(where)
        else:
            missing += unknown_keys(value, theirs[key], where)
    return missing


def deep_merge(base: dict, over: dict) -> dict:
    """Helm's merge of a parent chart's subchart values over the subchart's own."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def leaf_paths(node: Any, path: str = "") -> list[str]:
    if isinstance(node, dict) and node:
        return [p for k, v in node.items() for p in leaf_paths(v, f"{path}.{k}" if path else k)]
    return [path]


def check_against_chart(values: dict) -> list[str]:
    problems = [f"{k}: not in chart {CHART_VERSION}'s values.yaml"
                for k in unknown_keys({k: v for k, v in values.items() if k not in SUBCHARTS}, chart_values())]
    for sub, copy in SUBCHARTS.items():
        if sub in values:
            defined = deep_merge(load(CHART / f"{copy}-values.yaml"), chart_values().get(sub) or {})
            problems += [f"{sub}.{k}: not in {copy}'s values.yaml" for k in unknown_keys(values[sub], defined)]
    # Keys of the Milvus chart itself must be read by one of its templates: a key nobody
    # reads (proxy.pdb, streamingNode.woodpecker in our earlier values) silently does nothing.
    refs = template_refs("milvus")
    subchart_keys = set(SUBCHARTS) | {"etcd", "pulsar", "pulsarv3", "kafka"}
    for leaf in leaf_paths({k: v for k, v in values.items() if k not in subchart_keys}):
        if not any(leaf == r or leaf.startswith(r + ".") or r.startswith(leaf + ".") for r in refs):
            problems.append(f"{leaf}: read by no template of chart {CHART_VERSION}")
    return problems


@pytest.mark.parametrize("path", [VALUES, STANDALONE], ids=["cluster", "standalone"])
def test_every_key_is_defined_and_read_by_the_pinned_chart(path: Path) -> None:
    problems = check_against_chart(load(path))
    assert not problems, "\n".join(problems)
    assert f"--version {CHART_VERSION}" in path.read_text()


def test_the_key_check_is_not_vacuous() -> None:
    v = load(VALUES)
    v["proxy"]["pdb"] = {"minAvailable": 1}  # values of some other chart version
    v["streamingNode"]["woodpecker"] = {"embedded": True}  # not where 5.0.19 reads it
    v["minio"]["replicaz"] = 4
    v["queryNod"] = {"replicas": 2}
    problems = "\n".join(check_against_chart(v))
    for key in ("proxy.pdb", "streamingNode.woodpecker", "minio.replicaz", "queryNod"):
        assert key in problems, key


def test_the_test_data_is_the_pinned_chart() -> None:
    assert load(CHART / "values.yaml")["image"]["all"]["tag"] == "v2.6.15"
    assert "milvus-5.0.19" in (CHART / "README.md").read_text()
    refs = template_refs("milvus")
    assert "streaming.woodpecker.storage.type" in refs and "minio.accessKey" in refs
    assert not any(r.endswith(".pdb") or ".pdb." in r for r in refs), "5.0.19 has no Milvus PDB template"
    assert "podDisruptionBudget.enabled" in template_refs("minio")


def test_cluster_mode_components() -> None:
    v = load(VALUES)
    assert v["cluster"]["enabled"] is True
    assert v["image"]["all"]["tag"] == chart_values()["image"]["all"]["tag"]  # Milvus pinned with the chart
    for component in ("proxy", "mixCoordinator", "queryNode", "dataNode", "streamingNode"):
        assert v[component]["replicas"] >= 2, component
        assert v[component]["resources"]["requests"], component
        assert "pdb" not in v[component], f"{component}.pdb: chart {CHART_VERSION} has no such key"
    assert v["mixCoordinator"]["activeStandby"]["enabled"] is True
    assert v["streaming"]["enabled"] is True
    assert v["streaming"]["woodpecker"] == {"embedded": True, "storage": {"type": "minio"}}
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


def test_milvus_itself_uses_the_object_storage_secret() -> None:
    """config.tpl writes minio.accessKey into milvus.yaml, not existingSecret: every Milvus
    component gets the Secret's keys as MINIO_ACCESS_KEY_ID / MINIO_SECRET_ACCESS_KEY, which
    Milvus' environment source maps onto minio.accessKeyID / minio.secretAccessKey."""
    v = load(VALUES)
    secret = v["minio"]["existingSecret"]
    assert secret
    # the key names the MinIO subchart reads from an existing Secret
    assert v["minio"]["accessKey"] == "" and v["minio"]["secretKey"] == ""

    def milvus_key(env: str) -> str:  # Milvus' env formatter: lower case, no "_" / "." (base_table.go)
        return env.lower().replace("_", "").replace(".", "")

    for component in MILVUS_COMPONENTS:
        env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in v[component]["extraEnv"]}
        assert env == {
            "MINIO_ACCESS_KEY_ID": {"name": secret, "key": "accesskey"},
            "MINIO_SECRET_ACCESS_KEY": {"name": secret, "key": "secretkey"},
        }, component
        assert {milvus_key(n) for n in env} == {milvus_key("minio.accessKeyID"), milvus_key("minio.secretAccessKey")}
        assert f"{component}.extraEnv" in template_refs("milvus"), component


def test_no_secret_values() -> None:
    text = VALUES.read_text() + STANDALONE.read_text()
    assert "minioadmin" not in text and not re.search(r"(?i)password:\s*\S", text)
    assert not re.search(r"(?i)(accesskey|secretkey):\s*['\"]?[A-Za-z0-9/+]{8,}", text)


def test_our_pdbs_cover_every_replicated_milvus_component() -> None:
    import kubernetes_validate

    pdbs = [d for d in yaml.safe_load_all(PDBS.read_text()) if d]
    components = dict(line.split() for line in (CHART / "deployment-components.txt").read_text().splitlines())
    selected = set()
    for pdb in pdbs:
        kubernetes_validate.validate(pdb, "1.30", strict=True)
        labels = pdb["spec"]["selector"]["matchLabels"]
        assert labels["app.kubernetes.io/name"] == "milvus" and labels["app.kubernetes.io/instance"] == "milvus"
        assert labels["component"] in components.values(), labels
        assert pdb["spec"]["maxUnavailable"] == 1
        selected.add(labels["component"])
    assert selected == set(MILVUS_COMPONENTS.values())
    assert "namespace" not in str([p["metadata"] for p in pdbs])  # applied with -n milvus


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
