"""The HTTP/JSON API with real HTTP requests (httpx) against the real gateway and the real
search service (`mmsearch up`, see conftest.py): every RPC, the protobuf JSON mapping,
bearer auth, grpc-gateway's status mapping with search's message kept, NDJSON streams,
multipart upload, thumbnails under the file root, bad input (400 / 413), OpenAPI.
"""
from __future__ import annotations

import base64
import json
from typing import Any

import grpc
import httpx
import pytest

from mmsearch.search.v1 import search_pb2, search_pb2_grpc
from tests.conftest import png_bytes
from tests.gateway.conftest import INLINE_ID, MAX_BODY_BYTES, MAX_UPLOAD_BYTES, GatewaySuite

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def suite(gateway_suite: GatewaySuite) -> GatewaySuite:
    return gateway_suite


@pytest.fixture
def http(suite: GatewaySuite) -> httpx.Client:
    with suite.client(headers=suite.auth) as client:
        yield client  # type: ignore[misc]


def ndjson(reply: httpx.Response) -> list[dict[str, Any]]:
    assert reply.headers["content-type"].startswith("application/x-ndjson"), reply.headers
    return [json.loads(line) for line in reply.text.splitlines() if line.strip()]


def outcomes(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for line in lines if "result" in line for o in line["result"]["outcomes"]]


def grpc_error(suite: GatewaySuite, request: search_pb2.SearchRequest) -> grpc.RpcError:
    """The same request over gRPC, for the parity checks."""
    with grpc.insecure_channel(suite.search_address) as channel, pytest.raises(grpc.RpcError) as info:
        search_pb2_grpc.SearchStub(channel).Search(
            request, metadata=(("authorization", f"Bearer {suite.token}"),), timeout=60)
    return info.value


# --- Search ----------------------------------------------------------------------------------


def test_text_search_finds_the_cat_first(http: httpx.Client) -> None:
    reply = http.post("/v1/search", json={"query": {"text": "a cat"}, "topK": 5})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["hits"][0]["id"] == "cat"
    hit = body["hits"][0]
    # The protobuf JSON mapping: lowerCamelCase, enums by name, timestamps as RFC 3339.
    assert body["target"] == "TARGET_IMAGE"
    assert hit["rank"] == 1 and isinstance(hit["score"], float)
    assert hit["uri"].startswith("file://") and json.loads(hit["metadataJson"]) == {"label": "cat"}
    assert hit["ingestedAt"].endswith("Z") and "captionPending" in hit and hit["caption"]
    assert set(body["timings"]) >= {"embedMs", "milvusMs", "totalMs"}


def test_proto_field_names_are_accepted_too(http: httpx.Client) -> None:
    reply = http.post("/v1/search", json={"query": {"text": "a cat"}, "top_k": 2, "target": "TARGET_HYBRID",
                                          "fusion": {"method": "FUSION_METHOD_RRF"}})
    assert reply.status_code == 200, reply.text
    assert reply.json()["target"] == "TARGET_HYBRID" and len(reply.json()["hits"]) == 2


def test_image_search_with_inline_bytes_finds_the_cat(http: httpx.Client, suite: GatewaySuite) -> None:
    data = base64.b64encode((suite.queries / "cat_flipped.jpg").read_bytes()).decode()
    reply = http.post("/v1/search", json={"query": {"image": {"data": data}}, "topK": 3})
    assert reply.status_code == 200, reply.text
    assert reply.json()["hits"][0]["id"] == "cat"


def test_pagination_pages_concatenate(http: httpx.Client) -> None:
    whole = http.post("/v1/search", json={"query": {"text": "a cup of coffee"}, "topK": 6}).json()["hits"]
    first = http.post("/v1/search", json={"query": {"text": "a cup of coffee"}, "topK": 3}).json()["hits"]
    second = http.post("/v1/search", json={"query": {"text": "a cup of coffee"}, "topK": 3, "offset": 3}).json()
    assert [h["id"] for h in first + second["hits"]] == [h["id"] for h in whole]
    assert [h["rank"] for h in second["hits"]] == [4, 5, 6]


