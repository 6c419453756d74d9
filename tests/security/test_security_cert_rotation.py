"""Live certificate rotation (issue 14): renewed certificate files are used without a restart.

Files are laid out as Kubernetes mounts a Secret (`tls.crt -> ..data/tls.crt`, `..data ->
..<version>`) and rotated the way the kubelet does it: a new version folder, then an atomic
swap of the `..data` symlink. The renewed certificates come from a *new* CA, so which
certificate a handshake used is visible from the client: a client trusting only the new CA
connects only to a rotated server, a client trusting only the old one no longer connects.
- a running TLS server (the shared runtime, a real grpc.aio server on loopback): new
  connections get the new certificate, a call in flight on an old connection completes, the
  expiry gauge moves to the new certificate's notAfter;
- search's upstream channel (mTLS client): when its CA / certificate / key files change, new
  calls go over a new channel that uses them; the client expiry gauge moves too.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import os
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from prometheus_client import REGISTRY

from mmsearch.captioner.v1 import captioner_pb2, captioner_pb2_grpc
from mmsearch.common.v1 import types_pb2
from services.common.errors import Unavailable
from services.common.server import start_server
from services.common.settings import ClientTlsSettings, TlsSettings
from services.search.settings import SearchSettings
from services.search.upstreams import CaptionerClient
from tests.common.runtime_app import RuntimeTestSettings, make_app
from tests.conftest import png_bytes
from tests.security.certs import Pki, make_pki

GAUGE = "mmsearch_tls_certificate_expiry_timestamp_seconds"


def not_after(path: Path) -> float:
    return x509.load_pem_x509_certificate(path.read_bytes()).not_valid_after_utc.timestamp()


def mount(folder: Path, version: str, files: dict[str, Path]) -> None:
    """Writes `files` as a new Secret version and swaps `..data` to it (atomically)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / version).mkdir()
    for name, src in files.items():
        (folder / version / name).write_bytes(src.read_bytes())
        link = folder / name
        if not link.is_symlink():
            link.symlink_to(Path("..data") / name)
    tmp = folder / "..data_tmp"
    tmp.symlink_to(version)
    os.replace(tmp, folder / "..data")


def mounted(pki: Pki, pair: str = "server") -> dict[str, Path]:
    p = getattr(pki, pair)
    return {"tls.crt": p.cert, "tls.key": p.key, "ca.crt": pki.ca}


async def caption(address: str, ca: Path, timeout_s: float = 5, hold_ms: int = 0) -> str:
    creds = grpc.ssl_channel_credentials(root_certificates=ca.read_bytes())
    async with grpc.aio.secure_channel(address, creds, options=[("grpc.ssl_target_name_override", "localhost")]) as ch:
        reply = await captioner_pb2_grpc.CaptionerStub(ch).Caption(
            captioner_pb2.CaptionRequest(image=types_pb2.Image(data=png_bytes()), max_words=hold_ms), timeout=timeout_s)
        return reply.caption.description


async def test_a_running_server_serves_renewed_certificate_files(tmp_path: Path) -> None:
    old, new = make_pki(tmp_path / "old"), make_pki(tmp_path / "new", days=30)
    tls_dir = tmp_path / "secret"
    mount(tls_dir, "..v1", mounted(old))
    settings = RuntimeTestSettings(host="127.0.0.1", grpc_port=0, metrics_port=-1,
                                   tls=TlsSettings(cert_file=tls_dir / "tls.crt", key_file=tls_dir / "tls.key"))
    running = await start_server(settings, make_app(settings))
    address = f"127.0.0.1:{running.port}"
    labels = {"role": "server", "file": str(tls_dir / "tls.crt")}
    try:
        assert await caption(address, old.ca) == "32x24 PNG"
        assert REGISTRY.get_sample_value(GAUGE, labels) == not_after(old.server.cert)

        # A call in flight on an old connection while the files change under the server.
        creds = grpc.ssl_channel_credentials(root_certificates=old.ca.read_bytes())
        async with grpc.aio.secure_channel(address, creds,
                                           options=[("grpc.ssl_target_name_override", "localhost")]) as held:
            in_flight = asyncio.ensure_future(captioner_pb2_grpc.CaptionerStub(held).Caption(
                captioner_pb2.CaptionRequest(image=types_pb2.Image(data=png_bytes()), max_words=2500), timeout=15))
            await asyncio.sleep(0.5)
            assert not in_flight.done()
            mount(tls_dir, "..v2", mounted(new))
            await asyncio.sleep(1.1)  # the server looks at the files at most once a second

            # New connections get the new certificate ...
            assert await caption(address, new.ca) == "32x24 PNG"
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await caption(address, old.ca)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            # ... the call in flight is unaffected ...
            assert (await in_flight).caption.description == "32x24 PNG"
        # ... and the expiry gauge follows the certificate in use.
        assert REGISTRY.get_sample_value(GAUGE, labels) == not_after(new.server.cert)
        assert not_after(new.server.cert) != not_after(old.server.cert)
    finally:
        await running.stop(0)


