"""Slow remote images: a server that drips bytes, one that is steady but endless, and one
that never finishes its headers are cut off on every URI path (Search.Ingest, Search by
image, Captioner.Caption, Embedder.Embed) within the fetch budget, with INVALID_ARGUMENT
naming the setting (never UNAVAILABLE, which would tell callers to retry), and the
services keep serving."""
from __future__ import annotations

import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator

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
IMAGE = distinct_images(1, seed=31)[0]
BUDGET_S, MIN_RATE, GRACE_S = 3.0, 2_000, 1.0
URIS = UriSettings(allow_http=True, http_allowed_networks=["127.0.0.1/32"], http_timeout_s=5,
                   http_total_budget_s=BUDGET_S, http_min_bytes_per_s=MIN_RATE, http_min_rate_grace_s=GRACE_S)


@pytest.fixture(scope="module")
def slow_web() -> Iterator[str]:
    """A raw socket server: each path misbehaves in time, not in content."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def drip(conn: socket.socket, head: bytes, body: bytes, every_s: float, step: int) -> None:
        conn.sendall(head)
        for i in range(0, len(body), step):
            if stop.wait(every_s):
                return
            conn.sendall(body[i : i + step])

    def serve(conn: socket.socket) -> None:
        with conn:
            try:
                path = conn.recv(4096).split(b" ")[1].decode()
                ok_head = f"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: {len(IMAGE)}\r\n\r\n".encode()
                if path == "/ok.png":
                    conn.sendall(ok_head + IMAGE)
                elif path == "/drip.png":  # 1 byte a second: far under the minimum rate
                    drip(conn, ok_head, IMAGE, 1.0, 1)
                elif path == "/steady.png":  # 5 KB/s, above the minimum rate, but 40 s long
                    big = b"\x89PNG" + bytes(200_000)
                    head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(big)}\r\n\r\n".encode()
                    drip(conn, head, big, 0.1, 500)
                elif path == "/endless-headers.png":  # a header line a second, never a body
                    conn.sendall(b"HTTP/1.1 200 OK\r\n")
                    n = 0
                    while not stop.wait(1.0):
                        conn.sendall(f"X-Wait-{n}: yes\r\n".encode())
                        n += 1
            except OSError:
                pass

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    listener.close()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def channels(milvus_server: MilvusLiteServer) -> AsyncIterator[dict[str, grpc.aio.Channel]]:
    embedder = await start_embedder(uris=URIS)
    captioner = await start_captioner(uris=URIS)
    search = await start_search(milvus_server.uri, embedder.address, captioner.address, collection="slow_uris",
                                uris=URIS)
    servers: dict[str, RunningServer] = {"embedder": embedder, "captioner": captioner, "search": search}
    chans = {name: grpc.aio.insecure_channel(s.address) for name, s in servers.items()}
    yield chans
    for c in chans.values():
        await c.close()
    for server in (search, captioner, embedder):
        await server.stop(0.2)


SLOW = {
    "/drip.png": ("minimum transfer rate of 2000 bytes/s (URIS__HTTP_MIN_BYTES_PER_S)", GRACE_S),
    "/steady.png": ("total budget of 3.0 s (URIS__HTTP_TOTAL_BUDGET_S)", BUDGET_S),
    "/endless-headers.png": ("total budget of 3.0 s (URIS__HTTP_TOTAL_BUDGET_S)", BUDGET_S),
}


async def timed_refusal(call: object) -> tuple[grpc.StatusCode, str, float]:
    start = time.monotonic()
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details() or "", time.monotonic() - start
    return grpc.StatusCode.OK, "", time.monotonic() - start


@pytest.mark.parametrize("path", list(SLOW))
async def test_slow_remote_images_are_cut_off_on_every_path(
        channels: dict[str, grpc.aio.Channel], slow_web: str, path: str) -> None:
    import asyncio

    reason, cut_after_s = SLOW[path]
    image = types_pb2.Image(uri=slow_web + path)
    search = search_pb2_grpc.SearchStub(channels["search"])
    captioner = captioner_pb2_grpc.CaptionerStub(channels["captioner"])
    embedder = embedder_pb2_grpc.EmbedderStub(channels["embedder"])
    calls = {  # no caller deadline: only our budget ends them
        "Search(image)": search.Search(search_pb2.SearchRequest(query=types_pb2.Content(image=image), top_k=1)),
        "Captioner.Caption": captioner.Caption(captioner_pb2.CaptionRequest(image=image)),
        "Embedder.Embed": embedder.Embed(embedder_pb2.EmbedRequest(items=[types_pb2.Content(image=image)])),
    }
    start = time.monotonic()
    ingest, *results = await asyncio.gather(
        ingest_all(search, [search_pb2.IngestItem(image=image, id=f"slow-{path.strip('/.')}")]),
        *(timed_refusal(c) for c in calls.values()),
    )
    problems = []
    for name, (code, details, took) in zip(calls, results, strict=True):
        if code != grpc.StatusCode.INVALID_ARGUMENT or reason not in details or not cut_after_s <= took < BUDGET_S + 2:
            problems.append(f"{name}: {code} after {took:.1f} s: {details!r}")
    o = ingest.outcomes[0]
    if o.status != search_pb2.ITEM_STATUS_FAILED or o.error.code != grpc.StatusCode.INVALID_ARGUMENT.value[0] \
            or reason not in o.error.message:
        problems.append(f"Ingest: {o}")
    assert not problems, "\n".join(problems)
    assert time.monotonic() - start < BUDGET_S + 3
    # Everything still serves, and the same paths fetch a prompt server's image.
    good = types_pb2.Image(uri=slow_web + "/ok.png")
    assert len((await search.Search(search_pb2.SearchRequest(query=types_pb2.Content(image=good), top_k=1),
                                    timeout=30)).hits) <= 1
    assert (await captioner.Caption(captioner_pb2.CaptionRequest(image=good), timeout=30)).caption.description
    assert (await embedder.Embed(embedder_pb2.EmbedRequest(items=[types_pb2.Content(image=good)]), timeout=30)).dimension
