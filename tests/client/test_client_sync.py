"""SearchClient against an in-memory Search server on loopback (real gRPC)."""
from __future__ import annotations

import datetime
import io
import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from PIL import Image

from mmsearch.client import (
    Fusion,
    IngestItem,
    ItemStatus,
    SearchClient,
    SearchError,
    Target,
    check_health,
    retry_service_config,
)
from mmsearch.client._channel import ConnectionConfig
from mmsearch.client._convert import build_search_request, image_to_proto
from mmsearch.search.v1 import search_pb2
from tests.client.search_double import RunningDouble, start_double
from tests.conftest import png_bytes


@pytest.fixture
def double() -> Iterator[RunningDouble]:
    running = start_double()
    yield running
    running.stop()


@pytest.fixture
def client(double: RunningDouble) -> Iterator[SearchClient]:
    with SearchClient(double.address, timeout=5.0) as c:
        yield c


def _write_png(path: Path, color: tuple[int, int, int]) -> Path:
    path.write_bytes(png_bytes(color=color))
    return path


def test_service_config_is_a_retry_policy_on_unavailable() -> None:
    config = json.loads(retry_service_config(4))
    policy = config["methodConfig"][0]["retryPolicy"]
    assert policy["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert policy["maxAttempts"] == 4
    assert json.loads(retry_service_config(9))["methodConfig"][0]["retryPolicy"]["maxAttempts"] == 5
    assert "retryPolicy" not in json.loads(retry_service_config(1))["methodConfig"][0]
    assert "loadBalancingConfig" not in config
    # The services' own channels (search -> embedder / captioner) add round-robin.
    assert json.loads(retry_service_config(4, round_robin=True))["loadBalancingConfig"] == [{"round_robin": {}}]


def test_image_inputs(tmp_path: Path) -> None:
    path = _write_png(tmp_path / "a.png", (1, 2, 3))
    msg, uri = image_to_proto(path)
    assert msg.data == path.read_bytes() and uri == path.resolve().as_uri()
    msg, uri = image_to_proto(str(path))
    assert msg.data and uri.startswith("file://")
    msg, uri = image_to_proto("file:///srv/images/x.jpg")
    assert msg.uri == "file:///srv/images/x.jpg" and uri == ""
    msg, _ = image_to_proto(b"\x89PNG...")
    assert msg.data == b"\x89PNG..."
    msg, _ = image_to_proto(Image.new("RGB", (4, 4)))
    assert Image.open(io.BytesIO(msg.data)).size == (4, 4)
    with pytest.raises(TypeError):
        image_to_proto(42)  # type: ignore[arg-type]


def test_search_request_shapes(tmp_path: Path) -> None:
    path = _write_png(tmp_path / "a.png", (1, 2, 3))
    r = build_search_request("a cat", target="caption", top_k=3, offset=2, filter='metadata["label"] == "cat"')
    assert r.query.text == "a cat" and r.target == search_pb2.TARGET_CAPTION and r.top_k == 3 and r.offset == 2
    r = build_search_request(image=path, instruction="in black", target=Target.IMAGE)
    assert r.query.composed.instruction == "in black" and r.query.composed.image.data
    r = build_search_request(image=path, target="hybrid", fusion="weighted")
    assert r.query.image.data and r.fusion.method == search_pb2.FUSION_METHOD_WEIGHTED
    r = build_search_request("x", target="hybrid", fusion=Fusion(rrf_k=10))
    assert r.fusion.method == search_pb2.FUSION_METHOD_RRF and r.fusion.rrf_k == 10
    r = build_search_request(vector=[0.5, 0.5])
    assert list(r.query_vector.values) == [0.5, 0.5] and not r.HasField("query")
    for bad in ({}, {"text": "a", "image": b"x"}, {"text": "a", "instruction": "b"}):
        with pytest.raises(ValueError):
            build_search_request(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown target"):
        build_search_request("a", target="pixels")


def test_ingest_search_get_delete_stats(client: SearchClient, double: RunningDouble, tmp_path: Path) -> None:
    cat = _write_png(tmp_path / "cat.png", (200, 120, 40))
    items = [
        IngestItem(image=cat, id="cat", metadata={"label": "cat"}, caption="a tabby cat"),
        IngestItem(image=png_bytes(color=(0, 0, 0)), metadata={"label": "coffee"}, caption="a cup of coffee"),
        IngestItem(image=tmp_path / "missing.png", id="gone"),  # fails locally, the call goes on
        IngestItem(image=b"not an image", id="broken"),  # fails on the server
    ]
    updates = []
    summary = client.ingest_all(items, chunk_size=2, on_update=updates.append)
    assert [o.index for o in summary.outcomes] == [0, 1, 2, 3]
    assert [o.status for o in summary.outcomes] == [ItemStatus.STORED, ItemStatus.STORED, ItemStatus.FAILED, ItemStatus.FAILED]
    assert summary.outcomes[2].local and "file not found" in summary.outcomes[2].error_message
    assert summary.outcomes[3].error_code is grpc.StatusCode.INVALID_ARGUMENT and not summary.outcomes[3].local
    assert (summary.stored, summary.unchanged, summary.failed) == (2, 0, 2)
    assert summary.progress.received == 4 and summary.progress.done == 4
    assert double.servicer.knobs.ingest_chunks == [2, 1]
    assert updates and updates[-1].progress == summary.progress
    # the stored uri of a local path is its file URI
    assert double.servicer.items["cat"].uri == cat.resolve().as_uri()

    # idempotent re-run: unchanged
    again = client.ingest_all(items[:2])
    assert [o.status for o in again.outcomes] == [ItemStatus.UNCHANGED, ItemStatus.UNCHANGED]

    result = client.search(text="cat", top_k=1)
    assert len(result) == 1 and result[0].id == "cat" and result[0].rank == 1
    assert result[0].metadata == {"label": "cat"} and result.target is Target.IMAGE
    assert result.timings.total_ms == pytest.approx(3.5)
    page2 = client.search_text("cat", top_k=1, offset=1, target="caption")
    assert page2[0].rank == 2 and page2.target is Target.CAPTION
    assert client.search_image(cat, top_k=5).hits
    assert client.search_composed(cat, "coffee", top_k=1)[0].metadata["label"] == "coffee"

    got = client.get(["cat", "nope"])
    assert [r.id for r in got.records] == ["cat"] and got.missing_ids == ["nope"]
    assert got.records[0].caption == "a tabby cat"
    assert client.stats().item_count == 2
    assert client.delete(["cat", "nope"]) == 1
    assert client.stats().item_count == 1


def test_errors_carry_status_codes(client: SearchClient) -> None:
    with pytest.raises(SearchError) as err:
        client.search(text="x", top_k=0)
    assert err.value.code is grpc.StatusCode.INVALID_ARGUMENT and "top_k" in err.value.details
    assert err.value.method == "Search"


def test_retries_unavailable_with_grpc_policy(client: SearchClient, double: RunningDouble) -> None:
    double.servicer.knobs.unavailable_calls = 2
    assert client.stats().collection == "test"
    assert double.servicer.knobs.calls["Stats"] == 3


def test_gives_up_after_max_attempts(double: RunningDouble) -> None:
    double.servicer.knobs.unavailable_calls = 10
    with SearchClient(double.address, retry_attempts=2) as c, pytest.raises(SearchError) as err:
        c.stats()
    assert err.value.code is grpc.StatusCode.UNAVAILABLE
    assert double.servicer.knobs.calls["Stats"] == 2


def test_default_deadline_and_per_call_override(double: RunningDouble) -> None:
    double.servicer.knobs.delay_s = 0.5
    with SearchClient(double.address, timeout=0.1) as c:
        with pytest.raises(SearchError) as err:
            c.stats()
        assert err.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
        assert c.stats(timeout=5.0).item_count == 0


def test_bearer_token_on_plaintext_channel(double: RunningDouble) -> None:
    double.servicer.knobs.token = "s3cret"
    with SearchClient(double.address) as anonymous, pytest.raises(SearchError) as err:
        anonymous.stats()
    assert err.value.code is grpc.StatusCode.UNAUTHENTICATED
    with SearchClient(double.address, token="s3cret") as c:
        assert c.stats().item_count == 0


def test_unreachable_server_is_unavailable_and_health_fails() -> None:
    with SearchClient("127.0.0.1:1", timeout=1.0, retry_attempts=1) as c:
        with pytest.raises(SearchError) as err:
            c.stats()
        assert err.value.code is grpc.StatusCode.UNAVAILABLE
        with pytest.raises(TimeoutError):
            c.wait_until_ready(timeout=0.5)


def test_health(client: SearchClient, double: RunningDouble) -> None:
    assert client.health() == "SERVING"
    assert client.health("mmsearch.search.v1.Search") == "SERVING"
    assert client.health("no.such.Service") == "SERVICE_UNKNOWN"
    assert check_health(ConnectionConfig(double.address)) == "SERVING"
    client.wait_until_ready(timeout=2)


def test_breaking_off_an_ingest_cancels_it(client: SearchClient) -> None:
    items = (IngestItem(image=png_bytes(color=(i, i, i))) for i in range(50))
    for update in client.ingest(items, chunk_size=1):
        assert update.outcomes
        break  # the generator's finally cancels the call; nothing hangs


# ---------------------------------------------------------------------------- TLS


def _cert(subject: str, issuer_key: ec.EllipticCurvePrivateKey | None = None, issuer: x509.Name | None = None,
          ca: bool = False, san: str | None = None) -> tuple[bytes, bytes, ec.EllipticCurvePrivateKey, x509.Name]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False)
    cert = builder.sign(issuer_key or key, hashes.SHA256())
    pem_key = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), pem_key, key, name


