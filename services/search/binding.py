"""The embedders search uses, by the model they serve, and the model guard.

The default embedder (SEARCH_EMBEDDER_TARGET) serves whatever model it reports; more are
mapped by model in SEARCH_MODEL_EMBEDDERS (during a model change, the candidate's). Search
starts without its embedder (Milvus-only calls need none) and binds it in the background
whenever it appears: learns its model and creates the index's first collection for it, or
checks that the live collection's model can be embedded here. The engine, the ingest
pipeline and the backfills ask this object for the embedder of a collection's model, so a
vector is never compared with vectors from another model.
"""
from __future__ import annotations

from collections.abc import Mapping

from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential

from services.common.errors import FailedPrecondition, ServiceError, Unavailable
from services.common.log import get_logger
from services.search.domain import EmbedderInfo
from services.search.ports import Embedder, Index

log = get_logger(__name__)


class _NotBound(Exception):
    """Another attempt is due (tenacity retries on it)."""


class EmbedderBinding:
    def __init__(
        self, embedder: Embedder, index: Index, target: str,
        mapped: Mapping[str, tuple[Embedder, str]] | None = None,
    ) -> None:
        self.embedder = embedder
        self.index = index
        self.target = target  # named in errors: which embedder operators should look at
        self.mapped = dict(mapped or {})  # model id -> (client, target)
        self._checked: set[str] = set()  # mapped models whose embedder reported that model
        self.info: EmbedderInfo | None = None
        self.error = "the embedder has not answered yet"
        self.guard_failed = False  # the embedder answers, with another model: not transient
        # Last health probe: True SERVING, False answers but not SERVING, None unreachable.
        self.health: bool | None = None

    def model_id(self) -> str:
        """The default embedder's model ("" while unbound)."""
        return self.info.model_id if self.info else ""

    def targets(self) -> dict[str, str]:
        """Model -> embedder target, for every model this server can embed."""
        out = {model: target for model, (_, target) in self.mapped.items()}
        if self.info is not None:
            out[self.info.model_id] = self.target
        return out

    def require(self) -> str:
        """The default embedder's model; raises when it cannot embed now (fail fast)."""
        if self.info is None:
            if self.guard_failed:
                raise FailedPrecondition(self.error)
            raise Unavailable(f"embedder {self.target}: not available: {self.error}")
        if self.health is None:
            raise Unavailable(f"embedder {self.target}: unreachable")
        return self.info.model_id

    async def embedder_for(self, model: str) -> Embedder:
        """The embedder that serves `model`; raises when there is none or it is away."""
        if model in self.mapped:
            client, target = self.mapped[model]
            if model not in self._checked:
                try:
                    info = await client.info()
                except ServiceError as e:
                    raise Unavailable(f"embedder {target} (model {model!r}): {e.message}") from None
                if info.model_id != model:
                    raise FailedPrecondition(f"embedder {target} serves {info.model_id!r}, but SEARCH_MODEL_EMBEDDERS "
                                             f"maps it to {model!r}")
                self._checked.add(model)
            return client
        if self.require() == model:
            return self.embedder
        raise FailedPrecondition(f"no embedder here serves model {model!r}: the embedder at {self.target} serves "
                                 f"{self.model_id()!r}; map one to it with SEARCH_MODEL_EMBEDDERS")

    @staticmethod
    def check_vectors(made_by: str, needed: str) -> None:
        """Vectors made by `made_by` may meet a collection built by `needed`: raises if not."""
        if made_by != needed:
            raise FailedPrecondition(f"embedder now serves {made_by!r}, the collection was built by {needed!r}")

    async def bind_forever(self) -> None:
        """Learns the default embedder's model and binds the index to it, retrying until it
        does. One Info call a second at most while the embedder is away: cheap, and text
        search is back about a second after the embedder serves again."""
        attempts = AsyncRetrying(
            wait=wait_exponential(multiplier=0.25, max=1.0), retry=retry_if_exception_type(_NotBound), reraise=True
        )
        async for attempt in attempts:
            with attempt:
                await self._try_bind(attempt.retry_state.attempt_number)

    async def _try_bind(self, attempt: int) -> None:
        try:
            info = await self.embedder.info()
            await self.index.ensure_live(info.model_id, info.dimension, set(self.mapped))
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
        log.info("collection ready", index=self.index.index, model=info.model_id, dimension=info.dimension,
                 milvus=self.index.mode)
