"""The ingest pipeline: decode -> check -> caption -> embed -> upsert, stages overlapping.

Every received item ends with exactly one outcome (stored / unchanged / failed with a
reason). Stages are worker tasks joined by queues; the number of items in flight per call
is bounded (the request stream is not read further until items finish), and upstream
calls are batched (one Embed call carries several images and their captions; one Milvus
upsert carries many rows). Idempotency comes from content-hash ids plus a fingerprint of
everything that would be stored: an item whose fingerprint is already stored is
"unchanged" and costs no caption or embedding.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from services.common.content import Content, ImageContent, TextContent
from services.common.deadline import NO_DEADLINE, Deadline
from services.common.errors import (
    AlreadyExists,
    DeadlineExceeded,
    InvalidInput,
    Overloaded,
    ServiceError,
    Unavailable,
)
from services.common.images import PixelNeed, decode_image, inspect_image
from services.common.intake import ImageIntake, ImageRef
from services.common.log import get_logger
from services.search import fields as F
from services.search import flushing
from services.search.binding import EmbedderBinding
from services.search.domain import CaptionResult, IngestItem, ItemStatus, Outcome, Progress
from services.search.metrics import INGEST_IN_FLIGHT, INGEST_ITEMS, INGEST_REPLICA_WRITES, INGEST_STAGE_SECONDS
from services.search.originals import OriginalStore
from services.search.pending import PendingImages
from services.search.ports import Captioner, Index, StoredRow, VectorStore
from services.search.settings import SearchSettings
from services.search.validation import check_id, parse_metadata

log = get_logger(__name__)
T = TypeVar("T")


@dataclass
class _Work:
    item: IngestItem
    data: bytes = b""
    sha256: str = ""
    id: str = ""
    fingerprint: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    uri: str = ""
    caption: CaptionResult | None = None
    vectors: np.ndarray | None = None  # [2, dim]: image, caption
    # Captioning failed and is deferred: stored with the image vector only.
    caption_error: ServiceError | None = None
    # The caller's caption as given (part of the fingerprint), None when captioned here.
    caption_input: dict[str, Any] | None = None


def fingerprint_of(
    sha256: str, metadata: dict[str, Any], uri: str, caption: dict[str, Any] | None, model_id: str
) -> str:
    """Everything that would be stored for an item, hashed: equal means "unchanged"."""
    return hashlib.sha256(
        json.dumps([sha256, metadata, uri, caption, model_id], sort_keys=True, ensure_ascii=False).encode()
    ).hexdigest()


def pending_fingerprint(fingerprint: str) -> str:
    """The fingerprint stored while an item's caption is pending."""
    return hashlib.sha256(f"caption-pending:{fingerprint}".encode()).hexdigest()


def caption_text(caption: CaptionResult) -> str:
    """What the caption vector embeds: the description and its keywords, as the seeds do."""
    if caption.keywords:
        return f"{caption.description} Keywords: {', '.join(caption.keywords)}"
    return caption.description


async def _take_batch(
    queue: asyncio.Queue[T], max_items: int, wait_s: float,
    more_coming: Callable[[], int] | None = None, max_wait_s: float = 0.0,
) -> list[T]:
    """Waits for one item, then gathers more for up to `wait_s` (the batching window).

    With `more_coming`, gathering goes on past the window, up to `max_wait_s` after the
    first item, while that callable says more items are on their way: a slow upstream
    stage then feeds a few full downstream calls instead of many one-item calls (on a
    CPU embedder a one-image Embed call costs ~2.5x the CPU per item of a 16-image one;
    see docs/benchmarks.md).
    """
    batch = [await queue.get()]
    started = time.monotonic()
    window_end = started + wait_s
    hard_end = started + max(wait_s, max_wait_s)
    while len(batch) < max_items:
        now = time.monotonic()
        if now < window_end:
            until = window_end
        elif more_coming is not None and now < hard_end and more_coming() > 0:
            until = min(hard_end, now + max(wait_s, 0.005))  # re-check more_coming now and then
        else:
            break
        try:
            batch.append(await asyncio.wait_for(queue.get(), until - now))
        except TimeoutError:
            continue
    return batch