def test_mtls_with_token(tmp_path: Path) -> None:
    ca_pem, _, ca_key, ca_name = _cert("test-ca", ca=True)
    srv_pem, srv_key, _, _ = _cert("search.local", ca_key, ca_name, san="search.local")
    cli_pem, cli_key, _, _ = _cert("backend", ca_key, ca_name)
    (tmp_path / "ca.pem").write_bytes(ca_pem)
    creds = grpc.ssl_server_credentials([(srv_key, srv_pem)], root_certificates=ca_pem, require_client_auth=True)
    running = start_double(creds)
    running.servicer.knobs.token = "tok"
    try:
        with SearchClient(
            running.address,
            root_cert=tmp_path / "ca.pem",
            client_cert=cli_pem,
            client_key=cli_key,
            server_name="search.local",
            token="tok",
        ) as c:
            assert c.stats().collection == "test"
            assert running.servicer.knobs.last_metadata["authorization"] == "Bearer tok"
        # without a client certificate the handshake fails
        with SearchClient(running.address, root_cert=ca_pem, server_name="search.local", timeout=2, retry_attempts=1) as c:
            with pytest.raises(SearchError) as err:
                c.stats()
            assert err.value.code is grpc.StatusCode.UNAVAILABLE
    finally:
        running.stop()


def test_mtls_needs_both_cert_and_key() -> None:
    with pytest.raises(ValueError, match="both"):
        ConnectionConfig("x:1", client_cert=b"x").credentials()
