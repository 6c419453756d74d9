"""Outbound gRPC channels between services (search -> embedder / captioner).

Retries on UNAVAILABLE and CANCELLED use gRPC's built-in retry policy (service config, the same one the
client library puts on its channels), so every caller gets the same bounded, jittered
exponential backoff without a hand-written loop; calls are spread round-robin.
"""
from __future__ import annotations

import asyncio
import contextlib

import grpc

from mmsearch.grpc_retry import retry_service_config
from services.common.security import channel_credentials, client_files_stamp, client_pair_consistent
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


class ReloadingChannel:
    """A long-lived channel whose TLS files may be renewed under the running process.

    `reload_if_changed()` (called about once a second by the owner) rebuilds the channel
    when the CA / certificate / key files change; calls in flight finish on the old
    channel, which is closed after `old_channel_grace_s`. Unreadable files keep the old
    channel (and are retried at the next check).
    """

    def __init__(self, target: str, tls: ClientTlsSettings | None = None, max_message_bytes: int = 64 * MiB,
                 retry_attempts: int = 4, old_channel_grace_s: float = 120.0) -> None:
        self._args = (target, tls, max_message_bytes, retry_attempts)
        self._tls = tls
        self._stamp = client_files_stamp(tls)
        self.channel = create_channel(*self._args)
        self.generation = 0
        self._grace_s = old_channel_grace_s
        self._retired: set[asyncio.Task[None]] = set()

    def reload_if_changed(self) -> bool:
        stamp = client_files_stamp(self._tls)
        if stamp == self._stamp:
            return False
        if self._tls is not None and not client_pair_consistent(self._tls):
            return False  # caught half-way through an update: look again at the next check
        try:
            fresh = create_channel(*self._args)
        except OSError:
            return False
        self._stamp = stamp
        old, self.channel = self.channel, fresh
        self.generation += 1
        task = asyncio.get_running_loop().create_task(self._close_later(old))
        self._retired.add(task)
        task.add_done_callback(self._retired.discard)
        return True

    async def _close_later(self, channel: grpc.aio.Channel) -> None:
        await asyncio.sleep(self._grace_s)
        await channel.close()

    async def close(self) -> None:
        for task in list(self._retired):
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        await self.channel.close()
