"""A stand-in child for the launcher tests: a real grpc.health.v1 server whose behaviour is chosen by flags.

    python -m tests.cli.fake_service --port N --mode serving|never|crash|stubborn
        [--pidfile F] [--grandchild]

serving: SERVING after a short delay; never: NOT_SERVING forever; crash: logs and
exits 3 before serving; stubborn: SERVING but ignores SIGTERM (must be SIGKILLed).
--grandchild spawns a `sleep` in the same process group (the launcher must stop it too);
--pidfile records "<pid> <grandchild pid>".

Also `FakeAdmin` / `FakeAdminServer`: an in-process mmsearch.admin.v1.Admin (see below).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterable
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from mmsearch.admin.v1 import admin_pb2, admin_pb2_grpc
from mmsearch.common.v1 import types_pb2


def log(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, "level": "info", **fields}), file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mode", default="serving")
    parser.add_argument("--pidfile")
    parser.add_argument("--grandchild", action="store_true")
    args = parser.parse_args()

    grandchild = subprocess.Popen(["sleep", "600"]) if args.grandchild else None
    if args.pidfile:
        with open(args.pidfile, "w") as f:
            f.write(f"{__import__('os').getpid()} {grandchild.pid if grandchild else 0}")
    log("loading", mode=args.mode)
    if args.mode == "crash":
        print("Traceback (most recent call last):\nRuntimeError: model file missing", file=sys.stderr, flush=True)
        sys.exit(3)
    if args.mode == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    if args.mode != "never":
        time.sleep(0.3)
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        log("started", port=args.port)
    else:
        log("waiting for a model that never loads")

    stop = {"now": False}
    if args.mode != "stubborn":
        signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    while not stop["now"]:
        time.sleep(0.05)
    log("shutting down")
    server.stop(0)



# ---------------------------------------------------------------------------- a fake Admin service
#
# The CLI's `mmsearch index` commands and the client's AdminClient are tested against this
# in-process mmsearch.admin.v1.Admin servicer (grpc.aio on a loopback port, its own event
# loop in a thread) until the real one in the search service has its end-to-end test. It
# follows the contract (protos/mmsearch/admin/v1/admin.proto): roles, the candidate, the
# streamed Backfill (a first message with the total, then outcomes in batches with running
# totals; resumable: items already copied are SKIPPED), the catch-up pass and count check of
# Promote / Rollback (FAILED_PRECONDITION with both counts unless `force`), the error codes,
# and the "admin" scope when tokens are set.

UNREADABLE = "inline bytes cannot be re-read: no original store is configured (SEARCH_ORIGINALS_*)"


@dataclass
class FakeCollection:
    name: str
    version: int
    model: str
    dimension: int
    role: int
    items: set[str] = field(default_factory=set)


class FakeAdmin(admin_pb2_grpc.AdminServicer):
    """State: the index's collections, the live items, the models this server has an
    embedder for (SEARCH_MODEL_EMBEDDERS: model -> (target, dimension)), the items that
    cannot be re-read (they fail in Backfill and stay missing after catch-up)."""

    def __init__(self, index: str = "mmsearch", live_model: str = "lite-embed-v1", live_dimension: int = 384,
                 items: Iterable[str] = (), models: dict[str, tuple[str, int]] | None = None,
                 unreadable: Iterable[str] = (), tokens: dict[str, set[str]] | None = None,
                 batch: int = 2) -> None:
        self.index = index
        self.models = models if models is not None else {
            live_model: ("127.0.0.1:50051", live_dimension), "clip-vit-b-32": ("127.0.0.1:50061", 512)}
        live = FakeCollection(f"{index}__v1", 1, live_model, live_dimension, admin_pb2.ROLE_LIVE, set(items))
        self.collections: dict[str, FakeCollection] = {live.name: live}
        self.unreadable = set(unreadable)
        self.tokens = tokens  # None: no auth; else token -> scopes
        self.batch = batch
        self.delay_s = 0.0  # between Backfill messages
        self.busy = False  # a backfill / promote / rollback runs (ABORTED for the next)
        self.calls: list[tuple[str, object]] = []

    # -- helpers

    def _role(self, role: int) -> FakeCollection | None:
        return next((c for c in self.collections.values() if c.role == role), None)

    @property
    def live(self) -> FakeCollection:
        live = self._role(admin_pb2.ROLE_LIVE)
        assert live is not None
        return live

    def ingest(self, *ids: str) -> None:
        """What Ingest does: write to the live, the candidate and the previous collection."""
        for c in self.collections.values():
            if c.role in (admin_pb2.ROLE_LIVE, admin_pb2.ROLE_CANDIDATE, admin_pb2.ROLE_PREVIOUS):
                c.items.update(ids)

    def info(self, c: FakeCollection) -> admin_pb2.CollectionInfo:
        target = self.models.get(c.model, ("", 0))[0]
        return admin_pb2.CollectionInfo(name=c.name, version=c.version, embedder_model_id=c.model,
                                        dimension=c.dimension, item_count=len(c.items), role=c.role,
                                        embedder_target=target)

    async def _check(self, context: grpc.aio.ServicerContext, method: str, request: object) -> None:
        self.calls.append((method, request))
        if self.tokens is None:
            return
        auth = dict(context.invocation_metadata() or ()).get("authorization", "")
        token = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else None
        if token is None or token not in self.tokens:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or unknown bearer token")
        elif "admin" not in self.tokens[token]:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{method} needs the \"admin\" scope")

    async def _exclusive(self, context: grpc.aio.ServicerContext) -> None:
        if self.busy:
            await context.abort(grpc.StatusCode.ABORTED,
                                "another backfill, promote or rollback runs on this server; retry later")
        self.busy = True

    def _copy(self, source: FakeCollection, dest: FakeCollection, item_id: str) -> int:
        """One item into `dest`: BACKFILL_STATUS_*."""
        if item_id in dest.items:
            return admin_pb2.BACKFILL_STATUS_SKIPPED
        if item_id in self.unreadable:
            return admin_pb2.BACKFILL_STATUS_FAILED
        dest.items.add(item_id)
        return admin_pb2.BACKFILL_STATUS_COPIED

    # -- the RPCs

    async def ListCollections(self, request: admin_pb2.ListCollectionsRequest,
                              context: grpc.aio.ServicerContext) -> admin_pb2.ListCollectionsResponse:
        await self._check(context, "ListCollections", request)
        ordered = sorted(self.collections.values(), key=lambda c: c.version)
        return admin_pb2.ListCollectionsResponse(index=self.index, collections=[self.info(c) for c in ordered])

    async def CreateCandidate(self, request: admin_pb2.CreateCandidateRequest,
                              context: grpc.aio.ServicerContext) -> admin_pb2.CreateCandidateResponse:
        await self._check(context, "CreateCandidate", request)
        model = request.embedder_model_id
        if not model:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "embedder_model_id is required")
        if model not in self.models:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"no embedder is configured for model {model!r} (SEARCH_MODEL_EMBEDDERS)")
        if (candidate := self._role(admin_pb2.ROLE_CANDIDATE)) is not None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"a candidate already exists: {candidate.name} ({candidate.model})")
        version = max(c.version for c in self.collections.values()) + 1
        c = FakeCollection(f"{self.index}__v{version}", version, model, self.models[model][1],
                           admin_pb2.ROLE_CANDIDATE)
        self.collections[c.name] = c
        return admin_pb2.CreateCandidateResponse(candidate=self.info(c))

    async def Backfill(self, request: admin_pb2.BackfillRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[admin_pb2.BackfillResponse]:
        await self._check(context, "Backfill", request)
        if request.max_items_per_s < 0 or request.max_items < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "max_items_per_s and max_items must be >= 0")
        candidate = self._role(admin_pb2.ROLE_CANDIDATE)
        if candidate is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no candidate: create one first (CreateCandidate)")
        assert candidate is not None
        await self._exclusive(context)
        try:
            live = self.live
            ids = sorted(live.items)
            if request.max_items:
                ids = ids[:request.max_items]
            progress = admin_pb2.BackfillProgress(total=len(live.items))
            yield admin_pb2.BackfillResponse(progress=progress)
            for start in range(0, len(ids), self.batch):
                outcomes = []
                for item_id in ids[start:start + self.batch]:
                    if request.max_items_per_s:
                        await asyncio.sleep(1.0 / request.max_items_per_s)
                    status = self._copy(live, candidate, item_id)
                    outcome = admin_pb2.BackfillOutcome(id=item_id, status=status)
                    if status == admin_pb2.BACKFILL_STATUS_FAILED:
                        outcome.error.CopyFrom(types_pb2.ItemError(
                            code=grpc.StatusCode.FAILED_PRECONDITION.value[0], message=UNREADABLE))
                        progress.failed += 1
                    elif status == admin_pb2.BACKFILL_STATUS_SKIPPED:
                        progress.skipped += 1
                    else:
                        progress.copied += 1
                    outcomes.append(outcome)
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                yield admin_pb2.BackfillResponse(outcomes=outcomes, progress=progress)
        finally:
            self.busy = False

    async def _switch(self, context: grpc.aio.ServicerContext, force: bool, to: FakeCollection,
                      verb: str) -> admin_pb2.SwitchResponse:
        await self._exclusive(context)
        try:
            live = self.live
            caught_up = sum(self._copy(live, to, i) == admin_pb2.BACKFILL_STATUS_COPIED for i in sorted(live.items))
            if len(to.items) != len(live.items) and not force:
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"counts differ after catch-up: {to.name} has {len(to.items)} items, live {live.name} has "
                    f"{len(live.items)}; {verb} with force to switch anyway")
            for c in self.collections.values():
                if c.role == admin_pb2.ROLE_PREVIOUS:
                    c.role = admin_pb2.ROLE_RETIRED
            to.role, live.role = admin_pb2.ROLE_LIVE, admin_pb2.ROLE_PREVIOUS
            return admin_pb2.SwitchResponse(live=self.info(to), previous=self.info(live), caught_up=caught_up)
        finally:
            self.busy = False

    async def Promote(self, request: admin_pb2.PromoteRequest,
                      context: grpc.aio.ServicerContext) -> admin_pb2.SwitchResponse:
        await self._check(context, "Promote", request)
        candidate = self._role(admin_pb2.ROLE_CANDIDATE)
        if candidate is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no candidate to promote")
        assert candidate is not None
        return await self._switch(context, request.force, candidate, "promote")

    async def Rollback(self, request: admin_pb2.RollbackRequest,
                       context: grpc.aio.ServicerContext) -> admin_pb2.SwitchResponse:
        await self._check(context, "Rollback", request)
        previous = self._role(admin_pb2.ROLE_PREVIOUS)
        if previous is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no previous collection to roll back to")
        assert previous is not None
        return await self._switch(context, request.force, previous, "rollback")

    async def DropCollection(self, request: admin_pb2.DropCollectionRequest,
                             context: grpc.aio.ServicerContext) -> admin_pb2.DropCollectionResponse:
        await self._check(context, "DropCollection", request)
        c = self.collections.get(request.name)
        if c is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"no collection {request.name!r} in {self.index}")
        assert c is not None
        if c.role == admin_pb2.ROLE_LIVE:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"{c.name} is live: the live collection may not be dropped")
        del self.collections[c.name]
        return admin_pb2.DropCollectionResponse()


class FakeAdminServer:
    """`FakeAdmin` served by grpc.aio on 127.0.0.1 (a free port), its event loop in a
    thread, so that blocking callers (the CLI under CliRunner, AdminClient) and asyncio
    ones (AsyncAdminClient) can both talk to it."""

    def __init__(self, admin: FakeAdmin | None = None) -> None:
        self.admin = admin or FakeAdmin()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-admin", daemon=True)
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)

    async def _start(self) -> int:
        self._server = grpc.aio.server()
        admin_pb2_grpc.add_AdminServicer_to_server(self.admin, self._server)
        port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        return port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._server.stop(0), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()


if __name__ == "__main__":
    main()
