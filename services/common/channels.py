"""Outbound gRPC channels between services (search -> embedder / captioner).

Retries on UNAVAILABLE use gRPC's built-in retry policy (service config), so every
client gets the same bounded, jittered exponential backoff without a hand-written loop.
"""
from __future__ import annotations

import json

import grpc

from services.common.security import channel_credentials
from services.common.settings import ClientTlsSettings, MiB


def retry_service_config(max_attempts: int = 4, initial_backoff_s: float = 0.1, max_backoff_s: float = 2.0) -> str:
    method: dict[str, object] = {"name": [{}]}  # every method of every service on this channel
    # gRPC rejects a retry policy with maxAttempts < 2 (and then fails every call on the
    # channel with INVALID_ARGUMENT), so "1 attempt" means no retry policy at all.
    if max_attempts >= 2:
        method["retryPolicy"] = {
            "maxAttempts": max_attempts,
            "initialBackoff": f"{initial_backoff_s}s",
            "maxBackoff": f"{max_backoff_s}s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        }
    return json.dumps(
        {
            # Spread calls over every address a headless Service resolves to, so replicas
            # added by the autoscaler get traffic (the default pick_first would not).
            "loadBalancingConfig": [{"round_robin": {}}],
            "methodConfig": [method],
        }
    )


def create_channel(
    target: str,
    tls: ClientTlsSettings | None = None,
    max_message_bytes: int = 64 * MiB,
    retry_attempts: int = 4,
) -> grpc.aio.Channel:
    """One long-lived channel per upstream; never one per request.

    Use `dns:///name:port` targets for headless Services so round_robin sees every pod.
    """
    options: list[tuple[str, object]] = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", retry_service_config(retry_attempts)),
        ("grpc.keepalive_time_ms", 30_000),
    ]
    creds = channel_credentials(tls) if tls else None
    if creds is None:
        return grpc.aio.insecure_channel(target, options=options)
    if tls and tls.server_name_override:
        options.append(("grpc.ssl_target_name_override", tls.server_name_override))
    return grpc.aio.secure_channel(target, creds, options=options)
