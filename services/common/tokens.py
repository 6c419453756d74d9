"""Scoped bearer tokens (and mTLS client identities) from a file, re-read on change.

The file (`<PREFIX>AUTH_TOKEN_FILE`, YAML or JSON; a Kubernetes Secret mounted as a file
works as is) holds token *hashes*, never tokens::

    tokens:
      - name: shop-reader            # shown in the audit log instead of the token
        sha256: 9f86d081884c7d65...  # hex SHA-256 of the token: python -m services.common.tokens hash
        tenant: shop
        scopes: [search]             # search | ingest | delete | admin
    clients:                         # mTLS client certificates (needs TLS__CLIENT_CA_FILE)
      - name: shop-ingest-job
        identity: ingest.shop.internal   # the certificate's subject CN or one of its SANs
        tenant: shop
        scopes: [ingest]

The file is checked at most once a second (inode, mtime, size, as the TLS files are, so
Kubernetes' atomic symlink swap is seen): a token added or removed works or stops working
within about a second, without a restart. A file that does not parse keeps the previous
configuration (and logs why); a missing file means no file tokens (fail closed).

Plaintext tokens from `<PREFIX>AUTH_TOKENS` keep working beside the file: default tenant,
every scope, as before tenants existed.
"""
from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import secrets
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.common.log import get_logger
from services.common.principal import ALL_SCOPES, DEFAULT_TENANT, SCOPES, Principal, check_tenant
from services.common.security import files_stamp

log = get_logger(__name__)

_HEX = set("0123456789abcdef")


def hash_token(token: str | bytes) -> str:
    raw = token.encode() if isinstance(token, str) else token
    return hashlib.sha256(raw).hexdigest()


def short_identity(token: str | bytes) -> str:
    """An audit-safe name for an unnamed token: a prefix of its hash."""
    return "sha256:" + hash_token(token)[:12]


@dataclass(frozen=True)
class TokenConfig:
    by_hash: dict[str, Principal]
    by_identity: dict[str, Principal]


def _principal(entry: Any, where: str, default_name: str) -> Principal:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(entry).__name__}")  # noqa: TRY004 - a bad file
    tenant = check_tenant(str(entry.get("tenant") or DEFAULT_TENANT))
    scopes = entry.get("scopes")
    if isinstance(scopes, str):
        scopes = [s.strip() for s in scopes.split(",") if s.strip()]
    if not scopes or not isinstance(scopes, list):
        raise ValueError(f"{where}: scopes must be a non-empty list of {', '.join(SCOPES)}")
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown:
        raise ValueError(f"{where}: unknown scope(s) {unknown}; use {', '.join(SCOPES)}")
    return Principal(tenant, frozenset(scopes), str(entry.get("name") or default_name))


def parse_token_file(text: str) -> TokenConfig:
    """The file's tokens and client identities; ValueError says what is wrong."""
    try:
        data = json.loads(text) if text.lstrip().startswith("{") else _yaml(text)
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - yaml's own errors
        raise ValueError(f"not valid YAML or JSON: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError("the token file must be a mapping with `tokens` and/or `clients`")  # noqa: TRY004
    by_hash: dict[str, Principal] = {}
    for i, entry in enumerate(data.get("tokens") or []):
        digest = str((entry or {}).get("sha256", "")).strip().lower() if isinstance(entry, dict) else ""
        if len(digest) != 64 or not set(digest) <= _HEX:
            raise ValueError(f"tokens[{i}]: sha256 must be 64 hex characters (the SHA-256 of the token, never the "
                             "token itself)")
        by_hash[digest] = _principal(entry, f"tokens[{i}]", "sha256:" + digest[:12])
    by_identity: dict[str, Principal] = {}
    for i, entry in enumerate(data.get("clients") or []):
        identity = str((entry or {}).get("identity", "")).strip() if isinstance(entry, dict) else ""
        if not identity:
            raise ValueError(f"clients[{i}]: identity (certificate subject CN or SAN) is empty")
        by_identity[identity] = _principal(entry, f"clients[{i}]", identity)
    return TokenConfig(by_hash, by_identity)


def _yaml(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


class TokenRegistry:
    """Resolves a bearer token or a client certificate identity to a `Principal`."""

    def __init__(self, path: Path | None, plaintext_tokens: Sequence[str] = (), min_check_interval_s: float = 1.0):
        self.path = path
        self.min_check_interval_s = min_check_interval_s
        self._plain = [(t.encode(), Principal(DEFAULT_TENANT, ALL_SCOPES, short_identity(t))) for t in plaintext_tokens]
        self._lock = threading.Lock()
        self._checked = time.monotonic()
        self._stamp = files_stamp([path])
        self.reloads = 0
        # A broken file at start-up is a configuration error: fail loudly.
        self._config = self._read() if path is not None else TokenConfig({}, {})

    def _read(self) -> TokenConfig:
        assert self.path is not None
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            log.warning("token file is missing: no file token is accepted", path=str(self.path))
            return TokenConfig({}, {})
        return parse_token_file(text)

    def _refresh(self) -> None:
        if self.path is None:
            return
        now = time.monotonic()
        with self._lock:
            if now - self._checked < self.min_check_interval_s:
                return
            self._checked = now
            stamp = files_stamp([self.path])
            if stamp == self._stamp:
                return
            try:
                config = self._read()
            except (OSError, ValueError) as e:  # mid-write or a bad edit: keep what works
                log.warning("token file not reloaded; keeping the previous tokens", path=str(self.path), error=str(e))
                return
            self._stamp, self._config = stamp, config
            self.reloads += 1
            log.info("token file reloaded", path=str(self.path), tokens=len(config.by_hash),
                     clients=len(config.by_identity), reloads=self.reloads)

    def for_token(self, token: bytes) -> Principal | None:
        self._refresh()
        found: Principal | None = None
        # Plaintext tokens: compare against every one so timing does not tell which matched.
        for expected, principal in self._plain:
            if hmac.compare_digest(token, expected):
                found = principal
        if found is not None:
            return found
        # A dictionary lookup by SHA-256: its timing reveals nothing usable about a token.
        return self._config.by_hash.get(hash_token(token))

    def for_identities(self, identities: Iterable[str]) -> Principal | None:
        self._refresh()
        for identity in identities:
            principal = self._config.by_identity.get(identity)
            if principal is not None:
                return principal
        return None

    @property
    def has_clients(self) -> bool:
        self._refresh()
        return bool(self._config.by_identity)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.common.tokens",
                                     description="Hash bearer tokens for the token file (SEARCH_AUTH_TOKEN_FILE).")
    sub = parser.add_subparsers(dest="command", required=True)
    h = sub.add_parser("hash", help="print the SHA-256 hex of a token (read from stdin when not given)")
    h.add_argument("token", nargs="?")
    sub.add_parser("new", help="print a new random token and, on the next line, its SHA-256 hex")
    args = parser.parse_args(argv)
    if args.command == "new":
        token = secrets.token_urlsafe(32)
        print(token)
        print(hash_token(token))
        return 0
    token = args.token if args.token is not None else sys.stdin.readline().rstrip("\r\n")
    if not token:
        parser.error("empty token")
    print(hash_token(token))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
