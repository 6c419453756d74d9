"""The hostile-input corpus against every public RPC of the running suite.

Embedder, captioner (lite models) and search run as real processes. Every case must get
its documented status code with a message naming the problem (for ingest items: a FAILED
outcome with the reason), every process must still be alive after every case and answer
a good call at the end, and each process' resident memory must stay within a margin of
what it was after warm-up (a decoded 50,000 x 50,000 bomb alone would be 7.5 GB).
"""
from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio

from mmsearch.captioner.v1 import captioner_pb2, captioner_pb2_grpc
from mmsearch.common.v1 import types_pb2
from mmsearch.embedder.v1 import embedder_pb2, embedder_pb2_grpc
from mmsearch.search.v1 import search_pb2, search_pb2_grpc
from tests.conftest import MilvusLiteServer
from tests.corpus.hostile import IMAGES, OK
from tests.reliability.helpers import ServiceProcess, distinct_images, ingest_all, rss_mb

pytestmark = pytest.mark.asyncio(loop_scope="module")
INVALID = grpc.StatusCode.INVALID_ARGUMENT
MiB = 1024 * 1024
# Resident memory may grow this much over the whole corpus (allocator caches, gRPC
# buffers after a 100 MB message); a decoded bomb alone would be gigabytes.
# Measured: up to ~230 MiB (search, after the 100 MB and 21 MiB messages); Python-level
# allocations stay flat (tracemalloc), the rest is the C heap keeping freed pages.
RSS_MARGIN_MB = 400.0
DIM_PROBE = 8  # any wrong dimension: the lite model's is 384
PLACEHOLDER = "\x01\x02\x03\x04"
BAD_UTF8 = b"\xff\xfe\xc3\x28"


@dataclass
class Suite:
    procs: dict[str, ServiceProcess]
    channels: dict[str, grpc.aio.Channel]

    @property
    def search(self) -> search_pb2_grpc.SearchStub:
        return search_pb2_grpc.SearchStub(self.channels["search"])

    @property
    def captioner(self) -> captioner_pb2_grpc.CaptionerStub:
        return captioner_pb2_grpc.CaptionerStub(self.channels["captioner"])

    @property
    def embedder(self) -> embedder_pb2_grpc.EmbedderStub:
        return embedder_pb2_grpc.EmbedderStub(self.channels["embedder"])

    def rss(self) -> dict[str, float]:
        return {name: rss_mb(p.pid) for name, p in self.procs.items()}

    def assert_alive(self, after: str) -> None:
        for name, p in self.procs.items():
            assert p.alive, f"{name} died after {after!r}:\n" + "\n".join(p.tail(40))


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def suite(milvus_server: MilvusLiteServer, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Suite]:
    logs = tmp_path_factory.mktemp("corpus-logs")
    quiet = {"LOG_LEVEL": "WARNING"}
    embedder = ServiceProcess("embedder", {f"EMBEDDER_{k}": v for k, v in quiet.items()}, logs)
    captioner = ServiceProcess("captioner", {f"CAPTIONER_{k}": v for k, v in quiet.items()}, logs)
    search = ServiceProcess("search", {
        **{f"SEARCH_{k}": v for k, v in quiet.items()}, "SEARCH_MILVUS_URI": milvus_server.uri,
        "SEARCH_COLLECTION": "corpus", "SEARCH_EMBEDDER_TARGET": embedder.address,
        "SEARCH_CAPTIONER_TARGET": captioner.address}, logs)
    procs = {"embedder": embedder, "captioner": captioner, "search": search}
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", 64 * MiB)]
    channels: dict[str, grpc.aio.Channel] = {}
    try:
        embedder.start()
        captioner.start()
        await embedder.wait_ready_async(180)
        await captioner.wait_ready_async(180)
        search.start()
        await search.wait_ready_async(120)
        channels = {name: grpc.aio.insecure_channel(p.address, options=options) for name, p in procs.items()}
        yield Suite(procs, channels)
    finally:
        for c in channels.values():
            await c.close()
        for p in procs.values():
            p.stop()


def raw_with_bad_utf8(message: Any) -> bytes:
    """The message serialized, with the placeholder string's bytes replaced by invalid
    UTF-8 of the same length (the Python protobuf API refuses to build such a message)."""
    raw = message.SerializeToString()
    assert raw.count(PLACEHOLDER.encode()) == 1
    return raw.replace(PLACEHOLDER.encode(), BAD_UTF8)