class IngestPipeline:
    """One instance per service; `run` is called once per Ingest stream."""

    def __init__(
        self,
        settings: SearchSettings,
        intake: ImageIntake,
        captioner: Captioner,
        index: Index,
        binding: EmbedderBinding,
        pending_images: PendingImages | None = None,
        originals: OriginalStore | None = None,
    ) -> None:
        self.settings = settings
        self.intake = intake
        self.captioner = captioner
        self.index = index
        self.binding = binding
        self.pending_images = pending_images
        self.originals = originals

    def defers(self, error: ServiceError, store: VectorStore) -> bool:
        """A caption failure that the item is stored without (SEARCH_ON_CAPTION_FAILURE=defer):
        the captioner is down, throttled or slow. A collection made before deferred
        captions has no pending mark, so there items fail as with `fail`."""
        return (
            self.settings.on_caption_failure == "defer"
            and isinstance(error, Unavailable | Overloaded | DeadlineExceeded)
            and store.pending_supported
        )

    async def run(
        self, items: AsyncIterator[IngestItem], deadline: Deadline = NO_DEADLINE
    ) -> AsyncIterator[tuple[list[Outcome], Progress]]:
        """Yields (new outcomes, running totals) until every received item has an outcome."""
        run = _Run(self, deadline)
        try:
            async for chunk in run.execute(items):
                yield chunk
        finally:
            flushing.ingest_ended()  # the flush policy: a large stream's rows get flushed (flushing.py)


