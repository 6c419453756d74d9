"""Items by id and what the collection holds: the Get, Delete and Stats calls."""
from __future__ import annotations

from collections.abc import Sequence

from services.common.errors import InvalidInput, ServiceError
from services.common.log import get_logger
from services.search.binding import EmbedderBinding
from services.search.domain import CollectionStats, Record
from services.search.ports import Captioner, Index
from services.search.settings import SearchSettings
from services.search.validation import check_id

log = get_logger(__name__)
MAX_IDS = 1000


def check_ids(ids: Sequence[str]) -> list[str]:
    ids = list(ids)
    if not 1 <= len(ids) <= MAX_IDS:
        raise InvalidInput(f"give 1 to {MAX_IDS} ids, got {len(ids)}")
    # pymilvus turns ids into the expression `id in ['a', 'b']` without escaping, so a
    # quote in an id would inject expression text (one crafted id could select, and
    # Delete remove, every row). Only the id alphabet ingest accepts can pass.
    for item_id in ids:
        check_id(item_id)
    return ids


class Catalog:
    def __init__(
        self, settings: SearchSettings, index: Index, binding: EmbedderBinding, captioner: Captioner
    ) -> None:
        self.settings = settings
        self.index = index
        self.binding = binding
        self.captioner = captioner
        # Last health probe of the captioner (None: unreachable): Stats asks it for its
        # model only when it answers, so an unreachable captioner costs Stats no timeout.
        self.captioner_health: bool | None = None

    async def get(self, ids: Sequence[str]) -> tuple[list[Record], list[str]]:
        """(records of the stored ids, in the order asked; the ids not stored)."""
        ids = check_ids(ids)
        rows = await (await self.index.live()).get(ids)
        records = [
            Record(
                id=r["id"], uri=r.get("uri", ""), caption=r.get("caption", ""), keywords=r.get("keywords") or [],
                metadata=r.get("metadata") or {}, embedder_model_id=r.get("embedder_model_id", ""),
                captioner_model_id=r.get("captioner_model_id", ""), ingested_at_ms=r.get("ingested_at_ms"),
                content_sha256=r.get("content_sha256", ""), caption_pending=bool(r.get("caption_pending")),
            )
            for i in ids if (r := rows.get(i)) is not None
        ]
        return records, [i for i in ids if i not in rows]

    async def delete(self, ids: Sequence[str]) -> int:
        """Deletes from the live collection, and from a model change's other collections
        (best effort there: the promote's catch-up removes what is left)."""
        ids = check_ids(ids)
        deleted = await (await self.index.live()).delete(ids)
        for writer in await self.index.writers():
            try:
                await writer.delete(ids)
            except ServiceError as e:
                log.warning("could not delete from the model change's other collection", collection=writer.collection,
                            error=e.message)
        return deleted

    async def stats(self) -> CollectionStats:
        store = await self.index.live()
        info = await store.require()
        return CollectionStats(
            collection=self.index.index, item_count=await store.count(),
            embedder_model_id=info.model_id, dimension=info.dimension,
            captioner_model_id=await self.captioner.model_id() if self.captioner_health is not None else "",
            index_type=await store.index_type(), metric_type=self.settings.metric_type,
            milvus_mode=store.mode, caption_pending_count=await store.count_pending(),
            keyword_index=info.has_keyword, indexed_fields=dict(info.indexed_fields),
        )
