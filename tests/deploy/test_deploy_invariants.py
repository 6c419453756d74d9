"""The invariants that matter in every overlay: probes, resources, non-root, read-only root
filesystem, pinned images, no literal secrets, graceful shutdown, PDBs, topology spread,
ports consistent with the services' settings, a ServiceMonitor for every metrics port."""
from __future__ import annotations

import re

import pytest
import yaml
from k8s_helpers import (
    ENV_PREFIX,
    GRPC_PORTS,
    K8S,
    METRICS_PORTS,
    OVERLAYS,
    SERVICES,
    WORKLOADS,
    configmap_for,
    container,
    container_env,
    kubectl,
    matches,
    of_kind,
    one,
    overlay,
    pod_spec,
)

pytestmark = pytest.mark.skipif(kubectl() is None, reason="kubectl (with built-in kustomize) is not installed")

SENSITIVE = re.compile(r"(KEY|TOKEN|PASSWORD|SECRET|CREDENTIAL)", re.IGNORECASE)


def workloads(name: str) -> list[dict]:
    objs = overlay(name)
    return of_kind(objs, "Deployment") + of_kind(objs, "StatefulSet") + of_kind(objs, "DaemonSet")


@pytest.fixture(params=OVERLAYS)
def overlay_name(request: pytest.FixtureRequest) -> str:
    return request.param


def test_every_service_deployed(overlay_name: str) -> None:
    assert sorted(w["metadata"]["name"] for w in workloads(overlay_name)) == sorted(WORKLOADS)


def test_every_container_has_probes_resources_and_limits(overlay_name: str) -> None:
    for w in workloads(overlay_name):
        for c in pod_spec(w)["containers"]:
            where = f"{w['metadata']['name']}/{c['name']}"
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert probe in c, f"{where}: no {probe}"
            for kind in ("requests", "limits"):
                for res in ("cpu", "memory"):
                    assert res in c["resources"].get(kind, {}), f"{where}: no {kind}.{res}"


def test_every_pod_is_non_root_read_only_and_unprivileged(overlay_name: str) -> None:
    for w in workloads(overlay_name):
        spec = pod_spec(w)
        psc = spec.get("securityContext", {})
        assert psc.get("seccompProfile", {}).get("type") == "RuntimeDefault"
        assert spec.get("automountServiceAccountToken") is False
        assert spec.get("enableServiceLinks") is False, "service links inject *_PORT vars into the settings' env prefixes"
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c.get("securityContext", {})
            where = f"{w['metadata']['name']}/{c['name']}"
            assert sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, where
            assert sc.get("runAsUser", psc.get("runAsUser")) not in (None, 0), where
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("privileged", False) is False, where
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not sc.get("capabilities", {}).get("add"), where
            # Something writable for HOME and the caches.
            mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
            assert "/tmp" in mounts, f"{where}: no writable /tmp with a read-only root fs"


def test_images_are_pinned(overlay_name: str) -> None:
    for w in workloads(overlay_name):
        for c in pod_spec(w)["containers"]:
            image = c["image"]
            if "@sha256:" in image:
                continue
            tag = image.rsplit("/", 1)[-1].partition(":")[2]
            assert tag and tag != "latest", f"{image} is not pinned"
            assert c.get("imagePullPolicy") == "IfNotPresent"


def test_no_literal_secrets(overlay_name: str) -> None:
    objs = overlay(overlay_name)
    assert not of_kind(objs, "Secret"), "Secrets are created out of band, never rendered from the repo"
    for cm in of_kind(objs, "ConfigMap"):
        for key, value in cm.get("data", {}).items():
            if SENSITIVE.search(key):
                # Only paths to mounted secret files are allowed in a ConfigMap.
                assert key.endswith("_FILE") and value.startswith("/"), f"{cm['metadata']['name']}: {key}"
    for w in workloads(overlay_name):
        for c in pod_spec(w)["containers"]:
            for e in c.get("env", []):
                if SENSITIVE.search(e["name"]):
                    assert "value" not in e, f"literal value for {e['name']}"
                    assert "secretKeyRef" in e.get("valueFrom", {}), f"{e['name']} must come from a Secret"
    text = yaml.safe_dump_all(objs)
    assert "BEGIN" not in text or "PRIVATE KEY" not in text
    assert not re.search(r"\bsk-[A-Za-z0-9]{16,}", text), "something that looks like an API key"