def raw_unary(channel: grpc.aio.Channel, method: str, raw: bytes) -> Awaitable[Any]:
    return channel.unary_unary(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)(
        raw, timeout=30)


async def raw_ingest(channel: grpc.aio.Channel, raw: bytes) -> dict[int, search_pb2.ItemOutcome]:
    """Sends one already-encoded Ingest chunk; returns the outcomes by stream index."""
    call = channel.stream_stream("/mmsearch.search.v1.Search/Ingest", request_serializer=lambda b: b,
                                 response_deserializer=search_pb2.IngestResponse.FromString)
    outcomes: dict[int, search_pb2.ItemOutcome] = {}
    async for reply in call(iter([raw]), timeout=60):
        for o in reply.outcomes:
            assert o.index not in outcomes, f"item {o.index} got two outcomes"
            outcomes[o.index] = o
    return outcomes


async def status_of(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str, Any]:
    try:
        reply = await call
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details() or "", None
    return grpc.StatusCode.OK, "", reply


async def good_calls(s: Suite, image: bytes) -> None:
    run = await ingest_all(s.search, [search_pb2.IngestItem(image=types_pb2.Image(data=image))], timeout_s=60)
    assert not run.failed, run.failed
    hits = await s.search.Search(search_pb2.SearchRequest(query=types_pb2.Content(text="a pattern"), top_k=1),
                                 timeout=30)
    assert hits.hits
    assert (await s.captioner.Caption(captioner_pb2.CaptionRequest(image=types_pb2.Image(data=image)),
                                      timeout=30)).caption.description
    assert (await s.embedder.Embed(embedder_pb2.EmbedRequest(items=[types_pb2.Content(text="ok")]),
                                   timeout=30)).embeddings


# --- the cases ------------------------------------------------------------------------------------


def text_query(text: str = "a pattern", **kw: Any) -> search_pb2.SearchRequest:
    return search_pb2.SearchRequest(query=types_pb2.Content(text=text), **{"top_k": 3, **kw})


def vector_query(values: list[float], **kw: Any) -> search_pb2.SearchRequest:
    return search_pb2.SearchRequest(query_vector=types_pb2.Embedding(values=values), **{"top_k": 3, **kw})


Call = Callable[[Suite], Awaitable[Any]]


