"""Traversal and SSRF on every path that takes a URI (Search.Ingest, Search.Search by image
and by composed image, Captioner.Caption, Embedder.Embed), redirects re-checked hop by
hop; filter expressions bounded and unable to write; ids unable to inject expressions.

Every service here runs with file URIs confined to a root and remote fetching ON with
only 127.0.0.1/32 exempted (for the local HTTP server below), the most permissive
configuration a deployment would use: what is refused here is refused everywhere.
"""
from __future__ import annotations

import http.server
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from mmsearch.captioner.v1 import captioner_pb2, captioner_pb2_grpc
from mmsearch.common.v1 import types_pb2
from mmsearch.embedder.v1 import embedder_pb2, embedder_pb2_grpc
from mmsearch.search.v1 import search_pb2, search_pb2_grpc
from services.common.server import RunningServer
from services.common.settings import UriSettings
from tests.conftest import MilvusLiteServer
from tests.reliability.helpers import distinct_images, ingest_all, start_captioner, start_embedder, start_search

pytestmark = pytest.mark.asyncio(loop_scope="module")
IMAGE = distinct_images(1, seed=21)[0]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("uris")
    inside = base / "root"
    (inside / "sub").mkdir(parents=True)
    (inside / "ok.png").write_bytes(IMAGE)
    (base / "secret.png").write_bytes(distinct_images(1, seed=22)[0])
    (inside / "escape.png").symlink_to(base / "secret.png")
    (inside / "dir-escape").symlink_to(base)
    return inside


@pytest.fixture(scope="module")
def web() -> Iterator[str]:
    """A loopback web server (exempted by http_allowed_networks) whose redirects point at
    places that are not exempted."""
    routes: dict[str, tuple[int, dict[str, str], bytes]] = {
        "/ok.png": (200, {"Content-Type": "image/png"}, IMAGE),
        "/to-ok": (302, {"Location": "/ok.png"}, b""),
        "/to-metadata": (302, {"Location": "http://169.254.169.254/latest/meta-data/iam/"}, b""),
        "/to-private": (301, {"Location": "http://10.1.2.3/internal.png"}, b""),
        "/to-loopback-neighbour": (307, {"Location": "http://127.0.0.2:8080/admin"}, b""),
        "/to-ipv6-loopback": (308, {"Location": "http://[::1]/x.png"}, b""),
        "/to-file": (302, {"Location": "file:///etc/passwd"}, b""),
        "/to-gopher": (302, {"Location": "gopher://127.0.0.1:6379/_FLUSHALL"}, b""),
        "/hop1": (302, {"Location": "/hop2"}, b""),
        "/hop2": (302, {"Location": "/to-metadata"}, b""),
        "/loop": (302, {"Location": "/loop"}, b""),
        "/huge": (200, {"Content-Length": str(10**10)}, b""),
    }

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, headers, body = routes.get(self.path, (404, {}, b""))
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            if "Content-Length" not in headers:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if body:
                self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def hostile_uris(root: Path, web: str) -> dict[str, str]:
    """URI -> a phrase the refusal must contain."""
    port = web.rsplit(":", 1)[1]
    return {
        f"file://{root}/../secret.png": "'..'",
        f"file://{root}/sub/%2e%2e/%2e%2e/secret.png": "'..'",
        f"file://{root}/escape.png": "outside the allowed root",
        f"file://{root}/dir-escape/secret.png": "outside the allowed root",
        "file:///etc/passwd": "outside the allowed root",
        "file:///proc/self/environ": "outside the allowed root",
        f"file://evil.example{root}/ok.png": "must not name a host",
        f"file://{root}/ok.png%00.txt": "NUL",
        f"file://{root}/sub": "not a regular file",
        "http://169.254.169.254/latest/meta-data/": "non-public address",
        "http://[::ffff:169.254.169.254]/latest/meta-data/": "non-public address",
        "http://10.0.0.1/a.png": "non-public address",
        "http://192.168.0.1/a.png": "non-public address",
        "http://[fd00::1]/a.png": "non-public address",
        "http://2130706434/a.png": "non-public address",  # 127.0.0.2 in decimal
        f"http://[::1]:{port}/ok.png": "non-public address",
        f"http://0.0.0.0:{port}/ok.png": "non-public address",
        f"{web}/to-metadata": "non-public address",
        f"{web}/to-private": "non-public address",
        f"{web}/to-loopback-neighbour": "non-public address",
        f"{web}/to-ipv6-loopback": "non-public address",
        f"{web}/hop1": "non-public address",
        f"{web}/to-file": "unsupported scheme",
        f"{web}/to-gopher": "unsupported scheme",
        f"{web}/loop": "too many redirects",
        f"{web}/huge": "more than the limit",
        f"{web}/missing.png": "HTTP 404",
        "gopher://127.0.0.1:70/_stats": "unsupported URI scheme",
        "ftp://127.0.0.1/a.png": "unsupported URI scheme",
        "data:image/png;base64,iVBORw0KGgo=": "unsupported URI scheme",
        "jar:file:///etc/passwd!/": "unsupported URI scheme",
        "/etc/passwd": "unsupported URI scheme",
    }