async def test_a_half_written_pair_keeps_the_current_certificate(tmp_path: Path) -> None:
    old, new = make_pki(tmp_path / "old"), make_pki(tmp_path / "new", days=30)
    tls_dir = tmp_path / "secret"
    mount(tls_dir, "..v1", mounted(old))
    settings = RuntimeTestSettings(host="127.0.0.1", grpc_port=0, metrics_port=-1,
                                   tls=TlsSettings(cert_file=tls_dir / "tls.crt", key_file=tls_dir / "tls.key"))
    running = await start_server(settings, make_app(settings))
    address = f"127.0.0.1:{running.port}"
    try:
        # The new certificate with the old key (a non-atomic copy caught half-way).
        mount(tls_dir, "..v2", {"tls.crt": new.server.cert, "tls.key": old.server.key, "ca.crt": new.ca})
        await asyncio.sleep(1.1)
        assert await caption(address, old.ca) == "32x24 PNG", "the old pair is still served"
        mount(tls_dir, "..v3", mounted(new))
        await asyncio.sleep(1.1)
        assert await caption(address, new.ca) == "32x24 PNG"
    finally:
        await running.stop(0)


async def test_search_upstream_channel_picks_up_renewed_client_files(tmp_path: Path) -> None:
    old, new = make_pki(tmp_path / "old"), make_pki(tmp_path / "new", days=30)
    server_dir, client_dir = tmp_path / "server-secret", tmp_path / "client-secret"
    mount(server_dir, "..v1", mounted(old))
    mount(client_dir, "..v1", mounted(old, "client"))
    # The upstream requires client certificates (mTLS) from the CA in its own secret.
    server_tls = TlsSettings(cert_file=server_dir / "tls.crt", key_file=server_dir / "tls.key",
                             client_ca_file=server_dir / "ca.crt")
    settings = RuntimeTestSettings(host="127.0.0.1", grpc_port=0, metrics_port=-1, tls=server_tls)
    running = await start_server(settings, make_app(settings))
    upstream_tls = ClientTlsSettings(enabled=True, ca_file=client_dir / "ca.crt", cert_file=client_dir / "tls.crt",
                                     key_file=client_dir / "tls.key", server_name_override="localhost")
    client = CaptionerClient(SearchSettings(captioner_target=f"127.0.0.1:{running.port}", upstream_tls=upstream_tls,
                                            upstream_attempts=1, upstream_timeout_s=5))
    labels = {"role": "client", "file": str(client_dir / "tls.crt")}
    try:
        assert (await client.caption(png_bytes())).description == "32x24 PNG"
        assert REGISTRY.get_sample_value(GAUGE, labels) == not_after(old.client.cert)
        assert not client.reload_tls(), "nothing changed: the channel stays"

        held = asyncio.ensure_future(client._stub.Caption(  # in flight on the old channel
            captioner_pb2.CaptionRequest(image=types_pb2.Image(data=png_bytes()), max_words=2000), timeout=15))
        await asyncio.sleep(0.3)
        mount(server_dir, "..v2", mounted(new))  # both sides renewed, from a new CA
        mount(client_dir, "..v2", mounted(new, "client"))
        await asyncio.sleep(1.1)
        assert client.reload_tls(), "renewed files: a new channel"
        # A new connection with the old client files would now fail the handshake ...
        stale = CaptionerClient(SearchSettings(
            captioner_target=f"127.0.0.1:{running.port}", upstream_attempts=1, upstream_timeout_s=3,
            upstream_tls=ClientTlsSettings(enabled=True, ca_file=old.ca, cert_file=old.client.cert,
                                           key_file=old.client.key, server_name_override="localhost")))
        with pytest.raises(Unavailable):
            await stale.caption(png_bytes())
        await stale.close()
        # ... the reloaded one works, the held call finishes on its old connection.
        assert (await client.caption(png_bytes())).description == "32x24 PNG"
        assert (await held).caption.description == "32x24 PNG"
        assert REGISTRY.get_sample_value(GAUGE, labels) == not_after(new.client.cert)
    finally:
        await client.close()
        await running.stop(0)