def call_cases() -> list[tuple[str, Call, grpc.StatusCode, str]]:
    """(name, call, expected code, phrase the message must contain)."""
    img = distinct_images(1, seed=41)[0]
    image = types_pb2.Image(data=img)
    hundred_mb = b"\x89PNG" + bytes(100 * MiB)
    megabyte_text = "lorem ipsum " * (MiB // 12)
    s_ = lambda f: f
    return [
        # Search.Search
        ("top_k = 0", s_(lambda s: s.search.Search(text_query(top_k=0))), INVALID, "top_k must be between 1 and"),
        ("top_k negative", s_(lambda s: s.search.Search(text_query(top_k=-5))), INVALID, "top_k must be between"),
        ("top_k 1,000,000", s_(lambda s: s.search.Search(text_query(top_k=1_000_000))), INVALID, "got 1000000"),
        ("negative offset", s_(lambda s: s.search.Search(text_query(offset=-1))), INVALID, "offset must be >= 0"),
        ("offset + top_k over the window", s_(lambda s: s.search.Search(text_query(offset=16_380, top_k=10))),
         INVALID, "offset + top_k must be at most 16384"),
        ("unknown target enum", s_(lambda s: s.search.Search(text_query(target=99))), INVALID, "unknown target 99"),
        ("unknown fusion enum", s_(lambda s: s.search.Search(text_query(
            target=search_pb2.TARGET_HYBRID, fusion=search_pb2.Fusion(method=42)))), INVALID, "unknown fusion method"),
        ("rrf_k too large", s_(lambda s: s.search.Search(text_query(
            target=search_pb2.TARGET_HYBRID, fusion=search_pb2.Fusion(rrf_k=20_000)))), INVALID, "fusion.rrf_k"),
        ("fusion weight 5", s_(lambda s: s.search.Search(text_query(target=search_pb2.TARGET_HYBRID, fusion=(
            search_pb2.Fusion(method=search_pb2.FUSION_METHOD_WEIGHTED, image_weight=5.0))))), INVALID,
         "fusion weights"),
        ("composed query without an image", s_(lambda s: s.search.Search(search_pb2.SearchRequest(
            query=types_pb2.Content(composed=types_pb2.Composed(instruction="make it red")), top_k=3))),
         INVALID, "composed query has no image"),
        ("composed weight NaN", s_(lambda s: s.search.Search(search_pb2.SearchRequest(query=types_pb2.Content(
            composed=types_pb2.Composed(image=image, instruction="red", instruction_weight=float("nan"))), top_k=3))),
         INVALID, "instruction_weight"),
        ("composed empty instruction", s_(lambda s: s.search.Search(search_pb2.SearchRequest(
            query=types_pb2.Content(composed=types_pb2.Composed(image=image, instruction=" ")), top_k=3))),
         INVALID, "empty instruction"),
        ("no query at all", s_(lambda s: s.search.Search(search_pb2.SearchRequest(top_k=3))), INVALID,
         "set exactly one of query, query_vector, like_id and examples"),
        ("query and vector both", s_(lambda s: s.search.Search(search_pb2.SearchRequest(
            query=types_pb2.Content(text="x"), query_vector=types_pb2.Embedding(values=[1.0]), top_k=3))),
         INVALID, "set exactly one"),
        ("empty content", s_(lambda s: s.search.Search(search_pb2.SearchRequest(query=types_pb2.Content(), top_k=3))),
         INVALID, "content is empty"),
        ("whitespace text", s_(lambda s: s.search.Search(text_query(" \t\n"))), INVALID, "query text is empty"),
        ("1 MB of query text", s_(lambda s: s.search.Search(text_query(megabyte_text))), INVALID,
         "more than the limit"),
        ("NaN in query vector", s_(lambda s: s.search.Search(vector_query([float("nan")] * 384))), INVALID,
         "NaN or infinity"),
        ("inf in query vector", s_(lambda s: s.search.Search(vector_query([1.0] * 383 + [float("inf")]))), INVALID,
         "NaN or infinity"),
        ("wrong vector dimension", s_(lambda s: s.search.Search(vector_query([0.5] * DIM_PROBE))), INVALID,
         "dimension"),
        ("all-zero vector", s_(lambda s: s.search.Search(vector_query([0.0] * 384))), INVALID, "all zeros"),
        ("unknown output field", s_(lambda s: s.search.Search(text_query(output_fields=["image_vector"]))), INVALID,
         "unknown output fields"),
        ("1 MB filter", s_(lambda s: s.search.Search(text_query(filter="id == 'a' or " * (MiB // 12)))), INVALID,
         "more than the limit of 2048"),
        ("filter with NUL", s_(lambda s: s.search.Search(text_query(filter="id == 'a'\x00"))), INVALID,
         "control characters"),
        ("malformed filter", s_(lambda s: s.search.Search(text_query(filter='metadata["x"] =='))), INVALID,
         "Milvus rejected the filter"),
        ("invalid UTF-8 in query text", s_(lambda s: raw_unary(
            s.channels["search"], "/mmsearch.search.v1.Search/Search", raw_with_bad_utf8(text_query(PLACEHOLDER)))),
         INVALID, "bad UTF-8"),
        ("corrupt protobuf", s_(lambda s: raw_unary(s.channels["search"], "/mmsearch.search.v1.Search/Search",
                                                    b"\x0a\xff\xff\xff\xff\x0f")), INVALID, "could not be decoded"),
        ("100 MB search request", s_(lambda s: s.search.Search(search_pb2.SearchRequest(
            query=types_pb2.Content(image=types_pb2.Image(data=hundred_mb)), top_k=1))),
         grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max"),
        # Search.Get / Delete
        ("Get no ids", s_(lambda s: s.search.Get(search_pb2.GetRequest())), INVALID, "give 1 to 1000 ids"),
        ("Get 1001 ids", s_(lambda s: s.search.Get(search_pb2.GetRequest(ids=[f"i{n}" for n in range(1001)]))),
         INVALID, "got 1001"),
        ("Get injected id", s_(lambda s: s.search.Get(search_pb2.GetRequest(ids=["x'] or id != ['"]))), INVALID,
         "is invalid"),
        ("Delete no ids", s_(lambda s: s.search.Delete(search_pb2.DeleteRequest())), INVALID, "give 1 to 1000 ids"),
        ("Delete injected id", s_(lambda s: s.search.Delete(search_pb2.DeleteRequest(ids=["x'] or id not in ['"]))),
         INVALID, "is invalid"),
        # Search.Ingest, call level
        # (invalid UTF-8 inside one item fails that item alone: see part 3 of the test)
        ("truncated Ingest message", s_(lambda s: raw_ingest(s.channels["search"], search_pb2.IngestRequest(
            items=[search_pb2.IngestItem(image=image, metadata_json="{}")]).SerializeToString()[:-3])),
         INVALID, "could not be decoded"),
        ("100 MB ingest request", s_(lambda s: raw_ingest(s.channels["search"], search_pb2.IngestRequest(
            items=[search_pb2.IngestItem(image=types_pb2.Image(data=hundred_mb))]).SerializeToString())),
         grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max"),
        # Captioner
        ("caption: unknown language enum", s_(lambda s: s.captioner.Caption(captioner_pb2.CaptionRequest(
            image=image, language=7))), INVALID, "unknown language enum value 7"),
        ("caption: max_words 100000", s_(lambda s: s.captioner.Caption(captioner_pb2.CaptionRequest(
            image=image, max_words=100_000))), INVALID, "max_words must be between"),
        ("caption: 1 MB prompt", s_(lambda s: s.captioner.Caption(captioner_pb2.CaptionRequest(
            image=image, prompt=megabyte_text))), INVALID, "more than the limit"),
        ("caption: no image", s_(lambda s: s.captioner.Caption(captioner_pb2.CaptionRequest())), INVALID,
         "image is missing"),
        ("caption batch: empty", s_(lambda s: s.captioner.CaptionBatch(captioner_pb2.CaptionBatchRequest())),
         INVALID, "requests is empty"),
        ("caption batch: 65 requests", s_(lambda s: s.captioner.CaptionBatch(captioner_pb2.CaptionBatchRequest(
            requests=[captioner_pb2.CaptionRequest(image=image)] * 65))), INVALID, "more than max_batch_items"),
        ("caption: invalid UTF-8 prompt", s_(lambda s: raw_unary(
            s.channels["captioner"], "/mmsearch.captioner.v1.Captioner/Caption",
            raw_with_bad_utf8(captioner_pb2.CaptionRequest(image=image, prompt=PLACEHOLDER)))), INVALID, "bad UTF-8"),
        ("caption: 100 MB request", s_(lambda s: s.captioner.Caption(captioner_pb2.CaptionRequest(
            image=types_pb2.Image(data=hundred_mb)))), grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max"),
        # Embedder
        ("embed: no items", s_(lambda s: s.embedder.Embed(embedder_pb2.EmbedRequest())), INVALID, "items is empty"),
        ("embed: 65 items", s_(lambda s: s.embedder.Embed(embedder_pb2.EmbedRequest(
            items=[types_pb2.Content(text="x")] * 65))), INVALID, "too many items"),
        ("embed: 1 MB text", s_(lambda s: s.embedder.Embed(embedder_pb2.EmbedRequest(
            items=[types_pb2.Content(text=megabyte_text)]))), INVALID, "more than the limit"),
        ("embed: whitespace text", s_(lambda s: s.embedder.Embed(embedder_pb2.EmbedRequest(
            items=[types_pb2.Content(text="ok"), types_pb2.Content(text="   ")]))), INVALID, "item 1: text is empty"),
        ("embed: composed without image", s_(lambda s: s.embedder.Embed(embedder_pb2.EmbedRequest(
            items=[types_pb2.Content(composed=types_pb2.Composed(instruction="red"))]))), INVALID,
         "item 0: composed query has no image"),
        ("embed: empty content", s_(lambda s: s.embedder.Embed(embedder_pb2.EmbedRequest(
            items=[types_pb2.Content()]))), INVALID, "content is empty"),
        ("embed: invalid UTF-8 text", s_(lambda s: raw_unary(
            s.channels["embedder"], "/mmsearch.embedder.v1.Embedder/Embed",
            raw_with_bad_utf8(embedder_pb2.EmbedRequest(items=[types_pb2.Content(text=PLACEHOLDER)])))),
         INVALID, "bad UTF-8"),
        ("embed: 100 MB request", s_(lambda s: s.embedder.Embed(embedder_pb2.EmbedRequest(
            items=[types_pb2.Content(image=types_pb2.Image(data=hundred_mb))]))),
         grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max"),
    ]


def item_cases() -> list[tuple[str, search_pb2.IngestItem, str]]:
    """(name, item, phrase of the FAILED reason) for items inside an otherwise good stream."""
    img = types_pb2.Image(data=distinct_images(1, seed=42)[0])
    deep = json.dumps({"a": [[[[[[[[[1]]]]]]]]]})
    return [
        ("1 MB metadata", search_pb2.IngestItem(image=img, metadata_json=json.dumps({"x": "y" * MiB})),
         "more than the limit of 65536"),
        ("metadata 10 levels deep", search_pb2.IngestItem(image=img, metadata_json=deep), "nests deeper than 8"),
        ("metadata 100,000 levels deep", search_pb2.IngestItem(
            image=img, metadata_json='{"a":' + "[" * 30_000 + "]" * 30_000 + "}"), "nests deeper"),
        ("metadata array", search_pb2.IngestItem(image=img, metadata_json="[1, 2]"), "must be a JSON object"),
        ("metadata NaN", search_pb2.IngestItem(image=img, metadata_json='{"x": NaN}'), "not valid JSON"),
        ("metadata not JSON", search_pb2.IngestItem(image=img, metadata_json="{'x': 1"), "not valid JSON"),
        ("no image", search_pb2.IngestItem(metadata_json="{}"), "image is missing"),
        ("empty caller caption", search_pb2.IngestItem(image=img, caption=search_pb2.CaptionInput(description=" ")),
         "caption.description is empty"),
        ("1 MB caller caption", search_pb2.IngestItem(
            image=img, caption=search_pb2.CaptionInput(description="word " * (MiB // 5))), "more than the limit"),
        ("id with quotes", search_pb2.IngestItem(image=img, id="a'] or id != ['"), "is invalid"),
        ("id of 300 characters", search_pb2.IngestItem(image=img, id="a" * 300), "is invalid"),
        ("100,000-character source_uri", search_pb2.IngestItem(image=img, source_uri="s://" + "u" * 100_000),
         "uri is longer"),
    ]


# --- the test -------------------------------------------------------------------------------------


async def test_hostile_corpus_against_every_public_rpc(suite: Suite) -> None:
    good_image = distinct_images(1, seed=40)[0]
    await good_calls(suite, good_image)  # warm every model and buffer first
    rss_before = suite.rss()
    problems: list[str] = []
    checked = 0

    def check(name: str, code: Any, details: str, want: grpc.StatusCode, phrase: str) -> None:
        nonlocal checked
        checked += 1
        code_ok = code in (want, want.value[0])
        if not code_ok or phrase.lower() not in details.lower():
            problems.append(f"{name}: got {code} {details[:160]!r}; wanted {want.name} naming {phrase!r}")

    # 1. Every hostile image through every RPC that takes an image.
    names = list(IMAGES)
    run = await ingest_all(suite.search, [search_pb2.IngestItem(image=types_pb2.Image(data=IMAGES[n][0]))
                                          for n in names], timeout_s=120)
    suite.assert_alive("the image corpus through Ingest")
    assert sorted(run.outcomes) == list(range(len(names))), "every item got exactly one outcome"
    for i, name in enumerate(names):
        o, expected = run.outcomes[i], IMAGES[name][1]
        if expected == OK:
            if o.status != search_pb2.ITEM_STATUS_STORED:
                problems.append(f"Ingest {name}: {o.error.message!r}; wanted STORED")
        else:
            if o.status != search_pb2.ITEM_STATUS_FAILED:
                problems.append(f"Ingest {name}: status {o.status}; wanted FAILED")
            check(f"Ingest {name}", o.error.code, o.error.message, INVALID, expected)

    async def image_and_call_cases() -> None:
        for name, (data, expected) in IMAGES.items():
            image = types_pb2.Image(data=data)
            for path, call in [
                ("Search", suite.search.Search(search_pb2.SearchRequest(
                    query=types_pb2.Content(image=image), top_k=1), timeout=60)),
                ("Caption", suite.captioner.Caption(captioner_pb2.CaptionRequest(image=image), timeout=60)),
                ("Embed", suite.embedder.Embed(embedder_pb2.EmbedRequest(items=[types_pb2.Content(image=image)]),
                                               timeout=60)),
            ]:
                code, details, _ = await status_of(call)
                if expected == OK:
                    if code != grpc.StatusCode.OK:
                        problems.append(f"{path} {name}: {code} {details!r}; wanted OK")
                else:
                    check(f"{path} {name}", code, details, INVALID, expected)
                suite.assert_alive(f"{path} {name}")
        # 2. Malformed requests, call by call.
        for name, make, want, phrase in call_cases():
            code, details, _ = await status_of(make(suite))
            check(name, code, details, want, phrase)
            suite.assert_alive(name)

    await image_and_call_cases()

    # 3. Bad items inside one stream: each FAILED with its reason, the good ones stored.
    bad = item_cases()
    good = [search_pb2.IngestItem(image=types_pb2.Image(data=d)) for d in distinct_images(3, seed=43)]
    run = await ingest_all(suite.search, [b[1] for b in bad] + good, timeout_s=120)
    assert sorted(run.outcomes) == list(range(len(bad) + len(good)))
    for i, (name, _, phrase) in enumerate(bad):
        o = run.outcomes[i]
        if o.status != search_pb2.ITEM_STATUS_FAILED:
            problems.append(f"item {name}: status {o.status}; wanted FAILED")
        check(f"item {name}", o.error.code, o.error.message, INVALID, phrase)
    assert all(run.outcomes[len(bad) + j].status != search_pb2.ITEM_STATUS_FAILED for j in range(len(good)))
    suite.assert_alive("the bad items")

    # 3b. Invalid UTF-8 inside one item of a chunk (protobuf refuses the whole message):
    # that item fails with its index, its neighbours in the same chunk are stored.
    before = (await suite.search.Stats(search_pb2.StatsRequest(), timeout=30)).item_count
    neighbours = distinct_images(3, seed=44)
    chunk = search_pb2.IngestRequest(items=[
        search_pb2.IngestItem(image=types_pb2.Image(data=neighbours[0]), metadata_json='{"n": 0}'),
        search_pb2.IngestItem(image=types_pb2.Image(data=neighbours[1]), metadata_json=PLACEHOLDER),
        search_pb2.IngestItem(image=types_pb2.Image(data=neighbours[2]), id="after-the-broken-one"),
    ])
    outcomes = await raw_ingest(suite.channels["search"], raw_with_bad_utf8(chunk))
    assert sorted(outcomes) == [0, 1, 2], "every item of the chunk got exactly one outcome"
    assert outcomes[0].status == outcomes[2].status == search_pb2.ITEM_STATUS_STORED, outcomes
    assert outcomes[2].id == "after-the-broken-one"
    assert outcomes[1].status == search_pb2.ITEM_STATUS_FAILED
    check("item with invalid UTF-8 in metadata", outcomes[1].error.code, outcomes[1].error.message, INVALID,
          "must be valid UTF-8")
    assert (await suite.search.Stats(search_pb2.StatsRequest(), timeout=30)).item_count == before + 2
    suite.assert_alive("invalid UTF-8 inside an Ingest chunk")

    # 4. Offset past the end is not an error: an empty page.
    code, _, reply = await status_of(suite.search.Search(text_query(offset=5000, top_k=10), timeout=30))
    assert code == grpc.StatusCode.OK and len(reply.hits) == 0

    assert not problems, f"{len(problems)} of {checked} checks failed:\n" + "\n".join(problems)
    assert checked >= 30 + 3 * len(IMAGES)

    # Everything still answers, and memory stayed bounded.
    await good_calls(suite, good_image)
    rss_after = suite.rss()
    grown = {n: round(rss_after[n] - rss_before[n], 1) for n in rss_before}
    print(f"\nRSS MiB ({checked} checks): after warm-up {rss_before}, at the end {rss_after}, growth {grown}")
    assert all(g <= RSS_MARGIN_MB for g in grown.values()), f"grew more than {RSS_MARGIN_MB} MiB: {grown}"


async def test_corpus_writes_out_as_files(tmp_path: Path) -> None:
    from tests.corpus.hostile import write

    write(tmp_path)
    assert len(list(tmp_path.iterdir())) == len(IMAGES)
