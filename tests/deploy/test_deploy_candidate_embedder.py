"""Model change without downtime (issue 18), the Kubernetes side: the optional component
components/candidate-embedder (a second embedder for the candidate model) as the
production overlay shows it (a commented line), rendered on and off, and the original
store search keeps in the Milvus release's MinIO (docs/operations.md, "Change the embedding model")."""
from __future__ import annotations

import re
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml
from k8s_helpers import (
    CRD_SCHEMAS,
    GRPC_PORTS,
    K8S,
    METRICS_PORTS,
    OVERLAYS,
    REPO,
    Peer,
    allowed,
    configmap_for,
    container,
    container_env,
    kubectl,
    matches,
    of_kind,
    one,
    overlay,
    overlay_with_components,
    pod_spec,
)

pytestmark = pytest.mark.skipif(kubectl() is None, reason="kubectl (with built-in kustomize) is not installed")

PROD = "production-gpu"
COMPONENT = "candidate-embedder"
NAME = "embedder-candidate"
# The candidate runs the embedder program: its container keeps the embedder's name, so the
# overlays' embedder patches reach it (target name: embedder|embedder-candidate).
CONTAINER = "embedder"
PROMETHEUS = Peer("monitoring", {"app.kubernetes.io/name": "prometheus"})
OTHER_APP = Peer("shop", {"app": "checkout"})
K8S_VERSIONS = ("1.30", "1.37")
MILVUS_VALUES = K8S / "milvus" / "values.yaml"
CHART = REPO / "tests" / "deploy" / "data" / "milvus-chart-5.0.19"


def enabled(name: str) -> tuple[dict, ...]:
    return overlay_with_components(name, (COMPONENT,))


def labels_of(objs: tuple[dict, ...], name: str) -> dict[str, str]:
    return one(objs, "Deployment", name)["spec"]["template"]["metadata"]["labels"]


def me(objs: tuple[dict, ...], name: str) -> Peer:
    return Peer("mmsearch", labels_of(objs, name))


@pytest.fixture(params=OVERLAYS)
def with_component(request: pytest.FixtureRequest) -> tuple[dict, ...]:
    return enabled(request.param)


# --- on and off ----------------------------------------------------------------------


def test_production_overlay_shows_the_component_before_tls() -> None:
    """Commented out (off by default), listed before components/tls so TLS covers it."""
    text = (K8S / "overlays" / PROD / "kustomization.yaml").read_text()
    commented = text.index(f"# - ../../components/{COMPONENT}\n")
    assert commented < text.index("  - ../../components/tls\n")
    assert text.index("  - ../../components/autoscaling\n") < commented
    assert f"../../components/{COMPONENT}" not in yaml.safe_load(text)["components"]


@pytest.mark.parametrize("name", OVERLAYS)
def test_off_by_default(name: str) -> None:
    objs = overlay(name)
    assert not [o for o in objs if o["metadata"]["name"].startswith(NAME)]
    assert "SEARCH_MODEL_EMBEDDERS" not in configmap_for(objs, one(objs, "Deployment", "search"))


@pytest.mark.parametrize("name", OVERLAYS)
def test_on_adds_only_the_candidates_objects(name: str) -> None:
    def ids(objs: tuple[dict, ...]) -> set[tuple[str, str]]:
        # generated ConfigMaps carry a content hash: compare their names without it
        return {(o["kind"], re.sub(r"-[a-z0-9]{10}$", "", o["metadata"]["name"]) if o["kind"] == "ConfigMap"
                 else o["metadata"]["name"]) for o in objs}

    added = ids(enabled(name)) - ids(overlay(name))
    assert added == {
        ("Deployment", NAME), ("Service", NAME), ("PodDisruptionBudget", NAME), ("ServiceMonitor", NAME),
        ("ConfigMap", f"{NAME}-config"), ("NetworkPolicy", f"{NAME}-ingress-from-search"),
        ("NetworkPolicy", "search-egress-to-embedder-candidate"),
        ("NetworkPolicy", f"{NAME}-allow-prometheus-scrape"),
    }
    assert all(o["metadata"].get("namespace") == "mmsearch" for o in enabled(name) if o["kind"] != "Namespace")


