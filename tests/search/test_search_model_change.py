"""Changing the embedding model without downtime (issue 18), end to end.

Real processes on loopback: a Milvus Lite server, three lite embedders (model A; B = the
same models through a fixed 384 -> 384 rotation: another model id, same dimension, so
vectors that must never meet A's; C = a 128-dimension projection) and the search service
with B and C mapped in SEARCH_MODEL_EMBEDDERS and an original store. 200 items are
ingested as inline bytes with model A; then, through the Admin service:
- a candidate for B, items ingested meanwhile reach it (dual write);
- its backfill, with the search process killed -9 half-way and restarted: the re-run ends
  with exactly the live items in the candidate, none twice;
- promote, then rollback, while a client searches 20 times a second: no search fails and
  every result list comes from exactly one model (A before, B after the swap);
- a query vector from another model: FAILED_PRECONDITION naming both models;
- a change to another dimension (C), and what may not be dropped.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from pymilvus import MilvusClient
from typer.testing import CliRunner

from mmsearch.admin.v1 import admin_pb2, admin_pb2_grpc
from mmsearch.cli.main import app as cli_app
from mmsearch.common.v1 import types_pb2
from mmsearch.embedder.v1 import embedder_pb2, embedder_pb2_grpc
from mmsearch.search.v1 import search_pb2, search_pb2_grpc
from tests.conftest import MilvusLiteServer
from tests.reliability.helpers import ServiceProcess, distinct_images, ingest_all

pytestmark = pytest.mark.asyncio(loop_scope="module")

N = 200
CAPTIONS = ["a red cup on a table", "a black top", "a sleeping cat", "a mountain lake", "a city at night"]


@dataclass
class Suite:
    milvus: MilvusLiteServer
    search: ServiceProcess
    embedders: dict[str, ServiceProcess]  # "A", "B", "C"
    models: dict[str, str]  # "A" -> model id
    index: str
    originals: Path
    images: list[bytes] = field(default_factory=list)

    def channel(self) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(self.search.address)

    def rows(self, collection: str) -> list[dict]:
        client = MilvusClient(self.milvus.uri)
        try:
            it = client.query_iterator(collection, batch_size=1000, filter='id != ""',
                                       output_fields=["id", "embedder_model_id", "caption"])
            rows = []
            while batch := it.next():
                rows += batch
            it.close()
            return rows
        finally:
            client.close()


def _model_of(address: str) -> str:
    async def ask() -> str:
        async with grpc.aio.insecure_channel(address) as channel:
            return (await embedder_pb2_grpc.EmbedderStub(channel).Info(embedder_pb2.InfoRequest(), timeout=30)).model_id

    return asyncio.run(ask())


@pytest.fixture(scope="module")
def suite(milvus_server: MilvusLiteServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Suite]:
    logs = tmp_path_factory.mktemp("model-change-logs")
    quiet = {"EMBEDDER_LOG_LEVEL": "WARNING", "EMBEDDER_TORCH_THREADS": "1"}
    embedders = {
        "A": ServiceProcess("embedder", quiet, logs),
        "B": ServiceProcess("embedder", {**quiet, "EMBEDDER_LITE__DIM": "384"}, logs),
        "C": ServiceProcess("embedder", {**quiet, "EMBEDDER_LITE__DIM": "128"}, logs),
    }
    for p in embedders.values():
        p.start()
    for p in embedders.values():
        p.wait_ready(180)
    models = {name: _model_of(p.address) for name, p in embedders.items()}
    assert len(set(models.values())) == 3, models
    index = f"mc_{uuid.uuid4().hex[:8]}"
    originals = tmp_path_factory.mktemp("originals")
    search = ServiceProcess("search", {
        "SEARCH_MILVUS_URI": milvus_server.uri, "SEARCH_COLLECTION": index, "SEARCH_INDEX_TYPE": "FLAT",
        "SEARCH_EMBEDDER_TARGET": embedders["A"].address, "SEARCH_CAPTIONER_TARGET": "127.0.0.1:9",
        "SEARCH_MODEL_EMBEDDERS": f"{models['B']}={embedders['B'].address},{models['C']}={embedders['C'].address}",
        "SEARCH_ORIGINALS__DIR": str(originals), "SEARCH_LOG_LEVEL": "WARNING",
    }, logs)
    search.start()
    search.wait_ready(120)
    yield Suite(milvus_server, search, embedders, models, index, originals)
    search.stop()
    for p in embedders.values():
        p.stop()


def _items(images: list[bytes], start: int) -> list[search_pb2.IngestItem]:
    return [search_pb2.IngestItem(image=types_pb2.Image(data=d), id=f"item-{start + i:04d}",
                                  caption=search_pb2.CaptionInput(description=CAPTIONS[(start + i) % len(CAPTIONS)]),
                                  metadata_json=f'{{"n": {start + i}}}')
            for i, d in enumerate(images)]


async def _collections(suite: Suite) -> dict[str, admin_pb2.CollectionInfo]:
    async with suite.channel() as channel:
        reply = await admin_pb2_grpc.AdminStub(channel).ListCollections(admin_pb2.ListCollectionsRequest(), timeout=30)
    assert reply.index == suite.index
    return {c.name: c for c in reply.collections}


def _by_role(collections: dict[str, admin_pb2.CollectionInfo], role: int) -> admin_pb2.CollectionInfo:
    found = [c for c in collections.values() if c.role == role]
    assert len(found) == 1, collections
    return found[0]


def _cli(suite: Suite, *args: str) -> dict:
    result = CliRunner().invoke(cli_app, ["--address", suite.search.address, "--timeout", "300", "index", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@dataclass
class Searcher:
    """Searches by text 20 times a second; records every failure and which models each
    result list came from."""

    suite: Suite
    failures: list[str] = field(default_factory=list)
    models: list[frozenset[str]] = field(default_factory=list)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        stop = asyncio.Event()

        async def loop() -> None:
            async with self.suite.channel() as channel:
                stub = search_pb2_grpc.SearchStub(channel)
                while not stop.is_set():
                    started = time.monotonic()
                    try:
                        reply = await stub.Search(search_pb2.SearchRequest(
                            query=types_pb2.Content(text="a sleeping cat"), target=search_pb2.TARGET_HYBRID,
                            top_k=10, output_fields=["embedder_model_id"]), timeout=10)
                        self.models.append(frozenset(h.embedder_model_id for h in reply.hits))
                    except grpc.aio.AioRpcError as e:
                        self.failures.append(f"{e.code().name}: {e.details()}")
                    await asyncio.sleep(max(0.0, 0.05 - (time.monotonic() - started)))

        task = asyncio.create_task(loop())
        try:
            yield
        finally:
            stop.set()
            await task


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def ingested(suite: Suite) -> Suite:
    suite.images = distinct_images(N + 40, seed=18)
    async with suite.channel() as channel:
        run = await ingest_all(search_pb2_grpc.SearchStub(channel), _items(suite.images[:N], 0), timeout_s=600)
    assert len(run.stored) == N, run.failed
    return suite


async def test_the_first_collection_is_a_version_behind_the_alias(ingested: Suite) -> None:
    collections = await _collections(ingested)
    live = _by_role(collections, admin_pb2.ROLE_LIVE)
    assert (live.name, live.version, live.embedder_model_id) == (f"{ingested.index}__v1", 1, ingested.models["A"])
    assert live.item_count == N and live.dimension == 384


async def test_a_query_vector_from_another_model_is_refused(ingested: Suite) -> None:
    async with grpc.aio.insecure_channel(ingested.embedders["B"].address) as channel:
        reply = await embedder_pb2_grpc.EmbedderStub(channel).Embed(embedder_pb2.EmbedRequest(
            items=[types_pb2.Content(text="a sleeping cat")]), timeout=30)
    vector = types_pb2.Embedding(values=reply.embeddings[0].values)
    async with ingested.channel() as channel:
        stub = search_pb2_grpc.SearchStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Search(search_pb2.SearchRequest(query_vector=vector, query_vector_model_id=reply.model_id,
                                                       top_k=3), timeout=30)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert ingested.models["B"] in e.value.details() and ingested.models["A"] in e.value.details()
        # The same vector naming no model: only its dimension can be checked (documented).
        ok = await stub.Search(search_pb2.SearchRequest(query_vector=vector, top_k=3), timeout=30)
        assert len(ok.hits) == 3


async def test_backfill_survives_kill_9_and_ends_with_exactly_the_live_items(ingested: Suite) -> None:
    s = ingested
    async with s.channel() as channel:
        admin = admin_pb2_grpc.AdminStub(channel)
        created = await admin.CreateCandidate(admin_pb2.CreateCandidateRequest(embedder_model_id=s.models["B"]),
                                              timeout=60)
        assert (created.candidate.name, created.candidate.role) == (f"{s.index}__v2", admin_pb2.ROLE_CANDIDATE)
        with pytest.raises(grpc.aio.AioRpcError) as e:  # one candidate at a time
            await admin.CreateCandidate(admin_pb2.CreateCandidateRequest(embedder_model_id=s.models["C"]), timeout=60)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        # Items ingested now reach the candidate too, with B's vectors.
        run = await ingest_all(search_pb2_grpc.SearchStub(channel), _items(s.images[N : N + 20], N), timeout_s=300)
        assert len(run.stored) == 20
    candidate = f"{s.index}__v2"
    assert {r["id"] for r in s.rows(candidate)} == {f"item-{i:04d}" for i in range(N, N + 20)}

    # The backfill, killed -9 with the search process half-way.
    copied = 0
    async with s.channel() as channel:
        stream = admin_pb2_grpc.AdminStub(channel).Backfill(admin_pb2.BackfillRequest(max_items_per_s=60), timeout=600)
        async for reply in stream:
            copied = reply.progress.copied
            if copied >= 60:
                s.search.kill9()
                break
    assert 60 <= copied < N
    with contextlib.suppress(Exception):
        stream.cancel()
    s.search.start()
    s.search.wait_ready(120)
    partial = {r["id"] for r in s.rows(candidate)}
    assert N + 20 > len(partial) >= 80

    async with s.channel() as channel:
        final = None
        failed = []
        async for reply in admin_pb2_grpc.AdminStub(channel).Backfill(admin_pb2.BackfillRequest(), timeout=600):
            final = reply.progress
            failed += [o for o in reply.outcomes if o.status == admin_pb2.BACKFILL_STATUS_FAILED]
    assert final is not None and not failed
    assert final.total == N + 20 and final.skipped >= len(partial) and final.copied + final.skipped == N + 20
    live_rows, cand_rows = s.rows(f"{s.index}__v1"), s.rows(candidate)
    assert len(cand_rows) == len({r["id"] for r in cand_rows}) == N + 20  # none twice
    assert {r["id"] for r in cand_rows} == {r["id"] for r in live_rows}
    assert {r["embedder_model_id"] for r in cand_rows} == {s.models["B"]}
    captions = {r["id"]: r["caption"] for r in live_rows}
    assert all(r["caption"] == captions[r["id"]] for r in cand_rows)  # kept, not re-captioned


async def test_promote_and_rollback_under_continuous_search(ingested: Suite) -> None:
    s = ingested
    searcher = Searcher(s)
    async with s.channel() as channel:
        admin = admin_pb2_grpc.AdminStub(channel)
        async with searcher.running():
            await asyncio.sleep(1.0)
            before = len(searcher.models)
            switched = await admin.Promote(admin_pb2.PromoteRequest(), timeout=120)
            assert switched.live.name == f"{s.index}__v2" and switched.previous.name == f"{s.index}__v1"
            await asyncio.sleep(2.5)  # longer than a process' index refresh (1 s)
        promoted = len(searcher.models)
        assert not searcher.failures, searcher.failures[:5]
        assert promoted - before >= 10 * 2.5 * 0.8, "the client searched at >= 10/s"
        assert all(len(m) == 1 for m in searcher.models), "a result list mixed models"
        assert searcher.models[0] == {s.models["A"]} and searcher.models[-1] == {s.models["B"]}

        collections = await _collections(s)
        assert _by_role(collections, admin_pb2.ROLE_LIVE).embedder_model_id == s.models["B"]
        assert _by_role(collections, admin_pb2.ROLE_PREVIOUS).embedder_model_id == s.models["A"]
        # Ingest after the promote writes the previous collection too: rollback loses nothing.
        run = await ingest_all(search_pb2_grpc.SearchStub(channel), _items(s.images[N + 20 : N + 30], N + 20))
        assert len(run.stored) == 10

        searcher = Searcher(s)
        async with searcher.running():
            await asyncio.sleep(0.5)
            back = await admin.Rollback(admin_pb2.RollbackRequest(), timeout=120)
            assert back.live.name == f"{s.index}__v1" and back.caught_up == 0
            await asyncio.sleep(2.5)
        assert not searcher.failures, searcher.failures[:5]
        assert all(len(m) == 1 for m in searcher.models)
        assert searcher.models[0] == {s.models["B"]} and searcher.models[-1] == {s.models["A"]}
    assert len(s.rows(f"{s.index}__v1")) == len(s.rows(f"{s.index}__v2")) == N + 30


async def test_a_model_of_another_dimension_and_what_may_be_dropped(ingested: Suite) -> None:
    s = ingested
    # Through the CLI this time (`mmsearch index ...` against the real Admin service).
    created = _cli(s, "create", "--model", s.models["C"], "--json")
    assert created["dimension"] == 128 and created["version"] == 3 and created["role"] == "candidate"
    # One item's original is lost (inline bytes, no URI): it cannot be re-embedded.
    lost = hashlib.sha256(s.images[0]).hexdigest()
    (path,) = s.originals.rglob(f"{lost}*")
    path.unlink()
    # No backfill: promote's catch-up pass copies every other item itself, then the counts
    # differ by the lost one: refused with both counts, nothing changes...
    refused = CliRunner().invoke(cli_app, ["--address", s.search.address, "--timeout", "300", "index", "promote"])
    assert refused.exit_code == 1
    assert f"holds {N + 29} items" in refused.output and f"{N + 30}" in refused.output, refused.output
    assert _by_role(await _collections(s), admin_pb2.ROLE_LIVE).name == f"{s.index}__v1"
    # ... until the operator forces it (the lost item stays in the old collection).
    switched = _cli(s, "promote", "--force", "--json")
    assert switched["caught_up"] == 0 and switched["live"]["name"] == f"{s.index}__v3"
    assert switched["live"]["item_count"] == N + 29
    listed = _cli(s, "list", "--json")
    assert {c["name"]: c["role"] for c in listed["collections"]} == {
        f"{s.index}__v1": "previous", f"{s.index}__v2": "retired", f"{s.index}__v3": "live"}
    async with s.channel() as channel:
        admin = admin_pb2_grpc.AdminStub(channel)
        collections = await _collections(s)
        live = _by_role(collections, admin_pb2.ROLE_LIVE)
        assert (live.embedder_model_id, live.dimension, live.item_count) == (s.models["C"], 128, N + 29)
        stub = search_pb2_grpc.SearchStub(channel)
        reply = await stub.Search(search_pb2.SearchRequest(query=types_pb2.Content(text="a sleeping cat"), top_k=5,
                                                           target=search_pb2.TARGET_CAPTION), timeout=30)
        assert len(reply.hits) == 5 and reply.hits[0].caption == "a sleeping cat"
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Search(search_pb2.SearchRequest(query_vector=types_pb2.Embedding(values=[0.1] * 384), top_k=3),
                              timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "128" in e.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await admin.DropCollection(admin_pb2.DropCollectionRequest(name=live.name), timeout=60)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        retired = _by_role(collections, admin_pb2.ROLE_RETIRED)
        assert retired.name == f"{s.index}__v2"
        await admin.DropCollection(admin_pb2.DropCollectionRequest(name=retired.name), timeout=60)
        assert retired.name not in await _collections(s)
        # A candidate for the live model itself: a new version with today's schema (a schema migration).
        same = await admin.CreateCandidate(admin_pb2.CreateCandidateRequest(embedder_model_id=s.models["C"]),
                                           timeout=60)
        assert same.candidate.version == 4 and same.candidate.embedder_model_id == s.models["C"]
        await admin.DropCollection(admin_pb2.DropCollectionRequest(name=same.candidate.name), timeout=60)