def test_filter_over_http(http: httpx.Client) -> None:
    reply = http.post("/v1/search", json={"query": {"text": "a cat"}, "topK": 5,
                                          "filter": 'metadata["label"] != "cat"'})
    assert reply.status_code == 200, reply.text
    assert "cat" not in [h["id"] for h in reply.json()["hits"]]


# --- Get, Delete, Stats, Backfill --------------------------------------------------------------


def test_get_stats_and_delete(http: httpx.Client) -> None:
    got = http.post("/v1/get", json={"ids": ["cat", "no-such-item"]})
    assert got.status_code == 200, got.text
    assert [r["id"] for r in got.json()["records"]] == ["cat"]
    assert got.json()["missingIds"] == ["no-such-item"]
    assert len(got.json()["records"][0]["contentSha256"]) == 64

    stats = http.get("/v1/stats")
    assert stats.status_code == 200, stats.text
    assert http.post("/v1/stats").json()["collection"] == stats.json()["collection"]
    # uint64 is a string in the protobuf JSON mapping.
    assert int(stats.json()["itemCount"]) >= 10 and stats.json()["dimension"] > 0

    # An item only this test uses, ingested inline over NDJSON, then deleted.
    data = base64.b64encode(png_bytes(40, 30, (10, 200, 90))).decode()
    lines = ndjson(http.post("/v1/ingest", content=json.dumps(
        {"id": "gw-delete-me", "image": {"data": data}, "caption": {"description": "a green square"}}) + "\n"))
    assert outcomes(lines)[0]["status"] in ("ITEM_STATUS_STORED", "ITEM_STATUS_UNCHANGED")
    deleted = http.post("/v1/delete", json={"ids": ["gw-delete-me"]})
    assert deleted.status_code == 200 and deleted.json() == {"deletedCount": "1"}
    assert http.post("/v1/get", json={"ids": ["gw-delete-me"]}).json()["missingIds"] == ["gw-delete-me"]


def test_backfill_streams_ndjson(http: httpx.Client) -> None:
    reply = http.post("/v1/backfill", json={"maxItems": 1})
    # Nothing is pending (captions are made at ingest): an empty stream or only totals.
    assert reply.status_code == 200, reply.text
    for line in ndjson(reply) if reply.text else []:
        assert "result" in line and int(line["result"]["progress"].get("failed", "0")) == 0


# --- Ingest: NDJSON and multipart ----------------------------------------------------------------


def _log_tails(suite: GatewaySuite, n: int = 30) -> dict[str, list[str]]:
    logs = suite.data_dir / "logs"
    return {p.name: p.read_text(errors="replace").splitlines()[-n:] for p in sorted(logs.glob("*.log"))}


def test_ingest_ndjson_reports_every_item(http: httpx.Client, suite: GatewaySuite) -> None:
    cat = suite.photos / "cat.jpg"
    body = "\n".join([
        json.dumps({"id": "cat", "image": {"uri": cat.as_uri()}, "metadataJson": json.dumps({"label": "cat"})}),
        json.dumps({"items": [{"id": "gw-bad-image", "image": {"data": base64.b64encode(b"not an image").decode()}}]}),
        "",  # blank lines are skipped
    ])
    lines = ndjson(http.post("/v1/ingest", content=body))
    by_index = {int(o.get("index", "0")): o for o in outcomes(lines)}
    # Every item answered (search once ended the stream with the last outcome still queued:
    # tests/search/test_ingest.py). On failure: what came instead, and the services' last log lines.
    assert sorted(by_index) == [0, 1], (lines, _log_tails(suite))
    assert by_index[0]["status"] == "ITEM_STATUS_UNCHANGED"
    assert by_index[1]["status"] == "ITEM_STATUS_FAILED"
    assert by_index[1]["error"]["code"] == 3 and "not a recognised image" in by_index[1]["error"]["message"]
    assert int(lines[-1]["result"]["progress"]["received"]) == 2


