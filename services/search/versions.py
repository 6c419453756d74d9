"""The index and its versions: SEARCH_COLLECTION is a Milvus alias onto one physical
collection per embedding-model version ("<index>__v<N>").

The alias target is the live collection (Search reads it, Ingest writes it). During a
model change a candidate for the new model sits beside it, and after a promote the old
live one stays as "previous" for an instant rollback: Ingest writes to both of those too
(each with vectors from its own model), so neither falls behind. Roles other than live are
a collection property; the live one is wherever the alias points. A deployment from before
versions has a plain collection named SEARCH_COLLECTION: it is served as it is (version 0)
and becomes "<index>__v0" behind the alias when the first candidate is created.

Each process caches what it resolved for `REFRESH_S`, so a promote made through another
pod reaches this one within that time; a search always runs on one physical collection
with a vector from that collection's model, whichever it resolved.
"""
from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass

from pymilvus import MilvusClient

from services.common.errors import FailedPrecondition, InvalidInput, NotFound, Unavailable
from services.common.log import get_logger
from services.search.milvus_store import PROP_DIM, PROP_MODEL, MilvusConnection, MilvusStore
from services.search.settings import SearchSettings

log = get_logger(__name__)

PROP_ROLE = "mmsearch.role"
LIVE, CANDIDATE, PREVIOUS, RETIRED = "live", "candidate", "previous", "retired"
WRITTEN = (CANDIDATE, PREVIOUS)  # roles Ingest writes besides the live collection
REFRESH_S = 1.0


@dataclass(frozen=True)
class Version:
    name: str
    version: int
    model_id: str
    dimension: int
    role: str


@dataclass(frozen=True)
class _Resolved:
    at: float
    live: str | None
    versions: tuple[Version, ...]


def version_of(index: str, name: str) -> int | None:
    """The version number of a physical collection of `index` (0: the pre-versions one)."""
    if name == index:
        return 0
    m = re.fullmatch(re.escape(index) + r"__v(\d+)", name)
    return int(m.group(1)) if m else None


