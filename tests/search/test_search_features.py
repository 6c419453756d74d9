"""Search beyond one vector, end to end over gRPC on a real search service, lite embedder
and Milvus Lite (a server, and embedded where it matters): keyword leg, hybrid legs, more
like this, multi-example queries, min_score, grouping, decay, SearchAll, bad input."""
from __future__ import annotations

import asyncio
import io
import itertools
import json
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
import pytest_asyncio
from PIL import Image, ImageOps

from mmsearch.common.v1 import types_pb2
from mmsearch.search.v1 import search_pb2, search_pb2_grpc
from services.common.server import RunningServer
from services.search.milvus_store import MilvusStore, StoredRow
from services.search.settings import SearchSettings
from tests.conftest import MilvusLiteServer
from tests.search.conftest import Photo, create_legacy_collection, start_embedder, start_search

pytestmark = pytest.mark.asyncio(loop_scope="module")
# Codes made of the same digits: a text embedding sees nearly the same subwords in each.
CODES = ["x48213q", "x48231q", "x42813q", "x84213q", "x48123q"]
INDEXED = {"product": "string", "price": "float"}


@dataclass
class Suite:
    stub: search_pb2_grpc.SearchStub
    embedder: RunningServer
    milvus_uri: str
    milvus: str  # "server" or "embedded"


def jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def noisy(img: Image.Image, seed: int) -> bytes:
    """A near-duplicate: the same photo with faint noise (another content hash)."""
    arr = np.asarray(img.convert("RGB"), dtype=np.int16)
    arr = arr + np.random.default_rng(seed).integers(-4, 5, arr.shape)
    return jpeg(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)))


def item(data: bytes, item_id: str, caption: str, **metadata: object) -> search_pb2.IngestItem:
    return search_pb2.IngestItem(image=types_pb2.Image(data=data), id=item_id, metadata_json=json.dumps(metadata),
                                 caption=search_pb2.CaptionInput(description=caption))


async def ingest(stub: search_pb2_grpc.SearchStub, items: list[search_pb2.IngestItem]) -> dict[int, search_pb2.ItemOutcome]:
    outcomes: dict[int, search_pb2.ItemOutcome] = {}
    async for reply in stub.Ingest(iter([search_pb2.IngestRequest(items=items)])):
        for o in reply.outcomes:
            outcomes[o.index] = o
    return outcomes


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def embedder() -> AsyncIterator[RunningServer]:
    server = await start_embedder()
    yield server
    await server.stop(0.5)


@pytest_asyncio.fixture(loop_scope="module", scope="module", params=["server", "embedded"])
async def suite(request: pytest.FixtureRequest, milvus_server: MilvusLiteServer, embedder: RunningServer,
                photos: dict[str, Photo], tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Suite]:
    """Every feature on a Milvus Lite server and on embedded Milvus Lite (the default)."""
    uri = milvus_server.uri if request.param == "server" else str(tmp_path_factory.mktemp("lite") / "milvus.db")
    search = await start_search(uri, embedder.address, "127.0.0.1:1", collection="features",
                                indexed_fields=INDEXED, hybrid_candidates=64)
    async with grpc.aio.insecure_channel(search.address) as channel:
        stub = search_pb2_grpc.SearchStub(channel)
        images = {name: Image.open(io.BytesIO(p.data)) for name, p in photos.items()}
        items = [item(p.data, f"photo-{name}", f"a photo of a {name}", product=name, price=float(i))
                 for i, (name, p) in enumerate(photos.items())]
        items.append(item(photos["cat"].flipped, "photo-cat-flipped", "a photo of a cat, mirrored", product="cat"))
        # Five mugs that only their product code tells apart.
        mug = images["coffee"]
        items += [item(noisy(mug, 100 + i), f"mug-{code}", f"a red ceramic mug, product code {code}",
                       product=f"mug-{i}") for i, code in enumerate(CODES)]
        # Grouping: five near-duplicates of one rocket product.
        items += [item(noisy(images["rocket"], 200 + i), f"rocket-dup-{i}", "a rocket", product="rocket")
                  for i in range(5)]
        outcomes = await ingest(stub, items)
        assert all(o.status == search_pb2.ITEM_STATUS_STORED for o in outcomes.values()), outcomes
        yield Suite(stub, embedder, uri, request.param)
    await search.stop(0.5)