def test_ingest_bad_line_after_good_ones(http: httpx.Client, suite: GatewaySuite) -> None:
    good = json.dumps({"id": "cat", "image": {"uri": (suite.photos / "cat.jpg").as_uri()},
                       "metadataJson": json.dumps({"label": "cat"})})
    lines = ndjson(http.post("/v1/ingest", content=good + "\n{\"id\": 7, oops\n" + good + "\n"))
    # The item before the bad line is answered; then the bad line is named; nothing after it is sent.
    assert [o["status"] for o in outcomes(lines)] == ["ITEM_STATUS_UNCHANGED"]
    assert lines[-1]["error"]["code"] == 3 and lines[-1]["error"]["message"].startswith("line 2 is not valid JSON")


def test_ingest_bad_first_line_is_400(http: httpx.Client) -> None:
    reply = http.post("/v1/ingest", content='{"image": {"uri": 5}}\n')
    assert reply.status_code == 400, reply.text
    assert reply.json()["code"] == 3 and reply.json()["message"].startswith("line 1")


def test_ingest_upload_streams_per_file_outcomes(http: httpx.Client, suite: GatewaySuite) -> None:
    files = [("file", ("cat.jpg", (suite.photos / "cat.jpg").read_bytes(), "image/jpeg")),
             ("file", ("broken.jpg", b"\xff\xd8 this is not a jpeg", "image/jpeg"))]
    reply = http.post("/v1/ingest/upload", files=files, data={"metadata_json": json.dumps({"label": "cat"})})
    assert reply.status_code == 200, reply.text
    by_index = {int(o.get("index", "0")): o for o in outcomes(ndjson(reply))}
    assert by_index[0]["status"] in ("ITEM_STATUS_STORED", "ITEM_STATUS_UNCHANGED")
    assert by_index[1]["status"] == "ITEM_STATUS_FAILED" and by_index[1]["error"]["code"] == 3
    # The upload stored the cat's bytes under their content hash: remove it again.
    http.post("/v1/delete", json={"ids": [by_index[0]["id"]]})


def test_upload_without_files_is_400(http: httpx.Client) -> None:
    reply = http.post("/v1/ingest/upload", data={"metadata_json": "{}"}, files=[("other", ("a", b"x"))])
    assert reply.status_code == 400 and "no files" in reply.json()["message"]


# --- errors: auth, bad input, oversize, parity with gRPC -------------------------------------------


def test_missing_or_wrong_token_is_401_with_searchs_message(suite: GatewaySuite) -> None:
    with suite.client() as anonymous:
        reply = anonymous.post("/v1/search", json={"query": {"text": "a cat"}, "topK": 1})
        assert reply.status_code == 401, reply.text
        assert reply.json()["code"] == grpc.StatusCode.UNAUTHENTICATED.value[0] and reply.json()["message"]
        wrong = anonymous.get("/v1/stats", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert anonymous.post("/v1/ingest", content="{}\n").status_code == 401
        assert anonymous.get("/v1/thumbnail", params={"id": "cat"}).status_code == 401


def test_a_refused_ingest_is_401_even_with_its_lines_still_being_written(suite: GatewaySuite) -> None:
    """Search refuses the call at once while the gateway is still writing the body's lines:
    grpc.aio used to turn that into INTERNAL (a 500) for about one such request in five."""
    with suite.client() as anonymous:
        answers = [anonymous.post("/v1/ingest", content="{}\n" * 8) for _ in range(20)]
    assert [(a.status_code, a.json()["code"]) for a in answers] == [(401, 16)] * 20, [a.text for a in answers]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"query": {"text": "a cat"}, "topK": ', "request body is not valid JSON"),
        (b'{"query": {"text": "a cat"}, "topK": "ten"}', "Failed to parse topK field"),
        (b'{"query": {"text": "a cat"}, "topk": 3}', 'has no field named "topk"'),
        (b'[{"query": {"text": "a cat"}}]', "must be a JSON object (mmsearch.search.v1.SearchRequest)"),
        (b'{"query": {"text": "a cat"}, "target": "TARGET_NOPE"}', "Invalid enum value TARGET_NOPE"),
        (b'\xff\xfe{}', "request body is not UTF-8"),
    ],
    ids=["truncated", "wrong-type", "unknown-field", "not-an-object", "bad-enum", "not-utf8"],
)
def test_bad_json_is_400_with_a_message(http: httpx.Client, body: bytes, expected: str) -> None:
    reply = http.post("/v1/search", content=body, headers={"Content-Type": "application/json"})
    assert reply.status_code == 400, reply.text
    assert reply.json()["code"] == 3 and expected in reply.json()["message"], reply.json()