class IndexVersions:
    def __init__(self, settings: SearchSettings, connection: MilvusConnection | None = None) -> None:
        self.settings = settings
        self.index = settings.collection
        self.connection = connection or MilvusConnection(settings)
        self._stores: dict[str, MilvusStore] = {}
        self._resolved: _Resolved | None = None
        self._refresh = asyncio.Lock()
        # Admin operations (create, backfill, promote, rollback, drop): one at a time here.
        self.admin_lock = asyncio.Lock()

    @property
    def mode(self) -> str:
        return self.connection.mode

    def store(self, name: str) -> MilvusStore:
        if name not in self._stores:
            self._stores[name] = MilvusStore(self.settings, name, self.connection)
        return self._stores[name]

    @property
    def front(self) -> MilvusStore:
        """A store on the index name itself (the alias): health pings."""
        return self.store(self.index)

    # --- resolution --------------------------------------------------------------------

    def _scan(self, c: MilvusClient) -> tuple[str | None, tuple[Version, ...]]:
        # Asked by listing: describe_alias on a missing alias makes pymilvus log an error with a
        # traceback, every second on an index from before versions.
        live: str | None = None
        if self.index in (c.list_aliases().get("aliases") or []):
            live = c.describe_alias(self.index)["collection_name"]
        versions = []
        for name in c.list_collections():
            number = version_of(self.index, name)
            if number is None:
                continue
            props = c.describe_collection(name).get("properties", {}) or {}
            if live is None and number == 0:
                live = name  # a collection from before versions, served as it is
            role = LIVE if name == live else str(props.get(PROP_ROLE) or RETIRED)
            if role == LIVE and name != live:
                role = PREVIOUS  # marked live by a swap another process has not finished
            dim = str(props.get(PROP_DIM) or "")
            versions.append(Version(name, number, str(props.get(PROP_MODEL) or ""), int(dim) if dim.isdigit() else 0,
                                    role))
        return live, tuple(sorted(versions, key=lambda v: v.version))

    async def resolve(self, max_age_s: float = REFRESH_S) -> _Resolved:
        r = self._resolved
        if r is not None and time.monotonic() - r.at < max_age_s:
            return r
        async with self._refresh:
            r = self._resolved
            if r is not None and time.monotonic() - r.at < max_age_s:
                return r
            live, versions = await self.front._call("resolve", self._scan)
            self._resolved = _Resolved(time.monotonic(), live, versions)
            return self._resolved

    def forget(self) -> None:
        self._resolved = None

    async def live(self) -> MilvusStore:
        """The live collection's store (described), or UNAVAILABLE while there is none."""
        r = await self.resolve()
        if r.live is None:
            raise Unavailable(
                f"collection {self.index!r} does not exist yet: it is created when the embedder first answers "
                "(its model and dimension define it)")
        store = self.store(r.live)
        await store.require()
        return store

    async def writers(self) -> list[MilvusStore]:
        """The other collections Ingest writes (candidate, previous), described."""
        r = await self.resolve()
        out = []
        for v in r.versions:
            if v.role in WRITTEN:
                store = self.store(v.name)
                await store.require()
                out.append(store)
        return out

    async def versions(self) -> tuple[str | None, tuple[Version, ...]]:
        r = await self.resolve(max_age_s=0)
        return r.live, r.versions

    # --- changes -------------------------------------------------------------------------

    async def ensure_live(self, model_id: str, dimension: int, servable: set[str]) -> None:
        """Binding the default embedder: creates version 1 behind the alias when the index
        has no collection; else checks that the live collection's model can be embedded
        here (the default embedder's model, or one in `servable`) and loads it."""
        r = await self.resolve(max_age_s=0)
        if r.live is None:
            name = f"{self.index}__v1"
            await self.store(name).ensure_collection(model_id, dimension)
            try:
                await self.front._call("create_alias", lambda c: c.create_alias(name, self.index))
            except Unavailable:
                if (await self.resolve(max_age_s=0)).live is None:  # not a race with another pod
                    raise
            self.forget()
            return
        live = self.store(r.live)
        info = await live.describe()
        if info is not None and info.model_id != model_id and info.model_id in servable:
            await live.ensure_collection(info.model_id, info.dimension)  # loads it
        else:  # the model guard: refuses another model with its migration advice
            await live.ensure_collection(model_id, dimension)

    async def create_candidate(self, model_id: str, dimension: int) -> Version:
        live, versions = await self.versions()
        if live is None:
            raise FailedPrecondition(f"index {self.index!r} has no live collection yet")
        for v in versions:
            if v.role == CANDIDATE:
                raise FailedPrecondition(f"{v.name!r} is already the candidate (model {v.model_id!r}): promote it "
                                         "or drop it first")
        # The same model is allowed: a new version with today's schema settings (a schema
        # migration), filled by the same backfill.
        if live == self.index:  # from before versions: put it behind the alias first
            await self._put_behind_alias()
        number = max(v.version for v in versions) + 1
        name = f"{self.index}__v{number}"
        store = self.store(name)
        await store.ensure_collection(model_id, dimension)
        await self._set_role(name, CANDIDATE)
        self.forget()
        log.info("candidate collection created", index=self.index, collection=name, model=model_id)
        return Version(name, number, model_id, dimension, CANDIDATE)

    async def _put_behind_alias(self) -> None:
        name = f"{self.index}__v0"

        def run(c: MilvusClient) -> None:
            c.rename_collection(self.index, name)
            c.create_alias(name, self.index)

        await self.front._call("rename_collection", run)
        self._stores.pop(self.index, None)
        self.forget()
        log.info("collection put behind the index alias", index=self.index, collection=name)

    async def swap(self, to: str) -> str:
        """Points the alias at `to` (one Milvus call); the old live one becomes previous.
        Returns the old live collection's name."""
        live, versions = await self.versions()
        if live is None or to == live:
            raise FailedPrecondition(f"{to!r} is already live")
        if to not in {v.name for v in versions}:
            raise InvalidInput(f"{to!r} is not a collection of index {self.index!r}")
        await self.front._call("alter_alias", lambda c: c.alter_alias(to, self.index))
        await self._set_role(to, LIVE)
        await self._set_role(live, PREVIOUS)
        for v in versions:
            if v.role == PREVIOUS and v.name not in (live, to):
                await self._set_role(v.name, RETIRED)
        self.forget()
        log.info("index alias swapped", index=self.index, live=to, previous=live)
        return live

    async def drop(self, name: str) -> None:
        live, versions = await self.versions()
        if name not in {v.name for v in versions}:
            raise InvalidInput(f"{name!r} is not a collection of index {self.index!r}")
        if name == live:
            raise FailedPrecondition(f"{name!r} is live: promote or roll back to another collection first")
        await self.front._call("drop_collection", lambda c: c.drop_collection(name))
        self._stores.pop(name, None)
        self.forget()
        log.info("collection dropped", index=self.index, collection=name)

    async def _set_role(self, name: str, role: str) -> None:
        await self.front._call("alter_properties", lambda c: c.alter_collection_properties(
            name, properties={PROP_ROLE: role}))

    async def with_role(self, role: str) -> Version:
        _, versions = await self.versions()
        for v in versions:
            if v.role == role:
                return v
        raise NotFound(f"index {self.index!r} has no {role} collection")

    async def close(self) -> None:
        self.connection.close()
