"""Issue 21's search features through the client (sync and async) against the real suite
(`real_suite` in tests/conftest.py, whose collection indexes label:string, price:float):
keyword target and 3-leg hybrid, more like this, weighted examples with negatives,
min_score, grouping, decay / boost_recency, SearchAll, Stats, and clear errors."""
from __future__ import annotations

import io
import itertools
import time
from collections.abc import Iterator

import grpc
import pytest

from mmsearch.client import (
    AsyncSearchClient,
    Decay,
    Example,
    ExampleId,
    IngestItem,
    ItemStatus,
    SearchAllProgress,
    SearchClient,
    SearchError,
    Target,
)
from services.lite_models.sample_photos import load_sample_photos
from tests.conftest import SUITE_INDEXED_FIELDS, RealSuite

PREFIX = "feat-"
MINE = f'id like "{PREFIX}%"'


def jpeg(name: str, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    load_sample_photos([name])[0].image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def ingest(client: SearchClient, items: list[IngestItem]) -> None:
    summary = client.ingest_all(items)
    assert all(o.status in (ItemStatus.STORED, ItemStatus.UNCHANGED) for o in summary.outcomes), summary.outcomes


@pytest.fixture(scope="module")
def client(real_suite: RealSuite) -> Iterator[SearchClient]:
    with SearchClient(real_suite.address, timeout=120.0, token=real_suite.token) as c:
        # Six products: a cat (3 near-duplicate photos of it), coffee, rocket, astronaut, coins, moon.
        items = [IngestItem(image=jpeg("cat", q), id=f"{PREFIX}cat-{i}", metadata={"label": "cat", "price": 10.0 + i},
                            caption="a cat sitting on a sofa", keywords=["cat"])
                 for i, q in enumerate((92, 85, 78))]
        captions = {"coffee": "a cup of coffee on a table", "rocket": "a rocket launching into the sky",
                    "astronaut": "an astronaut in a space suit", "coins": "old coins on a cloth",
                    "moon": "the surface of the moon with craters, product code quokkaberry"}
        items += [IngestItem(image=jpeg(name), id=f"{PREFIX}{name}", metadata={"label": name, "price": 50.0},
                             caption=caption, keywords=[name]) for name, caption in captions.items()]
        ingest(c, items)
        yield c


def ids(hits) -> list[str]:  # type: ignore[no-untyped-def]
    return [h.id for h in hits]


def test_stats_show_keyword_index_and_indexed_fields(client: SearchClient) -> None:
    stats = client.stats()
    assert stats.keyword_index is True
    assert set(stats.indexed_fields) == set(SUITE_INDEXED_FIELDS.split(","))


def test_keyword_target_finds_the_rare_word(client: SearchClient) -> None:
    result = client.search("quokkaberry", target="keyword", top_k=3, filter=MINE)
    assert result.target is Target.KEYWORD
    assert ids(result) == [f"{PREFIX}moon"]  # BM25: only the item with the word matches


def test_keyword_scores_are_bm25_scores(client: SearchClient) -> None:
    result = client.search("quokkaberry", target="keyword", top_k=3, filter=MINE)
    assert result[0].score > 0


def test_three_leg_hybrid_with_weights(client: SearchClient) -> None:
    result = client.search("quokkaberry", legs={"image": 0.1, "caption": 0.1, "keyword": 0.8}, top_k=3, filter=MINE)
    assert result.target is Target.HYBRID and result[0].id == f"{PREFIX}moon"
    rrf = client.search("a cup of coffee", legs=["image", "caption", "keyword"], top_k=3, filter=MINE)
    assert rrf[0].id == f"{PREFIX}coffee"


def test_more_like_this_leaves_the_item_out(client: SearchClient) -> None:
    for target in ("image", "caption", "hybrid"):
        result = client.search(like=f"{PREFIX}cat-0", target=target, top_k=4, filter=MINE)
        assert f"{PREFIX}cat-0" not in ids(result), target
        assert result[0].id in (f"{PREFIX}cat-1", f"{PREFIX}cat-2"), (target, ids(result))
    with pytest.raises(SearchError) as err:
        client.search(like=f"{PREFIX}not-stored")
    assert err.value.code is grpc.StatusCode.INVALID_ARGUMENT and "not stored" in err.value.details


def test_a_negative_example_demotes_its_neighbours(client: SearchClient) -> None:
    plain = ids(client.search(examples=["a photo of a cat"], top_k=8, filter=MINE))
    assert plain[0].startswith(f"{PREFIX}cat-")
    pushed = ids(client.search(examples=["a photo of a cat", (ExampleId(f"{PREFIX}cat-0"), -1.0)], top_k=8,
                               filter=MINE))
    assert all(not i.startswith(f"{PREFIX}cat-") for i in pushed[:3]), pushed
    assert pushed.index(f"{PREFIX}cat-0") > plain.index(f"{PREFIX}cat-0")
    mixed = client.search(examples=[Example(text="a rocket"), (jpeg("rocket"), 0.5), Example(id=f"{PREFIX}coins", weight=-0.5)],
                          top_k=2, filter=MINE)
    assert mixed[0].id == f"{PREFIX}rocket"
    with pytest.raises(ValueError, match="positive"):
        client.search(examples=[("a cat", -1.0)])


@pytest.mark.parametrize("target", ["image", "caption", "keyword", "hybrid"])
def test_min_score_drops_every_hit_below_it(client: SearchClient, target: str) -> None:
    query = "a cat on a sofa" if target != "keyword" else "cat coffee moon"
    every = client.search(query, target=target, top_k=8, filter=MINE)
    assert len(every) >= 3, ids(every)
    threshold = every[1].score
    kept = client.search(query, target=target, top_k=8, filter=MINE, min_score=threshold)
    assert kept.hits and all(h.score >= threshold - 1e-6 for h in kept)
    assert ids(kept) == [h.id for h in every if h.score >= threshold - 1e-6][: len(kept)]
    assert len(kept) < len(every)


def test_group_by_gives_distinct_products(client: SearchClient) -> None:
    plain = client.search(image=jpeg("cat"), top_k=3, filter=MINE)
    assert all(i.startswith(f"{PREFIX}cat-") for i in ids(plain))  # the near-duplicates crowd the top
    grouped = client.search(image=jpeg("cat"), top_k=5, filter=MINE, group_by="label", group_size=1)
    labels = [h.metadata["label"] for h in grouped]
    assert len(labels) == 5 and len(set(labels)) == 5, labels
    two = client.search(image=jpeg("cat"), top_k=4, filter=MINE, group_by="label", group_size=2)
    assert [h.metadata["label"] for h in two].count("cat") == 2
    # An indexed field is a real column: `in [...]` works on embedded Milvus Lite too.
    some = client.search("a cat", top_k=8, filter=f'{MINE} and label in ["cat", "coffee"]')
    assert {h.metadata["label"] for h in some} == {"cat", "coffee"}
    with pytest.raises(SearchError) as err:
        client.search("a cat", group_by="colour")
    assert err.value.code is grpc.StatusCode.INVALID_ARGUMENT and "colour" in err.value.details


def test_decay_on_a_numeric_field_and_recency(client: SearchClient) -> None:
    # The three cat photos are near-duplicates; price 10, 11, 12: closest to 12 first.
    result = client.search(like=f"{PREFIX}cat-0", top_k=2, filter=f'{MINE} and label == "cat"',
                           decay=Decay(field="price", origin=12.0, scale=1.0, function="exp"))
    assert ids(result) == [f"{PREFIX}cat-2", f"{PREFIX}cat-1"]
    # Equal similarity (the same image under two ids), stored 1.5 s apart: newest first.
    photo = jpeg("coins", 60)
    ingest(client, [IngestItem(image=photo, id=f"{PREFIX}dup-old", caption="old coins", metadata={"label": "dup"})])
    time.sleep(1.5)
    ingest(client, [IngestItem(image=photo, id=f"{PREFIX}dup-new", caption="old coins", metadata={"label": "dup"})])
    recent = client.search(image=photo, top_k=2, filter=f'{MINE} and label == "dup"', boost_recency="1s")
    assert ids(recent) == [f"{PREFIX}dup-new", f"{PREFIX}dup-old"]
    assert recent[0].score > recent[1].score
    with pytest.raises(SearchError) as err:
        client.search("a cat", decay=Decay(field="label", scale=1.0))
    assert err.value.code is grpc.StatusCode.INVALID_ARGUMENT and "label" in err.value.details


def test_search_all_streams_every_hit_in_rank_order(client: SearchClient) -> None:
    n = 40
    ingest(client, [IngestItem(image=jpeg("moon", 50 + i), id=f"{PREFIX}all-{i:02d}", caption=f"moon number {i}")
                    for i in range(n)])
    progress: list[SearchAllProgress] = []
    hits = list(client.search_all("the moon", batch_size=7, filter=f'id like "{PREFIX}all-%"',
                                  on_progress=progress.append))
    assert [h.rank for h in hits] == list(range(1, n + 1))
    assert len(set(ids(hits))) == n
    assert all(a.score >= b.score - 1e-6 for a, b in itertools.pairwise(hits))
    assert [p.sent for p in progress][-1] == n and all(p.batch <= 7 for p in progress)
    assert len(list(client.search_all("the moon", limit=10, filter=f'id like "{PREFIX}all-%"'))) == 10
    caption = list(client.search_all("moon number 7", target="caption", filter=f'id like "{PREFIX}all-%"'))
    assert [h.rank for h in caption] == list(range(1, n + 1)) and len(set(ids(caption))) == n
    for target in ("hybrid", "keyword"):  # SearchAll ranks by one vector
        with pytest.raises(SearchError) as err:
            list(client.search_all("the moon", target=target))
        assert err.value.code is grpc.StatusCode.INVALID_ARGUMENT, target


async def test_async_client_new_options(client: SearchClient, real_suite: RealSuite) -> None:
    async with AsyncSearchClient(real_suite.address, timeout=120.0, token=real_suite.token) as aclient:
        result = await aclient.search("quokkaberry", target="keyword", top_k=2, filter=MINE)
        assert ids(result) == [f"{PREFIX}moon"]
        like = await aclient.search(like=f"{PREFIX}cat-0", top_k=3, filter=MINE, min_score=-1.0)
        assert f"{PREFIX}cat-0" not in ids(like)
        hits = [h async for h in aclient.search_all(like=f"{PREFIX}cat-0", filter=MINE, batch_size=2)]
        assert [h.rank for h in hits] == list(range(1, len(hits) + 1)) and f"{PREFIX}cat-0" not in ids(hits)
        assert (await aclient.stats()).keyword_index
        # Backfill shares the streaming helper with search_all: nothing is pending here.
        assert [u.progress.total async for u in aclient.backfill()][-1] == 0
    assert [u.progress.total for u in client.backfill()][-1] == 0


def test_local_validation_is_a_value_error(client: SearchClient) -> None:
    with pytest.raises(ValueError, match="exactly one query"):
        client.search("a cat", like="x")
    with pytest.raises(ValueError, match="legs= is for target hybrid"):
        client.search("a cat", target="image", legs={"image": 1.0})
    with pytest.raises(ValueError, match="finite"):
        client.search("a cat", legs={"image": float("nan")})
    with pytest.raises(ValueError, match="group_by"):
        client.search("a cat", group_size=2)
    with pytest.raises(ValueError, match="not both"):
        client.search("a cat", decay=Decay(scale=1.0), boost_recency="7d")
    with pytest.raises(ValueError, match="duration"):
        client.search("a cat", boost_recency="soon")
