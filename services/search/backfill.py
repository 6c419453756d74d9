"""Caption backfill: finishes the items Ingest stored with their caption pending.

One call works on a snapshot of the pending ids (in id order), a chunk at a time: read
each image again (the pending-images folder, else the item's URI), caption it (several at
once, paced), embed the captions in one batched call, and write each row back with its
caption, caption vector, the fingerprint a normal ingest of the same item would have
(so re-ingesting it afterwards is "unchanged") and no pending mark. The stored image
vector is kept. An item no longer pending when its turn comes is skipped, so running the
backfill again, or after an interruption, never captions an item twice.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np

from services.common import principal
from services.common.content import TextContent
from services.common.errors import Aborted, FailedPrecondition, InvalidInput, ServiceError, Unavailable
from services.common.intake import ImageIntake, ImageRef
from services.common.log import get_logger
from services.search import fields as F
from services.search.binding import EmbedderBinding
from services.search.domain import BackfillOutcome, BackfillProgress, BackfillStatus, CaptionResult
from services.search.ingest import caption_text, fingerprint_of
from services.search.originals import OriginalStore
from services.search.pending import PendingImages
from services.search.ports import Captioner, Embedder, Index, StoredRow, VectorStore
from services.search.settings import SearchSettings

log = get_logger(__name__)


class Pacer:
    """Starts at most `rate` items per second (evenly spaced)."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.next = time.monotonic()
        self.lock = asyncio.Lock()

    async def wait(self) -> None:
        async with self.lock:
            now = time.monotonic()
            if self.next > now:
                await asyncio.sleep(self.next - now)
            self.next = max(now, self.next) + self.interval


