"""The gRPC retry policy of every caller of mmsearch services: the client library's
channels and search's channels to its upstreams (one policy, one place; services import
this module, never the client library)."""
from __future__ import annotations

import json
from typing import Any


def retry_service_config(
    max_attempts: int = 4, initial_backoff_s: float = 0.1, max_backoff_s: float = 2.0, *, round_robin: bool = False
) -> str:
    """gRPC service config: retry every method of the channel on UNAVAILABLE and CANCELLED.

    CANCELLED is retried because a gRPC server that starts shutting down (SIGTERM in a
    rollout) cancels the calls it has received but not yet handed to a handler: they did no
    work, and retried they land on another replica (round-robin). A call the caller cancels
    itself is never retried by gRPC, so only a server's CANCELLED is.

    gRPC caps maxAttempts at 5; `max_attempts` <= 1 disables retries (gRPC rejects a policy
    with fewer than 2 attempts and would then fail every call on the channel).
    `round_robin` spreads calls over every address the target resolves to (a headless
    Kubernetes Service), so replicas added by an autoscaler get traffic; gRPC's default,
    pick_first, would keep one connection.
    """
    config: dict[str, Any] = {"methodConfig": [{"name": [{}]}]}
    if round_robin:
        config["loadBalancingConfig"] = [{"round_robin": {}}]
    if max_attempts > 1:
        config["methodConfig"][0]["retryPolicy"] = {
            "maxAttempts": min(max_attempts, 5),
            "initialBackoff": f"{initial_backoff_s}s",
            "maxBackoff": f"{max_backoff_s}s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"],
        }
    return json.dumps(config)
