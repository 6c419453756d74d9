"""NetworkPolicies, evaluated as a flow matrix: who may talk to whom on which port."""
from __future__ import annotations

import pytest
from k8s_helpers import GRPC_PORTS, METRICS_PORTS, OVERLAYS, Peer, allowed, kubectl, of_kind, one, overlay

pytestmark = pytest.mark.skipif(kubectl() is None, reason="kubectl (with built-in kustomize) is not installed")

PROMETHEUS = Peer("monitoring", {"app.kubernetes.io/name": "prometheus"})
OTHER_APP = Peer("shop", {"app": "checkout"})
KUBE_DNS = Peer("kube-system", {"k8s-app": "kube-dns"})
MILVUS_PROXY = Peer("milvus", {"app.kubernetes.io/name": "milvus", "component": "proxy"})
DASHSCOPE = Peer(ip="47.88.1.1")  # a public address
PRIVATE_HOST = Peer(ip="10.1.2.3")


def pod(overlay_name: str, name: str) -> dict[str, str]:
    return one(overlay(overlay_name), "Deployment", name)["spec"]["template"]["metadata"]["labels"]


def me(overlay_name: str, name: str) -> Peer:
    return Peer("mmsearch", pod(overlay_name, name))


@pytest.fixture(params=OVERLAYS)
def o(request: pytest.FixtureRequest) -> str:
    return request.param


def test_namespace_is_default_deny(o: str) -> None:
    deny = one(overlay(o), "NetworkPolicy", "default-deny-all")["spec"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"}
    assert not deny.get("ingress") and not deny.get("egress")


def test_only_search_is_reachable_from_other_namespaces(o: str) -> None:
    pols = of_kind(overlay(o), "NetworkPolicy")
    assert allowed(pols, "Ingress", pod(o, "search"), OTHER_APP, GRPC_PORTS["search"])
    assert not allowed(pols, "Ingress", pod(o, "search"), OTHER_APP, METRICS_PORTS["search"])
    for upstream in ("embedder", "captioner"):
        assert not allowed(pols, "Ingress", pod(o, upstream), OTHER_APP, GRPC_PORTS[upstream])
        # not even from the other mmsearch service
        other = "captioner" if upstream == "embedder" else "embedder"
        assert not allowed(pols, "Ingress", pod(o, upstream), me(o, other), GRPC_PORTS[upstream])


def test_embedder_and_captioner_only_from_search(o: str) -> None:
    pols = of_kind(overlay(o), "NetworkPolicy")
    for upstream in ("embedder", "captioner"):
        assert allowed(pols, "Ingress", pod(o, upstream), me(o, "search"), GRPC_PORTS[upstream])
        # a pod in another namespace that copies search's labels does not get in
        impostor = Peer("shop", pod(o, "search"))
        assert not allowed(pols, "Ingress", pod(o, upstream), impostor, GRPC_PORTS[upstream])
        assert allowed(pols, "Egress", pod(o, "search"), me(o, upstream), GRPC_PORTS[upstream])


def test_prometheus_scrapes_every_metrics_port_and_nothing_else(o: str) -> None:
    pols = of_kind(overlay(o), "NetworkPolicy")
    for name in GRPC_PORTS:
        assert allowed(pols, "Ingress", pod(o, name), PROMETHEUS, METRICS_PORTS[name])
        assert not allowed(pols, "Ingress", pod(o, name), OTHER_APP, METRICS_PORTS[name])
    assert not allowed(pols, "Ingress", pod(o, "embedder"), PROMETHEUS, GRPC_PORTS["embedder"])


def test_egress(o: str) -> None:
    pols = of_kind(overlay(o), "NetworkPolicy")
    for name in GRPC_PORTS:
        assert allowed(pols, "Egress", pod(o, name), KUBE_DNS, 53, "UDP")
        assert allowed(pols, "Egress", pod(o, name), KUBE_DNS, 53, "TCP")
        assert not allowed(pols, "Egress", pod(o, name), PRIVATE_HOST, 443)
    assert allowed(pols, "Egress", pod(o, "search"), MILVUS_PROXY, 19530)
    assert not allowed(pols, "Egress", pod(o, "embedder"), MILVUS_PROXY, 19530)
    assert not allowed(pols, "Egress", pod(o, "search"), DASHSCOPE, 443)
    assert not allowed(pols, "Egress", pod(o, "embedder"), DASHSCOPE, 443)


def test_public_https_only_where_a_backend_calls_dashscope() -> None:
    prod = of_kind(overlay("production-gpu"), "NetworkPolicy")
    assert allowed(prod, "Egress", pod("production-gpu", "captioner"), DASHSCOPE, 443)
    assert not allowed(prod, "Egress", pod("production-gpu", "captioner"), DASHSCOPE, 80)
    assert not allowed(prod, "Egress", pod("production-gpu", "captioner"), PRIVATE_HOST, 443)
    dev = of_kind(overlay("dev"), "NetworkPolicy")
    assert not allowed(dev, "Egress", pod("dev", "captioner"), DASHSCOPE, 443)