def text(value: str) -> types_pb2.Content:
    return types_pb2.Content(text=value)


async def ids(stub: search_pb2_grpc.SearchStub, **kw: object) -> list[str]:
    kw.setdefault("top_k", 10)
    reply = await stub.Search(search_pb2.SearchRequest(**kw), timeout=30)  # type: ignore[arg-type]
    return [h.id for h in reply.hits]


async def test_keyword_leg_finds_exact_codes_that_vectors_miss(suite: Suite) -> None:
    stats = await suite.stub.Stats(search_pb2.StatsRequest())
    assert stats.keyword_index and set(stats.indexed_fields) == {"product:string", "price:float"}
    keyword_first = caption_first = 0
    for code in CODES:
        by_keyword = await ids(suite.stub, query=text(code), target=search_pb2.TARGET_KEYWORD, top_k=3)
        by_caption = await ids(suite.stub, query=text(code), target=search_pb2.TARGET_CAPTION, top_k=3)
        keyword_first += by_keyword[0] == f"mug-{code}"
        caption_first += by_caption[0] == f"mug-{code}"
        assert by_keyword == [f"mug-{code}"]  # BM25 matches the word, nothing else holds it
        scores = [h.score for h in (await suite.stub.Search(search_pb2.SearchRequest(
            query=text(f"mug {code}"), target=search_pb2.TARGET_KEYWORD, top_k=6))).hits]
        assert scores[0] > 0 and all(s >= 0 for s in scores) and scores == sorted(scores, reverse=True)
    assert keyword_first == len(CODES) and caption_first < len(CODES)


async def test_three_leg_hybrid_fuses_as_specified(suite: Suite) -> None:
    code = CODES[2]
    legs = [search_pb2.Leg(target=search_pb2.TARGET_IMAGE, weight=0.0),
            search_pb2.Leg(target=search_pb2.TARGET_CAPTION, weight=0.0),
            search_pb2.Leg(target=search_pb2.TARGET_KEYWORD, weight=1.0)]
    weighted = search_pb2.Fusion(method=search_pb2.FUSION_METHOD_WEIGHTED)
    only_keyword = await ids(suite.stub, query=text(f"mug {code}"), target=search_pb2.TARGET_HYBRID, legs=legs,
                             fusion=weighted, top_k=1)
    assert only_keyword == [f"mug-{code}"]
    legs[0].weight, legs[2].weight = 1.0, 0.0  # all weight on the image leg: the image ranking
    image_only = await ids(suite.stub, query=text("a rocket"), target=search_pb2.TARGET_HYBRID, legs=legs,
                           fusion=weighted, top_k=5)
    assert image_only == await ids(suite.stub, query=text("a rocket"), target=search_pb2.TARGET_IMAGE, top_k=5)
    rrf = await ids(suite.stub, query=text(f"a red mug {code}"), target=search_pb2.TARGET_HYBRID, legs=legs, top_k=5)
    assert f"mug-{code}" in rrf[:2]  # first on the keyword leg, near the top of two others


@pytest.mark.parametrize("target", [search_pb2.TARGET_IMAGE, search_pb2.TARGET_CAPTION, search_pb2.TARGET_HYBRID])
async def test_more_like_this_finds_the_near_duplicate_never_the_item(suite: Suite, target: int) -> None:
    found = await ids(suite.stub, like_id="photo-cat", target=target, top_k=50)
    assert "photo-cat" not in found
    assert found[0] == "photo-cat-flipped"
    mugs = await ids(suite.stub, like_id=f"mug-{CODES[0]}", target=target, top_k=5)
    others = {f"mug-{c}" for c in CODES[1:]}
    assert set(mugs) <= others | {"photo-coffee"} and len(set(mugs) & others) >= 3  # its siblings, not itself


async def test_like_id_on_the_keyword_leg_queries_with_the_items_words(suite: Suite) -> None:
    found = await ids(suite.stub, like_id=f"mug-{CODES[1]}", target=search_pb2.TARGET_KEYWORD, top_k=10)
    assert f"mug-{CODES[1]}" not in found and set(found[:4]) == {f"mug-{c}" for c in CODES if c != CODES[1]}


