"""Who is calling: the caller's tenant, scopes and identity, for the current call.

The auth interceptor (services/common/interceptors.py, `ScopedAuthInterceptor`) resolves
the caller and sets it here for the duration of one call; domain code (the Milvus store,
the servicers) reads it with `current()`. No gRPC here: the store is testable alone, and
outside any call (or with auth off) the caller is the default tenant with every scope, as
every deployment was before tenants existed.
"""
from __future__ import annotations

import contextvars
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

DEFAULT_TENANT = "default"
# `search`: Search, SearchAll, Get, Stats. `ingest`: Ingest, Backfill. `delete`: Delete.
# `admin`: every scope (and any future administrative RPC).
SCOPES = ("search", "ingest", "delete", "admin")
ALL_SCOPES = frozenset(SCOPES)
# Tenant names are short and safe inside a Milvus string literal and a composite key.
TENANT_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


@dataclass(frozen=True)
class Principal:
    tenant: str
    scopes: frozenset[str]
    # What the audit log shows: a configured name or "sha256:<first 12 hex>", never a token.
    identity: str

    def allows(self, scope: str) -> bool:
        return scope in self.scopes or "admin" in self.scopes


DEFAULT_PRINCIPAL = Principal(DEFAULT_TENANT, ALL_SCOPES, "anonymous")

_current: contextvars.ContextVar[Principal] = contextvars.ContextVar("mmsearch_principal", default=DEFAULT_PRINCIPAL)


def current() -> Principal:
    return _current.get()


def set_current(principal: Principal) -> contextvars.Token[Principal]:
    return _current.set(principal)


def reset(token: contextvars.Token[Principal]) -> None:
    _current.reset(token)


@contextmanager
def acting_as(principal: Principal) -> Iterator[Principal]:
    """Runs a block as `principal` (tests, tools)."""
    token = _current.set(principal)
    try:
        yield principal
    finally:
        _current.reset(token)


def check_tenant(name: str) -> str:
    if not TENANT_PATTERN.fullmatch(name):
        raise ValueError(f"tenant {name[:80]!r} is invalid: 1 to 64 characters of [A-Za-z0-9_-], starting with a "
                         "letter or digit")
    return name
