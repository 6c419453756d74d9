"""Unit tests of the ingest pipeline (services/search/ingest.py) through fake ports: every
item gets exactly one outcome, ids are claimed once per stream, one bad item fails alone,
deadlines and model changes fail items with the right kind. End to end over gRPC and
Milvus: test_search_integration.py, test_search_ingest_duplicates.py."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from typing import Any

import pytest

from services.common.content import ImageContent
from services.common.deadline import NO_DEADLINE, Deadline
from services.common.errors import ErrorKind, InvalidInput, Unavailable
from services.common.images import sha256_hex
from services.common.intake import ImageRef
from services.search.domain import CaptionInput, IngestItem, ItemStatus, Outcome, Progress
from services.search.ingest import IngestPipeline
from services.search.ports import CollectionInfo
from tests.search.fakes import DIM, FakeEmbedder, FakeStore, Ports, bound_ports, jpeg


def pipeline(p: Ports) -> IngestPipeline:
    return IngestPipeline(p.settings, p.intake, p.captioner, p.index, p.binding)


async def _stream(items: Iterable[IngestItem]) -> AsyncIterator[IngestItem]:
    for item in items:
        yield item


async def ingest(p: Ports, items: list[IngestItem], deadline: Deadline = NO_DEADLINE) -> tuple[
        dict[int, Outcome], Progress]:
    """Runs one stream; checks every item got exactly one outcome."""
    seen: list[Outcome] = []
    progress = Progress()
    async for outcomes, progress in pipeline(p).run(_stream(items), deadline):
        seen += outcomes
    assert sorted(o.index for o in seen) == [i.index for i in items], "exactly one outcome per item"
    assert progress.in_flight == 0 and progress.received == len(items)
    return {o.index: o for o in seen}, progress


def item(index: int, data: bytes, **kw: Any) -> IngestItem:
    return IngestItem(index, ImageRef(data=data), **kw)


async def test_every_item_gets_one_outcome_and_bad_items_fail_alone() -> None:
    p = await bound_ports()
    items = [
        item(0, jpeg(0)),
        item(1, b"not an image at all"),
        item(2, jpeg(2), metadata_json="[1, 2]"),
        item(3, jpeg(3), id="bad id with spaces"),
        item(4, jpeg(4), caption=CaptionInput("  ")),
        item(5, jpeg(5), id="given-5", caption=CaptionInput("a red cup", ["cup"])),
        IngestItem(6, ImageRef(), decode_error="item 6 is not valid UTF-8"),
    ]
    out, progress = await ingest(p, items)
    assert {i for i, o in out.items() if o.status is ItemStatus.STORED} == {0, 5}
    reasons = {i: out[i].error.message for i in (1, 2, 3, 4, 6)}  # type: ignore[union-attr]
    assert "not a recognised image" in reasons[1]
    assert "JSON object" in reasons[2]
    assert "id 'bad id with spaces' is invalid" in reasons[3]
    assert reasons[4] == "caption.description is empty"
    assert reasons[6] == "item 6 is not valid UTF-8"
    assert all(out[i].error.kind is ErrorKind.INVALID_INPUT for i in reasons)  # type: ignore[union-attr]
    assert (progress.stored, progress.failed) == (2, 5)
    # The caller's caption is stored as given and costs no Caption call.
    assert p.store.rows["given-5"]["caption"] == "a red cup" and p.captioner.calls == 1
    assert set(p.store.rows) == {"given-5", out[0].id}


async def test_an_id_is_claimed_once_per_stream_first_item_wins() -> None:
    p = await bound_ports()
    same = jpeg(7)
    items = [item(0, jpeg(8), id="x"), item(1, jpeg(9), id="x"), item(2, same), item(3, same), item(4, jpeg(10), id="x")]
    out, progress = await ingest(p, items)
    assert [out[i].status for i in range(5)] == [ItemStatus.STORED, ItemStatus.DUPLICATE, ItemStatus.STORED,
                                                 ItemStatus.DUPLICATE, ItemStatus.DUPLICATE]
    assert "already used by item 0" in out[1].error.message  # type: ignore[union-attr]
    assert out[1].error.kind is ErrorKind.ALREADY_EXISTS  # type: ignore[union-attr]
    assert "already used by item 2" in out[3].error.message  # type: ignore[union-attr]
    assert progress.duplicate == 3 and len(p.store.rows) == 2
    # The stored row under "x" is item 0's image.
    assert p.store.rows["x"]["content_sha256"] == sha256_hex(items[0].image.data or b"")


async def test_a_second_run_is_unchanged_and_costs_no_model_call() -> None:
    p = await bound_ports()
    items = [item(i, jpeg(20 + i)) for i in range(6)]
    await ingest(p, items)
    captions, embeds = p.captioner.calls, len(p.embedder.calls)
    out, progress = await ingest(p, items)
    assert progress.unchanged == 6 and all(o.status is ItemStatus.UNCHANGED for o in out.values())
    assert (p.captioner.calls, len(p.embedder.calls)) == (captions, embeds)


async def test_an_item_the_embedder_refuses_fails_alone_and_the_batch_is_stored() -> None:
    bad = jpeg(31)
    p = await bound_ports(refuse=lambda c: InvalidInput("image is corrupt or truncated")
                          if isinstance(c, ImageContent) and c.image.data == bad else None)
    items = [item(i, jpeg(30 + i)) for i in range(6)]
    out, progress = await ingest(p, items)
    assert out[1].status is ItemStatus.FAILED
    assert out[1].error.message.startswith("embedding failed: item 0: image is corrupt")  # type: ignore[union-attr]
    assert progress.stored == 5 and len(p.store.rows) == 5
    assert max(len(c) for c in p.embedder.calls) > 2, "items were batched before the split"


async def test_a_captioner_outage_fails_items_or_defers_them() -> None:
    p = await bound_ports()
    p.captioner.down = Unavailable("captioner: UNAVAILABLE: connection refused")
    out, _ = await ingest(p, [item(i, jpeg(40 + i)) for i in range(3)])
    assert all(o.status is ItemStatus.FAILED and o.error.kind is ErrorKind.UNAVAILABLE  # type: ignore[union-attr]
               and o.error.message.startswith("caption failed: captioner") for o in out.values())  # type: ignore[union-attr]
    assert not p.store.rows

    p.settings = p.settings.model_copy(update={"on_caption_failure": "defer"})
    out, progress = await ingest(p, [item(i, jpeg(40 + i)) for i in range(3)])
    assert progress.deferred == 3 and all(o.status is ItemStatus.DEFERRED for o in out.values())
    assert all(r["caption_pending"] and r["caption"] == "" for r in p.store.rows.values())


async def test_a_passed_deadline_fails_every_item_once() -> None:
    p = await bound_ports()
    out, progress = await ingest(p, [item(i, jpeg(50 + i)) for i in range(4)], Deadline.after(-1))
    assert progress.failed == 4
    assert all(o.error.kind is ErrorKind.DEADLINE_EXCEEDED for o in out.values())  # type: ignore[union-attr]
    assert not p.store.rows


async def test_a_slow_embedder_past_the_deadline_fails_the_items_it_holds() -> None:
    p = await bound_ports(delay_s=0.5)
    out, progress = await ingest(p, [item(i, jpeg(60 + i)) for i in range(3)], Deadline.after(0.2))
    assert progress.failed == 3 and not p.store.rows
    assert all(o.error.kind is ErrorKind.DEADLINE_EXCEEDED for o in out.values())  # type: ignore[union-attr]


async def test_vectors_from_another_model_are_never_stored() -> None:
    p = await bound_ports()
    p.embedder.model_id = "fake-embedder-b"  # the embedder was redeployed with another model
    out, _ = await ingest(p, [item(0, jpeg(70))])
    assert out[0].error.kind is ErrorKind.FAILED_PRECONDITION  # type: ignore[union-attr]
    assert "'fake-embedder-b', the collection was built by 'fake-embedder-a'" in out[0].error.message  # type: ignore[union-attr]
    assert not p.store.rows


async def test_a_store_outage_fails_items_with_its_reason() -> None:
    p = await bound_ports()
    p.store.down = Unavailable("milvus: connection refused")
    out, _ = await ingest(p, [item(i, jpeg(80 + i)) for i in range(2)])
    assert all(o.error.kind is ErrorKind.UNAVAILABLE and "milvus" in o.error.message  # type: ignore[union-attr]
               for o in out.values())


@pytest.mark.parametrize("n", [1, 17, 70])
async def test_outcomes_are_complete_for_streams_of_any_size(n: int) -> None:
    p = await bound_ports()
    _, progress = await ingest(p, [item(i, jpeg(1000 + i, side=8)) for i in range(n)])
    assert progress.stored == n == len(p.store.rows)
    assert sum(p.store.upserts) == n


async def test_an_item_decided_while_the_caller_holds_the_previous_answer_is_still_answered() -> None:
    """The caller (gRPC, sending the previous message) resumes the stream a little later; the
    last item in flight, decided meanwhile, still gets its outcome. The output loop used to stop
    on `in_flight == 0` with that outcome still queued: over HTTP about one NDJSON ingest in ten
    lost its last outcome (tests/gateway/test_gateway_api.py)."""
    p = await bound_ports()
    items = [item(0, jpeg(60)), item(1, b"not an image at all")]
    answers: list[list[int]] = []
    async for outcomes, _progress in pipeline(p).run(_stream(items)):
        answers.append([o.index for o in outcomes])
        await asyncio.sleep(0.05)  # the other item is decided now, while its answer waits in the queue
    assert sorted(i for answer in answers for i in answer) == [0, 1], answers


async def test_items_are_written_to_a_model_changes_other_collection_with_its_vectors() -> None:
    p = await bound_ports()
    other_embedder = FakeEmbedder(model_id="fake-embedder-b")
    p.binding.mapped["fake-embedder-b"] = (other_embedder, "embedder-b:0")
    candidate = FakeStore(collection="fake__v2", info=CollectionInfo("fake-embedder-b", DIM, True, True))
    p.index.others.append(candidate)
    out, progress = await ingest(p, [item(i, jpeg(90 + i)) for i in range(5)])
    assert progress.stored == 5 and set(candidate.rows) == set(p.store.rows)
    for key, row in candidate.rows.items():
        assert row["embedder_model_id"] == "fake-embedder-b" and p.store.rows[key]["embedder_model_id"] == "fake-embedder-a"
        assert row["caption"] == p.store.rows[key]["caption"]
        assert row["fingerprint"] != p.store.rows[key]["fingerprint"]  # the model is part of it
    # The other collection failing never fails the items: they are stored (live) anyway.
    candidate.down = Unavailable("milvus: candidate unavailable")
    out, progress = await ingest(p, [item(i, jpeg(200 + i)) for i in range(3)])
    assert progress.stored == 3 and all(o.status is ItemStatus.STORED for o in out.values())


async def test_captions_go_in_bounded_batches_and_per_item_errors_fail_or_defer_that_item_alone() -> None:
    from services.common.errors import Overloaded
    from services.search.ingest import CAPTION_BATCH_ITEMS

    p = await bound_ports()
    bad, busy = jpeg(71), jpeg(72)
    p.captioner.item_errors = {
        sha256_hex(bad): InvalidInput("captioner: INVALID_ARGUMENT: image is corrupt or truncated"),
        sha256_hex(busy): Overloaded("captioner: RESOURCE_EXHAUSTED: too many captions waiting"),
    }
    items = [item(i, jpeg(70 + i)) for i in range(12)]
    out, progress = await ingest(p, items)
    assert p.captioner.batches and max(p.captioner.batches) <= CAPTION_BATCH_ITEMS
    assert sum(p.captioner.batches) == 12 and len(p.captioner.batches) < 12, "several images per CaptionBatch"
    assert out[1].status is ItemStatus.FAILED and out[2].status is ItemStatus.FAILED
    assert out[1].error.kind is ErrorKind.INVALID_INPUT  # type: ignore[union-attr]
    assert out[1].error.message == "caption failed: captioner: INVALID_ARGUMENT: image is corrupt or truncated"  # type: ignore[union-attr]
    assert out[2].error.kind is ErrorKind.OVERLOADED  # type: ignore[union-attr]
    assert progress.stored == 10 and len(p.store.rows) == 10

    # defer: the throttled item is stored pending; the corrupt one still fails (not a deferrable kind).
    p = await bound_ports()
    p.captioner.item_errors = {
        sha256_hex(bad): InvalidInput("captioner: INVALID_ARGUMENT: image is corrupt or truncated"),
        sha256_hex(busy): Overloaded("captioner: RESOURCE_EXHAUSTED: too many captions waiting"),
    }
    p.settings = p.settings.model_copy(update={"on_caption_failure": "defer"})
    out, progress = await ingest(p, items)
    assert out[1].status is ItemStatus.FAILED and out[2].status is ItemStatus.DEFERRED
    assert progress.stored == 10 and progress.deferred == 1


async def test_a_failed_caption_batch_call_fails_or_defers_each_of_its_items() -> None:
    p = await bound_ports()
    p.captioner.down = Unavailable("captioner: UNAVAILABLE: connection refused")
    out, _ = await ingest(p, [item(i, jpeg(90 + i)) for i in range(9)])
    assert len(out) == 9 and all(o.status is ItemStatus.FAILED for o in out.values())
    assert all(o.error.message == "caption failed: captioner: UNAVAILABLE: connection refused"  # type: ignore[union-attr]
               for o in out.values())
    assert sum(p.captioner.batches) == 9


def test_caption_workers_keep_the_images_in_flight_within_caption_concurrency() -> None:
    from services.search.ingest import caption_batch_items, caption_workers

    for concurrency in (1, 2, 3, 4, 5, 8, 9, 16, 64):
        assert 1 <= caption_batch_items(concurrency) * caption_workers(concurrency) <= concurrency