async def test_a_negative_example_pushes_its_neighbours_down(suite: Suite) -> None:
    plain = await ids(suite.stub, query=text("a cat"), top_k=3)
    assert "photo-cat" in plain
    examples = [search_pb2.Example(content=text("a cat"), weight=1.0),
                search_pb2.Example(id="photo-cat", weight=-1.0)]
    pushed = await ids(suite.stub, examples=examples, top_k=3)
    assert "photo-cat" not in pushed and "photo-cat-flipped" not in pushed
    # Positive examples alone: the weighted sum of two stored items finds both near the top.
    both = await ids(suite.stub, examples=[search_pb2.Example(id="photo-china", weight=1.0),
                                           search_pb2.Example(id="photo-flower", weight=1.0)], top_k=3)
    assert {"photo-china", "photo-flower"} <= set(both)


@pytest.mark.parametrize("target", [search_pb2.TARGET_IMAGE, search_pb2.TARGET_CAPTION, search_pb2.TARGET_HYBRID,
                                    search_pb2.TARGET_KEYWORD])
async def test_min_score_excludes_every_hit_below_it(suite: Suite, target: int) -> None:
    query = text("a red ceramic mug") if target != search_pb2.TARGET_KEYWORD else text("mug code")
    full = (await suite.stub.Search(search_pb2.SearchRequest(query=query, target=target, top_k=20))).hits
    assert len(full) >= 4
    threshold = (full[2].score + full[3].score) / 2
    if full[2].score == full[3].score:
        threshold = full[2].score
    cut = (await suite.stub.Search(search_pb2.SearchRequest(query=query, target=target, top_k=20,
                                                            min_score=threshold))).hits
    assert cut and all(h.score >= threshold for h in cut)
    assert [h.id for h in cut] == [h.id for h in full if h.score >= threshold]
    nothing = await ids(suite.stub, query=query, target=target, min_score=full[0].score + 1.0)
    assert nothing == []


async def test_grouping_gives_distinct_products(suite: Suite, photos: dict[str, Photo]) -> None:
    rocket = types_pb2.Content(image=types_pb2.Image(data=photos["rocket"].data))
    plain = (await suite.stub.Search(search_pb2.SearchRequest(query=rocket, top_k=5))).hits
    assert sum(json.loads(h.metadata_json)["product"] == "rocket" for h in plain) >= 5
    grouped = (await suite.stub.Search(search_pb2.SearchRequest(
        query=rocket, top_k=5, group_by=search_pb2.GroupBy(field="product", size=1)))).hits
    products = [json.loads(h.metadata_json)["product"] for h in grouped]
    assert len(grouped) == 5 and len(set(products)) == 5 and products[0] == "rocket"
    two = (await suite.stub.Search(search_pb2.SearchRequest(
        query=rocket, top_k=6, group_by=search_pb2.GroupBy(field="product", size=2)))).hits
    counts = [json.loads(h.metadata_json)["product"] for h in two]
    assert max(counts.count(p) for p in counts) <= 2


async def test_indexed_fields_filter_with_in_and_check_types(suite: Suite, photos: dict[str, Photo]) -> None:
    found = await ids(suite.stub, query=text("a photo"), top_k=50, filter='product in ["cat", "rocket"]')
    assert found and all(i.startswith(("photo-cat", "photo-rocket", "rocket-dup")) for i in found)
    cheap = await ids(suite.stub, query=text("a photo"), top_k=50, filter="price < 2.0")
    assert set(cheap) == {f"photo-{n}" for i, n in enumerate(photos) if i < 2}
    bad = await ingest(suite.stub, [item(photos["cat"].data, "typed-bad", "x", product=7),
                                    item(photos["cat"].data, "typed-good", "x", product="cat", price=3)])
    assert bad[0].status == search_pb2.ITEM_STATUS_FAILED and bad[0].error.code == 3
    assert "metadata field 'product' is indexed as string, got int" in bad[0].error.message
    assert bad[1].status == search_pb2.ITEM_STATUS_STORED  # an int is a fine float
    await suite.stub.Delete(search_pb2.DeleteRequest(ids=["typed-good"]))


