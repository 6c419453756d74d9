"""Python client library for the mmsearch Search service (and its Admin service: `AdminClient`).

    from mmsearch.client import SearchClient

    with SearchClient("127.0.0.1:50050") as client:
        client.ingest_all(["photos/cat.jpg", "photos/coffee.jpg"])
        for hit in client.search(text="a cat", top_k=3):
            print(hit.rank, round(hit.score, 3), hit.uri, hit.caption)

Depends only on the generated contracts (`mmsearch.*.v1`), grpcio and
grpcio-health-checking; never on the services. See docs/client.md.
"""
from mmsearch.client._base import DEFAULT_ADDRESS, SEARCH_SERVICE
from mmsearch.client._channel import ConnectionConfig, retry_service_config
from mmsearch.client.admin import ADMIN_SERVICE, AdminClient, AsyncAdminClient
from mmsearch.client.aio import AsyncSearchClient
from mmsearch.client.sync import SearchClient, check_health
from mmsearch.client.types import (
    BackfillOutcome,
    BackfillProgress,
    BackfillStatus,
    BackfillUpdate,
    CollectionInfo,
    Decay,
    DecayFunction,
    Example,
    ExampleId,
    ExampleInput,
    Fusion,
    FusionMethod,
    GetResult,
    Hit,
    ImageInput,
    IndexBackfillOutcome,
    IndexBackfillProgress,
    IndexBackfillStatus,
    IndexBackfillSummary,
    IndexBackfillUpdate,
    IndexCollections,
    IngestItem,
    IngestOutcome,
    IngestProgress,
    IngestSummary,
    IngestUpdate,
    ItemStatus,
    Record,
    Role,
    SearchAllProgress,
    SearchError,
    SearchFeatures,
    SearchResult,
    SearchTimings,
    Stats,
    StreamQuery,
    SwitchResult,
    Target,
)

__all__ = [
    "ADMIN_SERVICE",
    "DEFAULT_ADDRESS",
    "SEARCH_SERVICE",
    "AdminClient",
    "AsyncAdminClient",
    "AsyncSearchClient",
    "BackfillOutcome",
    "BackfillProgress",
    "BackfillStatus",
    "BackfillUpdate",
    "CollectionInfo",
    "ConnectionConfig",
    "Decay",
    "DecayFunction",
    "Example",
    "ExampleId",
    "ExampleInput",
    "Fusion",
    "FusionMethod",
    "GetResult",
    "Hit",
    "ImageInput",
    "IndexBackfillOutcome",
    "IndexBackfillProgress",
    "IndexBackfillStatus",
    "IndexBackfillSummary",
    "IndexBackfillUpdate",
    "IndexCollections",
    "IngestItem",
    "IngestOutcome",
    "IngestProgress",
    "IngestSummary",
    "IngestUpdate",
    "ItemStatus",
    "Record",
    "Role",
    "SearchAllProgress",
    "SearchClient",
    "SearchError",
    "SearchFeatures",
    "SearchResult",
    "SearchTimings",
    "Stats",
    "StreamQuery",
    "SwitchResult",
    "Target",
    "check_health",
    "retry_service_config",
]
