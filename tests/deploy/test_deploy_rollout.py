"""Rollouts and node drains never leave zero ready pods (issue 14, "Rollouts without a gap").

Renders every overlay and checks each Deployment against Kubernetes' own arithmetic:
- the replica floor is the autoscaler's minimum (HPA `minReplicas`, KEDA
  `minReplicaCount`) or `spec.replicas`;
- a RollingUpdate keeps at least `floor - maxUnavailable` pods available (percentages
  round down for maxUnavailable, up for maxSurge, as the Deployment controller does), which
  must be >= 1, and it must be able to progress (maxSurge or maxUnavailable >= 1);
- exactly one PodDisruptionBudget covers the pods and keeps >= 1 available during a drain
  (`minAvailable` >= 1, or `floor - maxUnavailable` >= 1); in production a drain must also be
  able to proceed at the floor (a PDB that allows no disruption would block it for good).
"""
from __future__ import annotations

import math

import pytest
from k8s_helpers import OVERLAYS, kubectl, matches, of_kind, overlay

pytestmark = pytest.mark.skipif(kubectl() is None, reason="kubectl (with built-in kustomize) is not installed")


def _count(value: int | str | None, replicas: int, default: str, round_up: bool) -> int:
    value = default if value is None else value
    if isinstance(value, str) and value.endswith("%"):
        exact = replicas * int(value[:-1]) / 100
        return math.ceil(exact) if round_up else math.floor(exact)
    return int(value)


def floor_replicas(objs: tuple[dict, ...], deployment: dict) -> int:
    name = deployment["metadata"]["name"]
    for hpa in of_kind(objs, "HorizontalPodAutoscaler"):
        if hpa["spec"]["scaleTargetRef"]["name"] == name:
            return int(hpa["spec"].get("minReplicas", 1))
    for so in of_kind(objs, "ScaledObject"):
        if so["spec"]["scaleTargetRef"]["name"] == name:
            return int(so["spec"].get("minReplicaCount", 0))
    return int(deployment["spec"].get("replicas", 1))


def rollout_floor(deployment: dict, replicas: int) -> tuple[int, int, int]:
    """(min available during a rollout, maxSurge, maxUnavailable)."""
    strategy = deployment["spec"].get("strategy", {})
    assert strategy.get("type", "RollingUpdate") == "RollingUpdate", "Recreate stops every pod first"
    ru = strategy.get("rollingUpdate", {})
    surge = _count(ru.get("maxSurge"), replicas, "25%", round_up=True)
    unavailable = _count(ru.get("maxUnavailable"), replicas, "25%", round_up=False)
    return replicas - unavailable, surge, unavailable


def drain_floor(objs: tuple[dict, ...], deployment: dict, replicas: int) -> tuple[int, int]:
    """(min available during voluntary disruptions, disruptions allowed at the floor)."""
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    pdbs = [p for p in of_kind(objs, "PodDisruptionBudget") if matches(p["spec"]["selector"], labels)]
    assert len(pdbs) == 1, f"{deployment['metadata']['name']}: {len(pdbs)} PDBs cover its pods"
    spec = pdbs[0]["spec"]
    if "minAvailable" in spec:
        keep = _count(spec["minAvailable"], replicas, "0", round_up=True)
    else:
        keep = replicas - _count(spec.get("maxUnavailable"), replicas, "1", round_up=True)
    return keep, replicas - keep


@pytest.mark.parametrize("overlay_name", OVERLAYS)
def test_rollouts_and_drains_never_leave_zero_ready_pods(overlay_name: str) -> None:
    objs = overlay(overlay_name)
    deployments = of_kind(objs, "Deployment")
    assert {d["metadata"]["name"] for d in deployments} >= {"search", "embedder", "captioner"}
    for d in deployments:
        name = d["metadata"]["name"]
        replicas = floor_replicas(objs, d)
        assert replicas >= 1, f"{overlay_name}/{name}: scales to zero"
        during_rollout, surge, unavailable = rollout_floor(d, replicas)
        assert during_rollout >= 1, (
            f"{overlay_name}/{name}: a rollout may leave {during_rollout} available "
            f"({replicas} replicas, maxUnavailable {unavailable})")
        assert surge >= 1 or unavailable >= 1, f"{overlay_name}/{name}: a rollout can never progress"
        during_drain, allowed = drain_floor(objs, d, replicas)
        assert during_drain >= 1, f"{overlay_name}/{name}: a drain may evict every ready pod"
        if overlay_name != "dev":  # dev runs one replica: a drain waits (documented)
            assert allowed >= 1, f"{overlay_name}/{name}: the PDB blocks every drain at {replicas} replicas"


def test_production_embedder_keeps_a_ready_replica_through_rollouts_and_drains() -> None:
    """The GPU embedder: 2 replicas minimum, surge-first rollouts, PDB minAvailable 1."""
    objs = overlay("production-gpu")
    embedder = next(d for d in of_kind(objs, "Deployment") if d["metadata"]["name"] == "embedder")
    assert floor_replicas(objs, embedder) == 2
    assert rollout_floor(embedder, 2) == (2, 1, 0)
    assert drain_floor(objs, embedder, 2) == (1, 1)


def test_the_check_catches_the_old_gap() -> None:
    """The arithmetic flags what production-gpu had: maxSurge 0 / maxUnavailable 1 from one
    replica, PDB maxUnavailable 1."""
    old = {"metadata": {"name": "embedder", "labels": {}},
           "spec": {"replicas": 1, "strategy": {"rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
                    "template": {"metadata": {"labels": {"app": "e"}}}}}
    pdb = {"kind": "PodDisruptionBudget", "metadata": {"name": "embedder"},
           "spec": {"maxUnavailable": 1, "selector": {"matchLabels": {"app": "e"}}}}
    assert rollout_floor(old, 1)[0] == 0
    assert drain_floor((pdb,), old, 1)[0] == 0
    assert rollout_floor({"spec": {}}, 4) == (3, 1, 1)  # Kubernetes' 25% defaults


@pytest.mark.parametrize("overlay_name", OVERLAYS)
def test_search_readiness_asks_the_search_capability(overlay_name: str) -> None:
    """Readiness follows "can answer searches" (Milvus), not every upstream: a dead embedder
    or captioner must not take every search pod out of its Service."""
    search = next(d for d in of_kind(overlay(overlay_name), "Deployment") if d["metadata"]["name"] == "search")
    probe = search["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    if "grpc" in probe:
        assert probe["grpc"].get("service") == "search"
    else:
        command = probe["exec"]["command"]
        assert command[command.index("--service") + 1] == "search"