def test_graceful_shutdown_fits_in_the_termination_grace_period(overlay_name: str) -> None:
    objs = overlay(overlay_name)
    for w in workloads(overlay_name):
        name = w["metadata"]["name"]
        env = configmap_for(objs, w)
        grace = float(env[f"{ENV_PREFIX[name]}SHUTDOWN_GRACE_S"])
        pre_stop = container(w).get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
        sleep = float(pre_stop[1]) if pre_stop[:1] == ["sleep"] else 0.0
        assert pod_spec(w)["terminationGracePeriodSeconds"] > grace + sleep, name


def test_ports_match_the_services_settings(overlay_name: str) -> None:
    objs = overlay(overlay_name)
    for w in workloads(overlay_name):
        name = w["metadata"]["name"]
        if name not in GRPC_PORTS:
            continue  # the HTTP gateway: test_deploy_gateway.py
        env, c = configmap_for(objs, w), container(w)
        grpc, metrics = GRPC_PORTS[name], METRICS_PORTS[name]
        assert int(env[f"{ENV_PREFIX[name]}GRPC_PORT"]) == grpc
        assert int(env[f"{ENV_PREFIX[name]}METRICS_PORT"]) == metrics
        assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"grpc": grpc, "metrics": metrics}
        # Probes hit the gRPC port, whichever handler they use.
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            p = c[probe]
            if "grpc" in p:
                assert p["grpc"]["port"] == grpc
            elif "tcpSocket" in p:
                assert p["tcpSocket"]["port"] == grpc
            else:
                assert f"127.0.0.1:{grpc}" in p["exec"]["command"]
        svc = one(objs, "Service", name)
        assert matches(svc["spec"]["selector"] and {"matchLabels": svc["spec"]["selector"]},
                       w["spec"]["template"]["metadata"]["labels"])
        assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == {"grpc": grpc, "metrics": metrics}
        assert all(p["targetPort"] in ("grpc", "metrics") for p in svc["spec"]["ports"])


def test_settings_classes_agree_on_the_ports() -> None:
    """The ports above are the services' own defaults (where the service code exists yet)."""
    import importlib

    checked = 0
    for name in SERVICES:
        try:
            mod = importlib.import_module(f"services.{name}.settings")
        except ModuleNotFoundError:
            continue
        cls = next(v for k, v in vars(mod).items() if k.endswith("Settings") and k.lower().startswith(name))
        assert cls.model_fields["grpc_port"].default == GRPC_PORTS[name]
        assert cls.model_fields["metrics_port"].default == METRICS_PORTS[name]
        checked += 1
    if not checked:
        pytest.skip("no services/*/settings.py yet")


def test_every_metrics_port_has_a_service_monitor(overlay_name: str) -> None:
    objs = overlay(overlay_name)
    monitors = of_kind(objs, "ServiceMonitor")
    for w in workloads(overlay_name):
        name = w["metadata"]["name"]
        pod_labels = w["spec"]["template"]["metadata"]["labels"]
        # A Service exposes the container's metrics port...
        services = [
            s for s in of_kind(objs, "Service")
            if matches({"matchLabels": s["spec"].get("selector", {})}, pod_labels)
            and any(p["name"] == "metrics" for p in s["spec"]["ports"])
        ]
        assert len(services) == 1, f"{name}: {len(services)} Services expose metrics (double scrape or none)"
        svc_labels = services[0]["metadata"]["labels"]
        # ...and a ServiceMonitor selects that Service and scrapes that port.
        assert any(
            matches(m["spec"]["selector"], svc_labels)
            and any(e["port"] == "metrics" and e.get("path", "/metrics") == "/metrics" for e in m["spec"]["endpoints"])
            for m in monitors
        ), f"{name}: metrics port not scraped"


def test_pdbs_and_topology_spread(overlay_name: str) -> None:
    objs = overlay(overlay_name)
    pdbs = of_kind(objs, "PodDisruptionBudget")
    for w in workloads(overlay_name):
        labels = w["spec"]["template"]["metadata"]["labels"]
        mine = [p for p in pdbs if matches(p["spec"]["selector"], labels)]
        # Exactly one PDB; what it allows is checked in test_deploy_rollout.py.
        assert len(mine) == 1, w["metadata"]["name"]
        tsc = pod_spec(w).get("topologySpreadConstraints", [])
        keys = {t["topologyKey"] for t in tsc}
        assert {"topology.kubernetes.io/zone", "kubernetes.io/hostname"} <= keys
        assert all(matches(t["labelSelector"], labels) for t in tsc)


