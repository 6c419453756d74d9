"""TLS on every service, mTLS from search to embedder and captioner, bearer tokens on the
public API — all through settings, with certificates made at test time.

The suite here: embedder and captioner (lite) require client certificates signed by the
test CA; search serves TLS, requires a bearer token, and dials both upstreams with its
client certificate. Every refusal is checked on the wire (real handshakes on loopback).
"""
from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from pydantic import SecretStr

from mmsearch.captioner.v1 import captioner_pb2, captioner_pb2_grpc
from mmsearch.client import AsyncSearchClient, SearchError
from mmsearch.common.v1 import types_pb2
from mmsearch.embedder.v1 import embedder_pb2, embedder_pb2_grpc
from mmsearch.search.v1 import search_pb2, search_pb2_grpc
from services.common.channels import create_channel
from services.common.server import RunningServer
from services.common.settings import ClientTlsSettings, TlsSettings
from tests.conftest import MilvusLiteServer
from tests.reliability.helpers import (
    distinct_images,
    ingest_all,
    items_of,
    start_captioner,
    start_embedder,
    start_search,
)
from tests.security.certs import Pki, make_pki

pytestmark = pytest.mark.asyncio(loop_scope="module")
TOKEN = "tok-9f8e7d6c5b4a-primary"
TOKEN_2 = "tok-rotated-2nd-0123456789"
AUTH = (("authorization", f"Bearer {TOKEN}"),)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def suite(pki: Pki, milvus_server: MilvusLiteServer) -> AsyncIterator[dict[str, RunningServer]]:
    mtls = TlsSettings(cert_file=pki.server.cert, key_file=pki.server.key, client_ca_file=pki.ca)
    embedder = await start_embedder(tls=mtls)
    captioner = await start_captioner(tls=mtls)
    search = await start_search(
        milvus_server.uri, f"localhost:{embedder.port}", f"127.0.0.1:{captioner.port}", collection="tls",
        metrics_port=0,
        tls=TlsSettings(cert_file=pki.server.cert, key_file=pki.server.key),
        auth_tokens=[SecretStr(TOKEN), SecretStr(TOKEN_2)],
        upstream_tls=ClientTlsSettings(enabled=True, ca_file=pki.ca, cert_file=pki.client.cert,
                                       key_file=pki.client.key),
    )
    # The same search, but requiring client certificates too (for the client library's mTLS).
    search_mtls = await start_search(
        milvus_server.uri, f"localhost:{embedder.port}", f"127.0.0.1:{captioner.port}", collection="tls",
        tls=mtls, auth_tokens=[SecretStr(TOKEN)],
        upstream_tls=ClientTlsSettings(enabled=True, ca_file=pki.ca, cert_file=pki.client.cert,
                                       key_file=pki.client.key),
    )
    yield {"embedder": embedder, "captioner": captioner, "search": search, "search_mtls": search_mtls}
    for server in (search_mtls, search, captioner, embedder):
        await server.stop(0.2)


def creds(ca: Path | None, client: tuple[Path, Path] | None = None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes() if ca else None,
        private_key=client[1].read_bytes() if client else None,
        certificate_chain=client[0].read_bytes() if client else None,
    )


async def info_code(address: str, credentials: grpc.ChannelCredentials | None, service: str) -> grpc.StatusCode:
    """The status of a cheap call (OK when it went through)."""
    channel = (grpc.aio.secure_channel(address, credentials) if credentials
               else grpc.aio.insecure_channel(address))
    async with channel:
        try:
            if service == "embedder":
                await embedder_pb2_grpc.EmbedderStub(channel).Info(embedder_pb2.InfoRequest(), timeout=5)
            elif service == "captioner":
                await captioner_pb2_grpc.CaptionerStub(channel).Info(captioner_pb2.InfoRequest(), timeout=5)
            else:
                await search_pb2_grpc.SearchStub(channel).Stats(search_pb2.StatsRequest(), timeout=5, metadata=AUTH)
        except grpc.aio.AioRpcError as e:
            return e.code()
    return grpc.StatusCode.OK


