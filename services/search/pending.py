"""The images of items whose caption is pending, kept for the backfill.

Search stores vectors, not pixels: an item given as inline bytes whose caption is deferred
could not be captioned later without them. With SEARCH_PENDING_IMAGES_DIR set, Ingest
writes each deferred item's bytes here (one file per id, named by the id's SHA-256) and the
backfill reads and removes them. Items given by URI are read again from the URI (same
file-root / remote rules as Ingest), so they need no copy. In Kubernetes the folder must
be shared by every search pod (a ReadWriteMany volume) or the backfill only finds the
images its own pod kept; without a copy, re-ingesting the item captions it too.

Files are written like the original store's (services/search/originals.py, `write_atomic`);
the two stay apart because this one is keyed by tenant and id (its files are removed once
captioned), that one by content (kept for good).
"""
from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from pathlib import Path

from services.common import principal
from services.common.log import get_logger
from services.search.originals import write_atomic

log = get_logger(__name__)


class PendingImages:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _path(self, item_id: str) -> Path:
        # Named by the calling tenant's stored key: the same id in two tenants is two files.
        tenant = principal.current().tenant
        key = item_id if tenant == principal.DEFAULT_TENANT else f"{tenant}~{item_id}"
        return self.folder / f"{hashlib.sha256(key.encode()).hexdigest()}.img"

    def _put(self, items: Sequence[tuple[str, bytes]]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        for item_id, data in items:
            write_atomic(self._path(item_id), data)  # a reader never sees half a file

    async def put_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Never fails the ingest: without its copy an item is still stored pending, and the
        backfill reports it FAILED ("re-ingest the item") if its URI cannot be read either."""
        try:
            await asyncio.to_thread(self._put, items)
        except OSError as e:
            log.warning("could not keep deferred images for the backfill", folder=str(self.folder), error=str(e),
                        items=len(items))

    async def get(self, item_id: str) -> bytes | None:
        path = self._path(item_id)
        try:
            return await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            return None

    async def remove(self, item_id: str) -> None:
        await asyncio.to_thread(self._path(item_id).unlink, True)
