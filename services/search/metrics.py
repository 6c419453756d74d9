"""Search service metrics (beyond the shared gRPC ones)."""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_FAST = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

INGEST_ITEMS = Counter("search_ingest_items_total", "Ingested items by outcome.", ["outcome"])
INGEST_STAGE_SECONDS = Histogram(
    "search_ingest_stage_seconds", "Time per ingest stage call (decode, check, caption, embed, upsert).", ["stage"],
    buckets=_FAST,
)
INGEST_IN_FLIGHT = Gauge("search_ingest_in_flight_items", "Items received but without an outcome yet.")
MILVUS_SECONDS = Histogram("search_milvus_seconds", "Milvus operation latency.", ["op"], buckets=_FAST)
SEARCH_SECONDS = Histogram("search_query_seconds", "Search latency by mode.", ["mode"], buckets=_FAST)
# The two hops of one query, per mode: "embed" (the query's Embed call; 0 for vector
# queries) and "milvus" (the vector search), so a slow mode shows which hop is slow.
SEARCH_STAGE_SECONDS = Histogram(
    "search_query_stage_seconds", "Search time per mode and stage (embed, milvus).", ["mode", "stage"], buckets=_FAST
)
# A model change (docs/operations.md): items Ingest also wrote to the candidate / previous
# collection ("written"), or could not ("failed": the admin backfill or the promote's
# catch-up copies them).
INGEST_REPLICA_WRITES = Counter(
    "search_ingest_replica_writes_total", "Items written to a model change's other collection, by outcome.",
    ["outcome"],
)
# The admin backfill and the promote / rollback catch-up: items by outcome.
REINDEX_ITEMS = Counter("search_reindex_items_total", "Items the model change's backfill handled, by outcome.",
                        ["outcome"])
# Background flushes of collections (services/search/flushing.py), by trigger ("ingest_end",
# "idle") and outcome ("ok", "failed"); their latency is search_milvus_seconds{op="flush"}.
MILVUS_FLUSHES = Counter("search_milvus_flushes_total", "Background Milvus flushes by reason and outcome.",
                         ["reason", "outcome"])