async def test_ingest_and_search_over_tls_with_mtls_upstreams(suite: dict[str, RunningServer], pki: Pki) -> None:
    """The whole data path is encrypted: client -TLS-> search -mTLS-> embedder / captioner."""
    async with grpc.aio.secure_channel(suite["search"].address, creds(pki.ca)) as channel:
        stub = search_pb2_grpc.SearchStub(channel)
        run = await ingest_all(stub, items_of(distinct_images(3, seed=11)), metadata=AUTH)
        assert len(run.stored) == 3, {i: o.error.message for i, o in run.failed.items()}
        reply = await stub.Search(search_pb2.SearchRequest(query=types_pb2.Content(text="a colourful pattern"),
                                                           top_k=3), metadata=AUTH, timeout=30)
        assert len(reply.hits) == 3
        # The second configured token works too (rotation: old and new accepted at once).
        stats = await stub.Stats(search_pb2.StatsRequest(), metadata=(("authorization", f"Bearer {TOKEN_2}"),))
        assert stats.item_count >= 3


async def test_client_library_over_tls_and_mtls_with_a_token(suite: dict[str, RunningServer], pki: Pki) -> None:
    """AsyncSearchClient's TLS options against the real search service: server TLS, then mTLS
    (with `server_name` overriding the name it checks); the wrong CA or no client
    certificate fails at the handshake."""
    tls_address = f"localhost:{suite['search'].port}"
    async with AsyncSearchClient(tls_address, root_cert=pki.ca, token=TOKEN, timeout=30) as client:
        assert (await client.stats()).dimension > 0
        assert await client.health() == "SERVING"
    async with AsyncSearchClient(tls_address, root_cert=pki.other_ca, token=TOKEN, timeout=5,
                                 retry_attempts=1) as client:
        with pytest.raises(SearchError) as err:
            await client.stats()
        assert err.value.code is grpc.StatusCode.UNAVAILABLE

    mtls_address = f"127.0.0.1:{suite['search_mtls'].port}"
    async with AsyncSearchClient(mtls_address, root_cert=pki.ca, client_cert=pki.client.cert,
                                 client_key=pki.client.key.read_bytes(), server_name="localhost", token=TOKEN,
                                 timeout=30) as client:
        assert (await client.stats()).dimension > 0
    async with AsyncSearchClient(mtls_address, root_cert=pki.ca, server_name="localhost", token=TOKEN, timeout=5,
                                 retry_attempts=1) as client:
        with pytest.raises(SearchError) as err:
            await client.stats()
        assert err.value.code is grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("service", ["search", "embedder", "captioner"])
async def test_every_service_refuses_plaintext_and_untrusted_certificates(
        suite: dict[str, RunningServer], pki: Pki, service: str) -> None:
    address = f"localhost:{suite[service].port}"
    # The right client (trusts the CA; client cert for the mTLS services) gets through.
    good = creds(pki.ca, (pki.client.cert, pki.client.key) if service != "search" else None)
    assert await info_code(address, good, service) == grpc.StatusCode.OK
    # Plaintext against a TLS port: the handshake fails.
    assert await info_code(address, None, service) == grpc.StatusCode.UNAVAILABLE
    # A client that trusts another CA does not accept the server's certificate.
    assert await info_code(address, creds(pki.other_ca), service) == grpc.StatusCode.UNAVAILABLE
    assert await info_code(address, creds(pki.other_ca, (pki.client.cert, pki.client.key)), service) == \
        grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("service", ["embedder", "captioner"])
async def test_mtls_upstreams_refuse_clients_without_a_trusted_certificate(
        suite: dict[str, RunningServer], pki: Pki, service: str) -> None:
    address = f"localhost:{suite[service].port}"
    # Trusts the server, but presents no certificate: refused.
    assert await info_code(address, creds(pki.ca), service) == grpc.StatusCode.UNAVAILABLE
    # Presents a certificate from an unrelated CA: refused.
    assert await info_code(address, creds(pki.ca, (pki.other_client.cert, pki.other_client.key)), service) == \
        grpc.StatusCode.UNAVAILABLE