def test_invalid_argument_from_search_keeps_its_message(http: httpx.Client, suite: GatewaySuite) -> None:
    cases = [
        {"query": {"text": "a cat"}, "topK": 0},
        {"query": {"text": "a cat"}, "topK": 3, "filter": "metadata[ == oops"},
        {"query": {"image": {"data": base64.b64encode(b"GIF89a but not really").decode()}}, "topK": 3},
        {"topK": 3},
    ]
    from google.protobuf import json_format

    for case in cases:
        reply = http.post("/v1/search", json=case)
        assert reply.status_code == 400, (case, reply.text)
        error = grpc_error(suite, json_format.ParseDict(case, search_pb2.SearchRequest()))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert reply.json() == {"code": 3, "message": error.details(), "details": []}


def test_oversize_bodies_are_413(http: httpx.Client) -> None:
    big = b'{"filter": "' + b"x" * (MAX_BODY_BYTES + 10) + b'"}'
    declared = http.post("/v1/search", content=big, headers={"Content-Type": "application/json"})
    assert declared.status_code == 413, declared.text
    assert "GATEWAY_MAX_BODY_BYTES" in declared.json()["message"] and declared.json()["code"] == 3

    def chunks():  # no Content-Length: chunked transfer, counted as it arrives
        yield b'{"filter": "'
        for _ in range(MAX_BODY_BYTES // 65536 + 2):
            yield b"x" * 65536
        yield b'"}'

    streamed = http.post("/v1/search", content=chunks(), headers={"Content-Type": "application/json"})
    assert streamed.status_code == 413 and "more than the limit" in streamed.json()["message"]

    line = json.dumps({"image": {"data": "A" * (MAX_BODY_BYTES + 10)}}).encode()
    assert http.post("/v1/ingest", content=line).status_code == 413

    files = [("file", ("big.png", b"\0" * (MAX_UPLOAD_BYTES + 10), "image/png"))]
    upload = http.post("/v1/ingest/upload", files=files)
    assert upload.status_code == 413 and "GATEWAY_MAX_UPLOAD_BYTES" in upload.json()["message"]


def test_unknown_route_and_method_use_the_error_body(http: httpx.Client) -> None:
    missing = http.get("/v1/nope")
    assert missing.status_code == 404 and missing.json()["code"] == 5
    wrong_verb = http.get("/v1/search")
    assert wrong_verb.status_code == 405 and wrong_verb.json()["code"] == 12


# --- thumbnails ---------------------------------------------------------------------------------


def test_thumbnail_of_a_stored_file(http: httpx.Client) -> None:
    from io import BytesIO

    from PIL import Image

    reply = http.get("/v1/thumbnail", params={"id": "cat", "size": 128})
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"] == "image/jpeg" and "private" in reply.headers["cache-control"]
    image = Image.open(BytesIO(reply.content))
    assert max(image.size) == 128


def test_no_thumbnail_for_inline_bytes_or_unknown_items(http: httpx.Client) -> None:
    hits = http.post("/v1/search", json={"query": {"text": "red"}, "topK": 1,
                                         "filter": 'metadata["label"] == "inline"'}).json()["hits"]
    assert hits and not hits[0]["uri"].startswith("file:")
    inline = http.get("/v1/thumbnail", params={"id": hits[0]["id"]})
    assert inline.status_code == 404 and "file:// URI" in inline.json()["message"]
    unknown = http.get("/v1/thumbnail", params={"id": "gw-no-such-item"})
    assert unknown.status_code == 404 and unknown.json()["code"] == 5
    assert http.get("/v1/thumbnail").status_code == 400  # id is required
    assert INLINE_ID  # (the upload's id is its content hash; found above by its label)


# --- the document and health ---------------------------------------------------------------------


def test_openapi_document_lists_every_rpc_with_its_schemas(http: httpx.Client) -> None:
    doc = http.get("/openapi.json").json()
    for method in search_pb2.DESCRIPTOR.services_by_name["Search"].methods:
        path = "/v1/" + "".join("-" + c.lower() if c.isupper() else c for c in method.name).lstrip("-")
        assert path in doc["paths"], path
    schemas = doc["components"]["schemas"]
    assert schemas["mmsearch.search.v1.SearchRequest"]["properties"]["topK"]["type"] == "integer"
    assert "likeId" in schemas["mmsearch.search.v1.SearchRequest"]["properties"]
    assert "/v1/ingest/upload" in doc["paths"] and "/v1/thumbnail" in doc["paths"]


def test_health_endpoints(suite: GatewaySuite) -> None:
    with suite.client() as anonymous:
        assert anonymous.get("/healthz").json() == {"status": "SERVING"}
        ready = anonymous.get("/readyz").json()
        assert ready["status"] == "SERVING" and ready["search"] == "SERVING"
        page = anonymous.get("/")
        assert page.status_code == 200 and "<title>mmsearch</title>" in page.text
        assert anonymous.get("/static/app.js").status_code == 200


def test_search_all_streams_every_hit_in_rank_order(http: httpx.Client) -> None:
    reply = http.post("/v1/search-all", json={"search": {"query": {"text": "a cat"}}, "batchSize": 5})
    assert reply.status_code == 200, reply.text
    lines = ndjson(reply)
    assert all("result" in line for line in lines), lines[-1]
    hits = [h for line in lines for h in line["result"]["hits"]]
    assert hits[0]["id"] == "cat"
    assert [h["rank"] for h in hits] == list(range(1, len(hits) + 1))
    assert int(lines[-1]["result"]["sent"]) == len(hits) >= 10
    assert len(lines) == -(-len(hits) // 5)  # batches of 5


def test_more_like_this_over_http(http: httpx.Client) -> None:
    reply = http.post("/v1/search", json={"likeId": "cat", "topK": 3})
    assert reply.status_code == 200, reply.text
    assert "cat" not in [h["id"] for h in reply.json()["hits"]] and len(reply.json()["hits"]) == 3
    missing = http.post("/v1/search", json={"likeId": "gw-no-such-item", "topK": 3})
    assert missing.status_code == 400 and missing.json()["message"]


def test_ingest_outcomes_stream_back_while_the_body_is_still_being_sent(suite: GatewaySuite) -> None:
    """Full duplex over HTTP/1.1 chunked: the first item's outcome arrives before the client
    sends the second line, and nothing of the body is lost meanwhile."""
    import socket
    from urllib.parse import urlsplit

    def line(name: str) -> bytes:
        return (json.dumps({"id": name, "image": {"uri": (suite.photos / f"{name}.jpg").as_uri()},
                            "metadataJson": json.dumps({"label": name})}) + "\n").encode()

    def chunk(data: bytes) -> bytes:
        return f"{len(data):x}\r\n".encode() + data + b"\r\n"

    url = urlsplit(suite.base_url)
    with socket.create_connection((url.hostname, url.port), timeout=120) as sock:
        sock.sendall(b"POST /v1/ingest HTTP/1.1\r\nHost: gw\r\nContent-Type: application/x-ndjson\r\n"
                     b"Transfer-Encoding: chunked\r\nConnection: close\r\n"
                     + f"Authorization: Bearer {suite.token}\r\n\r\n".encode() + chunk(line("cat")))
        received = b""
        while b'"id":"cat"' not in received:  # the outcome of the first line, before the second is sent
            data = sock.recv(65536)
            assert data, received
            received += data
        assert received.startswith(b"HTTP/1.1 200")
        second = line("coffee")
        sock.sendall(chunk(second[:10]) + chunk(second[10:]) + b"0\r\n\r\n")  # split across chunks
        while data := sock.recv(65536):
            received += data
    body = received.partition(b"\r\n\r\n")[2]
    text = b"".join(part for i, part in enumerate(body.split(b"\r\n")) if i % 2 == 1).decode()  # de-chunk
    found = [o for ln in text.splitlines() if ln.strip() for o in json.loads(ln)["result"]["outcomes"]]
    assert [(o.get("index", "0"), o["id"], o["status"]) for o in found] == [
        ("0", "cat", "ITEM_STATUS_UNCHANGED"), ("1", "coffee", "ITEM_STATUS_UNCHANGED")]
