"""Every variable the manifests set is a real setting of its service, and the services'
settings classes accept the values: a typo (EMBEDDER_MAX_BATCH_SIZE) or a renamed field
would otherwise be ignored silently (the settings use extra="ignore")."""
from __future__ import annotations

import importlib
import typing

import pytest
from k8s_helpers import ENV_PREFIX, OVERLAYS, SERVICES, container_env, kubectl, one, overlay
from pydantic import BaseModel

pytestmark = pytest.mark.skipif(kubectl() is None, reason="kubectl (with built-in kustomize) is not installed")

# Variables read by libraries, not by the settings classes.
NOT_SETTINGS = {"OMP_NUM_THREADS"}


def settings_class(service: str) -> type[BaseModel]:
    try:
        mod = importlib.import_module(f"services.{service}.settings")
    except ModuleNotFoundError:
        pytest.skip(f"services/{service}/settings.py does not exist yet")
    return next(
        v for k, v in vars(mod).items()
        if isinstance(v, type) and k.endswith("Settings") and k.lower().startswith(service) and issubclass(v, BaseModel)
    )


def _model_of(annotation: typing.Any) -> type[BaseModel] | None:
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def field_exists(model: type[BaseModel], path: list[str]) -> bool:
    head, *rest = path
    info = model.model_fields.get(head)
    if info is None:
        return False
    if not rest:
        return True
    nested = _model_of(info.annotation)
    return nested is not None and field_exists(nested, rest)


@pytest.mark.parametrize("overlay_name", OVERLAYS)
@pytest.mark.parametrize("service", SERVICES)
def test_every_variable_is_a_setting(overlay_name: str, service: str) -> None:
    cls = settings_class(service)
    objs = overlay(overlay_name)
    env = container_env(objs, one(objs, "Deployment", service))
    prefix = ENV_PREFIX[service]
    unknown = []
    for name in env:
        if name in NOT_SETTINGS:
            continue
        assert name.startswith(prefix), f"{name} lacks the {prefix} prefix"
        if not field_exists(cls, name[len(prefix):].lower().split("__")):
            unknown.append(name)
    assert not unknown, f"not settings of {cls.__name__}: {unknown}"


@pytest.mark.parametrize("overlay_name", OVERLAYS)
@pytest.mark.parametrize("service", SERVICES)
def test_settings_accept_the_configmap(overlay_name: str, service: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cls = settings_class(service)
    objs = overlay(overlay_name)
    env = container_env(objs, one(objs, "Deployment", service))
    for name, value in env.items():
        if isinstance(value, str):  # secrets (valueFrom) are not available here
            monkeypatch.setenv(name, value)
    settings = cls()
    assert settings.grpc_port == int(env[f"{ENV_PREFIX[service]}GRPC_PORT"])