def test_upstream_services_are_headless_for_client_side_balancing(overlay_name: str) -> None:
    """search -> embedder/captioner must see every pod, or autoscaled replicas get no calls."""
    objs = overlay(overlay_name)
    search = one(objs, "Deployment", "search")
    env = configmap_for(objs, search)
    for upstream in ("embedder", "captioner"):
        assert one(objs, "Service", upstream)["spec"].get("clusterIP") == "None"
        assert env[f"SEARCH_{upstream.upper()}_TARGET"] == f"dns:///{upstream}:{GRPC_PORTS[upstream]}"


def test_dev_overlay_is_small_and_offline() -> None:
    objs = overlay("dev")
    for w in workloads("dev"):
        assert w["spec"]["replicas"] == 1
        c = container(w)
        assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
        assert c["image"].endswith(":0.1.0-cpu")
        # Plaintext: the kubelet's native grpc probe works (the gateway's are HTTP).
        kind = "grpc" if w["metadata"]["name"] in GRPC_PORTS else "httpGet"
        assert kind in c["readinessProbe"] and kind in c["startupProbe"]
    assert configmap_for(objs, one(objs, "Deployment", "embedder"))["EMBEDDER_BACKEND"] == "lite"
    assert configmap_for(objs, one(objs, "Deployment", "captioner"))["CAPTIONER_BACKEND"] == "lite"
    uri = configmap_for(objs, one(objs, "Deployment", "search"))["SEARCH_MILVUS_URI"]
    assert uri.startswith("http://") and uri.endswith(":19530")
    assert not of_kind(objs, "ScaledObject") and not of_kind(objs, "HorizontalPodAutoscaler")


def test_production_embedder_is_a_gpu_workload() -> None:
    objs = overlay("production-gpu")
    w = one(objs, "Deployment", "embedder")
    c, spec = container(w), pod_spec(w)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert c["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert "mmsearch-gpu" in c["image"] and c["image"].endswith(":0.1.0-cuda")
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    assert spec["nodeSelector"]
    env = container_env(objs, w)
    assert env["EMBEDDER_BACKEND"] in ("clip", "bge") and env["EMBEDDER_DEVICE"] == "cuda"
    assert env["EMBEDDER_DTYPE"] == "float16"
    # Weights come from a read-only volume mounted where EMBEDDER_MODEL_DIR points.
    mount = next(m for m in c["volumeMounts"] if env["EMBEDDER_MODEL_DIR"].startswith(m["mountPath"] + "/"))
    assert mount["readOnly"] is True
    vol = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    claim = vol["persistentVolumeClaim"]["claimName"]
    # Shared by every replica on any GPU node; filled once, mounted read-only.
    assert one(objs, "PersistentVolumeClaim", claim)["spec"]["accessModes"][0] in ("ReadWriteMany", "ReadOnlyMany")
    assert vol["persistentVolumeClaim"]["readOnly"] is True


def test_production_secrets_are_mandatory() -> None:
    objs = overlay("production-gpu")
    search = container(one(objs, "Deployment", "search"))
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in search["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    assert refs["SEARCH_AUTH_TOKENS"]["optional"] is False
    assert refs["SEARCH_MILVUS_TOKEN"]["optional"] is False
    captioner = container(one(objs, "Deployment", "captioner"))
    key = next(e for e in captioner["env"] if e["name"] == "CAPTIONER_API_KEY")
    assert key["valueFrom"]["secretKeyRef"]["optional"] is False


def test_example_files_are_not_part_of_any_kustomization() -> None:
    for kfile in K8S.rglob("kustomization.yaml"):
        k = yaml.safe_load(kfile.read_text())
        listed = [*k.get("resources", []), *k.get("components", []), *(p.get("path", "") for p in k.get("patches", []))]
        assert not [r for r in listed if "example" in r], kfile


def test_examples_are_valid_objects() -> None:
    """The example files validate too (built-in kinds strictly; cert-manager CRDs parse)."""
    import kubernetes_validate

    for path in sorted((K8S / "examples").glob("*.example.yaml")):
        for obj in filter(None, yaml.safe_load_all(path.read_text())):
            assert obj["metadata"]["namespace"] == "mmsearch", path.name
            if obj["apiVersion"].startswith("cert-manager.io/"):
                assert obj["kind"] in ("Issuer", "Certificate")
                continue
            kubernetes_validate.validate(obj, "1.37", strict=True)
