"""No secret in any log line or error message, over a full run at DEBUG level.

Embedder, captioner and search run as real processes (`python -m services.<name>`) whose
every output byte is captured. Secrets: the captioner's DashScope API key, the embedder's
DashScope API key, two bearer tokens of the search API, and a Milvus token. The run
ingests (some items fail), searches, is refused for a wrong token, and meets failing
upstreams whose error bodies echo the API key back (hostile or careless upstreams do).
"""
from __future__ import annotations

import base64
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from mmsearch.common.v1 import types_pb2
from mmsearch.search.v1 import search_pb2, search_pb2_grpc
from tests.captioner.fakes import FakeUpstream
from tests.conftest import MilvusLiteServer
from tests.embedder.dashscope_fake import FakeDashScope
from tests.reliability.helpers import ServiceProcess, distinct_images, ingest_all, items_of

CAPTIONER_KEY = "sk-cap-7Hq2LmZ0vXw9RtYb4NcK"
EMBEDDER_KEY = "sk-emb-3Fd8KpQ1sWz6UyVn0JgH"
TOKENS = ("search-token-A-b81f0c2d9e", "search-token-B-44aa77cc11")
MILVUS_TOKEN = "root:Milvus-pw-Zx81Qa"


def secret_forms() -> dict[str, str]:
    """Each secret, and the encodings in which a library might print it."""
    forms = {}
    for name, value in [("captioner key", CAPTIONER_KEY), ("embedder key", EMBEDDER_KEY),
                        ("token A", TOKENS[0]), ("token B", TOKENS[1]), ("milvus token", MILVUS_TOKEN),
                        ("milvus password", MILVUS_TOKEN.split(":", 1)[1])]:
        forms[name] = value
        forms[f"{name} (base64)"] = base64.b64encode(value.encode()).decode().rstrip("=")
    return forms


@pytest.fixture
def fakes() -> Iterator[tuple[FakeUpstream, FakeDashScope]]:
    captioner = FakeUpstream(protocol="dashscope", api_key=CAPTIONER_KEY).start()
    embedder = FakeDashScope(api_key=EMBEDDER_KEY).start()
    try:
        yield captioner, embedder
    finally:
        captioner.stop()
        embedder.stop()


