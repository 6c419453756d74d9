"""Outbound gRPC channels between services (search -> embedder / captioner).

Retries on UNAVAILABLE use gRPC's built-in retry policy (service config, the same one the
client library puts on its channels), so every caller gets the same bounded, jittered
exponential backoff without a hand-written loop; calls are spread round-robin.
"""
from __future__ import annotations

import grpc

from mmsearch.client._channel import retry_service_config
from services.common.security import channel_credentials
from services.common.settings import ClientTlsSettings, MiB


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
        ("grpc.service_config", retry_service_config(retry_attempts, round_robin=True)),
        ("grpc.keepalive_time_ms", 30_000),
        # Reconnect soon after an upstream comes back: gRPC's default backoff grows to
        # 120 s, so an embedder down for a minute would stay "unreachable" for minutes more.
        ("grpc.initial_reconnect_backoff_ms", 250),
        ("grpc.min_reconnect_backoff_ms", 250),
        ("grpc.max_reconnect_backoff_ms", 2_000),
    ]
    creds = channel_credentials(tls) if tls else None
    if creds is None:
        return grpc.aio.insecure_channel(target, options=options)
    if tls and tls.server_name_override:
        options.append(("grpc.ssl_target_name_override", tls.server_name_override))
    return grpc.aio.secure_channel(target, creds, options=options)