def good_uris(root: Path, web: str) -> list[str]:
    return [f"file://{root}/ok.png", f"{web}/ok.png", f"{web}/to-ok"]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def suite(root: Path, web: str, milvus_server: MilvusLiteServer) -> AsyncIterator[dict[str, RunningServer]]:
    uris = UriSettings(file_root=root, allow_http=True, http_allowed_networks=["127.0.0.1/32"], max_redirects=3,
                       http_timeout_s=5)
    embedder = await start_embedder(uris=uris)
    captioner = await start_captioner(uris=uris)
    search = await start_search(milvus_server.uri, embedder.address, captioner.address, collection="security",
                                uris=uris)
    yield {"embedder": embedder, "captioner": captioner, "search": search}
    for server in (search, captioner, embedder):
        await server.stop(0.2)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def channels(suite: dict[str, RunningServer]) -> AsyncIterator[dict[str, grpc.aio.Channel]]:
    chans = {name: grpc.aio.insecure_channel(s.address) for name, s in suite.items()}
    yield chans
    for c in chans.values():
        await c.close()


async def refusal(call: object) -> tuple[grpc.StatusCode, str]:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


async def test_every_uri_path_refuses_traversal_and_ssrf(channels: dict[str, grpc.aio.Channel], root: Path,
                                                         web: str) -> None:
    search = search_pb2_grpc.SearchStub(channels["search"])
    captioner = captioner_pb2_grpc.CaptionerStub(channels["captioner"])
    embedder = embedder_pb2_grpc.EmbedderStub(channels["embedder"])
    hostile = hostile_uris(root, web)
    assert len(hostile) >= 30
    problems: list[str] = []

    def expect(path: str, uri: str, code: grpc.StatusCode | int, details: str, reason: str) -> None:
        ok_code = code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INVALID_ARGUMENT.value[0])
        if not ok_code or reason not in details:
            problems.append(f"{path} {uri!r}: {code} {details!r} (wanted INVALID_ARGUMENT naming {reason!r})")

    # Search.Ingest: each hostile item fails alone, with a reason; nothing else is affected.
    uris = list(hostile)
    run = await ingest_all(search, [search_pb2.IngestItem(image=types_pb2.Image(uri=u)) for u in uris])
    assert sorted(run.outcomes) == list(range(len(uris)))
    for i, uri in enumerate(uris):
        o = run.outcomes[i]
        assert o.status == search_pb2.ITEM_STATUS_FAILED, uri
        expect("Ingest", uri, o.error.code, o.error.message, hostile[uri])

    for uri, reason in hostile.items():
        image = types_pb2.Image(uri=uri)
        for path, call in {
            "Search(image)": search.Search(search_pb2.SearchRequest(query=types_pb2.Content(image=image), top_k=1),
                                           timeout=20),
            "Search(composed)": search.Search(search_pb2.SearchRequest(
                query=types_pb2.Content(composed=types_pb2.Composed(image=image, instruction="in red")), top_k=1),
                timeout=20),
            "Captioner.Caption": captioner.Caption(captioner_pb2.CaptionRequest(image=image), timeout=20),
            "Embedder.Embed": embedder.Embed(embedder_pb2.EmbedRequest(items=[types_pb2.Content(image=image)]),
                                             timeout=20),
        }.items():
            code, details = await refusal(call)
            expect(path, uri, code, details, reason)
    assert not problems, "\n".join(problems)


