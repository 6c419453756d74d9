"""Every kustomization renders, and every rendered object validates offline: built-in
kinds against the Kubernetes OpenAPI schemas (kubernetes-validate, strict: unknown fields
are errors), CRDs against the structural schemas in k8s_helpers."""
from __future__ import annotations

import jsonschema
import pytest
from k8s_helpers import CRD_SCHEMAS, OVERLAYS, kubectl, overlay, render

pytestmark = pytest.mark.skipif(kubectl() is None, reason="kubectl (with built-in kustomize) is not installed")

# Oldest supported (native sidecar-free, matchLabelKeys beta, grpc probes GA) and newest schema.
K8S_VERSIONS = ("1.30", "1.37")


@pytest.mark.parametrize("path", ["base", *(f"overlays/{o}" for o in OVERLAYS)])
def test_kustomization_renders(path: str) -> None:
    objs = render(path)
    kinds = {o["kind"] for o in objs}
    assert {"Deployment", "Service", "ConfigMap", "NetworkPolicy", "ServiceMonitor", "PodDisruptionBudget"} <= kinds
    assert all(o["metadata"].get("namespace") == "mmsearch" for o in objs if o["kind"] != "Namespace")


def _builtin(obj: dict) -> bool:
    return (obj["apiVersion"], obj["kind"]) not in CRD_SCHEMAS


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", OVERLAYS)
def test_builtin_objects_validate_against_kubernetes_schemas(name: str, version: str) -> None:
    import kubernetes_validate

    errors = []
    for obj in filter(_builtin, overlay(name)):
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {path}: {e.message}")
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("name", OVERLAYS)
def test_custom_resources_validate_structurally(name: str) -> None:
    crds = [o for o in overlay(name) if not _builtin(o)]
    assert crds, "expected ServiceMonitors / PrometheusRule (and a ScaledObject in production)"
    for obj in crds:
        jsonschema.validate(obj, CRD_SCHEMAS[(obj["apiVersion"], obj["kind"])])


def test_every_kind_is_known() -> None:
    """Nothing renders that neither validator knows (a typo'd apiVersion would be skipped)."""
    import kubernetes_validate

    for name in OVERLAYS:
        for obj in filter(_builtin, overlay(name)):
            kubernetes_validate.validate(obj, K8S_VERSIONS[-1], strict=False)  # SchemaNotFoundError if unknown


def test_structural_schemas_catch_typos() -> None:
    """The CRD schemas are not vacuous: a misspelt field or an unquoted KEDA number fails."""
    obj = next(o for o in overlay("production-gpu") if o["kind"] == "ScaledObject")
    bad = {**obj, "spec": {**obj["spec"], "maxReplicas": 3}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, CRD_SCHEMAS[("keda.sh/v1alpha1", "ScaledObject")])
    trig = dict(obj["spec"]["triggers"][0], metadata={**obj["spec"]["triggers"][0]["metadata"], "threshold": 5})
    bad = {**obj, "spec": {**obj["spec"], "triggers": [trig]}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, CRD_SCHEMAS[("keda.sh/v1alpha1", "ScaledObject")])
    sm = next(o for o in overlay("dev") if o["kind"] == "ServiceMonitor")
    bad = {**sm, "spec": {"selector": sm["spec"]["selector"], "endpoint": sm["spec"]["endpoints"]}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, CRD_SCHEMAS[("monitoring.coreos.com/v1", "ServiceMonitor")])