@pytest.mark.parametrize("name", OVERLAYS)
def test_every_object_it_adds_is_labelled_for_removal(name: str) -> None:
    """`kubectl apply` never prunes: the runbook deletes the component's objects by label,
    and that label selects nothing else."""
    label = {"app.kubernetes.io/name": NAME}
    plain = {(o["kind"], re.sub(r"-[a-z0-9]{10}$", "", o["metadata"]["name"])) for o in overlay(name)}
    for o in enabled(name):
        mine = (o["kind"], re.sub(r"-[a-z0-9]{10}$", "", o["metadata"]["name"])) not in plain
        assert matches({"matchLabels": label}, o["metadata"].get("labels", {})) == mine, o["metadata"]["name"]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_validate(with_component: tuple[dict, ...], version: str) -> None:
    import kubernetes_validate

    errors = []
    for obj in with_component:
        key = (obj["apiVersion"], obj["kind"])
        if key in CRD_SCHEMAS:
            jsonschema.validate(obj, CRD_SCHEMAS[key])
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {'.'.join(map(str, e.path))}: {e.message}")
    assert not errors, "\n".join(errors)


# --- its own Deployment and Service ---------------------------------------------------


def test_own_deployment_and_headless_service(with_component: tuple[dict, ...]) -> None:
    objs = with_component
    dep, live = one(objs, "Deployment", NAME), one(objs, "Deployment", "embedder")
    pods, live_pods = labels_of(objs, NAME), labels_of(objs, "embedder")
    assert dep["spec"]["selector"]["matchLabels"].items() <= pods.items()
    assert not matches(dep["spec"]["selector"], live_pods) and not matches(live["spec"]["selector"], pods)
    svc = one(objs, "Service", NAME)
    assert svc["spec"]["clusterIP"] == "None"  # client-side balancing, like the embedder's
    assert matches({"matchLabels": svc["spec"]["selector"]}, pods)
    assert not matches({"matchLabels": svc["spec"]["selector"]}, live_pods)
    # the live embedder's Service never sends search's query traffic to the candidate
    assert not matches({"matchLabels": one(objs, "Service", "embedder")["spec"]["selector"]}, pods)
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == {
        "grpc": GRPC_PORTS["embedder"], "metrics": METRICS_PORTS["embedder"]}
    c = container(dep, CONTAINER)
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {
        "grpc": GRPC_PORTS["embedder"], "metrics": METRICS_PORTS["embedder"]}
    assert c["command"] == container(live)["command"] and c["image"] == container(live)["image"]
    # neither autoscaler nor the live embedder's PDB touches it
    for so in of_kind(objs, "ScaledObject"):
        assert so["spec"]["scaleTargetRef"]["name"] != NAME
    for hpa in of_kind(objs, "HorizontalPodAutoscaler"):
        assert hpa["spec"]["scaleTargetRef"]["name"] != NAME
    assert dep["spec"]["replicas"] >= 1
    pdbs = [p for p in of_kind(objs, "PodDisruptionBudget") if matches(p["spec"]["selector"], pods)]
    assert [p["metadata"]["name"] for p in pdbs] == [NAME]


