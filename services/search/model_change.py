"""Changing the embedding model without downtime (the Admin service's domain).

A candidate collection for the new model is created beside the live one (`versions.py`);
from then on Ingest writes every item to both. The backfill copies the items that were
stored before: for each live row it re-reads the image (the original store by content
hash, else the item's URI, checked against the stored hash), embeds it and the stored
caption with the candidate's model (no re-captioning) and writes the row under the same
key, with the same caption, metadata and timestamps. A row already in the candidate with
the fingerprint it would get is skipped, so the backfill is resumable after any
interruption and never writes an item twice. Promote runs the same copy as a catch-up
pass, removes what was deleted meanwhile, compares the counts, and swaps the alias;
rollback is the same toward the previous collection.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np

from services.common import principal
from services.common.content import Content, ImageContent, TextContent
from services.common.errors import Aborted, FailedPrecondition, InvalidInput, ServiceError
from services.common.intake import ImageIntake, ImageRef
from services.common.log import get_logger
from services.search import fields as F
from services.search.backfill import Pacer
from services.search.binding import EmbedderBinding
from services.search.domain import CaptionResult
from services.search.ingest import caption_text, fingerprint_of, pending_fingerprint
from services.search.metrics import REINDEX_ITEMS
from services.search.milvus_store import MilvusStore
from services.search.originals import OriginalStore
from services.search.ports import Embedder, StoredRow
from services.search.settings import SearchSettings
from services.search.versions import CANDIDATE, PREVIOUS, IndexVersions, Version

log = get_logger(__name__)
_IN_FLIGHT = 2


class CopyStatus(str, Enum):
    COPIED = "copied"
    SKIPPED = "skipped"
    FAILED = "failed"


@dataclass(frozen=True)
class CopyOutcome:
    id: str  # the stored key ("<tenant>~<id>" for a non-default tenant's item)
    status: CopyStatus
    error: ServiceError | None = None


@dataclass
class CopyProgress:
    total: int = 0
    copied: int = 0
    skipped: int = 0
    failed: int = 0


@dataclass(frozen=True)
class CollectionView:
    name: str
    version: int
    model_id: str
    dimension: int
    item_count: int
    role: str
    embedder_target: str


@dataclass(frozen=True)
class Switched:
    live: CollectionView
    previous: CollectionView
    caught_up: int


@dataclass
class _Todo:
    key: str
    row: dict[str, Any]
    fingerprint: str
    data: bytes = b""
    error: ServiceError | None = field(default=None)


def expected_fingerprint(row: dict[str, Any], model: str) -> str:
    """The fingerprint a collection built by `model` holds for this stored row: what an
    Ingest of the same item computes (`ingest._fingerprint`), so after a promote a
    re-ingest of an unchanged item is still "unchanged"."""
    given = row.get("captioner_model_id") == "caller"  # the caller's caption is part of it
    caption = {"description": row.get("caption") or "", "keywords": list(row.get("keywords") or [])} if given else None
    fingerprint = fingerprint_of(row["content_sha256"], row.get("metadata") or {}, row.get("uri") or "", caption, model)
    return pending_fingerprint(fingerprint) if row.get(F.CAPTION_PENDING) else fingerprint


def _tenant_of(key: str, row: dict[str, Any]) -> str:
    if row.get(F.TENANT):
        return str(row[F.TENANT])
    tenant, sep, _ = key.partition(F.TENANT_KEY_SEPARATOR)
    return tenant if sep else principal.DEFAULT_TENANT


class ModelChange:
    def __init__(
        self, settings: SearchSettings, index: IndexVersions, binding: EmbedderBinding, intake: ImageIntake,
        originals: OriginalStore | None,
    ) -> None:
        self.settings = settings
        self.index = index
        self.binding = binding
        self.intake = intake
        self.originals = originals
        # Busy seconds per stage of the copies (summed over chunks in flight), logged at the end.
        self.stage_s: dict[str, float] = defaultdict(float)

    @contextlib.asynccontextmanager
    async def _exclusive(self, what: str) -> AsyncIterator[None]:
        if self.index.admin_lock.locked():
            raise Aborted(f"another model-change operation runs on this server; retry the {what} later")
        async with self.index.admin_lock:
            yield

    # --- views ---------------------------------------------------------------------------

    async def _view(self, v: Version) -> CollectionView:
        count = await self.index.store(v.name).count_all()
        return CollectionView(v.name, v.version, v.model_id, v.dimension, count, v.role,
                              self.binding.targets().get(v.model_id, ""))

    async def collections(self) -> list[CollectionView]:
        _, versions = await self.index.versions()
        return [await self._view(v) for v in versions]

    # --- the calls -----------------------------------------------------------------------

    async def create_candidate(self, model_id: str) -> CollectionView:
        if not model_id.strip():
            raise InvalidInput("embedder_model_id is empty: name the new model (an embedder's model id)")
        async with self._exclusive("create"):
            embedder = await self.binding.embedder_for(model_id)
            info = await embedder.info()
            version = await self.index.create_candidate(model_id, info.dimension)
            return await self._view(version)

    async def backfill(self, max_items: int = 0, max_items_per_s: float = 0.0) -> AsyncIterator[
            tuple[list[CopyOutcome], CopyProgress]]:
        if max_items_per_s < 0 or max_items < 0:
            raise InvalidInput("max_items and max_items_per_s must be >= 0")
        async with self._exclusive("backfill"):
            candidate = await self.index.with_role(CANDIDATE)
            live = await self.index.live()
            async for chunk in self._copy(live, self.index.store(candidate.name), max_items, max_items_per_s):
                yield chunk

    async def promote(self, force: bool = False) -> Switched:
        async with self._exclusive("promote"):
            return await self._switch(await self.index.with_role(CANDIDATE), force)

    async def rollback(self, force: bool = False) -> Switched:
        async with self._exclusive("rollback"):
            return await self._switch(await self.index.with_role(PREVIOUS), force)

    async def drop(self, name: str) -> None:
        async with self._exclusive("drop"):
            await self.index.drop(name)

    async def _switch(self, to: Version, force: bool) -> Switched:
        # Searches after the swap embed with the new live model's embedder: it must be here.
        await self.binding.embedder_for(to.model_id)
        live = await self.index.live()
        target = self.index.store(to.name)
        progress = CopyProgress()
        async for _, progress in self._copy(live, target, 0, 0):
            pass
        extra = sorted(set(await target.all_keys()) - set(await live.all_keys()))
        await target.delete_keys(extra)  # deleted from live while the other copy missed it
        live_n, target_n = await live.count_all(), await target.count_all()
        if live_n != target_n and not force:
            raise FailedPrecondition(
                f"{to.name!r} holds {target_n} items, the live collection {live.collection!r} {live_n} "
                f"({progress.failed} could not be copied in the catch-up pass: run the backfill to see why); "
                "fix that, or switch anyway with force")
        previous = await self.index.swap(to.name)
        _, versions = await self.index.versions()
        by_name = {v.name: v for v in versions}
        log.info("index switched", live=to.name, previous=previous, caught_up=progress.copied, items=target_n)
        return Switched(await self._view(by_name[to.name]), await self._view(by_name[previous]), progress.copied)

    # --- the copy ------------------------------------------------------------------------

    async def _copy(self, src: MilvusStore, dst: MilvusStore, max_items: int, rate: float) -> AsyncIterator[
            tuple[list[CopyOutcome], CopyProgress]]:
        """Every row of `src` into `dst` with `dst`'s model's vectors; yields per chunk."""
        dst_info = await dst.require()
        embedder = await self.binding.embedder_for(dst_info.model_id)
        keys = await src.all_keys()
        progress = CopyProgress(total=len(keys))
        log.info("model-change copy started", source=src.collection, target=dst.collection, items=len(keys))
        yield [], progress
        pacer = Pacer(rate)
        done = 0
        chunks = _chunks(keys, max(1, self.settings.embed_batch_items))
        # Two chunks in flight, like the ingest pipeline's two Embed calls: one is read from
        # Milvus and the original store while the other is embedded, so neither waits.
        window: deque[asyncio.Task[list[CopyOutcome]]] = deque()

        def launch() -> None:
            chunk = next(chunks, None)
            if chunk is not None:
                window.append(asyncio.create_task(
                    self._copy_chunk(src, dst, embedder, dst_info.model_id, chunk, pacer)))

        for _ in range(_IN_FLIGHT):
            launch()
        try:
            while window:
                outcomes = await window.popleft()
                for o in outcomes:
                    REINDEX_ITEMS.labels(o.status.value).inc()
                    if o.status is CopyStatus.COPIED:
                        progress.copied += 1
                    elif o.status is CopyStatus.SKIPPED:
                        progress.skipped += 1
                    else:
                        progress.failed += 1
                done += sum(o.status is not CopyStatus.SKIPPED for o in outcomes)
                if not max_items or done < max_items:
                    launch()
                yield outcomes, progress
        finally:
            for task in window:  # the caller went away: stop what is in flight
                task.cancel()
        log.info("model-change copy done", target=dst.collection, copied=progress.copied, skipped=progress.skipped,
                 failed=progress.failed, busy_s={k: round(v, 3) for k, v in self.stage_s.items()})

    async def _copy_chunk(
        self, src: MilvusStore, dst: MilvusStore, embedder: Embedder, model: str, keys: Sequence[str], pacer: Pacer,
    ) -> list[CopyOutcome]:
        t0 = time.perf_counter()
        rows = await src.rows_by_key(keys)
        have = await dst.fingerprints_by_key(keys)
        self.stage_s["read rows"] += time.perf_counter() - t0
        outcomes: dict[str, CopyOutcome] = {}
        todo: list[_Todo] = []
        for key in keys:
            row = rows.get(key)
            if row is None:  # deleted since the snapshot
                outcomes[key] = CopyOutcome(key, CopyStatus.SKIPPED)
                continue
            fingerprint = expected_fingerprint(row, model)
            if have.get(key) == fingerprint:
                outcomes[key] = CopyOutcome(key, CopyStatus.SKIPPED)
            else:
                todo.append(_Todo(key, row, fingerprint))
        limit = asyncio.Semaphore(max(1, self.settings.decode_workers))

        async def read(t: _Todo) -> None:
            async with limit:
                await pacer.wait()
                try:
                    t.data = await self._image(t.row)
                except ServiceError as e:
                    t.error = e

        t0 = time.perf_counter()
        await asyncio.gather(*(read(t) for t in todo))
        self.stage_s["read images"] += time.perf_counter() - t0
        ready = [t for t in todo if t.error is None]
        await self._embed_and_write(dst, embedder, model, ready)
        for t in todo:
            outcomes[t.key] = (CopyOutcome(t.key, CopyStatus.FAILED, t.error) if t.error is not None
                               else CopyOutcome(t.key, CopyStatus.COPIED))
        return [outcomes[k] for k in keys]

    async def _embed_and_write(self, dst: MilvusStore, embedder: Embedder, model: str, batch: list[_Todo]) -> None:
        """Embeds and writes `batch`; on failure, each item alone (one bad image fails alone)."""
        if not batch:
            return
        try:
            t0 = time.perf_counter()
            vectors = await self._embed(embedder, model, batch)
            t1 = time.perf_counter()
            await dst.upsert_keyed([(t.key, _tenant_of(t.key, t.row), _row(t, model, v))
                                    for t, v in zip(batch, vectors, strict=True)])
            self.stage_s["embed"] += t1 - t0
            self.stage_s["write"] += time.perf_counter() - t1
        except ServiceError as e:
            if len(batch) > 1 and isinstance(e, InvalidInput):
                for t in batch:
                    await self._embed_and_write(dst, embedder, model, [t])
                return
            for t in batch:
                t.error = type(e)(f"re-embedding failed: {e.message}")

    async def _embed(self, embedder: Embedder, model: str, batch: list[_Todo]) -> list[np.ndarray]:
        contents: list[Content] = []
        for t in batch:
            contents.append(ImageContent(ImageRef(data=t.data)))
            if not t.row.get(F.CAPTION_PENDING):
                contents.append(TextContent(caption_text(_caption(t.row))))
        vectors, made_by = await embedder.embed(contents)
        self.binding.check_vectors(made_by, model)
        out, i = [], 0
        for t in batch:
            if t.row.get(F.CAPTION_PENDING):  # placeholder caption vector, as Ingest writes it
                out.append(np.stack([vectors[i], vectors[i]]))
                i += 1
            else:
                out.append(vectors[i : i + 2])
                i += 2
        return out

    async def _image(self, row: dict[str, Any]) -> bytes:
        """The item's image: the original store by content hash, else its URI."""
        sha = row["content_sha256"]
        if self.originals is not None:
            data = await self.originals.get(sha)
            if data is not None:
                return data
        uri = row.get("uri") or ""
        if "://" not in uri:
            raise FailedPrecondition(
                "the item was ingested as inline bytes and no original store keeps them (SEARCH_ORIGINALS__DIR or "
                "SEARCH_ORIGINALS__S3_BUCKET, set before it was ingested): re-ingest it")
        data = await self.intake.read(ImageRef(uri=uri))
        if hashlib.sha256(data).hexdigest() != sha:
            raise FailedPrecondition(f"the image at {uri} changed since the item was ingested: re-ingest it")
        return data


def _caption(row: dict[str, Any]) -> CaptionResult:
    return CaptionResult(row.get("caption") or "", list(row.get("keywords") or []), row.get("captioner_model_id") or "")


def _row(t: _Todo, model: str, vectors: np.ndarray) -> StoredRow:
    r = t.row
    return StoredRow(
        id=t.key, content_sha256=r["content_sha256"], fingerprint=t.fingerprint, uri=r.get("uri") or "",
        caption=r.get("caption") or "", keywords=list(r.get("keywords") or []), metadata=r.get("metadata") or {},
        embedder_model_id=model, captioner_model_id=r.get("captioner_model_id") or "",
        ingested_at_ms=int(r.get("ingested_at_ms") or 0), image_vector=vectors[0], caption_vector=vectors[1],
        caption_pending=bool(r.get(F.CAPTION_PENDING)),
    )


def _chunks(keys: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(keys), size):
        yield keys[start : start + size]
