"""Tenants and scoped tokens end to end: a real search service (scoped tokens from a hashed
token file), the lite embedder and a Milvus Lite server, all over gRPC on loopback.

Two tenants hold the same photos under the same ids (plus items of their own); from tenant
alpha nothing of tenant beta is visible through any RPC: every search target and feature,
like_id and stored-id examples, SearchAll, Get, Delete, Stats, Backfill. Read-only tokens
cannot write, removed tokens stop working without a restart, hostile filters stay inside
the tenant, Delete and Backfill are audited.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import pytest_asyncio
from prometheus_client import REGISTRY

from mmsearch.common.v1 import types_pb2
from mmsearch.admin.v1 import admin_pb2, admin_pb2_grpc
from mmsearch.search.v1 import search_pb2, search_pb2_grpc
from services.common.log import configure_logging
from services.common.server import RunningServer
from services.common.tokens import hash_token
from tests.conftest import MilvusLiteServer
from tests.search.conftest import Photo, create_legacy_collection, start_embedder, start_search

pytestmark = pytest.mark.asyncio(loop_scope="module")

TOKENS = {
    "alpha-all": ("alpha", ["search", "ingest", "delete"]),
    "alpha-read": ("alpha", ["search"]),
    "alpha-revocable": ("alpha", ["search"]),
    "beta-admin": ("beta", ["admin"]),
}
LEGACY = "legacy-plain-token-31337"  # SEARCH_AUTH_TOKENS: default tenant, every scope
SHARED = ["cat", "coffee", "rocket", "astronaut", "moon", "clock"]  # in both tenants, same ids
SECRET_WORD = "zq991secret"  # only in beta's own item


def token_file_text(names: list[str]) -> str:
    return json.dumps({"tokens": [{"name": n, "sha256": hash_token(n), "tenant": TOKENS[n][0], "scopes": TOKENS[n][1]}
                                  for n in names]})


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # as Kubernetes swaps a mounted Secret


def md(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


class Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(logging.getLogger().handlers[0].format(record))

    def audits(self) -> list[dict[str, object]]:
        return [e for e in (json.loads(line) for line in self.lines if line.startswith("{")) if e.get("event") == "audit"]


@dataclass
class Suite:
    stub: search_pb2_grpc.SearchStub
    token_file: Path
    log: Captured
    dimension: int


def item(data: bytes, item_id: str, caption: str | None, owner: str, **metadata: object) -> search_pb2.IngestItem:
    return search_pb2.IngestItem(
        image=types_pb2.Image(data=data), id=item_id, metadata_json=json.dumps({"owner": owner, **metadata}),
        caption=search_pb2.CaptionInput(description=caption) if caption is not None else None)


async def ingest(stub: search_pb2_grpc.SearchStub, token: str, items: list[search_pb2.IngestItem]) -> dict[
        str, int]:
    out: dict[str, int] = {}
    async for reply in stub.Ingest(iter([search_pb2.IngestRequest(items=items)]), metadata=md(token), timeout=120):
        out.update({o.id: o.status for o in reply.outcomes})
    return out


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def embedder() -> AsyncIterator[RunningServer]:
    server = await start_embedder()
    yield server
    await server.stop(0.5)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def suite(milvus_server: MilvusLiteServer, embedder: RunningServer, photos: dict[str, Photo],
                tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Suite]:
    configure_logging("INFO", json=True)
    captured = Captured()
    logging.getLogger().addHandler(captured)
    token_file = tmp_path_factory.mktemp("auth") / "tokens.json"
    write_atomically(token_file, token_file_text(list(TOKENS)))
    # The captioner is down: items without a caption are stored pending (for Backfill).
    search = await start_search(milvus_server.uri, embedder.address, "127.0.0.1:1", collection="tenants",
                                auth_token_file=token_file, auth_tokens=LEGACY, indexed_fields={"product": "string"},
                                on_caption_failure="defer", hybrid_candidates=64,
                                tenant_metrics=True)
    async with grpc.aio.insecure_channel(search.address) as channel:
        stub = search_pb2_grpc.SearchStub(channel)
        for tenant, token in (("alpha", "alpha-all"), ("beta", "beta-admin")):
            items = [item(photos[n].data, f"photo-{n}", f"a photo of a {n}", tenant, product=n) for n in SHARED]
            items.append(item(photos["flower"].data, f"{tenant}-only", f"a flower that only {tenant} has", tenant,
                              product="flower"))
            if tenant == "beta":
                items.append(item(photos["coins"].data, "beta-secret", f"coins with code {SECRET_WORD}", tenant,
                                  product="coins"))
            outcomes = await ingest(stub, token, items)
            assert set(outcomes.values()) == {search_pb2.ITEM_STATUS_STORED}, outcomes
            # One pending item each (no caption, captioner down): Backfill's work.
            pending = await ingest(stub, token, [item(photos["brick"].data, f"{tenant}-pending", None, tenant)])
            assert pending == {f"{tenant}-pending": search_pb2.ITEM_STATUS_DEFERRED}
        stats = await stub.Stats(search_pb2.StatsRequest(), metadata=md("alpha-read"), timeout=30)
        yield Suite(stub, token_file, captured, stats.dimension)
    await search.stop(0.5)
    logging.getLogger().removeHandler(captured)


def owners(hits: list[search_pb2.Hit]) -> set[str]:
    return {json.loads(h.metadata_json or "{}").get("owner", "?") for h in hits}


def assert_alpha_only(hits: list[search_pb2.Hit]) -> None:
    assert owners(hits) <= {"alpha"}, [(h.id, h.metadata_json) for h in hits]
    assert not {h.id for h in hits} & {"beta-only", "beta-secret", "beta-pending"}


def text(value: str) -> types_pb2.Content:
    return types_pb2.Content(text=value)


async def search(suite: Suite, token: str = "alpha-read", **kw: object) -> list[search_pb2.Hit]:
    kw.setdefault("top_k", 50)
    reply = await suite.stub.Search(search_pb2.SearchRequest(**kw), metadata=md(token), timeout=30)  # type: ignore[arg-type]
    return list(reply.hits)


async def rpc_error(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    return info.value


@pytest.mark.parametrize("target", [search_pb2.TARGET_IMAGE, search_pb2.TARGET_CAPTION, search_pb2.TARGET_HYBRID,
                                    search_pb2.TARGET_KEYWORD])
async def test_every_target_finds_only_the_callers_items(suite: Suite, target: int) -> None:
    for query in ("a photo of a cat", "a flower that only beta has", f"coins with code {SECRET_WORD}"):
        hits = await search(suite, query=text(query), target=target)
        assert_alpha_only(hits)
    # The same query from beta finds beta's secret: it is there, only not for alpha.
    beta = await search(suite, "beta-admin", query=text(f"code {SECRET_WORD}"), target=target)
    assert "beta-secret" in {h.id for h in beta} and owners(beta) == {"beta"}
    # Alpha sees its own copy of the shared photos under the caller's id, never a composite key.
    mine = await search(suite, query=text("a photo of a cat"), target=target)
    if target != search_pb2.TARGET_KEYWORD or mine:
        assert all("~" not in h.id for h in mine)


async def test_features_stay_inside_the_tenant(suite: Suite) -> None:
    vector = np.random.default_rng(1).normal(size=suite.dimension).astype(np.float32)
    cases = [
        {"query_vector": types_pb2.Embedding(values=vector.tolist())},
        {"query": text("a cat"), "group_by": search_pb2.GroupBy(field="product", size=2)},
        {"query": text("a cat"), "decay": search_pb2.Decay(field="ingested_at", scale=3_600_000)},
        {"query": text("a cat"), "min_score": -1.0},
        {"query": text("a cat"), "target": search_pb2.TARGET_HYBRID,
             "legs": [search_pb2.Leg(target=t) for t in (search_pb2.TARGET_IMAGE, search_pb2.TARGET_CAPTION,
                                                      search_pb2.TARGET_KEYWORD)]},
        {"like_id": "photo-cat"},
        {"like_id": "photo-cat", "target": search_pb2.TARGET_HYBRID},
        {"examples": [search_pb2.Example(id="photo-cat", weight=1.0), search_pb2.Example(id="photo-moon", weight=-0.5)]},
        {"query": text("a cat"), "filter": 'metadata["owner"] == "beta"'},
        {"query": text("a cat"), "offset": 3, "top_k": 20},
    ]
    for kw in cases:
        hits = await search(suite, **kw)
        assert_alpha_only(hits)
        assert hits or "filter" in kw, kw
        if "like_id" in kw:
            assert "photo-cat" not in {h.id for h in hits}  # the item itself is never a hit


async def test_another_tenants_ids_answer_exactly_as_missing_ones(suite: Suite) -> None:
    for field in ("like_id", "examples"):
        answers = []
        for item_id in ("beta-secret", "no-such-item"):
            kw: dict[str, object] = ({"like_id": item_id} if field == "like_id"
                                     else {"examples": [search_pb2.Example(id=item_id, weight=1.0)]})
            e = await rpc_error(suite.stub.Search(search_pb2.SearchRequest(top_k=5, **kw), metadata=md("alpha-read"),  # type: ignore[arg-type]
                                                  timeout=30))
            answers.append((e.code(), e.details().replace(item_id, "<id>")))
        assert answers[0] == answers[1], answers
        assert answers[0][0] == grpc.StatusCode.INVALID_ARGUMENT
    get = await suite.stub.Get(search_pb2.GetRequest(ids=["beta-secret", "beta-only", "photo-cat"]),
                               metadata=md("alpha-read"), timeout=30)
    assert list(get.missing_ids) == ["beta-secret", "beta-only"]
    assert [(r.id, json.loads(r.metadata_json)["owner"]) for r in get.records] == [("photo-cat", "alpha")]


async def test_concurrent_calls_of_two_tenants_each_keep_their_own(suite: Suite) -> None:
    async def get(token: str) -> set[str]:
        reply = await suite.stub.Get(search_pb2.GetRequest(ids=["photo-cat", "photo-moon"]), metadata=md(token),
                                     timeout=30)
        return {json.loads(r.metadata_json)["owner"] for r in reply.records}

    async def find(token: str) -> set[str]:
        return owners(await search(suite, token, query=text("a photo of a moon"), top_k=5))

    tokens = ["alpha-read", "beta-admin"] * 20
    results = await asyncio.gather(*(get(t) for t in tokens), *(find(t) for t in tokens))
    expected = [{t.split("-")[0]} for t in tokens] * 2
    assert results == expected


async def test_search_all_streams_only_the_callers_items(suite: Suite) -> None:
    stats = await suite.stub.Stats(search_pb2.StatsRequest(), metadata=md("alpha-read"), timeout=30)
    hits: list[search_pb2.Hit] = []
    async for reply in suite.stub.SearchAll(
            search_pb2.SearchAllRequest(search=search_pb2.SearchRequest(query=text("anything"))),
            metadata=md("alpha-read"), timeout=60):
        hits += reply.hits
    assert_alpha_only(hits)
    assert len(hits) == stats.item_count  # every alpha item, nothing else


async def test_stats_count_per_tenant(suite: Suite) -> None:
    counts = {}
    for token in ("alpha-read", "beta-admin", LEGACY):
        s = await suite.stub.Stats(search_pb2.StatsRequest(), metadata=md(token), timeout=30)
        counts[token] = (s.item_count, s.caption_pending_count)
    # Deletions by other tests may have run first: alpha has at most its 8, beta exactly 9.
    assert counts["beta-admin"] == (len(SHARED) + 3, 1)
    assert counts["alpha-read"][0] <= len(SHARED) + 2 and counts["alpha-read"][1] <= 1
    assert counts[LEGACY] == (0, 0)  # the default tenant (today's plaintext tokens) has nothing here


async def test_backfill_sees_only_the_callers_pending_items(suite: Suite) -> None:
    ids: list[str] = []
    async for reply in suite.stub.Backfill(search_pb2.BackfillRequest(), metadata=md("alpha-all"), timeout=60):
        ids += [o.id for o in reply.outcomes]
    assert ids == ["alpha-pending"]  # the captioner is down: FAILED, but only alpha's was tried
    audit = [a for a in suite.log.audits() if a.get("method") == "Backfill"][-1]
    assert (audit["tenant"], audit["identity"], audit["outcome"]) == ("alpha", "alpha-all", "started")


async def test_per_tenant_metrics_count_calls_when_enabled(suite: Suite) -> None:
    labels = {"tenant": "beta", "grpc_method": "Stats"}
    before = REGISTRY.get_sample_value("mmsearch_tenant_calls_total", labels) or 0.0
    await suite.stub.Stats(search_pb2.StatsRequest(), metadata=md("beta-admin"), timeout=30)
    assert REGISTRY.get_sample_value("mmsearch_tenant_calls_total", labels) == before + 1


async def test_delete_never_reaches_another_tenant(suite: Suite) -> None:
    reply = await suite.stub.Delete(search_pb2.DeleteRequest(ids=["beta-secret", "beta-only"]),
                                    metadata=md("alpha-all"), timeout=30)
    assert reply.deleted_count == 0  # as for missing ids
    reply = await suite.stub.Delete(search_pb2.DeleteRequest(ids=["photo-clock", "alpha-only"]),
                                    metadata=md("alpha-all"), timeout=30)
    assert reply.deleted_count == 2
    beta = await suite.stub.Get(search_pb2.GetRequest(ids=["beta-secret", "photo-clock"]), metadata=md("beta-admin"),
                                timeout=30)
    assert sorted(r.id for r in beta.records) == ["beta-secret", "photo-clock"]  # beta's copy is untouched
    alpha = await suite.stub.Get(search_pb2.GetRequest(ids=["photo-clock"]), metadata=md("alpha-read"), timeout=30)
    assert list(alpha.missing_ids) == ["photo-clock"]
    # Audit: one line per Delete, with tenant, identity (the name, never the token) and ids.
    audits = [a for a in suite.log.audits() if a.get("method") == "Delete"]
    assert [(a["tenant"], a["identity"], a["ids"], a["outcome"]) for a in audits[-2:]] == [
        ("alpha", "alpha-all", 2, "ok"), ("alpha", "alpha-all", 2, "ok")]
    assert not any("alpha-all" in line and "Bearer" in line for line in suite.log.lines)


async def test_a_read_only_token_cannot_write(suite: Suite, photos: dict[str, Photo]) -> None:
    e = await rpc_error(suite.stub.Delete(search_pb2.DeleteRequest(ids=["photo-cat"]), metadata=md("alpha-read"),
                                          timeout=30))
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED and "'delete'" in (e.details() or "")
    e = await rpc_error(ingest(suite.stub, "alpha-read", [item(photos["grass"].data, "sneaky", "grass", "alpha")]))
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED and "'ingest'" in (e.details() or "")
    e = await rpc_error(suite.stub.Get(search_pb2.GetRequest(ids=["sneaky"]), metadata=md("wrong-token"), timeout=30))
    assert e.code() == grpc.StatusCode.UNAUTHENTICATED
    e = await rpc_error(suite.stub.Stats(search_pb2.StatsRequest(), timeout=30))
    assert e.code() == grpc.StatusCode.UNAUTHENTICATED
    got = await suite.stub.Get(search_pb2.GetRequest(ids=["photo-cat", "sneaky"]), metadata=md("alpha-read"),
                               timeout=30)
    assert list(got.missing_ids) == ["sneaky"]  # nothing was written, nothing was deleted


async def test_a_token_removed_from_the_file_stops_working_without_a_restart(suite: Suite) -> None:
    await suite.stub.Stats(search_pb2.StatsRequest(), metadata=md("alpha-revocable"), timeout=30)
    write_atomically(suite.token_file, token_file_text([n for n in TOKENS if n != "alpha-revocable"]))
    deadline = time.monotonic() + 5
    while True:
        try:
            await suite.stub.Stats(search_pb2.StatsRequest(), metadata=md("alpha-revocable"), timeout=30)
        except grpc.aio.AioRpcError as e:
            assert e.code() == grpc.StatusCode.UNAUTHENTICATED
            break
        assert time.monotonic() < deadline, "the removed token still works after 5 s"
        await asyncio.sleep(0.2)
    await suite.stub.Stats(search_pb2.StatsRequest(), metadata=md("alpha-read"), timeout=30)  # others still work
    write_atomically(suite.token_file, token_file_text(list(TOKENS)))  # and it comes back the same way
    deadline = time.monotonic() + 5
    while True:
        try:
            await suite.stub.Stats(search_pb2.StatsRequest(), metadata=md("alpha-revocable"), timeout=30)
            break
        except grpc.aio.AioRpcError:
            assert time.monotonic() < deadline, "the re-added token does not work after 5 s"
            await asyncio.sleep(0.2)


HOSTILE_FILTERS = [
    'id != "" or true',
    '1 == 1 or true',
    'true) or (true',
    'id != "x") or (id != "y"',
    'tenant != "alpha"',
    'tenant == "beta"',
    'TENANT == "beta"',
    '(tenant == "beta")',
    'tenant in ["alpha", "beta"]',
    'id != "" or tenant == "beta"',
    '"a" == "a") or (1 == 1',
    "'a' == 'a') or ('b' == 'b'",
    'caption like "%") or (caption like "%',
    'caption like "%\\") or (true or \\""',
    'metadata["owner"] == "beta"',
    'metadata["owner"] != "alpha"',
    'not (metadata["owner"] == "alpha")',
    ')) or ((true',
    '((true',
    'id != "" ' + 'or id != "" ' * 150,
    'id in [' + ", ".join(f'"x{i}"' for i in range(300)) + '] or true',
    '(' * 60 + 'true' + ')' * 60 + ' or true',
    'ID != "" || true',
    'product == "coins" || product != "coins"',
    'exists metadata["owner"] or true',
]


async def test_hostile_filters_never_leave_the_tenant(suite: Suite) -> None:
    refused = 0
    for expr in HOSTILE_FILTERS:
        for target in (search_pb2.TARGET_IMAGE, search_pb2.TARGET_HYBRID, search_pb2.TARGET_KEYWORD):
            query = text(f"coins with code {SECRET_WORD}")
            try:
                hits = await search(suite, query=query, target=target, filter=expr)
            except grpc.aio.AioRpcError as e:
                assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (expr, e.details())
                refused += 1
                continue
            assert_alpha_only(hits)
        try:
            async for reply in suite.stub.SearchAll(
                    search_pb2.SearchAllRequest(search=search_pb2.SearchRequest(query=text("coins"), filter=expr)),
                    metadata=md("alpha-read"), timeout=60):
                assert_alpha_only(list(reply.hits))
        except grpc.aio.AioRpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (expr, e.details())
    assert refused >= 3 * 10  # the ones naming `tenant` or unbalanced are refused outright


async def test_a_collection_from_before_tenants_serves_the_default_tenant_only(
        embedder: RunningServer, tmp_path: Path, photos: dict[str, Photo]) -> None:
    uri = str(tmp_path / "old.db")
    async with grpc.aio.insecure_channel(embedder.address) as channel:
        from mmsearch.embedder.v1 import embedder_pb2, embedder_pb2_grpc

        info = await embedder_pb2_grpc.EmbedderStub(channel).Info(embedder_pb2.InfoRequest(), timeout=30)
    create_legacy_collection(uri, "old", info.model_id, info.dimension)
    token_file = tmp_path / "tokens.yaml"
    token_file.write_text(
        "tokens:\n"
        f"  - {{name: beta, sha256: {hash_token('beta-admin')}, tenant: beta, scopes: [admin]}}\n")
    search_server = await start_search(uri, embedder.address, "127.0.0.1:1", collection="old",
                                       auth_token_file=token_file, auth_tokens=LEGACY,
                                       originals={"dir": tmp_path / "originals"})
    try:
        async with grpc.aio.insecure_channel(search_server.address) as channel:
            stub = search_pb2_grpc.SearchStub(channel)
            outcomes = await ingest(stub, LEGACY, [item(photos["cat"].data, "photo-cat", "a cat", "default")])
            assert outcomes == {"photo-cat": search_pb2.ITEM_STATUS_STORED}
            got = await stub.Get(search_pb2.GetRequest(ids=["photo-cat"]), metadata=md(LEGACY), timeout=30)
            assert [r.id for r in got.records] == ["photo-cat"]
            hits = (await stub.Search(search_pb2.SearchRequest(query=text("a cat"), top_k=3), metadata=md(LEGACY),
                                      timeout=30)).hits
            assert [h.id for h in hits] == ["photo-cat"]
            for call in (stub.Get(search_pb2.GetRequest(ids=["photo-cat"]), metadata=md("beta-admin"), timeout=30),
                         stub.Stats(search_pb2.StatsRequest(), metadata=md("beta-admin"), timeout=30),
                         stub.Search(search_pb2.SearchRequest(query=text("a cat"), top_k=3), metadata=md("beta-admin"),
                                     timeout=30)):
                e = await rpc_error(call)
                assert e.code() == grpc.StatusCode.FAILED_PRECONDITION, e.details()
                assert "mmsearch index create" in (e.details() or "") and "backfill" in (e.details() or "")
            # The migration the message names: a new version (with the tenant field) of the same
            # model, backfilled and promoted, with no downtime; then every tenant is served.
            admin = admin_pb2_grpc.AdminStub(channel)
            created = await admin.CreateCandidate(admin_pb2.CreateCandidateRequest(embedder_model_id=info.model_id),
                                                  metadata=md(LEGACY), timeout=60)
            assert created.candidate.name == "old__v1"
            async for reply in admin.Backfill(admin_pb2.BackfillRequest(), metadata=md(LEGACY), timeout=120):
                assert all(o.status == admin_pb2.BACKFILL_STATUS_COPIED for o in reply.outcomes), reply
            switched = await admin.Promote(admin_pb2.PromoteRequest(), metadata=md(LEGACY), timeout=60)
            assert (switched.live.name, switched.previous.name, switched.live.item_count) == ("old__v1", "old__v0", 1)
            stats = await stub.Stats(search_pb2.StatsRequest(), metadata=md("beta-admin"), timeout=30)
            assert stats.item_count == 0  # beta's own items: none yet
            got = await stub.Get(search_pb2.GetRequest(ids=["photo-cat"]), metadata=md("beta-admin"), timeout=30)
            assert list(got.missing_ids) == ["photo-cat"]  # the default tenant's item stays its own
            hits = (await stub.Search(search_pb2.SearchRequest(query=text("a cat"), top_k=3), metadata=md(LEGACY),
                                      timeout=30)).hits
            assert [h.id for h in hits] == ["photo-cat"]
    finally:
        await search_server.stop(0.5)