def test_candidate_pods_keep_the_invariants(with_component: tuple[dict, ...]) -> None:
    """The same pod hardening, probes and shutdown budget as every workload."""
    objs = with_component
    dep = one(objs, "Deployment", NAME)
    spec, c = pod_spec(dep), container(dep, CONTAINER)
    assert spec["automountServiceAccountToken"] is False and spec["enableServiceLinks"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["seccompProfile"]
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert "/tmp" in {m["mountPath"] for m in c["volumeMounts"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert probe in c
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][kind])
    env = configmap_for(objs, dep, CONTAINER)
    sleep = float(c["lifecycle"]["preStop"]["exec"]["command"][1])
    assert spec["terminationGracePeriodSeconds"] > float(env["EMBEDDER_SHUTDOWN_GRACE_S"]) + sleep
    keys = {t["topologyKey"] for t in spec["topologySpreadConstraints"]}
    assert {"topology.kubernetes.io/zone", "kubernetes.io/hostname"} <= keys
    assert all(matches(t["labelSelector"], labels_of(objs, NAME)) for t in spec["topologySpreadConstraints"])
    ru = dep["spec"]["strategy"]["rollingUpdate"]
    assert ru["maxUnavailable"] == 0 and ru["maxSurge"] >= 1  # a new model pod is Ready first
    for e in c.get("env", []):
        if re.search(r"KEY|TOKEN|PASSWORD|SECRET", e["name"]):
            assert "secretKeyRef" in e["valueFrom"]


def test_candidate_env_is_the_embedders_plus_the_new_model(with_component: tuple[dict, ...]) -> None:
    from test_deploy_settings import NOT_SETTINGS, field_exists, settings_class

    objs = with_component
    dep, live = one(objs, "Deployment", NAME), one(objs, "Deployment", "embedder")
    refs = [s["configMapRef"]["name"] for s in container(dep, CONTAINER)["envFrom"]]
    live_ref = container(live)["envFrom"][0]["configMapRef"]["name"]
    assert refs[0] == live_ref and refs[1].startswith(f"{NAME}-config")  # later wins
    env = container_env(objs, dep, CONTAINER)
    own = one(objs, "ConfigMap", refs[1])["data"]
    assert {"EMBEDDER_MODEL_ID", "EMBEDDER_BACKEND", "EMBEDDER_MODEL_DIR"} <= set(own)
    # the placeholder is unmistakable (the runbook's step 1 edits it)
    assert "CHANGE-ME" in own["EMBEDDER_MODEL_ID"] and "CHANGE-ME" in own["EMBEDDER_MODEL_DIR"]
    cls = settings_class("embedder")
    unknown = [n for n in env if n not in NOT_SETTINGS
               and not (n.startswith("EMBEDDER_") and field_exists(cls, n[len("EMBEDDER_"):].lower().split("__")))]
    assert not unknown


def test_embedder_settings_accept_the_candidates_env(
    with_component: tuple[dict, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_deploy_settings import settings_class

    env = container_env(with_component, one(with_component, "Deployment", NAME), CONTAINER)
    for name, value in env.items():
        if isinstance(value, str):
            monkeypatch.setenv(name, value)
    settings = settings_class("embedder")()
    assert settings.model_id == env["EMBEDDER_MODEL_ID"] and settings.grpc_port == GRPC_PORTS["embedder"]


# --- search finds it by model id --------------------------------------------------------


def test_search_maps_the_candidate_model_to_the_candidate_service(
    with_component: tuple[dict, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.search.settings import SearchSettings, parse_model_embedders

    objs = with_component
    search = one(objs, "Deployment", "search")
    env = container_env(objs, search)
    model_id = container_env(objs, one(objs, "Deployment", NAME), CONTAINER)["EMBEDDER_MODEL_ID"]
    targets = parse_model_embedders(env["SEARCH_MODEL_EMBEDDERS"])
    assert targets == {model_id: f"dns:///{NAME}:{GRPC_PORTS['embedder']}"}
    host, port = targets[model_id].removeprefix("dns:///").split(":")
    svc = one(objs, "Service", host)  # a Service of this namespace...
    assert int(port) in {p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc"}
    assert matches({"matchLabels": svc["spec"]["selector"]}, labels_of(objs, NAME))  # ...in front of it
    # the live model keeps its own embedder for queries
    assert env["SEARCH_EMBEDDER_TARGET"] == f"dns:///embedder:{GRPC_PORTS['embedder']}"
    for name, value in env.items():
        if isinstance(value, str):
            monkeypatch.setenv(name, value)
    assert SearchSettings().model_embedders == targets


def test_the_model_id_is_edited_in_one_place() -> None:
    """SEARCH_MODEL_EMBEDDERS takes its model id from candidate.env (kustomize replacements)."""
    component = K8S / "components" / COMPONENT
    k = yaml.safe_load((component / "kustomization.yaml").read_text())
    (rep,) = k["replacements"]
    assert rep["source"] == {"kind": "ConfigMap", "name": f"{NAME}-config", "fieldPath": "data.EMBEDDER_MODEL_ID"}
    (target,) = rep["targets"]
    assert target["select"]["name"] == "search-config"
    assert target["fieldPaths"] == ["data.SEARCH_MODEL_EMBEDDERS"]
    assert target["options"] == {"delimiter": "=", "index": 0}
    ids = [line for line in (component / "candidate.env").read_text().splitlines() if line.startswith("EMBEDDER_MODEL_ID=")]
    assert len(ids) == 1


# --- reachability and scraping ---------------------------------------------------------


def test_only_search_reaches_the_candidate(with_component: tuple[dict, ...]) -> None:
    objs = with_component
    pols, pods, port = of_kind(objs, "NetworkPolicy"), labels_of(objs, NAME), GRPC_PORTS["embedder"]
    assert allowed(pols, "Egress", labels_of(objs, "search"), Peer("mmsearch", pods), port)
    assert allowed(pols, "Ingress", pods, me(objs, "search"), port)
    assert not allowed(pols, "Ingress", pods, Peer("shop", labels_of(objs, "search")), port)  # an impostor
    for other in ("embedder", "captioner", "gateway"):
        assert not allowed(pols, "Ingress", pods, me(objs, other), port)
    assert not allowed(pols, "Ingress", pods, OTHER_APP, port)
    assert not allowed(pols, "Ingress", pods, PROMETHEUS, port)
    # and it reaches nothing but DNS (no Milvus, no public internet unless labelled)
    assert allowed(pols, "Egress", pods, Peer("kube-system", {"k8s-app": "kube-dns"}), 53, "UDP")
    assert not allowed(pols, "Egress", pods, Peer("milvus", {"app.kubernetes.io/name": "milvus"}), 19530)
    assert not allowed(pols, "Egress", pods, Peer(ip="47.88.1.1"), 443)
    # the live embedder's flows are unchanged
    assert allowed(pols, "Ingress", labels_of(objs, "embedder"), me(objs, "search"), port)


def test_scraped_like_the_live_embedder(with_component: tuple[dict, ...]) -> None:
    objs = with_component
    pods = labels_of(objs, NAME)
    services = [s for s in of_kind(objs, "Service")
                if matches({"matchLabels": s["spec"].get("selector", {})}, pods)
                and any(p["name"] == "metrics" for p in s["spec"]["ports"])]
    assert [s["metadata"]["name"] for s in services] == [NAME]  # scraped once
    monitors = [m for m in of_kind(objs, "ServiceMonitor") if matches(m["spec"]["selector"], services[0]["metadata"]["labels"])]
    assert [m["metadata"]["name"] for m in monitors] == [NAME]  # its own job: "embedder-candidate"
    live = one(objs, "ServiceMonitor", "embedder")
    assert monitors[0]["spec"]["endpoints"] == live["spec"]["endpoints"]
    # selected by the same Prometheus (base/kustomization.yaml's `release` knob)
    assert monitors[0]["metadata"]["labels"]["release"] == live["metadata"]["labels"]["release"]
    assert not matches(live["spec"]["selector"], services[0]["metadata"]["labels"])
    pols = of_kind(objs, "NetworkPolicy")
    assert allowed(pols, "Ingress", pods, PROMETHEUS, METRICS_PORTS["embedder"])
    assert not allowed(pols, "Ingress", pods, OTHER_APP, METRICS_PORTS["embedder"])
    # the live embedder's autoscaler reads job="embedder" only: the candidate's backfill
    # queue never scales the live GPUs
    for so in of_kind(objs, "ScaledObject"):
        for t in so["spec"]["triggers"]:
            assert 'job="embedder"' in t["metadata"]["query"]


# --- production shape ------------------------------------------------------------------


def test_production_candidate_is_shaped_like_the_gpu_embedder() -> None:
    objs = enabled(PROD)
    dep, live = one(objs, "Deployment", NAME), one(objs, "Deployment", "embedder")
    c, lc = container(dep, CONTAINER), container(live)
    assert c["image"] == lc["image"] and "mmsearch-gpu" in c["image"]
    assert c["resources"] == lc["resources"] and c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod_spec(dep)["nodeSelector"] == pod_spec(live)["nodeSelector"]
    assert pod_spec(dep)["tolerations"] == pod_spec(live)["tolerations"]
    assert pod_spec(dep)["terminationGracePeriodSeconds"] == pod_spec(live)["terminationGracePeriodSeconds"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe] == lc[probe]  # TLS exec probes, 10 minutes to load the model
    assert "--tls" in c["readinessProbe"]["exec"]["command"]
    # the new model's weights come from the same read-only models volume
    env = container_env(objs, dep, CONTAINER)
    mount = next(m for m in c["volumeMounts"] if env["EMBEDDER_MODEL_DIR"].startswith(m["mountPath"] + "/"))
    assert mount["readOnly"] is True
    vol = next(v for v in pod_spec(dep)["volumes"] if v["name"] == mount["name"])
    assert vol["persistentVolumeClaim"] == next(
        v for v in pod_spec(live)["volumes"] if v["name"] == mount["name"])["persistentVolumeClaim"]
    assert env["EMBEDDER_DEVICE"] == "cuda"


def test_production_candidate_serves_mtls_with_its_own_certificate() -> None:
    objs = enabled(PROD)
    dep = one(objs, "Deployment", NAME)
    c, env = container(dep, CONTAINER), configmap_for(objs, dep, CONTAINER)
    mount = next(m for m in c["volumeMounts"] if m["name"] == "tls")
    assert mount["readOnly"] is True
    secret = next(v for v in pod_spec(dep)["volumes"] if v["name"] == "tls")["secret"]["secretName"]
    assert secret == f"mmsearch-{NAME}-tls"
    for key in ("TLS__CERT_FILE", "TLS__KEY_FILE", "TLS__CLIENT_CA_FILE"):
        assert env[f"EMBEDDER_{key}"].startswith(mount["mountPath"] + "/")
    # search dials it by the Service name: the example certificate carries that name
    certs = [d for d in yaml.safe_load_all((K8S / "examples" / "certificates.example.yaml").read_text())
             if d and d["kind"] == "Certificate" and d["spec"]["secretName"] == secret]
    assert len(certs) == 1 and NAME in certs[0]["spec"]["dnsNames"] and "localhost" in certs[0]["spec"]["dnsNames"]
    assert configmap_for(objs, one(objs, "Deployment", "search"))["SEARCH_UPSTREAM_TLS__ENABLED"] == "true"


def test_enabling_it_leaves_the_rest_of_production_unchanged() -> None:
    def strip(objs: tuple[dict, ...]) -> dict:
        out = {}
        for o in objs:
            if o["metadata"]["name"].startswith(NAME) or o["metadata"]["name"] == "search-egress-to-embedder-candidate":
                continue
            text = re.sub(r"(search-config|embedder-config|[a-z-]+-config)-[a-z0-9]{10}\b", r"\1", yaml.safe_dump(o))
            out[(o["kind"], re.sub(r"-[a-z0-9]{10}$", "", o["metadata"]["name"]))] = yaml.safe_load(text)
        return out

    before, after = strip(overlay(PROD)), strip(enabled(PROD))
    assert before.keys() == after.keys()
    changed = [k for k in before if before[k] != after[k]]
    assert changed == [("ConfigMap", "search-config")]  # + SEARCH_MODEL_EMBEDDERS, nothing else
    extra = set(after[changed[0]]["data"].items()) - set(before[changed[0]]["data"].items())
    assert {k for k, _ in extra} == {"SEARCH_MODEL_EMBEDDERS"}


# --- the original store ----------------------------------------------------------------


def _minio_service() -> tuple[str, str, int]:
    """(Service name, namespace, port) of the MinIO that the Milvus release of
    milvus/values.yaml runs, by the MinIO subchart's own naming (minio.fullname)."""
    values = yaml.safe_load(MILVUS_VALUES.read_text())
    m = re.search(r"helm upgrade --install (\S+) zilliztech/milvus -n (\S+)", MILVUS_VALUES.read_text())
    assert m, "milvus/values.yaml names its release and namespace"
    release, namespace = m.groups()
    chart = yaml.safe_load((CHART / "values.yaml").read_text())["minio"]
    sub = yaml.safe_load((CHART / "minio-8.0.17-values.yaml").read_text())
    minio = {**sub, **chart, **values["minio"]}
    if minio.get("fullnameOverride"):
        name = minio["fullnameOverride"]
    else:
        chart_name = minio.get("nameOverride") or "minio"
        name = release if chart_name in release else f"{release}-{chart_name}"
    port = (values["minio"].get("service") or {}).get("port") or chart["service"]["port"]
    return name, namespace, int(port)


def test_original_store_is_the_milvus_releases_minio() -> None:
    objs = overlay(PROD)
    env = container_env(objs, one(objs, "Deployment", "search"))
    name, namespace, port = _minio_service()
    assert (name, namespace, port) == ("milvus-minio", "milvus", 9000)
    url = urlsplit(env["SEARCH_ORIGINALS__S3_ENDPOINT"])
    assert url.scheme == "http"  # the chart's MinIO serves plain HTTP (minio.tls.enabled off)
    assert url.hostname in (f"{name}.{namespace}", f"{name}.{namespace}.svc", f"{name}.{namespace}.svc.cluster.local")
    assert url.port == port
    # its own bucket, made by the chart's bucket job; never Milvus' own bucket
    buckets = [b["name"] for b in yaml.safe_load(MILVUS_VALUES.read_text())["minio"].get("buckets", [])]
    assert env["SEARCH_ORIGINALS__S3_BUCKET"] in buckets
    assert env["SEARCH_ORIGINALS__S3_BUCKET"] != yaml.safe_load(MILVUS_VALUES.read_text())["minio"]["bucketName"]
    assert env["SEARCH_ORIGINALS__S3_PREFIX"].endswith("/")


def test_original_store_credentials_come_from_a_secret() -> None:
    objs = overlay(PROD)
    c = container(one(objs, "Deployment", "search"))
    env = {e["name"]: e for e in c["env"]}
    for key, secret_key in (("SEARCH_ORIGINALS__S3_ACCESS_KEY", "access-key"), ("SEARCH_ORIGINALS__S3_SECRET_KEY", "secret-key")):
        assert "value" not in env[key]
        ref = env[key]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "mmsearch-originals", "key": secret_key, "optional": False}
    for cm in of_kind(objs, "ConfigMap"):
        assert not [k for k in cm.get("data", {}) if k.startswith("SEARCH_ORIGINALS__S3_") and k.endswith("_KEY")]
    # the example Secret documents the same name and keys (no real values)
    example = next(d for d in yaml.safe_load_all((K8S / "examples" / "secrets.example.yaml").read_text())
                   if d and d["metadata"]["name"] == "mmsearch-originals")
    assert set(example["stringData"]) == {"access-key", "secret-key"}
    assert all(v.startswith("<") for v in example["stringData"].values())


def test_search_reaches_the_original_store_and_nothing_else_does() -> None:
    objs = overlay(PROD)
    pols = of_kind(objs, "NetworkPolicy")
    _, namespace, port = _minio_service()
    minio = Peer(namespace, {"app": "minio", "release": "milvus"})
    assert allowed(pols, "Egress", labels_of(objs, "search"), minio, port)
    assert not allowed(pols, "Egress", labels_of(objs, "search"), minio, 9001)  # no console
    assert not allowed(pols, "Egress", labels_of(objs, "search"), Peer("shop", {"app": "minio", "release": "milvus"}), port)
    for other in ("embedder", "captioner", "gateway"):
        assert not allowed(pols, "Egress", labels_of(objs, other), minio, port)


def test_settings_accept_the_original_store(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.search.settings import SearchSettings

    objs = overlay(PROD)
    env = container_env(objs, one(objs, "Deployment", "search"))
    for name, value in env.items():
        if isinstance(value, str):
            monkeypatch.setenv(name, value)
    monkeypatch.setenv("SEARCH_ORIGINALS__S3_ACCESS_KEY", "a")  # from the Secret in the cluster
    monkeypatch.setenv("SEARCH_ORIGINALS__S3_SECRET_KEY", "b")
    originals = SearchSettings().originals
    assert originals.enabled and originals.dir is None
    assert originals.s3_endpoint == env["SEARCH_ORIGINALS__S3_ENDPOINT"]


def test_dev_keeps_no_originals_in_object_storage() -> None:
    """Milvus standalone (dev) runs no MinIO: the dev overlay leaves the store unset."""
    objs = overlay("dev")
    env = container_env(objs, one(objs, "Deployment", "search"))
    assert not [k for k in env if k.startswith("SEARCH_ORIGINALS__")]
