"""Unit tests of the search engine (services/search/engine.py) and its domain models
through fake ports: validation, the model guard, deadlines, fusion defaults, paging.
End to end over gRPC and Milvus: test_search_integration.py, test_search_features.py."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from services.common.content import TextContent
from services.common.deadline import NO_DEADLINE, Deadline
from services.common.errors import ErrorKind, ServiceError
from services.common.intake import ImageRef
from services.search.domain import CaptionInput, Fusion, IngestItem, Leg, SearchQuery, Target
from services.search.engine import SearchEngine
from services.search.ports import CollectionInfo
from tests.search.fakes import DIM, FakeEmbedder, FakeStore, Ports, bound_ports, jpeg, unit
from tests.search.test_ingest import ingest

CAPTIONS = ["a red cup", "a black top", "a sleeping cat", "a mountain lake", "a city at night"]


def engine(p: Ports) -> SearchEngine:
    return SearchEngine(p.settings, p.index, p.intake, p.binding)


async def stocked() -> Ports:
    """Five items with the captions above, stored through the real pipeline."""
    p = await bound_ports()
    await ingest(p, [IngestItem(i, ImageRef(data=jpeg(i)), id=f"item-{i}", caption=CaptionInput(c))
                     for i, c in enumerate(CAPTIONS)])
    return p


async def refused(p: Ports, q: SearchQuery, deadline: Deadline = NO_DEADLINE) -> ServiceError:
    with pytest.raises(ServiceError) as e:
        await engine(p).search(q, deadline)
    return e.value


async def test_a_caption_search_ranks_the_item_whose_caption_was_embedded_first() -> None:
    p = await stocked()
    q = SearchQuery(content=TextContent("a sleeping cat"), target=Target.CAPTION, top_k=3)
    result = await engine(p).search(q)
    assert result.hits[0].id == "item-2"
    assert [h.rank for h in result.hits] == [1, 2, 3]
    assert result.hits[0].fields["caption"] == "a sleeping cat"
    scores = [h.score for h in result.hits]
    assert scores == sorted(scores, reverse=True) and scores[0] == pytest.approx(1.0, abs=1e-5)


async def test_pages_follow_each_other() -> None:
    p = await stocked()
    first = await engine(p).search(SearchQuery(content=TextContent("x"), target=Target.CAPTION, top_k=2))
    second = await engine(p).search(SearchQuery(content=TextContent("x"), target=Target.CAPTION, top_k=2, offset=2))
    assert [h.rank for h in second.hits] == [3, 4]
    assert not {h.id for h in first.hits} & {h.id for h in second.hits}


@pytest.mark.parametrize("q, message", [
    (SearchQuery(content=TextContent("x"), top_k=0), "top_k must be between 1 and"),
    (SearchQuery(content=TextContent("x"), offset=-1), "offset must be >= 0"),
    (SearchQuery(content=TextContent("   ")), "query text is empty"),
    (SearchQuery(), "set exactly one of query, query_vector, like_id and examples"),
    (SearchQuery(content=TextContent("x"), vector=[1.0] * DIM), "set exactly one of"),
    (SearchQuery(content=TextContent("x"), output_fields=("nope",)), "unknown output fields ['nope']"),
    (SearchQuery(content=TextContent("x"), legs=(Leg(Target.IMAGE),)), "legs apply to the HYBRID target only"),
    (SearchQuery(content=TextContent("x"), target=Target.HYBRID, fusion=Fusion(rrf_k=0)), "fusion.rrf_k must be in"),
    (SearchQuery(content=TextContent("x"), target=Target.HYBRID, fusion=Fusion(True, 60, 2.0, 0.5)),
     "fusion weights must be in [0, 1]"),
    (SearchQuery(vector=[1.0] * (DIM + 1)), f"{DIM}"),
    (SearchQuery(vector=[float("nan")] * DIM), "query_vector contains NaN or infinity"),
])
async def test_bad_queries_are_invalid_input_naming_the_problem(q: SearchQuery, message: str) -> None:
    p = await stocked()
    calls = len(p.embedder.calls)
    e = await refused(p, q)
    assert e.kind is ErrorKind.INVALID_INPUT and message in e.message
    assert len(p.embedder.calls) == calls, "nothing was embedded for a refused query"


async def test_vectors_from_another_model_are_refused_naming_both_models() -> None:
    p = await stocked()
    p.embedder.model_id = "fake-embedder-b"
    e = await refused(p, SearchQuery(content=TextContent("a red cup")))
    assert e.kind is ErrorKind.FAILED_PRECONDITION
    assert "'fake-embedder-b'" in e.message and "'fake-embedder-a'" in e.message


async def test_without_an_embedder_text_fails_fast_and_vectors_still_work() -> None:
    p = await stocked()
    p.binding.health = None  # the last probe found no embedder
    e = await refused(p, SearchQuery(content=TextContent("a red cup")))
    assert e.kind is ErrorKind.UNAVAILABLE and "unreachable" in e.message
    result = await engine(p).search(SearchQuery(vector=unit("text:a red cup").tolist(), target=Target.CAPTION))
    assert result.hits[0].id == "item-0"


async def test_an_unbound_engine_says_why() -> None:
    p = await bound_ports()
    p.binding.info, p.binding.error = None, "embedder: connection refused"
    e = await refused(p, SearchQuery(content=TextContent("x")))
    assert e.kind is ErrorKind.UNAVAILABLE and "not available: embedder: connection refused" in e.message
    assert p.embedder.calls == []


async def test_a_passed_deadline_is_deadline_exceeded_before_the_embedder_is_called() -> None:
    p = await stocked()
    calls = len(p.embedder.calls)
    e = await refused(p, SearchQuery(content=TextContent("x")), Deadline.after(-1))
    assert e.kind is ErrorKind.DEADLINE_EXCEEDED and len(p.embedder.calls) == calls


async def test_the_caller_deadline_reaches_the_embedder() -> None:
    p = await stocked()
    p.embedder.delay_s = 0.5
    e = await refused(p, SearchQuery(content=TextContent("x")), Deadline.after(0.1))
    assert e.kind is ErrorKind.DEADLINE_EXCEEDED


async def test_hybrid_search_fuses_the_legs_by_their_weights() -> None:
    p = await stocked()
    for weights, top in (((0.0, 1.0), "item-1"), ((1.0, 0.0), None)):
        q = SearchQuery(content=TextContent("a black top"), target=Target.HYBRID, top_k=5,
                        fusion=Fusion(True, 60, *weights))
        result = await engine(p).search(q)
        assert len(result.hits) == 5 and result.target is Target.HYBRID
        if top:  # the caption leg alone decides: the item captioned with the query's words
            assert result.hits[0].id == top and result.hits[0].score == pytest.approx(1.0, abs=1e-5)
        else:  # the image leg alone: a text vector is no item's image vector
            assert result.hits[0].score < 0.99


def test_fusion_defaults_live_in_one_place() -> None:
    assert Fusion.given(False) == Fusion() == Fusion(False, 60, 0.5, 0.5)
    assert Fusion.given(True, 10, 0.2, 0.0) == Fusion(True, 10, 0.2, 0.0)
    assert Fusion.given(True, 0, 0.0, 0.0) == dataclasses.replace(Fusion(), weighted=True)
    Fusion().validate()
    with pytest.raises(ServiceError, match="rrf_k"):
        Fusion(rrf_k=20000).validate()


async def test_like_id_needs_no_embedder_and_never_returns_the_item_itself() -> None:
    p = await stocked()
    calls = len(p.embedder.calls)
    # The fake store applies no filter expressions, so check the filter the engine built.
    q = SearchQuery(like_id="item-3")
    opts = await engine(p)._options(q, ["caption"], "", await engine(p)._on(q))
    assert opts.filter == 'id != "item-3"'
    result = await engine(p).search(SearchQuery(like_id="item-3", target=Target.IMAGE, filter=""))
    assert len(p.embedder.calls) == calls
    assert np.isfinite([h.score for h in result.hits]).all()


async def test_a_query_vector_from_another_model_is_refused_naming_both() -> None:
    p = await stocked()
    vector = unit("text:a red cup").tolist()
    e = await refused(p, SearchQuery(vector=vector, vector_model="fake-embedder-b"))
    assert e.kind is ErrorKind.FAILED_PRECONDITION
    assert "'fake-embedder-b'" in e.message and "'fake-embedder-a'" in e.message
    ok = await engine(p).search(SearchQuery(vector=vector, vector_model="fake-embedder-a", target=Target.CAPTION))
    assert ok.hits[0].id == "item-0"


async def test_a_search_embeds_with_the_embedder_of_the_live_collections_model() -> None:
    p = await stocked()
    other = FakeEmbedder(model_id="fake-embedder-b")
    p.binding.mapped["fake-embedder-b"] = (other, "embedder-b:0")
    p.index.store = FakeStore(info=CollectionInfo("fake-embedder-b", DIM, True, True))  # a promote happened
    result = await engine(p).search(SearchQuery(content=TextContent("a red cup")))
    assert len(other.calls) == 1 and result.hits == []
    p.index.store = FakeStore(info=CollectionInfo("fake-embedder-c", DIM, True, True))
    e = await refused(p, SearchQuery(content=TextContent("a red cup")))
    assert e.kind is ErrorKind.FAILED_PRECONDITION and "no embedder here serves model 'fake-embedder-c'" in e.message
