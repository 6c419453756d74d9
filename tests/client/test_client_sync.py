"""SearchClient: request building and conversion alone; every call against the real suite
(real search, embedder and captioner processes, Milvus Lite; `real_suite` in
tests/conftest.py); retries and deadlines against a server that fails on demand."""
from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
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
from mmsearch.client._convert import IngestTracker, build_search_request, image_to_proto
from mmsearch.search.v1 import search_pb2
from services.lite_models.sample_photos import load_sample_photos
from tests.client.fault_server import FaultServer
from tests.conftest import RealSuite, png_bytes

# Searches are limited to this module's own items: the suite is shared with other tests.
MINE = 'id like "client-sync-%"'


@pytest.fixture
def faults() -> Iterator[FaultServer]:
    server = FaultServer()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(real_suite: RealSuite) -> Iterator[SearchClient]:
    with SearchClient(real_suite.address, timeout=60.0, token=real_suite.token) as c:
        yield c


def write_photo(path: Path, name: str) -> Path:
    load_sample_photos([name])[0].image.convert("RGB").save(path, format="JPEG", quality=92)
    return path


def _write_png(path: Path, color: tuple[int, int, int]) -> Path:
    path.write_bytes(png_bytes(color=color))
    return path


def test_service_config_is_a_retry_policy_on_unavailable_and_cancelled() -> None:
    config = json.loads(retry_service_config(4))
    policy = config["methodConfig"][0]["retryPolicy"]
    assert policy["retryableStatusCodes"] == ["UNAVAILABLE", "CANCELLED"]
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


def test_ingest_is_sent_in_chunks_around_local_failures(tmp_path: Path) -> None:
    items = [png_bytes(color=(1, 1, 1)), png_bytes(color=(2, 2, 2)), IngestItem(image=tmp_path / "missing.png"),
             png_bytes(color=(3, 3, 3))]
    tracker = IngestTracker(2, 8 << 20)
    assert [len(r.items) for r in tracker.requests(items)] == [2, 1]


def test_ingest_search_get_delete_stats(client: SearchClient, tmp_path: Path) -> None:
    cat = write_photo(tmp_path / "cat.jpg", "cat")
    coffee = io.BytesIO()
    load_sample_photos(["coffee"])[0].image.convert("RGB").save(coffee, format="JPEG", quality=92)
    items = [
        IngestItem(image=cat, id="client-sync-cat", metadata={"label": "cat"}),
        IngestItem(image=coffee.getvalue(), id="client-sync-coffee", metadata={"label": "coffee"},
                   caption="a cup of espresso on a saucer"),
        IngestItem(image=tmp_path / "missing.png", id="client-sync-gone"),  # fails locally, the call goes on
        IngestItem(image=b"not an image", id="client-sync-broken"),  # fails on the server
    ]
    before = client.stats().item_count
    updates = []
    summary = client.ingest_all(items, chunk_size=2, on_update=updates.append)
    assert [o.index for o in summary.outcomes] == [0, 1, 2, 3]
    assert [o.status for o in summary.outcomes] == [ItemStatus.STORED, ItemStatus.STORED, ItemStatus.FAILED, ItemStatus.FAILED]
    assert summary.outcomes[2].local and "file not found" in summary.outcomes[2].error_message
    assert summary.outcomes[3].error_code is grpc.StatusCode.INVALID_ARGUMENT and not summary.outcomes[3].local
    assert (summary.stored, summary.unchanged, summary.failed) == (2, 0, 2)
    assert summary.progress.received == 4 and summary.progress.done == 4
    assert updates and updates[-1].progress == summary.progress

    # idempotent re-run: unchanged
    again = client.ingest_all(items[:2])
    assert [o.status for o in again.outcomes] == [ItemStatus.UNCHANGED, ItemStatus.UNCHANGED]

    result = client.search(text="a cat", top_k=1, filter=MINE)
    assert len(result) == 1 and result[0].id == "client-sync-cat" and result[0].rank == 1
    assert result[0].metadata == {"label": "cat"} and result.target is Target.IMAGE
    assert result[0].uri == cat.resolve().as_uri()  # a local path is stored as its file URI
    assert result.timings.total_ms >= result.timings.milvus_ms > 0
    both = client.search_text("a cup of espresso", top_k=2, target="caption", filter=MINE)
    assert both[0].id == "client-sync-coffee" and both[0].caption == "a cup of espresso on a saucer"
    page2 = client.search_text("a cup of espresso", top_k=1, offset=1, target="caption", filter=MINE)
    assert page2[0].rank == 2 and page2[0].id == both[1].id and page2.target is Target.CAPTION
    assert client.search_image(cat, top_k=1, filter=MINE)[0].id == "client-sync-cat"
    composed = client.search_composed(cat, "a cup of coffee", top_k=2, filter=MINE)
    assert {h.id for h in composed} == {"client-sync-cat", "client-sync-coffee"}
    assert composed[0].score >= composed[1].score

    got = client.get(["client-sync-cat", "nope"])
    assert [r.id for r in got.records] == ["client-sync-cat"] and got.missing_ids == ["nope"]
    assert got.records[0].caption and got.records[0].content_sha256
    assert client.stats().item_count == before + 2
    assert client.delete(["client-sync-cat", "nope"]) == 1
    assert client.stats().item_count == before + 1


