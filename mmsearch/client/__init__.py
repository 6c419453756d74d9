"""Python client library for the mmsearch Search service.

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
from mmsearch.client.aio import AsyncSearchClient
from mmsearch.client.sync import SearchClient, check_health
from mmsearch.client.types import (
    BackfillOutcome,
    BackfillProgress,
    BackfillStatus,
    BackfillUpdate,
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
    IngestItem,
    IngestOutcome,
    IngestProgress,
    IngestSummary,
    IngestUpdate,
    ItemStatus,
    Record,
    SearchAllProgress,
    SearchError,
    SearchFeatures,
    SearchResult,
    SearchTimings,
    Stats,
    StreamQuery,
    Target,
)

__all__ = [
    "DEFAULT_ADDRESS",
    "SEARCH_SERVICE",
    "AsyncSearchClient",
    "BackfillOutcome",
    "BackfillProgress",
    "BackfillStatus",
    "BackfillUpdate",
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
    "IngestItem",
    "IngestOutcome",
    "IngestProgress",
    "IngestSummary",
    "IngestUpdate",
    "ItemStatus",
    "Record",
    "SearchAllProgress",
    "SearchClient",
    "SearchError",
    "SearchFeatures",
    "SearchResult",
    "SearchTimings",
    "Stats",
    "StreamQuery",
    "Target",
    "check_health",
    "retry_service_config",
]