class _Run:
    """The state of one Ingest call."""

    def __init__(self, pipeline: IngestPipeline, deadline: Deadline) -> None:
        s = pipeline.settings
        self.p = pipeline
        self.s = s
        self.deadline = deadline
        # The collections this call writes, resolved when the first item needs them: the
        # live one, and a model change's candidate / previous one (`versions.py`).
        self._live: VectorStore | None = None
        self.writers: Sequence[VectorStore] = ()
        self.progress = Progress()
        self.feeding = True
        self.feed_error: BaseException | None = None
        self.outcomes: asyncio.Queue[Outcome | None] = asyncio.Queue()
        self.slots = asyncio.Semaphore(s.max_in_flight_items)
        # (arrival number, item): the number orders id claims (see `claim`).
        self.decode_q: asyncio.Queue[tuple[int, IngestItem]] = asyncio.Queue(maxsize=s.decode_workers * 2)
        self.check_q: asyncio.Queue[_Work] = asyncio.Queue()
        self.caption_q: asyncio.Queue[_Work] = asyncio.Queue()
        self.embed_q: asyncio.Queue[_Work] = asyncio.Queue()
        self.upsert_q: asyncio.Queue[_Work] = asyncio.Queue()
        self.captioning = 0  # items a caption worker has taken and not passed on yet
        # One embed worker gathers at a time, so arrivals fill one batch, not two halves.
        self.embed_gathering = asyncio.Lock()
        # One id per stream, the first item in stream order wins (search.proto, DUPLICATE).
        # Items leave the decode stage out of order, so ids are claimed in arrival order:
        # `decoded` parks finished items until every earlier one has been decided.
        self.claimed: dict[str, int] = {}  # id -> stream index of the item that holds it
        self.decoded: dict[int, _Work | None] = {}  # arrival number -> work (None: failed)
        self.next_claim = 0
        self.tasks: list[asyncio.Task[Any]] = []

    # --- bookkeeping ------------------------------------------------------------------

    def finish(self, work: _Work | IngestItem, status: ItemStatus, error: ServiceError | None = None) -> None:
        item = work.item if isinstance(work, _Work) else work
        item_id = work.id if isinstance(work, _Work) else ""
        outcome = Outcome(item.index, item_id, status, error)
        if status is ItemStatus.STORED:
            self.progress.stored += 1
        elif status is ItemStatus.UNCHANGED:
            self.progress.unchanged += 1
        elif status is ItemStatus.DUPLICATE:
            self.progress.duplicate += 1
        elif status is ItemStatus.DEFERRED:
            self.progress.deferred += 1
            log.info("ingest item deferred", index=item.index, id=item_id, reason=error.message if error else "")
        else:
            self.progress.failed += 1
            log.info("ingest item failed", index=item.index, id=item_id, reason=error.message if error else "")
        INGEST_ITEMS.labels(status.value).inc()
        INGEST_IN_FLIGHT.dec()
        self.slots.release()
        self.outcomes.put_nowait(outcome)

    async def live(self) -> VectorStore:
        if self._live is None:
            live = await self.p.index.live()
            try:
                self.writers = [w for w in await self.p.index.writers() if w is not live]
            except ServiceError as e:  # the items are stored either way; the catch-up copies them
                log.warning("a model change's other collection cannot be written", error=e.message)
            self._live = live
        return self._live

    def item_deadline(self) -> Deadline:
        """The call's deadline for an upstream call on an item (each upstream caps it)."""
        if self.deadline.expired():
            raise DeadlineExceeded("the Ingest call's deadline passed before this item was processed")
        return self.deadline

    def spawn(self, coro: Any) -> None:
        self.tasks.append(asyncio.create_task(coro))

    # --- the call -----------------------------------------------------------------------

    async def execute(self, items: AsyncIterator[IngestItem]) -> AsyncIterator[tuple[list[Outcome], Progress]]:
        s = self.s
        self.spawn(self.feed(items))
        for _ in range(s.decode_workers):
            self.spawn(self.decoder())
        self.spawn(self.checker())
        for _ in range(caption_workers(s.caption_concurrency)):
            self.spawn(self.captioner())
        for _ in range(2):  # two in flight so the embedder's batcher always has work
            self.spawn(self.embedder())
        self.spawn(self.upserter())
        try:
            while self.feeding or self.progress.in_flight > 0 or not self.outcomes.empty():
                # `in_flight` drops as an item is decided, not as its outcome is sent: the last
                # item can be decided while the caller holds the previous answer (gRPC sending
                # it), and its outcome is then still queued here. Stopping on the counters
                # alone ended the stream without it (an Ingest lost its last outcome).
                first = await self.outcomes.get()
                batch = [first]
                while not self.outcomes.empty():
                    batch.append(self.outcomes.get_nowait())
                if self.feed_error is not None:
                    raise self.feed_error
                decided = [o for o in batch if o is not None]
                if decided:
                    yield decided, self.progress
        finally:
            for task in self.tasks:
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
            INGEST_IN_FLIGHT.dec(self.progress.in_flight)

    async def feed(self, items: AsyncIterator[IngestItem]) -> None:
        try:
            async for item in items:
                await self.slots.acquire()  # bounded in-flight: stop reading the stream
                arrival = self.progress.received
                self.progress.received += 1
                INGEST_IN_FLIGHT.inc()
                await self.decode_q.put((arrival, item))
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # a broken request stream ends the call
            self.feed_error = e
        finally:
            self.feeding = False
            self.outcomes.put_nowait(None)  # wake the output loop

    # --- stages -------------------------------------------------------------------------

    async def decoder(self) -> None:
        while True:
            arrival, item = await self.decode_q.get()
            start = time.perf_counter()
            work: _Work | None = None
            try:
                work = await self.prepare(item)
            except ServiceError as e:
                self.finish(item, ItemStatus.FAILED, e)
            except Exception as e:
                log.exception("decode stage error", index=item.index)
                self.finish(item, ItemStatus.FAILED, InvalidInput(f"could not read the item: {type(e).__name__}"))
            finally:
                INGEST_STAGE_SECONDS.labels("decode").observe(time.perf_counter() - start)
            self.claim(arrival, work)

    def claim(self, arrival: int, work: _Work | None) -> None:
        """Decides ids in stream order, whatever order decoding finished in.

        An item goes on only once every earlier item has an id (or failed), so "the first
        item with an id wins" does not depend on timing; later ones become DUPLICATE.
        """
        self.decoded[arrival] = work
        while self.next_claim in self.decoded:
            w = self.decoded.pop(self.next_claim)
            self.next_claim += 1
            if w is None:
                continue
            first = self.claimed.setdefault(w.id, w.item.index)
            if first != w.item.index:
                self.finish(w, ItemStatus.DUPLICATE, AlreadyExists(
                    f"id {w.id!r} was already used by item {first} of this stream; an id is used once per "
                    "Ingest stream and the first item wins (send a new version in a later stream)"
                ))
            else:
                self.check_q.put_nowait(w)

    async def prepare(self, item: IngestItem) -> _Work:
        s = self.s
        if item.decode_error:
            raise InvalidInput(item.decode_error)
        metadata = parse_metadata(item.metadata_json, s.max_metadata_bytes, s.max_metadata_depth)
        live = await self.live()
        live.indexed_values(metadata)  # a wrong type in an indexed field fails this item alone
        if item.caption is not None and not item.caption.description.strip():
            raise InvalidInput("caption.description is empty")
        data = await self.p.intake.read(item.image)
        decoded = await asyncio.to_thread(_inspect, data, self.p.intake, s.decode_on_ingest)
        item_id = check_id(item.id) if item.id else decoded
        uri = item.image.uri or item.source_uri
        if len(uri) > F.MAX_URI_CHARS:
            raise InvalidInput(f"uri is longer than {F.MAX_URI_CHARS} characters")
        fingerprint = fingerprint_of(
            decoded, metadata, uri, item.caption.__dict__ if item.caption else None, _model(live))
        work = _Work(item, data, decoded, item_id, fingerprint, metadata, uri,
                     caption_input=item.caption.__dict__ if item.caption else None)
        if item.caption is not None:
            work.caption = CaptionResult(item.caption.description, list(item.caption.keywords), "caller")
        return work

    async def checker(self) -> None:
        while True:
            batch = await _take_batch(self.check_q, self.s.upsert_batch_items, self.s.batch_wait_ms / 1000)
            start = time.perf_counter()
            try:
                stored = await (await self.live()).fingerprints([w.id for w in batch])
            except ServiceError as e:
                for w in batch:
                    self.finish(w, ItemStatus.FAILED, e)
                continue
            finally:
                INGEST_STAGE_SECONDS.labels("check").observe(time.perf_counter() - start)
            for w in batch:
                if stored.get(w.id) == w.fingerprint:
                    self.finish(w, ItemStatus.UNCHANGED)
                elif w.caption is not None:
                    self.embed_q.put_nowait(w)
                else:
                    self.caption_q.put_nowait(w)

    async def captioner(self) -> None:
        """Sends the items waiting for a caption in CaptionBatch calls of up to
        `CAPTION_BATCH_ITEMS` (what is queued now: a lone item goes at once). The workers
        (`caption_workers`) keep at most `caption_concurrency` images in flight, as one
        call per image did. Each item's outcome is the one its own Caption call had."""
        batch_items = caption_batch_items(self.s.caption_concurrency)
        while True:
            batch = [await self.caption_q.get()]
            while len(batch) < batch_items and not self.caption_q.empty():
                batch.append(self.caption_q.get_nowait())
            self.captioning += len(batch)
            start = time.perf_counter()
            results: Sequence[CaptionResult | ServiceError] = ()
            live: VectorStore | None = None
            try:
                try:
                    results = await self.p.captioner.caption_batch([w.data for w in batch], self.item_deadline())
                except ServiceError as e:  # the whole call failed: each item as if its own call had
                    results = [e] * len(batch)
                if any(isinstance(r, ServiceError) for r in results):
                    live = await self.live()
            except Exception as e:
                log.exception("caption stage error", index=batch[0].item.index, items=len(batch))
                for w in batch:
                    self.finish(w, ItemStatus.FAILED, InvalidInput(f"caption failed: {type(e).__name__}"))
                continue
            finally:
                self.captioning -= len(batch)  # no await until the items are queued for embedding below
                INGEST_STAGE_SECONDS.labels("caption").observe(time.perf_counter() - start)
            for w, result in zip(batch, results, strict=True):
                if isinstance(result, ServiceError):
                    error = type(result)(f"caption failed: {result.message}")
                    assert live is not None
                    if self.p.defers(result, live):  # stored now with its image vector, captioned later
                        w.caption_error = error
                        self.embed_q.put_nowait(w)
                    else:
                        self.finish(w, ItemStatus.FAILED, error)
                elif not result.description.strip():
                    self.finish(w, ItemStatus.FAILED, InvalidInput("caption failed: the captioner returned no description"))
                else:
                    w.caption = result
                    self.embed_q.put_nowait(w)

    def captions_pending(self) -> int:
        """Items still in the caption stage: they will reach the embed queue soon."""
        return self.caption_q.qsize() + self.captioning

    async def embedder(self) -> None:
        while True:
            async with self.embed_gathering:
                batch = await _take_batch(
                    self.embed_q, self.s.embed_batch_items, self.s.batch_wait_ms / 1000,
                    more_coming=self.captions_pending, max_wait_s=self.s.embed_batch_max_wait_ms / 1000,
                )
            await self.embed_batch(batch, allow_split=True)

    async def embed_batch(self, batch: list[_Work], allow_split: bool) -> None:
        start = time.perf_counter()
        try:
            vectors = await self.embed_for(await self.live(), batch)
        except InvalidInput as e:
            if allow_split and len(batch) > 1:  # find the one bad item instead of failing all
                for w in batch:
                    await self.embed_batch([w], allow_split=False)
                return
            for w in batch:
                self.finish(w, ItemStatus.FAILED, InvalidInput(f"embedding failed: {e.message}"))
            return
        except ServiceError as e:
            for w in batch:
                self.finish(w, ItemStatus.FAILED, type(e)(f"embedding failed: {e.message}"))
            return
        finally:
            INGEST_STAGE_SECONDS.labels("embed").observe(time.perf_counter() - start)
        for w, v in zip(batch, vectors, strict=True):
            w.vectors = v
            self.upsert_q.put_nowait(w)

    async def embed_for(self, store: VectorStore, batch: list[_Work]) -> list[np.ndarray]:
        """Each item's [image, caption] vectors from the embedder of `store`'s model."""
        model = _model(store)
        embedder = await self.p.binding.embedder_for(model)
        contents: list[Content] = []
        for w in batch:
            contents.append(ImageContent(ImageRef(data=w.data)))
            if w.caption_error is None:  # a deferred item has no caption to embed yet
                assert w.caption is not None
                contents.append(TextContent(caption_text(w.caption)))
        vectors, made_by = await embedder.embed(contents, self.item_deadline())
        self.p.binding.check_vectors(made_by, model)
        out, i = [], 0
        for w in batch:
            if w.caption_error is None:
                out.append(vectors[i : i + 2])
                i += 2
            else:  # placeholder caption vector: never searched (caption legs skip pending rows)
                out.append(np.stack([vectors[i], vectors[i]]))
                i += 1
        return out

    async def upserter(self) -> None:
        while True:
            batch = await _take_batch(self.upsert_q, self.s.upsert_batch_items, self.s.batch_wait_ms / 1000)
            now_ms = int(time.time() * 1000)
            start = time.perf_counter()
            try:
                live = await self.live()
                rows = [_row(w, _model(live), _fingerprint(w, _model(live)), w.vectors, now_ms) for w in batch]
                deferred = [w for w in batch if w.caption_error is not None]
                if deferred and self.p.pending_images is not None:  # the backfill's copy of the image
                    await self.p.pending_images.put_many([(w.id, w.data) for w in deferred])
                if self.p.originals is not None:  # what a model change re-embeds inline items from
                    await self.p.originals.put_many([(w.sha256, w.data) for w in batch if not w.item.image.uri])
                await live.upsert(rows)
            except ServiceError as e:
                for w in batch:
                    self.finish(w, ItemStatus.FAILED, type(e)(f"storing failed: {e.message}"))
                continue
            finally:
                INGEST_STAGE_SECONDS.labels("upsert").observe(time.perf_counter() - start)
            for writer in self.writers:
                await self.replicate(writer, batch, now_ms)
            for w in batch:
                if w.caption_error is not None:
                    self.finish(w, ItemStatus.DEFERRED, w.caption_error)
                else:
                    self.finish(w, ItemStatus.STORED)

    async def replicate(self, store: VectorStore, batch: list[_Work], now_ms: int) -> None:
        """Writes stored items to a model change's other collection too, with its model's
        vectors. Best effort: the item is stored (in the live collection) either way; what
        fails here is copied by the next admin backfill or the promote's catch-up pass."""
        model = _model(store)
        try:
            vectors = await self.embed_for(store, batch)
            rows = [_row(w, model, _fingerprint(w, model), v, now_ms) for w, v in zip(batch, vectors, strict=True)]
            await store.upsert(rows)
        except ServiceError as e:
            INGEST_REPLICA_WRITES.labels("failed").inc(len(batch))
            log.warning("could not write items to the model change's other collection; the admin backfill or the "
                        "promote's catch-up copies them", collection=store.collection, items=len(batch),
                        error=e.message)
            return
        INGEST_REPLICA_WRITES.labels("written").inc(len(batch))


