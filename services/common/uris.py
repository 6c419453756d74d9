"""URI intake: read `file://` inside a root and `http(s)://` to public hosts only.

Every path that takes a URI (ingest, search by image URI, captioner, embedder) goes
through `UriFetcher.fetch`, so traversal and SSRF protections live in one place.
Known limit: the address check happens before connecting, so a DNS answer that changes
between our check and httpx's own lookup (rebinding) is not caught; run the services
with egress rules (deploy/k8s NetworkPolicy) as the second fence.
"""
from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import time
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

import httpx

from services.common.errors import InvalidInput, Unavailable
from services.common.settings import UriSettings

_REDIRECTS = {301, 302, 303, 307, 308}


class UriFetcher:
    """Fetches image bytes by URI under the configured limits."""

    def __init__(self, settings: UriSettings, max_bytes: int) -> None:
        self._settings = settings
        self._max_bytes = max_bytes
        self._allowed = [ipaddress.ip_network(n, strict=False) for n in settings.http_allowed_networks]
        self._client: httpx.AsyncClient | None = None

    async def fetch(self, uri: str) -> bytes:
        scheme = urlsplit(uri).scheme.lower()
        if scheme == "file":
            return await asyncio.to_thread(self._read_file, uri)
        if scheme in ("http", "https"):
            if not self._settings.allow_http:
                raise InvalidInput(f"remote URIs are disabled on this server: {uri!r}")
            return await self._fetch_http(uri)
        raise InvalidInput(f"unsupported URI scheme {scheme!r} in {uri!r} (use file:// or http(s)://)")

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    # --- file:// -------------------------------------------------------------------

    def resolve_file(self, uri: str) -> Path:
        """The real path a file URI names, guaranteed to be inside the root."""
        root = self._settings.file_root
        if root is None:
            raise InvalidInput("file:// URIs are disabled on this server (no file root configured)")
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise InvalidInput(f"file URI must not name a host: {uri!r}")
        raw = unquote(parts.path)
        if "\x00" in raw:
            raise InvalidInput("file URI contains a NUL byte")
        if ".." in Path(raw).parts:
            raise InvalidInput(f"file URI must not contain '..' segments: {uri!r}")
        real_root = Path(os.path.realpath(root))
        target = Path(raw) if os.path.isabs(raw) else real_root / raw
        real = Path(os.path.realpath(target))  # follows symlinks: an escape shows here
        if real != real_root and real_root not in real.parents:
            raise InvalidInput(f"file URI resolves outside the allowed root: {uri!r}")
        return real

    def _read_file(self, uri: str) -> bytes:
        path = self.resolve_file(uri)
        try:
            size = path.stat().st_size
            if not path.is_file():
                raise InvalidInput(f"file URI is not a regular file: {uri!r}")
            if size > self._max_bytes:
                raise InvalidInput(f"file is {size} bytes, more than the limit of {self._max_bytes} bytes: {uri!r}")
            return path.read_bytes()
        except FileNotFoundError:
            raise InvalidInput(f"file not found: {uri!r}") from None
        except PermissionError:
            raise InvalidInput(f"file is not readable: {uri!r}") from None

    # --- http(s):// ------------------------------------------------------------------

    async def _check_host(self, url: str) -> None:
        parts = urlsplit(url)
        host = parts.hostname
        if not host:
            raise InvalidInput(f"URI has no host: {url!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            raise InvalidInput(f"cannot resolve host {host!r}: {e.strerror}") from None
        for info in infos:
            address = ipaddress.ip_address(info[4][0])
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
                address = address.ipv4_mapped
            if any(address in net for net in self._allowed):
                continue
            if not address.is_global or address.is_multicast:
                raise InvalidInput(f"URI host {host!r} resolves to a non-public address ({address}); refused")

    async def _fetch_http(self, uri: str) -> bytes:
        """One fetch under three bounds, all INVALID_ARGUMENT naming their setting: the
        remote host is the caller's choice, and UNAVAILABLE would tell callers that this
        service is down and a retry is safe."""
        s = self._settings
        try:
            async with asyncio.timeout(s.http_total_budget_s):
                return await self._fetch_hops(uri, time.monotonic())
        except TimeoutError:
            raise InvalidInput(
                f"fetching {uri!r} took longer than the total budget of {s.http_total_budget_s} s "
                "(URIS__HTTP_TOTAL_BUDGET_S)"
            ) from None

    def _check_rate(self, uri: str, received: int, started: float) -> None:
        s = self._settings
        elapsed = time.monotonic() - started
        if elapsed > s.http_min_rate_grace_s and received < s.http_min_bytes_per_s * elapsed:
            raise InvalidInput(
                f"fetching {uri!r} was slower than the minimum transfer rate of {s.http_min_bytes_per_s} bytes/s "
                f"(URIS__HTTP_MIN_BYTES_PER_S): {received} bytes in {elapsed:.1f} s"
            )

    async def _fetch_hops(self, uri: str, started: float) -> bytes:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self._settings.http_timeout_s, follow_redirects=False)
        url = uri
        for _hop in range(self._settings.max_redirects + 1):
            await self._check_host(url)
            try:
                async with self._client.stream("GET", url) as response:
                    if response.status_code in _REDIRECTS and "location" in response.headers:
                        url = urljoin(url, response.headers["location"])
                        if urlsplit(url).scheme not in ("http", "https"):
                            raise InvalidInput(f"redirect to unsupported scheme refused: {url!r}")
                        continue
                    if response.status_code != 200:
                        raise InvalidInput(f"fetching {uri!r} returned HTTP {response.status_code}")
                    declared = int(response.headers.get("content-length") or 0)
                    if declared > self._max_bytes:
                        raise InvalidInput(f"remote image is {declared} bytes, more than the limit of {self._max_bytes}")
                    body = bytearray()
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) > self._max_bytes:
                            raise InvalidInput(f"remote image exceeds the limit of {self._max_bytes} bytes")
                        self._check_rate(uri, len(body), started)
                    return bytes(body)
            except httpx.TimeoutException:
                raise InvalidInput(
                    f"fetching {uri!r} timed out: nothing received for {self._settings.http_timeout_s} s "
                    "(URIS__HTTP_TIMEOUT_S)"
                ) from None
            except httpx.HTTPError as e:
                raise Unavailable(f"fetching {uri!r} failed: {type(e).__name__}") from None
        raise InvalidInput(f"too many redirects (> {self._settings.max_redirects}) for {uri!r}")