async def test_decay_ranks_equal_similarity_newest_first(suite: Suite, photos: dict[str, Photo]) -> None:
    same = photos["astronaut"].data
    for i in range(4):  # the same image under four ids, ingested in turn
        await ingest(suite.stub, [item(same, f"decay-{i}", "an astronaut", product="decay")])
        await asyncio.sleep(0.05)
    query = types_pb2.Content(image=types_pb2.Image(data=same))
    decay = search_pb2.Decay(field="ingested_at", scale=2_000, function=search_pb2.DECAY_FUNCTION_EXP)
    reply = await suite.stub.Search(search_pb2.SearchRequest(query=query, top_k=4, decay=decay,
                                                             filter='product == "decay"'))
    assert [h.id for h in reply.hits] == ["decay-3", "decay-2", "decay-1", "decay-0"]
    assert reply.hits[0].score > reply.hits[-1].score
    # Decay on an indexed numeric field: the price closest to the origin wins among equals.
    await suite.stub.Delete(search_pb2.DeleteRequest(ids=[f"decay-{i}" for i in range(4)]))


async def test_bad_input_names_the_problem(suite: Suite) -> None:
    q = text("a cat")
    cases = {
        "group_by.field 'colour' is not an indexed field":
            search_pb2.SearchRequest(query=q, top_k=5, group_by=search_pb2.GroupBy(field="colour")),
        "examples[1].weight must be a finite number":
            search_pb2.SearchRequest(top_k=5, examples=[search_pb2.Example(content=q, weight=1),
                                                        search_pb2.Example(content=q, weight=math.nan)]),
        "examples[0].weight is 0": search_pb2.SearchRequest(top_k=5, examples=[search_pb2.Example(content=q)]),
        "at least one positive weight":
            search_pb2.SearchRequest(top_k=5, examples=[search_pb2.Example(id="photo-cat", weight=-1)]),
        "cancel out": search_pb2.SearchRequest(top_k=5, examples=[search_pb2.Example(id="photo-cat", weight=1),
                                                                  search_pb2.Example(id="photo-cat", weight=-1)]),
        "like_id 'no-such-item' is not stored": search_pb2.SearchRequest(like_id="no-such-item", top_k=5),
        "example ids not stored": search_pb2.SearchRequest(
            top_k=5, examples=[search_pb2.Example(id="no-such-item", weight=1)]),
        "min_score must be a finite number": search_pb2.SearchRequest(query=q, top_k=5, min_score=math.inf),
        "the keyword leg takes a text query":
            search_pb2.SearchRequest(query_vector=types_pb2.Embedding(values=[0.1] * 384), top_k=5,
                                     target=search_pb2.TARGET_KEYWORD),
        "set exactly one of query, query_vector, like_id and examples":
            search_pb2.SearchRequest(query=q, like_id="photo-cat", top_k=5),
        "leg keyword is given twice": search_pb2.SearchRequest(
            query=q, top_k=5, target=search_pb2.TARGET_HYBRID,
            legs=[search_pb2.Leg(target=search_pb2.TARGET_KEYWORD), search_pb2.Leg(target=search_pb2.TARGET_KEYWORD)]),
        "leg weight must be >= 0": search_pb2.SearchRequest(
            query=q, top_k=5, target=search_pb2.TARGET_HYBRID, legs=[search_pb2.Leg(target=1, weight=-0.5)]),
        "decay.scale must be > 0": search_pb2.SearchRequest(query=q, top_k=5, decay=search_pb2.Decay(
            field="ingested_at")),
        "decay.field 'price_tag' must be 'ingested_at' or an indexed numeric field":
            search_pb2.SearchRequest(query=q, top_k=5, decay=search_pb2.Decay(field="price_tag", scale=1)),
        "group_by cannot be combined with offset": search_pb2.SearchRequest(
            query=q, top_k=5, offset=5, group_by=search_pb2.GroupBy(field="product")),
        "more than the limit of 8": search_pb2.SearchRequest(
            top_k=5, examples=[search_pb2.Example(content=q, weight=1)] * 9),
    }
    problems = []
    for message, request in cases.items():
        try:
            await suite.stub.Search(request, timeout=30)
            problems.append(f"{message!r}: accepted")
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.INVALID_ARGUMENT or message not in (e.details() or ""):
                problems.append(f"{message!r}: {e.code()} {e.details()!r}")
    assert not problems, "\n".join(problems)