def test_expiry_gauge_is_in_unix_seconds(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    from services.common.security import certificate_expiry

    expiry = certificate_expiry(pki.server.cert.read_bytes())
    assert expiry is not None
    left = expiry - dt.datetime.now(dt.UTC).timestamp()
    assert 0 < left <= 86400 + 60  # the test PKI's certificates live one day


async def test_the_search_service_reloads_its_upstream_files_by_itself(tmp_path: Path) -> None:
    """Wired into the running service: search notices renewed upstream files within about a
    second (its health loop) and keeps reaching its (also renewed) mTLS captioner."""
    from services.search.app import SearchService

    old, new = make_pki(tmp_path / "old"), make_pki(tmp_path / "new", days=30)
    server_dir, client_dir = tmp_path / "server-secret", tmp_path / "client-secret"
    mount(server_dir, "..v1", mounted(old))
    mount(client_dir, "..v1", mounted(old, "client"))
    upstream_settings = RuntimeTestSettings(host="127.0.0.1", grpc_port=0, metrics_port=-1, tls=TlsSettings(
        cert_file=server_dir / "tls.crt", key_file=server_dir / "tls.key", client_ca_file=server_dir / "ca.crt"))
    upstream = await start_server(upstream_settings, make_app(upstream_settings))
    settings = SearchSettings(
        host="127.0.0.1", grpc_port=0, metrics_port=-1, milvus_uri=str(tmp_path / "milvus.db"),
        embedder_target="127.0.0.1:1", captioner_target=f"127.0.0.1:{upstream.port}", embedder_start_wait_s=0,
        upstream_tls=ClientTlsSettings(enabled=True, ca_file=client_dir / "ca.crt", cert_file=client_dir / "tls.crt",
                                       key_file=client_dir / "tls.key", server_name_override="localhost"))
    service = SearchService(settings)
    search = await start_server(settings, service.app())
    labels = {"role": "client", "file": str(client_dir / "tls.crt")}

    async def until(predicate: object, within_s: float) -> float:
        start = asyncio.get_running_loop().time()
        while not predicate():  # type: ignore[operator]
            assert asyncio.get_running_loop().time() - start < within_s
            await asyncio.sleep(0.05)
        return asyncio.get_running_loop().time() - start

    try:
        await until(lambda: service.catalog.captioner_health is True, 5)
        mount(server_dir, "..v2", mounted(new))
        mount(client_dir, "..v2", mounted(new, "client"))
        took = await until(lambda: REGISTRY.get_sample_value(GAUGE, labels) == not_after(new.client.cert), 5)
        print(f"search reloaded its upstream TLS files {took:.2f} s after they changed")
        # Its probes now run over the new channel, through a handshake with the new files.
        await asyncio.sleep(1.5)
        assert service.captioner._rc.generation == 1
        assert service.catalog.captioner_health is True
    finally:
        await search.stop(0)
        await upstream.stop(0)
