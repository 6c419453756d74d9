"""Admin gRPC servicer (mmsearch.admin.v1): protobuf <-> the model-change domain only."""
from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from mmsearch.admin.v1 import admin_pb2, admin_pb2_grpc
from services.common.interceptors import item_error
from services.search.model_change import CollectionView, CopyProgress, CopyStatus, ModelChange, Switched
from services.search.versions import CANDIDATE, LIVE, PREVIOUS, RETIRED

_ROLES = {LIVE: admin_pb2.ROLE_LIVE, CANDIDATE: admin_pb2.ROLE_CANDIDATE, PREVIOUS: admin_pb2.ROLE_PREVIOUS,
          RETIRED: admin_pb2.ROLE_RETIRED}
_STATUS = {CopyStatus.COPIED: admin_pb2.BACKFILL_STATUS_COPIED, CopyStatus.SKIPPED: admin_pb2.BACKFILL_STATUS_SKIPPED,
           CopyStatus.FAILED: admin_pb2.BACKFILL_STATUS_FAILED}


def _collection(v: CollectionView) -> admin_pb2.CollectionInfo:
    return admin_pb2.CollectionInfo(
        name=v.name, version=v.version, embedder_model_id=v.model_id, dimension=v.dimension, item_count=v.item_count,
        role=_ROLES.get(v.role, admin_pb2.ROLE_UNSPECIFIED), embedder_target=v.embedder_target,
    )


def _progress(p: CopyProgress) -> admin_pb2.BackfillProgress:
    return admin_pb2.BackfillProgress(total=p.total, copied=p.copied, skipped=p.skipped, failed=p.failed)


def _switched(s: Switched) -> admin_pb2.SwitchResponse:
    return admin_pb2.SwitchResponse(live=_collection(s.live), previous=_collection(s.previous), caught_up=s.caught_up)


class AdminServicer(admin_pb2_grpc.AdminServicer):
    def __init__(self, change: ModelChange) -> None:
        self.change = change

    async def ListCollections(
        self, request: admin_pb2.ListCollectionsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListCollectionsResponse:
        views = await self.change.collections()
        return admin_pb2.ListCollectionsResponse(index=self.change.index.index,
                                                 collections=[_collection(v) for v in views])

    async def CreateCandidate(
        self, request: admin_pb2.CreateCandidateRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.CreateCandidateResponse:
        return admin_pb2.CreateCandidateResponse(
            candidate=_collection(await self.change.create_candidate(request.embedder_model_id)))

    async def Backfill(
        self, request: admin_pb2.BackfillRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[admin_pb2.BackfillResponse]:
        async for outcomes, progress in self.change.backfill(request.max_items, request.max_items_per_s):
            yield admin_pb2.BackfillResponse(
                outcomes=[admin_pb2.BackfillOutcome(id=o.id, status=_STATUS[o.status],
                                                    error=item_error(o.error) if o.error else None)
                          for o in outcomes],
                progress=_progress(progress),
            )

    async def Promote(self, request: admin_pb2.PromoteRequest, context: grpc.aio.ServicerContext
                      ) -> admin_pb2.SwitchResponse:
        return _switched(await self.change.promote(request.force))

    async def Rollback(self, request: admin_pb2.RollbackRequest, context: grpc.aio.ServicerContext
                       ) -> admin_pb2.SwitchResponse:
        return _switched(await self.change.rollback(request.force))

    async def DropCollection(
        self, request: admin_pb2.DropCollectionRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.DropCollectionResponse:
        await self.change.drop(request.name)
        return admin_pb2.DropCollectionResponse()
