"""AdminClient and AsyncAdminClient (mmsearch.admin.v1) over real gRPC on loopback.

The server is the in-process Admin servicer of tests/cli/fake_service.py (`FakeAdmin`,
grpc.aio), which follows the contract; the end-to-end test against the search service's
own Admin lives with the server.
"""
from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from mmsearch.client import (
    AdminClient,
    AsyncAdminClient,
    CollectionInfo,
    IndexBackfillStatus,
    IndexBackfillUpdate,
    IndexCollections,
    Role,
    SearchError,
    SwitchResult,
)
from tests.cli.fake_service import UNREADABLE, FakeAdmin, FakeAdminServer

ITEMS = [f"item-{i}" for i in range(5)]


@pytest.fixture
def server() -> Iterator[FakeAdminServer]:
    s = FakeAdminServer(FakeAdmin(items=ITEMS, unreadable={"item-3"}))
    yield s
    s.stop()


@pytest.fixture
def admin(server: FakeAdminServer) -> Iterator[AdminClient]:
    with AdminClient(server.address, timeout=5.0) as client:
        yield client


def test_list_collections_typed(admin: AdminClient) -> None:
    listing = admin.list_collections()
    assert isinstance(listing, IndexCollections) and listing.index == "mmsearch" and len(listing) == 1
    live = listing.collections[0]
    assert live == CollectionInfo(name="mmsearch__v1", version=1, embedder_model_id="lite-embed-v1", dimension=384,
                                  item_count=5, role=Role.LIVE, embedder_target="127.0.0.1:50051")
    assert listing.live == live and listing.candidate is None and listing.previous is None


def test_model_change_round_trip(admin: AdminClient, server: FakeAdminServer) -> None:
    candidate = admin.create_candidate("clip-vit-b-32")
    assert (candidate.name, candidate.version, candidate.role, candidate.dimension, candidate.item_count) == (
        "mmsearch__v2", 2, Role.CANDIDATE, 512, 0)
    assert server.admin.calls[-1][1].embedder_model_id == "clip-vit-b-32"  # type: ignore[attr-defined]

    updates = list(admin.backfill(max_items=2))
    assert isinstance(updates[0], IndexBackfillUpdate) and updates[0].outcomes == ()
    assert updates[0].progress.total == 5
    outcomes, progress = updates[-1]  # an update unpacks as (outcomes, progress)
    assert len(outcomes) == 2
    assert (progress.copied, progress.skipped, progress.failed, progress.done) == (2, 0, 0, 2)

    seen: list[IndexBackfillUpdate] = []
    summary = admin.backfill_all(on_update=seen.append)  # resumes: the first two are skipped
    assert seen and seen[-1].progress == summary.progress
    p = summary.progress
    assert (p.total, p.copied, p.skipped, p.failed) == (5, 2, 2, 1)
    assert [o.id for o in summary.outcomes] == ITEMS
    assert not summary.ok and [o.id for o in summary.failures] == ["item-3"]
    failure = summary.failures[0]
    assert failure.status is IndexBackfillStatus.FAILED
    assert failure.code is grpc.StatusCode.FAILED_PRECONDITION and failure.message == UNREADABLE
    assert all(o.code is None and o.message == "" for o in summary.outcomes if o.status is not IndexBackfillStatus.FAILED)

    with pytest.raises(SearchError) as refused:  # 4 of 5: counts differ
        admin.promote()
    assert refused.value.code is grpc.StatusCode.FAILED_PRECONDITION and refused.value.method == "Promote"
    assert "has 4 items" in refused.value.details and "has 5" in refused.value.details
    assert admin.list_collections().live.name == "mmsearch__v1"  # type: ignore[union-attr]

    server.admin.ingest("item-5")  # written to both while the candidate exists
    result = admin.promote(force=True)
    assert isinstance(result, SwitchResult)
    assert (result.live.name, result.live.role, result.previous.name, result.previous.role) == (
        "mmsearch__v2", Role.LIVE, "mmsearch__v1", Role.PREVIOUS)
    assert result.caught_up == 0 and result.live.item_count == 5 and result.previous.item_count == 6
    listing = admin.list_collections()
    assert listing.live.name == "mmsearch__v2" and listing.previous.name == "mmsearch__v1"  # type: ignore[union-attr]

    back = admin.rollback(force=True)
    assert (back.live.name, back.previous.name) == ("mmsearch__v1", "mmsearch__v2")

    with pytest.raises(SearchError) as live_drop:
        admin.drop_collection("mmsearch__v1")
    assert live_drop.value.code is grpc.StatusCode.FAILED_PRECONDITION and "live" in live_drop.value.details
    admin.drop_collection("mmsearch__v2")
    assert [c.name for c in admin.list_collections()] == ["mmsearch__v1"]