def test_errors_carry_status_codes(client: SearchClient) -> None:
    with pytest.raises(SearchError) as err:
        client.search(text="x", top_k=0)
    assert err.value.code is grpc.StatusCode.INVALID_ARGUMENT and "top_k" in err.value.details
    assert err.value.method == "Search"


def test_retries_unavailable_with_grpc_policy(faults: FaultServer) -> None:
    faults.knobs.unavailable_calls = 2
    with SearchClient(faults.address, timeout=5.0) as c:
        assert c.stats().collection == "faults"
    assert faults.knobs.calls == 3


def test_gives_up_after_max_attempts(faults: FaultServer) -> None:
    faults.knobs.unavailable_calls = 10
    with SearchClient(faults.address, retry_attempts=2) as c, pytest.raises(SearchError) as err:
        c.stats()
    assert err.value.code is grpc.StatusCode.UNAVAILABLE
    assert faults.knobs.calls == 2


def test_default_deadline_and_per_call_override(faults: FaultServer) -> None:
    faults.knobs.delay_s = 0.5
    with SearchClient(faults.address, timeout=0.1) as c:
        with pytest.raises(SearchError) as err:
            c.stats()
        assert err.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
        assert c.stats(timeout=5.0).collection == "faults"


def test_bearer_token_on_plaintext_channel(real_suite: RealSuite) -> None:
    with SearchClient(real_suite.address) as anonymous, pytest.raises(SearchError) as err:
        anonymous.stats()
    assert err.value.code is grpc.StatusCode.UNAUTHENTICATED
    with SearchClient(real_suite.address, token="not-the-token") as wrong, pytest.raises(SearchError) as err:
        wrong.stats()
    assert err.value.code is grpc.StatusCode.UNAUTHENTICATED
    with SearchClient(real_suite.address, token=real_suite.token) as c:
        assert c.stats().dimension > 0


def test_unreachable_server_is_unavailable_and_health_fails() -> None:
    with SearchClient("127.0.0.1:1", timeout=1.0, retry_attempts=1) as c:
        with pytest.raises(SearchError) as err:
            c.stats()
        assert err.value.code is grpc.StatusCode.UNAVAILABLE
        with pytest.raises(TimeoutError):
            c.wait_until_ready(timeout=0.5)


def test_health(client: SearchClient, real_suite: RealSuite) -> None:
    assert client.health() == "SERVING"
    assert client.health("mmsearch.search.v1.Search") == "SERVING"
    assert client.health("no.such.Service") == "SERVICE_UNKNOWN"
    assert check_health(ConnectionConfig(real_suite.embedder_address)) == "SERVING"  # any service, no token
    client.wait_until_ready(timeout=2)


def test_breaking_off_an_ingest_cancels_it(client: SearchClient) -> None:
    items = (IngestItem(image=png_bytes(color=(i, 200, 7)), id=f"client-sync-break-{i}") for i in range(50))
    for update in client.ingest(items, chunk_size=1):
        assert update.outcomes
        break  # the generator's finally cancels the call; nothing hangs
    assert client.health() == "SERVING"  # the channel and the server go on


# ---------------------------------------------------------------------------- TLS
# (against the real search service over TLS and mTLS: tests/security/test_security_tls_auth.py)


def test_mtls_needs_both_cert_and_key() -> None:
    with pytest.raises(ValueError, match="both"):
        ConnectionConfig("x:1", client_cert=b"x").credentials()