async def test_allowed_uris_still_work_on_every_path(channels: dict[str, grpc.aio.Channel], root: Path,
                                                     web: str) -> None:
    """The fences are not walls: inside the root, and the exempted network, work."""
    search = search_pb2_grpc.SearchStub(channels["search"])
    captioner = captioner_pb2_grpc.CaptionerStub(channels["captioner"])
    embedder = embedder_pb2_grpc.EmbedderStub(channels["embedder"])
    uris = good_uris(root, web)
    run = await ingest_all(search, [search_pb2.IngestItem(image=types_pb2.Image(uri=u), id=f"good-{i}")
                                    for i, u in enumerate(uris)])
    assert not run.failed, {i: o.error.message for i, o in run.failed.items()}
    for uri in uris:
        image = types_pb2.Image(uri=uri)
        hits = await search.Search(search_pb2.SearchRequest(query=types_pb2.Content(image=image), top_k=1), timeout=30)
        assert len(hits.hits) == 1
        assert (await captioner.Caption(captioner_pb2.CaptionRequest(image=image), timeout=30)).caption.description
        reply = await embedder.Embed(embedder_pb2.EmbedRequest(items=[types_pb2.Content(image=image)]), timeout=30)
        assert reply.dimension > 0


# --- filter expressions ---------------------------------------------------------------------


async def count(search: search_pb2_grpc.SearchStub) -> int:
    return (await search.Stats(search_pb2.StatsRequest(), timeout=10)).item_count


async def test_filters_are_bounded_and_cannot_write(channels: dict[str, grpc.aio.Channel]) -> None:
    search = search_pb2_grpc.SearchStub(channels["search"])
    await ingest_all(search, [search_pb2.IngestItem(image=types_pb2.Image(data=d), id=f"filter-{i}",
                                                    metadata_json='{"label": "keep"}')
                              for i, d in enumerate(distinct_images(3, seed=23))])
    before = await count(search)
    assert before >= 3

    def query(expr: str) -> search_pb2.SearchRequest:
        return search_pb2.SearchRequest(query=types_pb2.Content(text="a pattern"), top_k=5, filter=expr)

    rejected = {
        "x" * 2049: "more than the limit of 2048",
        "id == 'a'" + " " * 3000: "more than the limit",
        "id == 'a'\x00": "control characters",
        "id == 'a'\x1b[2J": "control characters",
        'metadata["label"] ==': "Milvus rejected the filter",
        "id == 'x'; delete from security": "Milvus rejected the filter",
        "drop collection security": "Milvus rejected the filter",
        # Refused before Milvus: it could close the server's `tenant == ... and (` wrapper.
        "id == 'x') or (1 == 1": "never opened",
        "delete(id == 'filter-0')": "Milvus rejected the filter",
        "upsert": "Milvus rejected the filter",
        "(" * 1000 + "id != ''" + ")" * 1000: "Milvus rejected the filter",
        'metadata["timeout"] ==': "Milvus rejected the filter",
        "no_such_field_connect == 1": "Milvus rejected the filter",
    }
    problems = []
    for expr, reason in rejected.items():
        code, details = await refusal(search.Search(query(expr), timeout=20))
        if code != grpc.StatusCode.INVALID_ARGUMENT or reason not in details:
            problems.append(f"{expr[:60]!r}: {code} {details[:200]!r}")
    assert not problems, "\n".join(problems)
    # Expressions are read-only: a filter matching everything only reads.
    hits = await search.Search(query("id != '' or not (id != '')"), timeout=20)
    assert len(hits.hits) == min(5, before)
    labelled = await search.Search(query('metadata["label"] == "keep" and id like "filter-%"'), timeout=20)
    assert {h.id for h in labelled.hits} == {"filter-0", "filter-1", "filter-2"}
    assert await count(search) == before, "no filter changed the collection"


@pytest.mark.parametrize("evil", [
    "x'] or id not in ['",
    "x' or id != '",
    "a\"] or id != [\"",
    "' || true || '",
    "id != ''",
    "filter-0' ",
    "../../etc passwd",
    "a b",
    "",
    "x" * 300,
])
async def test_ids_cannot_inject_expressions(channels: dict[str, grpc.aio.Channel], evil: str) -> None:
    """pymilvus builds `id in ['...']` from ids without escaping: Get / Delete must refuse
    anything outside the id alphabet, or one crafted id would read or delete every row."""
    search = search_pb2_grpc.SearchStub(channels["search"])
    await ingest_all(search, [search_pb2.IngestItem(image=types_pb2.Image(data=d), id=f"keep-{i}")
                              for i, d in enumerate(distinct_images(2, seed=24))])
    before = await count(search)
    for call in (search.Get(search_pb2.GetRequest(ids=[evil]), timeout=10),
                 search.Delete(search_pb2.DeleteRequest(ids=["keep-0", evil]), timeout=10)):
        code, details = await refusal(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (evil, code, details)
        assert "is invalid" in details
    assert await count(search) == before, "nothing deleted"
    got = await search.Get(search_pb2.GetRequest(ids=["keep-0", "keep-1"]), timeout=10)
    assert [r.id for r in got.records] == ["keep-0", "keep-1"]