def test_error_mapping(admin: AdminClient) -> None:
    cases = [
        (lambda: admin.create_candidate("unknown-model"), grpc.StatusCode.FAILED_PRECONDITION, "SEARCH_MODEL_EMBEDDERS"),
        (lambda: list(admin.backfill()), grpc.StatusCode.NOT_FOUND, "no candidate"),
        (lambda: admin.promote(), grpc.StatusCode.NOT_FOUND, "no candidate"),
        (lambda: admin.rollback(), grpc.StatusCode.NOT_FOUND, "no previous"),
        (lambda: admin.drop_collection("nope"), grpc.StatusCode.INVALID_ARGUMENT, "nope"),
    ]
    for call, code, words in cases:
        with pytest.raises(SearchError) as e:
            call()
        assert e.value.code is code and words in e.value.details, e.value
    admin.create_candidate("clip-vit-b-32")
    with pytest.raises(SearchError) as twice:
        admin.create_candidate("clip-vit-b-32")
    assert twice.value.code is grpc.StatusCode.FAILED_PRECONDITION and "already exists" in str(twice.value)
    with pytest.raises(SearchError) as negative:
        list(admin.backfill(max_items_per_s=-1))
    assert negative.value.code is grpc.StatusCode.INVALID_ARGUMENT and negative.value.method == "Backfill"


def test_token_and_admin_scope() -> None:
    server = FakeAdminServer(FakeAdmin(tokens={"ops": {"admin", "search"}, "reader": {"search"}}))
    try:
        with AdminClient(server.address, token="ops", timeout=5.0) as client:
            assert client.list_collections().live is not None
        with AdminClient(server.address, token="reader", timeout=5.0) as client, pytest.raises(SearchError) as e:
            client.list_collections()
        assert e.value.code is grpc.StatusCode.PERMISSION_DENIED and "admin" in e.value.details
        with AdminClient(server.address, timeout=5.0) as client, pytest.raises(SearchError) as e:
            client.list_collections()
        assert e.value.code is grpc.StatusCode.UNAUTHENTICATED
    finally:
        server.stop()


def test_unreachable_is_unavailable() -> None:
    with AdminClient("127.0.0.1:1", timeout=2.0, retry_attempts=1) as client, pytest.raises(SearchError) as e:
        client.list_collections()
    assert e.value.code is grpc.StatusCode.UNAVAILABLE and e.value.method == "ListCollections"


async def test_async_admin_client(server: FakeAdminServer) -> None:
    async with AsyncAdminClient(server.address, timeout=5.0) as admin:
        assert (await admin.list_collections()).live.item_count == 5  # type: ignore[union-attr]
        candidate = await admin.create_candidate("clip-vit-b-32")
        assert candidate.role is Role.CANDIDATE
        totals = [update.progress async for update in admin.backfill(max_items=3)]
        assert totals[0].total == 5 and totals[-1].copied == 3
        summary = await admin.backfill_all()
        assert (summary.progress.skipped, summary.progress.copied, summary.progress.failed) == (3, 1, 1)
        with pytest.raises(SearchError) as e:
            await admin.promote()
        assert e.value.code is grpc.StatusCode.FAILED_PRECONDITION
        result = await admin.promote(force=True)
        assert result.live.name == "mmsearch__v2" and result.previous.name == "mmsearch__v1"
        back = await admin.rollback(force=True)
        assert back.live.name == "mmsearch__v1"
        await admin.drop_collection("mmsearch__v2")
        assert len(await admin.list_collections()) == 1
