"""The model guard: which embedding model search is bound to, once the embedder has
answered and the collection has been created or checked for that model.

Search starts without its embedder (Milvus-only calls need none) and binds it in the
background whenever it appears. The engine, the ingest pipeline and the caption backfill
ask this one object which model vectors must come from, so a query or an item is never
embedded by another model than the one that built the collection.
"""
from __future__ import annotations

from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential

from services.common.errors import FailedPrecondition, ServiceError, Unavailable
from services.common.log import get_logger
from services.search.domain import EmbedderInfo
from services.search.ports import Embedder, VectorStore

log = get_logger(__name__)


class _NotBound(Exception):
    """Another attempt is due (tenacity retries on it)."""


class EmbedderBinding:
    def __init__(self, embedder: Embedder, store: VectorStore, target: str) -> None:
        self.embedder = embedder
        self.store = store
        self.target = target  # named in errors: which embedder operators should look at
        self.info: EmbedderInfo | None = None
        self.error = "the embedder has not answered yet"
        self.guard_failed = False  # the embedder answers, with another model: not transient
        # Last health probe: True SERVING, False answers but not SERVING, None unreachable.
        self.health: bool | None = None

    def model_id(self) -> str:
        """The bound model ("" while unbound)."""
        return self.info.model_id if self.info else ""

    def require(self) -> str:
        """The bound model; raises when queries cannot be embedded now (fail fast)."""
        if self.info is None:
            if self.guard_failed:
                raise FailedPrecondition(self.error)
            raise Unavailable(f"embedder {self.target}: not available: {self.error}")
        if self.health is None:
            raise Unavailable(f"embedder {self.target}: unreachable")
        return self.info.model_id

    def bound_model(self) -> str:
        """The bound model; Unavailable while there is none (items wait for no embedder)."""
        if self.info is None:
            raise Unavailable("embedder: not bound to the collection yet (search is waiting for it)")
        return self.info.model_id

    def check_vectors_from(self, model: str) -> None:
        """Vectors made by `model` may meet the collection's: raises if they may not."""
        bound = self.bound_model()
        if model != bound:
            raise FailedPrecondition(f"embedder now serves {model!r}, the collection was built by {bound!r}")

    async def bind_forever(self) -> None:
        """Learns the embedder's model and binds the collection to it, retrying until it does.

        One Info call a second at most while the embedder is away: cheap, and text search
        is back about a second after the embedder serves again."""
        attempts = AsyncRetrying(
            wait=wait_exponential(multiplier=0.25, max=1.0), retry=retry_if_exception_type(_NotBound), reraise=True
        )
        async for attempt in attempts:
            with attempt:
                await self._try_bind(attempt.retry_state.attempt_number)

    async def _try_bind(self, attempt: int) -> None:
        try:
            info = await self.embedder.info()
            await self.store.ensure_collection(info.model_id, info.dimension)
        except FailedPrecondition as e:  # the model guard: stays unbound, says why
            if e.message != self.error:
                log.error("embedder does not match the collection", error=e.message)
            self.error, self.guard_failed = e.message, True
            raise _NotBound from None
        except ServiceError as e:
            if attempt % 30 == 5:
                log.info("waiting for the embedder", target=self.target, error=e.message)
            self.error, self.guard_failed = e.message, False
            raise _NotBound from None
        self.info, self.health = info, True
        log.info("collection ready", collection=self.store.collection, model=info.model_id,
                 dimension=info.dimension, milvus=self.store.mode)