#: Most images per CaptionBatch call from the caption stage. Small on purpose: a batch
#: answers when its slowest image is captioned, so two smaller batches in flight keep the
#: embed stage fed while one full batch would leave it idle.
CAPTION_BATCH_ITEMS = 4


def caption_batch_items(concurrency: int) -> int:
    return max(1, min(CAPTION_BATCH_ITEMS, concurrency))


def caption_workers(concurrency: int) -> int:
    """Caption workers such that at most `concurrency` images are in flight."""
    return max(1, concurrency // caption_batch_items(concurrency))


def _model(store: VectorStore) -> str:
    assert store.info is not None  # described by the index before it is handed out
    return store.info.model_id


def _fingerprint(w: _Work, model: str) -> str:
    """The fingerprint of the item as a collection built by `model` stores it. A pending
    item gets another one than the captioned item's: re-ingesting it captions it (never
    "unchanged" while pending)."""
    fingerprint = fingerprint_of(w.sha256, w.metadata, w.uri, w.caption_input, model)
    return pending_fingerprint(fingerprint) if w.caption_error is not None else fingerprint


def _row(w: _Work, model: str, fingerprint: str, vectors: np.ndarray | None, now_ms: int) -> StoredRow:
    assert vectors is not None
    if w.caption_error is not None:  # `fingerprint` is the pending one (see `_fingerprint`)
        return StoredRow(
            id=w.id, content_sha256=w.sha256, fingerprint=fingerprint, uri=w.uri, caption="", keywords=[], metadata=w.metadata, embedder_model_id=model,
            captioner_model_id="", ingested_at_ms=now_ms, image_vector=vectors[0], caption_vector=vectors[1],
            caption_pending=True,
        )
    assert w.caption is not None
    return StoredRow(
        id=w.id, content_sha256=w.sha256, fingerprint=fingerprint, uri=w.uri,
        caption=w.caption.description[: F.MAX_CAPTION_CHARS],
        keywords=[k[: F.MAX_KEYWORD_CHARS] for k in w.caption.keywords[: F.MAX_KEYWORDS]],
        metadata=w.metadata, embedder_model_id=model, captioner_model_id=w.caption.model_id, ingested_at_ms=now_ms,
        image_vector=vectors[0], caption_vector=vectors[1],
    )


def _inspect(data: bytes, intake: ImageIntake, decode: bool) -> str:
    """Checks the image's header (size, format, declared pixels); returns its SHA-256.

    Search keeps no pixels, so it decodes none: the captioner and the embedder decode the
    image and refuse a corrupt body (the item fails with their message). `decode`
    (SEARCH_DECODE_ON_INGEST) decodes it here too, at the smallest scale."""
    if decode:
        return decode_image(data, intake.limits, PixelNeed()).sha256
    return inspect_image(data, intake.limits).sha256
