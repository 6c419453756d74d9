"""Helpers for the deployment tests: render kustomizations, look objects up, evaluate
NetworkPolicies, and the structural schemas of the CRDs we ship (ServiceMonitor,
PrometheusRule, ScaledObject), which kubernetes-validate does not know."""
from __future__ import annotations

import functools
import ipaddress
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
OVERLAYS = ("dev", "production-gpu")
SERVICES = ("search", "embedder", "captioner")
# Every Deployment: the gRPC services and the HTTP gateway (tests/deploy/test_deploy_gateway.py).
WORKLOADS = (*SERVICES, "gateway")
# The services' conventions (services/*/settings.py defaults).
GRPC_PORTS = {"search": 50050, "embedder": 50051, "captioner": 50052}
METRICS_PORTS = {"search": 9100, "embedder": 9101, "captioner": 9102, "gateway": 9103}
ENV_PREFIX = {"search": "SEARCH_", "embedder": "EMBEDDER_", "captioner": "CAPTIONER_", "gateway": "GATEWAY_"}
NAMESPACE = "mmsearch"

Obj = dict[str, Any]


def kubectl() -> str | None:
    return shutil.which("kubectl")


@functools.cache
def render(path: str) -> tuple[Obj, ...]:
    """`kubectl kustomize <path>` parsed into objects (cached per path)."""
    exe = kubectl()
    assert exe, "kubectl is not installed"
    out = subprocess.run(
        [exe, "kustomize", str(K8S / path)], check=True, capture_output=True, text=True, timeout=120
    ).stdout
    return tuple(d for d in yaml.safe_load_all(out) if d)


def overlay(name: str) -> tuple[Obj, ...]:
    return render(f"overlays/{name}")


@functools.cache
def overlay_with_components(name: str, components: tuple[str, ...]) -> tuple[Obj, ...]:
    """The overlay rendered with optional components switched on the way an operator does
    it: where its kustomization.yaml shows the component as a commented line
    (`# - ../../components/<c>`), that line is uncommented in place (the order of the
    components matters); otherwise the component is appended to `components`. The
    overlay's files are copied to a temporary folder and its `../../` paths pointed back
    at deploy/k8s."""
    import os
    import tempfile

    src = K8S / "overlays" / name
    with tempfile.TemporaryDirectory(prefix=f"kustomize-{name}-") as tmp:
        dst = Path(tmp)
        for f in src.iterdir():
            if f.is_file():
                shutil.copy(f, dst / f.name)
        text = (src / "kustomization.yaml").read_text()
        appended = []
        for c in components:
            line = f"# - ../../components/{c}\n"
            if line in text:
                text = text.replace(line, line[2:], 1)
            else:
                appended.append(f"../../components/{c}")
        k = yaml.safe_load(text)
        if appended:
            k["components"] = [*(k.get("components") or []), *appended]
        to_k8s = os.path.relpath(K8S, dst)
        for key in ("resources", "components"):
            k[key] = [p.replace("../../", f"{to_k8s}/", 1) if p.startswith("../../") else p for p in k.get(key) or []]
        (dst / "kustomization.yaml").write_text(yaml.safe_dump(k, sort_keys=False))
        exe = kubectl()
        assert exe, "kubectl is not installed"
        out = subprocess.run(
            [exe, "kustomize", str(dst)], check=True, capture_output=True, text=True, timeout=120
        ).stdout
    return tuple(d for d in yaml.safe_load_all(out) if d)


def of_kind(objs: Iterable[Obj], kind: str) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: Iterable[Obj], kind: str, name: str) -> Obj:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def pod_spec(workload: Obj) -> Obj:
    return workload["spec"]["template"]["spec"]


def container(workload: Obj, name: str | None = None) -> Obj:
    containers = pod_spec(workload)["containers"]
    name = name or workload["metadata"]["name"]
    return next(c for c in containers if c["name"] == name)