async def test_no_secret_in_any_log_line_or_error(fakes: tuple[FakeUpstream, FakeDashScope],
                                                   milvus_server: MilvusLiteServer, tmp_path: Path) -> None:
    cap_fake, emb_fake = fakes
    debug = {"LOG_LEVEL": "DEBUG", "LOG_JSON": "true"}
    common = {"DASHSCOPE_LOGGING_LEVEL": "debug"}  # the SDK's own debug logging, on
    embedder = ServiceProcess("embedder", {
        **common, **{f"EMBEDDER_{k}": v for k, v in debug.items()},
        "EMBEDDER_BACKEND": "dashscope", "EMBEDDER_DASHSCOPE__API_KEY": EMBEDDER_KEY,
        "EMBEDDER_DASHSCOPE__BASE_URL": emb_fake.base_url,
        "EMBEDDER_DASHSCOPE__RETRY__INITIAL_BACKOFF_S": "0.01", "EMBEDDER_DASHSCOPE__RETRY__MAX_BACKOFF_S": "0.05",
    }, tmp_path)
    captioner = ServiceProcess("captioner", {
        **common, **{f"CAPTIONER_{k}": v for k, v in debug.items()},
        "CAPTIONER_BACKEND": "dashscope", "CAPTIONER_API_KEY": CAPTIONER_KEY, "CAPTIONER_BASE_URL": cap_fake.base_url,
        "CAPTIONER_RETRY__INITIAL_BACKOFF_S": "0.01", "CAPTIONER_RETRY__MAX_BACKOFF_S": "0.05",
    }, tmp_path)
    search = ServiceProcess("search", {
        **{f"SEARCH_{k}": v for k, v in debug.items()},
        "SEARCH_MILVUS_URI": milvus_server.uri, "SEARCH_MILVUS_TOKEN": MILVUS_TOKEN, "SEARCH_COLLECTION": "secrets",
        "SEARCH_AUTH_TOKENS": ",".join(TOKENS), "SEARCH_EMBEDDER_TARGET": embedder.address,
        "SEARCH_CAPTIONER_TARGET": captioner.address, "SEARCH_UPSTREAM_ATTEMPTS": "2",
    }, tmp_path)
    procs = [embedder, captioner, search]
    seen_by_client: list[str] = []
    try:
        embedder.start()
        captioner.start()
        await embedder.wait_ready_async(120)
        await captioner.wait_ready_async(120)
        search.start()
        await search.wait_ready_async(120)

        # Upstream failures whose bodies echo the key: retried ones, and final ones.
        echo = f"request had Authorization: Bearer {CAPTIONER_KEY}"
        cap_fake.script = deque([
            cap_fake.error(500, "InternalError", echo),
            cap_fake.error(429, "Throttling.RateQuota", echo),
            cap_fake.error(401, "InvalidApiKey", f"Invalid API-key provided: {CAPTIONER_KEY}"),
            cap_fake.error(400, "DataInspectionFailed", f"inappropriate content; key={CAPTIONER_KEY}"),
        ])
        emb_fake.script = deque([(500, {"code": "InternalError", "message": f"echo {EMBEDDER_KEY}"})] * 2)

        auth = (("authorization", f"Bearer {TOKENS[0]}"),)
        async with grpc.aio.insecure_channel(search.address) as channel:
            stub = search_pb2_grpc.SearchStub(channel)
            run = await ingest_all(stub, items_of(distinct_images(8, seed=31)), metadata=auth, timeout_s=120)
            assert len(run.outcomes) == 8
            assert run.failed, "the scripted upstream failures failed some items"
            seen_by_client += [o.error.message for o in run.outcomes.values()]

            reply = await stub.Search(search_pb2.SearchRequest(query=types_pb2.Content(text="a pattern"), top_k=3),
                                      metadata=(("authorization", f"Bearer {TOKENS[1]}"),), timeout=30)
            assert reply.hits

            for metadata in [(("authorization", "Bearer not-the-token"),), None]:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.Stats(search_pb2.StatsRequest(), metadata=metadata, timeout=10)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
                seen_by_client.append(err.value.details() or "")

            # The embedder's upstream now fails for good, echoing its key.
            emb_fake.always = (401, {"code": "InvalidApiKey", "message": f"Invalid API-key provided: {EMBEDDER_KEY}"})
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Search(search_pb2.SearchRequest(query=types_pb2.Content(text="anything"), top_k=1),
                                  metadata=auth, timeout=30)
            seen_by_client.append(err.value.details() or "")
            failing = await ingest_all(stub, items_of(distinct_images(2, seed=32)), metadata=auth, timeout_s=60)
            assert len(failing.failed) == 2
            seen_by_client += [o.error.message for o in failing.outcomes.values()]
            emb_fake.always = None
    finally:
        for proc in reversed(procs):
            proc.stop()  # SIGTERM: shutdown lines are logged too

    # The secrets were really in use: the fakes saw the keys on the wire.
    assert any(r.headers.get("Authorization") == f"Bearer {CAPTIONER_KEY}" for r in cap_fake.requests)
    assert any(r["headers"].get("Authorization") == f"Bearer {EMBEDDER_KEY}" for r in emb_fake.requests)
    logs = {p.name: p.log() for p in procs}
    # The run exercised the failure paths at DEBUG level.
    assert "ingest item failed" in logs["search"]
    assert "retrying" in logs["captioner"]
    assert '"level": "debug"' in logs["search"]
    leaks = [f"{name} in the {where} log" for where, text in logs.items()
             for name, form in secret_forms().items() if form in text]
    leaks += [f"{name} in a message to the client: {msg!r}" for msg in seen_by_client
              for name, form in secret_forms().items() if form in msg]
    assert not leaks, "\n".join(leaks)
