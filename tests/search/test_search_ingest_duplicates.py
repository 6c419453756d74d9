"""One id used twice in one Ingest stream: the first item in stream order wins, every
later one is DUPLICATE (ALREADY_EXISTS, naming the first), whatever order the server
happens to finish them in. Real search, embedder and Milvus Lite server on loopback."""
from __future__ import annotations

import io
import random
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest
import pytest_asyncio
from PIL import Image

from mmsearch.common.v1 import types_pb2
from mmsearch.search.v1 import search_pb2, search_pb2_grpc
from services.common.images import sha256_hex
from services.common.server import RunningServer
from tests.conftest import MilvusLiteServer
from tests.search.conftest import start_embedder, start_search

pytestmark = pytest.mark.asyncio(loop_scope="module")
TRIALS = 20


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def stub(milvus_server: MilvusLiteServer) -> AsyncIterator[search_pb2_grpc.SearchStub]:
    embedder = await start_embedder()
    # No captioner runs: every item carries its caption, so only decode order varies.
    search: RunningServer = await start_search(
        milvus_server.uri, embedder.address, "127.0.0.1:1", collection="duplicates", decode_workers=4
    )
    async with grpc.aio.insecure_channel(search.address) as channel:
        yield search_pb2_grpc.SearchStub(channel)
    await search.stop(0.5)
    await embedder.stop(0.5)


def jpeg(side: int, seed: int) -> bytes:
    """Noise: a big one takes tens of ms to decode, a small one well under one."""
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def item(data: bytes, item_id: str = "", label: str = "") -> search_pb2.IngestItem:
    return search_pb2.IngestItem(
        image=types_pb2.Image(data=data), id=item_id, metadata_json=f'{{"label": "{label}"}}',
        caption=search_pb2.CaptionInput(description=f"noise {label}"),
    )


async def run(stub: search_pb2_grpc.SearchStub, items: list[search_pb2.IngestItem], chunk: int) -> tuple[
        dict[int, search_pb2.ItemOutcome], search_pb2.IngestProgress]:
    requests = [search_pb2.IngestRequest(items=items[i : i + chunk]) for i in range(0, len(items), chunk)]
    outcomes: dict[int, search_pb2.ItemOutcome] = {}
    progress = search_pb2.IngestProgress()
    async for reply in stub.Ingest(iter(requests)):
        for o in reply.outcomes:
            assert o.index not in outcomes, "an item got two outcomes"
            outcomes[o.index] = o
        progress = reply.progress
    assert len(outcomes) == len(items)
    return outcomes, progress


@pytest.mark.parametrize("chunk", [64, 1, 3], ids=["one-chunk", "one-item-chunks", "across-chunks"])
async def test_first_item_with_an_id_wins_every_trial(stub: search_pb2_grpc.SearchStub, chunk: int) -> None:
    rng = random.Random(chunk)
    before = (await stub.Stats(search_pb2.StatsRequest())).item_count
    distinct = 0
    for trial in range(TRIALS):
        # The first holder of the id is slow to decode half the time (big image), so a
        # later, small item with the same id usually finishes decoding first.
        big_first = trial % 2 == 0
        first = jpeg(1000 if big_first else 16, seed=1000 * chunk + trial)
        later = jpeg(16 if big_first else 1000, seed=1000 * chunk + trial + 500)
        key = f"dup-{chunk}-{trial}"
        fillers = [item(jpeg(16, seed=10_000 * chunk + 10 * trial + k), f"{key}-f{k}", "filler") for k in range(3)]
        items = [item(first, key, "first"), *fillers[:rng.randint(0, 3)], item(later, key, "later")]
        items += [item(later, key, "third")]  # a third claimant: still the first wins
        later_index = [i for i, it in enumerate(items) if it.id == key][1:]
        outcomes, progress = await run(stub, items, chunk)

        assert outcomes[0].status == search_pb2.ITEM_STATUS_STORED, outcomes[0]
        for i in later_index:
            o = outcomes[i]
            assert o.status == search_pb2.ITEM_STATUS_DUPLICATE, (trial, o)
            assert o.id == key
            assert o.error.code == grpc.StatusCode.ALREADY_EXISTS.value[0]
            assert "already used by item 0 of this stream" in o.error.message
        assert progress.duplicate == len(later_index) and progress.in_flight == 0
        assert progress.stored == len(items) - len(later_index)
        record = (await stub.Get(search_pb2.GetRequest(ids=[key]))).records[0]
        assert record.content_sha256 == sha256_hex(first)  # the first item's bytes survived
        assert '"first"' in record.metadata_json
        distinct += len(items) - len(later_index)
    after = (await stub.Stats(search_pb2.StatsRequest())).item_count
    assert after - before == distinct  # nothing duplicated, nothing lost


async def test_the_same_image_twice_without_ids_is_one_item(stub: search_pb2_grpc.SearchStub) -> None:
    data = jpeg(64, seed=77)
    outcomes, progress = await run(stub, [item(data, label="a"), item(jpeg(64, seed=78)), item(data, label="b")], 2)
    assert outcomes[0].status == search_pb2.ITEM_STATUS_STORED
    assert outcomes[2].status == search_pb2.ITEM_STATUS_DUPLICATE and outcomes[2].id == sha256_hex(data)
    assert progress.duplicate == 1
    # Re-sent in a new stream, the first is unchanged and the second is again a duplicate.
    outcomes, _ = await run(stub, [item(data, label="a"), item(data, label="b")], 1)
    assert [outcomes[0].status, outcomes[1].status] == [search_pb2.ITEM_STATUS_UNCHANGED, search_pb2.ITEM_STATUS_DUPLICATE]


async def test_a_failed_first_item_does_not_hold_the_id(stub: search_pb2_grpc.SearchStub) -> None:
    """An item that fails before it has an id claims nothing: a later one with that id is stored."""
    good = jpeg(32, seed=99)
    items = [search_pb2.IngestItem(image=types_pb2.Image(data=b"not an image"), id="dup-failed-first"),
             item(good, "dup-failed-first", "good")]
    outcomes, _ = await run(stub, items, 2)
    assert outcomes[0].status == search_pb2.ITEM_STATUS_FAILED
    assert outcomes[1].status == search_pb2.ITEM_STATUS_STORED