async def test_search_upstream_channel_settings(suite: dict[str, RunningServer], pki: Pki) -> None:
    """The channel search builds from SEARCH_UPSTREAM_TLS__*: works with the client cert,
    fails without it, and refuses a server whose certificate another CA signed."""
    target = f"127.0.0.1:{suite['embedder'].port}"

    async def call(tls: ClientTlsSettings, address: str = target) -> grpc.StatusCode:
        channel = create_channel(address, tls, retry_attempts=1)
        try:
            await embedder_pb2_grpc.EmbedderStub(channel).Info(embedder_pb2.InfoRequest(), timeout=5)
        except grpc.aio.AioRpcError as e:
            return e.code()
        finally:
            await channel.close()
        return grpc.StatusCode.OK

    full = ClientTlsSettings(enabled=True, ca_file=pki.ca, cert_file=pki.client.cert, key_file=pki.client.key)
    assert await call(full) == grpc.StatusCode.OK
    assert await call(ClientTlsSettings(enabled=True, ca_file=pki.ca)) == grpc.StatusCode.UNAVAILABLE
    assert await call(ClientTlsSettings()) == grpc.StatusCode.UNAVAILABLE  # plaintext
    impostor = await start_embedder(tls=TlsSettings(cert_file=pki.other_server.cert, key_file=pki.other_server.key))
    try:
        assert await call(full, f"127.0.0.1:{impostor.port}") == grpc.StatusCode.UNAVAILABLE
    finally:
        await impostor.stop(0)


@pytest.mark.parametrize("metadata", [
    None,
    (("authorization", "Bearer wrong-token"),),
    (("authorization", f"Basic {TOKEN}"),),
    (("authorization", TOKEN),),  # no scheme
    (("authorization", f"Bearer {TOKEN}x"),),
    (("authorization", f"Bearer {TOKEN[:-1]}"),),
    (("x-api-key", TOKEN),),
], ids=["missing", "wrong", "basic-scheme", "no-scheme", "longer", "prefix", "other-header"])
async def test_every_search_rpc_needs_the_bearer_token(suite: dict[str, RunningServer], pki: Pki,
                                                       metadata: tuple[tuple[str, str], ...] | None) -> None:
    async with grpc.aio.secure_channel(suite["search"].address, creds(pki.ca)) as channel:
        stub = search_pb2_grpc.SearchStub(channel)
        before = (await stub.Stats(search_pb2.StatsRequest(), metadata=AUTH)).item_count
        calls = {
            "Search": stub.Search(search_pb2.SearchRequest(query=types_pb2.Content(text="x"), top_k=1),
                                  metadata=metadata, timeout=10),
            "Get": stub.Get(search_pb2.GetRequest(ids=["a"]), metadata=metadata, timeout=10),
            "Delete": stub.Delete(search_pb2.DeleteRequest(ids=["a"]), metadata=metadata, timeout=10),
            "Stats": stub.Stats(search_pb2.StatsRequest(), metadata=metadata, timeout=10),
        }
        for name, call in calls.items():
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
            assert "bearer token" in (err.value.details() or "")
            assert TOKEN not in (err.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in stub.Ingest(iter([search_pb2.IngestRequest(items=items_of(distinct_images(2, seed=12)))]),
                                       metadata=metadata, timeout=10):
                pass
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert (await stub.Stats(search_pb2.StatsRequest(), metadata=AUTH)).item_count == before, "nothing stored"


async def test_probes_and_tooling_need_no_token(suite: dict[str, RunningServer], pki: Pki) -> None:
    search = suite["search"]
    async with grpc.aio.secure_channel(search.address, creds(pki.ca)) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "mmsearch.search.v1.Search", "liveness"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, name
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = [r async for r in reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)]
        names = {s.name for s in replies[0].list_services_response.service}
        assert "mmsearch.search.v1.Search" in names
    assert search.metrics_port
    url = f"http://127.0.0.1:{search.metrics_port}/metrics"
    body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    assert "grpc_server_handled_total" in body
    assert TOKEN not in body and TOKEN_2 not in body


async def test_tokens_come_from_one_comma_separated_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """As a Kubernetes secret mounts them: SEARCH_AUTH_TOKENS=a,b; never shown in repr."""
    from services.search.settings import SearchSettings

    monkeypatch.setenv("SEARCH_AUTH_TOKENS", f"{TOKEN}, {TOKEN_2}")
    settings = SearchSettings()
    assert [t.get_secret_value() for t in settings.auth_tokens] == [TOKEN, TOKEN_2]
    assert TOKEN not in repr(settings) and TOKEN not in str(settings.model_dump())
