"""Search dials Milvus over TLS from SEARCH_MILVUS_TLS__* (a Milvus proxy with
common.security.tlsMode 1 or 2). The server here is a real gRPC TLS server on loopback
standing in for the Milvus proxy: it records who called over which channel and answers
UNIMPLEMENTED, so the TLS handshake, the CA check and the client certificate are the
real ones pymilvus and grpc perform."""
from __future__ import annotations

from concurrent import futures
from pathlib import Path

import grpc
import pytest
from pydantic import ValidationError

from services.search.milvus_store import MilvusStore, milvus_tls_kwargs
from services.search.settings import SearchSettings
from tests.conftest import free_port
from tests.security.certs import Pki, make_pki


class _Recorder(grpc.GenericRpcHandler):
    def __init__(self) -> None:
        self.calls: list[tuple[str, list[bytes]]] = []

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = handler_call_details.method

        def answer(request: bytes, context: grpc.ServicerContext) -> bytes:
            self.calls.append((method, list(context.peer_identities() or [])))
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "stand-in for the Milvus proxy")

        return grpc.unary_unary_rpc_method_handler(answer)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("milvus-pki"))


def _serve(pki: Pki, require_client_cert: bool) -> tuple[grpc.Server, _Recorder, int]:
    recorder = _Recorder()
    server = grpc.server(futures.ThreadPoolExecutor(4), handlers=[recorder])
    creds = grpc.ssl_server_credentials(
        [(pki.server.key.read_bytes(), pki.server.cert.read_bytes())],
        root_certificates=pki.ca.read_bytes() if require_client_cert else None,
        require_client_auth=require_client_cert,
    )
    port = server.add_secure_port(f"127.0.0.1:{free_port()}", creds)
    server.start()
    return server, recorder, port


def _dial(settings: SearchSettings) -> None:
    store = MilvusStore(settings)
    try:
        store._get_client()
    except Exception:  # noqa: BLE001, S110 - the stand-in answers UNIMPLEMENTED: who got through matters
        pass
    finally:
        store._drop_client()


def _settings(port: int, scheme: str = "https", **tls: object) -> SearchSettings:
    return SearchSettings(milvus_uri=f"{scheme}://localhost:{port}", milvus_timeout_s=3,
                          milvus_tls={k: v for k, v in tls.items()})


def test_one_way_tls_verifies_the_server_with_the_given_ca(pki: Pki) -> None:
    server, recorder, port = _serve(pki, require_client_cert=False)
    try:
        _dial(_settings(port, ca_file=pki.ca))
        assert recorder.calls, "pymilvus never reached the TLS server"
        assert all(ids == [] for _m, ids in recorder.calls)  # no client certificate in tlsMode 1
        recorder.calls.clear()
        _dial(_settings(port, ca_file=pki.other_ca))  # a server another CA signed is refused
        assert recorder.calls == []
        _dial(_settings(port, scheme="http"))  # TLS off: a plaintext client never gets a call through
        assert recorder.calls == []
        _dial(_settings(port, scheme="http", enabled=True, ca_file=pki.ca))  # `enabled` with http://
        assert recorder.calls
    finally:
        server.stop(None)


def test_mutual_tls_presents_the_client_certificate(pki: Pki) -> None:
    server, recorder, port = _serve(pki, require_client_cert=True)
    try:
        _dial(_settings(port, ca_file=pki.ca))  # no client certificate: refused at the handshake
        assert recorder.calls == []
        _dial(_settings(port, ca_file=pki.ca, cert_file=pki.other_client.cert, key_file=pki.other_client.key))
        assert recorder.calls == []  # a certificate from another CA: refused too
        _dial(_settings(port, ca_file=pki.ca, cert_file=pki.client.cert, key_file=pki.client.key))
        assert recorder.calls
        identities = {i for _m, ids in recorder.calls for i in ids}
        assert identities, "the server saw no client certificate"
    finally:
        server.stop(None)


def test_arguments_and_incomplete_settings(pki: Pki, tmp_path: Path) -> None:
    assert milvus_tls_kwargs(SearchSettings(milvus_uri="http://milvus:19530")) == {}
    assert milvus_tls_kwargs(SearchSettings(milvus_uri="https://milvus:19530")) == {"secure": True}
    assert milvus_tls_kwargs(SearchSettings(
        milvus_uri="http://milvus:19530",
        milvus_tls={"enabled": True, "ca_file": pki.ca, "server_name_override": "milvus.milvus.svc"},
    )) == {"secure": True, "server_pem_path": str(pki.ca), "server_name": "milvus.milvus.svc"}
    with pytest.raises(ValidationError, match="go together"):
        SearchSettings(milvus_tls={"enabled": True, "cert_file": pki.client.cert})
    with pytest.raises(ValidationError, match="needs SEARCH_MILVUS_TLS__CA_FILE"):
        SearchSettings(milvus_tls={"enabled": True, "cert_file": pki.client.cert, "key_file": pki.client.key})


def test_environment_names(monkeypatch: pytest.MonkeyPatch, pki: Pki) -> None:
    monkeypatch.setenv("SEARCH_MILVUS_TLS__ENABLED", "true")
    monkeypatch.setenv("SEARCH_MILVUS_TLS__CA_FILE", str(pki.ca))
    monkeypatch.setenv("SEARCH_MILVUS_DB_NAME", "mmsearch")
    s = SearchSettings()
    assert s.milvus_tls.enabled and s.milvus_tls.ca_file == pki.ca and s.milvus_db_name == "mmsearch"