class Backfiller:
    def __init__(
        self, settings: SearchSettings, index: Index, captioner: Captioner, intake: ImageIntake,
        binding: EmbedderBinding, pending_images: PendingImages | None, originals: OriginalStore | None = None,
    ) -> None:
        self.settings = settings
        self.index = index
        self.captioner = captioner
        self.intake = intake
        self.binding = binding
        self.pending_images = pending_images
        self.originals = originals
        # One backfill at a time per tenant (a tenant never waits on, or learns of, another's).
        self._running: dict[str, asyncio.Lock] = {}

    async def run(self, max_items: int = 0, max_items_per_s: float = 0.0) -> AsyncIterator[
            tuple[list[BackfillOutcome], BackfillProgress]]:
        """Yields (outcomes of one chunk, running totals); first ([], totals) with the snapshot size."""
        if max_items_per_s < 0:
            raise InvalidInput(f"max_items_per_s must be >= 0, got {max_items_per_s}")
        running = self._running.setdefault(principal.current().tenant, asyncio.Lock())
        if running.locked():
            raise Aborted("a backfill is already running on this server; run one at a time")
        async with running:
            if not self.binding.model_id():
                raise Unavailable("embedder: not bound to the collection yet; backfill needs it")
            store = await self.index.live()
            if not store.pending_supported:
                raise FailedPrecondition(
                    f"collection {store.collection!r} predates deferred captions: nothing can be pending")
            embedder = await self.binding.embedder_for(self._model(store))
            ceiling = self.settings.backfill_max_items_per_s
            rate = min(max_items_per_s, ceiling) if max_items_per_s > 0 else ceiling
            ids = await store.pending_ids(max_items if max_items > 0 else 10_000_000)
            progress = BackfillProgress(total=len(ids))
            log.info("backfill started", pending=len(ids), items_per_s=rate)
            yield [], progress
            pacer = Pacer(rate)
            chunk = max(1, self.settings.embed_batch_items)
            for start in range(0, len(ids), chunk):
                outcomes = await self._chunk(ids[start : start + chunk], pacer, store, embedder)
                for o in outcomes:
                    if o.status is BackfillStatus.CAPTIONED:
                        progress.captioned += 1
                    elif o.status is BackfillStatus.SKIPPED:
                        progress.skipped += 1
                    else:
                        progress.failed += 1
                yield outcomes, progress
            log.info("backfill done", captioned=progress.captioned, failed=progress.failed, skipped=progress.skipped)

    async def _chunk(
        self, ids: list[str], pacer: Pacer, store: VectorStore, embedder: Embedder
    ) -> list[BackfillOutcome]:
        rows = await store.rows_with_image_vector(ids)
        outcomes: dict[str, BackfillOutcome] = {}
        todo = []
        for item_id in ids:
            row = rows.get(item_id)
            if row is None or not row.get(F.CAPTION_PENDING):
                outcomes[item_id] = BackfillOutcome(item_id, BackfillStatus.SKIPPED)
            else:
                todo.append(row)
        limit = asyncio.Semaphore(max(1, self.settings.caption_concurrency))

        async def caption(row: dict[str, Any]) -> CaptionResult | ServiceError:
            async with limit:
                await pacer.wait()
                try:
                    data = await self._image(row)
                    result = await self.captioner.caption(data)
                except ServiceError as e:
                    return type(e)(f"caption failed: {e.message}")
                if not result.description.strip():
                    return InvalidInput("caption failed: the captioner returned no description")
                return result

        captions = await asyncio.gather(*(caption(r) for r in todo))
        done = [(r, c) for r, c in zip(todo, captions, strict=True) if isinstance(c, CaptionResult)]
        for row, c in zip(todo, captions, strict=True):
            if isinstance(c, ServiceError):
                outcomes[row["id"]] = BackfillOutcome(row["id"], BackfillStatus.FAILED, c)
        if done:
            try:
                vectors, made_by = await embedder.embed([TextContent(caption_text(c)) for _, c in done])
                model = self._model(store)
                self.binding.check_vectors(made_by, model)
                await store.upsert([self._row(r, c, v, model) for (r, c), v in zip(done, vectors, strict=True)])
            except ServiceError as e:
                for row, _ in done:
                    outcomes[row["id"]] = BackfillOutcome(row["id"], BackfillStatus.FAILED, type(e)(e.message))
            else:
                for row, _ in done:
                    outcomes[row["id"]] = BackfillOutcome(row["id"], BackfillStatus.CAPTIONED)
                    if self.pending_images is not None:
                        await self.pending_images.remove(row["id"])
        return [outcomes[i] for i in ids]

    async def _image(self, row: dict[str, Any]) -> bytes:
        if self.pending_images is not None:
            data = await self.pending_images.get(row["id"])
            if data is not None:
                return data
        if self.originals is not None:
            data = await self.originals.get(row["content_sha256"])
            if data is not None:
                return data
        uri = row.get("uri") or ""
        if "://" in uri:
            return await self.intake.read(ImageRef(uri=uri))
        raise FailedPrecondition(
            "the image is not kept (inline bytes without SEARCH_PENDING_IMAGES_DIR, or another pod's copy): "
            "re-ingest the item to caption it")

    @staticmethod
    def _model(store: VectorStore) -> str:
        assert store.info is not None  # the index describes a store before handing it out
        return store.info.model_id

    def _row(self, row: dict[str, Any], caption: CaptionResult, caption_vector: np.ndarray, model: str) -> StoredRow:
        metadata = row.get("metadata") or {}
        uri = row.get("uri") or ""
        return StoredRow(
            id=row["id"], content_sha256=row["content_sha256"],
            fingerprint=fingerprint_of(row["content_sha256"], metadata, uri, None, model),
            uri=uri, caption=caption.description[: F.MAX_CAPTION_CHARS],
            keywords=[k[: F.MAX_KEYWORD_CHARS] for k in caption.keywords[: F.MAX_KEYWORDS]],
            metadata=metadata, embedder_model_id=model, captioner_model_id=caption.model_id,
            ingested_at_ms=int(row.get("ingested_at_ms") or time.time() * 1000),
            image_vector=np.asarray(row[F.IMAGE_VECTOR], dtype=np.float32), caption_vector=caption_vector,
            caption_pending=False,
        )