async def test_search_all_streams_20000_items_in_order_without_gaps(suite: Suite) -> None:
    """Rows written straight through the store (real code, random vectors): 20,000 of them."""
    if suite.milvus == "embedded":
        pytest.skip("20,000 rows once is enough: the Milvus Lite server run covers it")
    settings = SearchSettings(milvus_uri=suite.milvus_uri, collection="features", indexed_fields=INDEXED)
    store = MilvusStore(settings)
    info = await store.require()
    rng = np.random.default_rng(7)
    now = int(time.time() * 1000)
    for start in range(0, 20_000, 2_000):
        vecs = rng.normal(size=(2_000, info.dimension)).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        await store.upsert([
            StoredRow(f"bulk-{start + i:05d}", "0" * 64, "0" * 64, "", "bulk", [], {"product": "bulk"},
                      info.model_id, "", now, v, v)
            for i, v in enumerate(vecs)])
    await store.close()
    query = search_pb2.SearchRequest(query_vector=types_pb2.Embedding(values=rng.normal(size=info.dimension).tolist()),
                                     filter='product == "bulk"', output_fields=["uri"])
    seen: list[str] = []
    scores: list[float] = []
    ranks: list[int] = []
    last_sent = 0
    async for reply in suite.stub.SearchAll(search_pb2.SearchAllRequest(search=query, batch_size=1000), timeout=300):
        assert reply.sent == last_sent + len(reply.hits)
        last_sent = reply.sent
        seen += [h.id for h in reply.hits]
        scores += [h.score for h in reply.hits]
        ranks += [h.rank for h in reply.hits]
    assert len(seen) == 20_000 and len(set(seen)) == 20_000  # no gaps, no duplicates
    assert ranks == list(range(1, 20_001))
    assert all(a >= b - 1e-5 for a, b in itertools.pairwise(scores))  # rank order
    few = search_pb2.SearchRequest(query_vector=query.query_vector, filter='product != "bulk"')
    every = [h.id async for reply in suite.stub.SearchAll(search_pb2.SearchAllRequest(search=few)) for h in reply.hits]
    limited = [h.id async for reply in suite.stub.SearchAll(search_pb2.SearchAllRequest(search=few, limit=5,
                                                                                       batch_size=2))
               for h in reply.hits]
    assert len(every) > 5 and limited == every[:5]
    with pytest.raises(grpc.aio.AioRpcError) as e:
        async for _ in suite.stub.SearchAll(search_pb2.SearchAllRequest(
                search=search_pb2.SearchRequest(query=text("a cat"), target=search_pb2.TARGET_HYBRID))):
            pass
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "SearchAll streams one target" in e.value.details()


async def test_a_collection_from_before_the_keyword_leg_says_how_to_migrate(suite: Suite) -> None:
    """An old collection (no keyword field, as created by the previous release) keeps serving
    vector search; a keyword query is FAILED_PRECONDITION naming the migration."""
    if suite.milvus == "embedded":
        pytest.skip("one Milvus is enough for the old-collection check")
    info = await MilvusStore(SearchSettings(milvus_uri=suite.milvus_uri, collection="features")).require()
    create_legacy_collection(suite.milvus_uri, "features_old", info.model_id, info.dimension)
    search = await start_search(suite.milvus_uri, suite.embedder.address, "127.0.0.1:1", collection="features_old")
    try:
        async with grpc.aio.insecure_channel(search.address) as channel:
            stub = search_pb2_grpc.SearchStub(channel)
            await ingest(stub, [item(jpeg(ImageOps.grayscale(Image.new("RGB", (64, 64), (9, 9, 9)))), "old-1", "x")])
            assert not (await stub.Stats(search_pb2.StatsRequest())).keyword_index
            assert await ids(stub, query=text("a cat"), top_k=1) == ["old-1"]
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.Search(search_pb2.SearchRequest(query=text("x"), top_k=1, target=search_pb2.TARGET_KEYWORD))
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "created before the keyword leg" in e.value.details() and "mmsearch index create" in e.value.details()
    finally:
        await search.stop(0.5)