def configmap_for(objs: Iterable[Obj], workload: Obj, name: str | None = None) -> dict[str, str]:
    """Merged data of every ConfigMap the container reads through envFrom."""
    objs = list(objs)
    data: dict[str, str] = {}
    for src in container(workload, name).get("envFrom", []):
        ref = src.get("configMapRef")
        if ref:
            data.update(one(objs, "ConfigMap", ref["name"]).get("data", {}))
    return data


def container_env(objs: Iterable[Obj], workload: Obj, name: str | None = None) -> dict[str, Any]:
    """The container's environment: ConfigMap values, then `env` entries (values or valueFrom)."""
    env: dict[str, Any] = dict(configmap_for(objs, workload, name))
    for e in container(workload, name).get("env", []):
        env[e["name"]] = e.get("value", e.get("valueFrom"))
    return env


def matches(selector: Obj | None, labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics (matchLabels + matchExpressions)."""
    if selector is None:
        return False
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


# --- NetworkPolicy evaluation ---------------------------------------------------------


@dataclass(frozen=True)
class Peer:
    """The other end of a connection: a pod (namespace + labels) or an outside address."""

    namespace: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    ip: str | None = None

    def __hash__(self) -> int:  # labels is a dict
        return hash((self.namespace, tuple(sorted(self.labels.items())), self.ip))


def _namespace_labels(name: str) -> dict[str, str]:
    return {"kubernetes.io/metadata.name": name}


def _peer_matches(rule_peer: Obj, peer: Peer, policy_namespace: str) -> bool:
    if "ipBlock" in rule_peer:
        if peer.ip is None:
            return False
        block = rule_peer["ipBlock"]
        addr = ipaddress.ip_address(peer.ip)
        net = ipaddress.ip_network(block["cidr"])
        if addr.version != net.version or addr not in net:
            return False
        return not any(
            addr in ipaddress.ip_network(e) for e in block.get("except", []) if ipaddress.ip_network(e).version == addr.version
        )
    if peer.namespace is None:
        return False
    ns_sel, pod_sel = rule_peer.get("namespaceSelector"), rule_peer.get("podSelector")
    if ns_sel is None:
        ns_ok = peer.namespace == policy_namespace
    else:
        ns_ok = matches(ns_sel, _namespace_labels(peer.namespace))
    pod_ok = True if pod_sel is None else matches(pod_sel, peer.labels)
    return ns_ok and pod_ok


def _port_matches(rule: Obj, port: int, protocol: str) -> bool:
    ports = rule.get("ports")
    if not ports:
        return True
    return any(p.get("protocol", "TCP") == protocol and p.get("port") == port for p in ports)


def allowed(
    policies: Iterable[Obj], direction: str, pod_labels: dict[str, str], peer: Peer, port: int, protocol: str = "TCP"
) -> bool:
    """Whether `direction` ("Ingress"/"Egress") traffic of a pod in the mmsearch namespace with
    `pod_labels` to/from `peer` on `port` is allowed by the policies (union semantics)."""
    selecting = [
        p for p in policies
        if p["kind"] == "NetworkPolicy"
        and direction in p["spec"].get("policyTypes", ["Ingress"])
        and (p["spec"]["podSelector"] == {} or matches(p["spec"]["podSelector"], pod_labels))
    ]
    if not selecting:
        return True  # not isolated in that direction
    key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    for p in selecting:
        ns = p["metadata"].get("namespace", NAMESPACE)
        for rule in p["spec"].get(key, []) or []:
            peers = rule.get(peers_key)
            peer_ok = True if not peers else any(_peer_matches(rp, peer, ns) for rp in peers)
            if peer_ok and _port_matches(rule, port, protocol):
                return True
    return False


# --- structural schemas for the CRDs --------------------------------------------------
# Only the fields we use and their types, with additionalProperties: false where a typo
# would silently disable a feature (e.g. `endpoint` instead of `endpoints`).

_META = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}
_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "matchExpressions": {"type": "array", "items": {"type": "object", "required": ["key", "operator"]}},
    },
}
_DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}

SERVICE_MONITOR = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": _META,
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": _SELECTOR,
                "namespaceSelector": {"type": "object"},
                "jobLabel": {"type": "string"},
                "targetLabels": {"type": "array", "items": {"type": "string"}},
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "targetPort": {"type": ["string", "integer"]},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": _DURATION,
                            "scrapeTimeout": _DURATION,
                            "honorLabels": {"type": "boolean"},
                            "tlsConfig": {"type": "object"},
                            "relabelings": {"type": "array"},
                            "metricRelabelings": {"type": "array"},
                        },
                    },
                },
            },
        },
    },
}

PROMETHEUS_RULE = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": _META,
        "spec": {
            "type": "object",
            "required": ["groups"],
            "additionalProperties": False,
            "properties": {
                "groups": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name", "rules"],
                        "additionalProperties": False,
                        "properties": {
                            "name": {"type": "string"},
                            "interval": _DURATION,
                            "rules": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "required": ["expr"],
                                    "additionalProperties": False,
                                    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                                    "properties": {
                                        "alert": {"type": "string"},
                                        "record": {"type": "string"},
                                        "expr": {"type": "string", "minLength": 1},
                                        "for": _DURATION,
                                        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                                        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
                                    },
                                },
                            },
                        },
                    },
                }
            },
        },
    },
}

_HPA_BEHAVIOR_RULES = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "stabilizationWindowSeconds": {"type": "integer", "minimum": 0, "maximum": 3600},
        "selectPolicy": {"enum": ["Max", "Min", "Disabled"]},
        "policies": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["type", "value", "periodSeconds"],
                "additionalProperties": False,
                "properties": {
                    "type": {"enum": ["Pods", "Percent"]},
                    "value": {"type": "integer", "minimum": 1},
                    "periodSeconds": {"type": "integer", "minimum": 1, "maximum": 1800},
                },
            },
        },
    },
}

SCALED_OBJECT = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": _META,
        "spec": {
            "type": "object",
            "required": ["scaleTargetRef", "triggers"],
            "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "name": {"type": "string"},
                        "envSourceContainerName": {"type": "string"},
                    },
                },
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "initialCooldownPeriod": {"type": "integer", "minimum": 0},
                "idleReplicaCount": {"type": "integer", "minimum": 0},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "fallback": {
                    "type": "object",
                    "required": ["failureThreshold", "replicas"],
                    "additionalProperties": False,
                    "properties": {
                        "failureThreshold": {"type": "integer", "minimum": 1},
                        "replicas": {"type": "integer", "minimum": 1},
                        "behavior": {"type": "string"},
                    },
                },
                "advanced": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                        "scalingModifiers": {"type": "object"},
                        "horizontalPodAutoscalerConfig": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "name": {"type": "string"},
                                "behavior": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "properties": {"scaleUp": _HPA_BEHAVIOR_RULES, "scaleDown": _HPA_BEHAVIOR_RULES},
                                },
                            },
                        },
                    },
                },
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["type", "metadata"],
                        "additionalProperties": False,
                        "properties": {
                            "type": {"type": "string"},
                            "name": {"type": "string"},
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            "useCachedMetrics": {"type": "boolean"},
                            "authenticationRef": {"type": "object", "required": ["name"]},
                            # KEDA trigger metadata is a map of strings (numbers must be quoted).
                            "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                        },
                        # The prometheus scaler's own required parameters.
                        "if": {"properties": {"type": {"const": "prometheus"}}},
                        "then": {
                            "properties": {
                                "metadata": {"required": ["serverAddress", "query", "threshold"]}
                            }
                        },
                    },
                },
            },
        },
    },
}

CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR,
    ("monitoring.coreos.com/v1", "PrometheusRule"): PROMETHEUS_RULE,
    ("keda.sh/v1alpha1", "ScaledObject"): SCALED_OBJECT,
}


# --- promtool (Prometheus' CLI) ------------------------------------------------------------

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool (Prometheus' CLI) is not installed")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL
    return subprocess.run([PROMTOOL, *args], check=False, capture_output=True, text=True, timeout=120)


def rule_groups_file(rule_manifest: Path, out: Path) -> Path:
    """A PrometheusRule's groups as the plain rules file promtool reads."""
    rule = yaml.safe_load(rule_manifest.read_text())
    out.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    return out
