"""mTLS client identities mapped to a tenant and scopes by the token file, like tokens:
a real search service requiring client certificates, with SEARCH_AUTH_TOKEN_FILE."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest
from prometheus_client import REGISTRY

from mmsearch.search.v1 import search_pb2, search_pb2_grpc
from services.common.settings import TlsSettings
from services.common.tokens import hash_token
from tests.conftest import MilvusLiteServer
from tests.search.conftest import start_embedder, start_search
from tests.security.certs import make_pki

pytestmark = pytest.mark.asyncio


def creds(ca: Path, cert: Path, key: Path) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=ca.read_bytes(), private_key=key.read_bytes(),
                                        certificate_chain=cert.read_bytes())


async def test_a_client_certificate_maps_to_its_tenant_and_scopes(tmp_path: Path,
                                                                  milvus_server: MilvusLiteServer) -> None:
    pki = make_pki(tmp_path / "pki")
    token_file = tmp_path / "tokens.json"
    # The test client certificate's CN is "search": read-only in tenant "alpha".
    token_file.write_text(json.dumps({
        "clients": [{"name": "reader-cert", "identity": "search", "tenant": "alpha", "scopes": ["search"]}],
        "tokens": [{"name": "writer", "sha256": hash_token("w-token"), "tenant": "alpha", "scopes": ["delete"]}],
    }))
    embedder = await start_embedder()
    search = await start_search(
        milvus_server.uri, embedder.address, "127.0.0.1:1", collection="scoped_mtls", auth_token_file=token_file,
        tls=TlsSettings(cert_file=pki.server.cert, key_file=pki.server.key, client_ca_file=pki.ca))
    try:
        channel = grpc.aio.secure_channel(f"localhost:{search.port}", creds(pki.ca, pki.client.cert, pki.client.key))
        async with channel:
            stub = search_pb2_grpc.SearchStub(channel)
            labels = {"tenant": "alpha", "grpc_method": "Stats"}
            before = REGISTRY.get_sample_value("mmsearch_tenant_calls_total", labels)
            stats = await stub.Stats(search_pb2.StatsRequest(), timeout=30)  # the certificate alone is enough
            assert stats.item_count == 0
            # SEARCH_TENANT_METRICS is off here: no per-tenant series moves.
            assert REGISTRY.get_sample_value("mmsearch_tenant_calls_total", labels) == before
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Delete(search_pb2.DeleteRequest(ids=["x"]), timeout=30)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED and "'delete'" in info.value.details()
            # A bearer token, when given, decides (and must be valid).
            reply = await stub.Delete(search_pb2.DeleteRequest(ids=["x"]), timeout=30,
                                      metadata=(("authorization", "Bearer w-token"),))
            assert reply.deleted_count == 0
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Stats(search_pb2.StatsRequest(), timeout=30,
                                 metadata=(("authorization", "Bearer not-a-token"),))
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # The file no longer maps the certificate: it is refused within about a second.
        token_file.write_text(json.dumps({"clients": []}))
        channel = grpc.aio.secure_channel(f"localhost:{search.port}", creds(pki.ca, pki.client.cert, pki.client.key))
        async with channel:
            stub = search_pb2_grpc.SearchStub(channel)
            for _ in range(30):
                try:
                    await stub.Stats(search_pb2.StatsRequest(), timeout=30)
                except grpc.aio.AioRpcError as e:
                    assert e.code() == grpc.StatusCode.UNAUTHENTICATED
                    break
                await asyncio.sleep(0.2)
            else:
                pytest.fail("the unmapped certificate still works after 6 s")
    finally:
        await search.stop(0.2)
        await embedder.stop(0.2)
