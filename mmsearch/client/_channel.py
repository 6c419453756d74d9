"""Channel options, TLS and bearer-token credentials shared by the sync and async clients.

Retries on UNAVAILABLE and CANCELLED use gRPC's built-in retry policy (a service config on the
channel): bounded attempts, exponential backoff with jitter, and the stream's messages
replayed by gRPC itself. The client never retries other codes: INVALID_ARGUMENT is the
caller's bug, RESOURCE_EXHAUSTED is left to the caller's own pacing, DEADLINE_EXCEEDED
means the caller's time budget is spent.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import grpc

from mmsearch.grpc_retry import retry_service_config

MiB = 1024 * 1024

PathOrBytes = Union[str, "os.PathLike[str]", bytes]


def _read(value: PathOrBytes | None) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value
    return Path(value).expanduser().read_bytes()


@dataclass(frozen=True)
class ConnectionConfig:
    """Everything needed to open a channel to one service.

    `tls` is implied by any of `root_cert`, `client_cert`; with `tls` and no `root_cert`
    the system roots verify the server. `client_cert` + `client_key` enable mTLS.
    `token` is sent as `authorization: Bearer <token>`: as call credentials on TLS
    channels, as plain call metadata on plaintext ones (loopback / inside a mesh).
    """

    address: str
    token: str | None = None
    tls: bool = False
    root_cert: PathOrBytes | None = None
    client_cert: PathOrBytes | None = None
    client_key: PathOrBytes | None = None
    server_name: str | None = None
    retry_attempts: int = 4
    max_message_bytes: int = 64 * MiB
    extra_options: tuple[tuple[str, Any], ...] = ()

    @property
    def secure(self) -> bool:
        return self.tls or self.root_cert is not None or self.client_cert is not None

    def options(self) -> list[tuple[str, Any]]:
        opts: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.enable_retries", 1 if self.retry_attempts > 1 else 0),
            ("grpc.service_config", retry_service_config(self.retry_attempts)),
            ("grpc.keepalive_time_ms", 30_000),
        ]
        if self.server_name:
            opts.append(("grpc.ssl_target_name_override", self.server_name))
        opts.extend(self.extra_options)
        return opts

    def credentials(self) -> grpc.ChannelCredentials | None:
        """None for a plaintext channel."""
        if not self.secure:
            return None
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("mTLS needs both client_cert and client_key")
        creds = grpc.ssl_channel_credentials(
            root_certificates=_read(self.root_cert),
            private_key=_read(self.client_key),
            certificate_chain=_read(self.client_cert),
        )
        if self.token:
            creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(self.token))
        return creds

    def call_metadata(self) -> tuple[tuple[str, str], ...] | None:
        """The token as metadata, only on plaintext channels (TLS ones carry it as credentials)."""
        if self.token and not self.secure:
            return (("authorization", f"Bearer {self.token}"),)
        return None

    def sync_channel(self) -> grpc.Channel:
        creds = self.credentials()
        if creds is None:
            return grpc.insecure_channel(self.address, options=self.options())
        return grpc.secure_channel(self.address, creds, options=self.options())

    def aio_channel(self) -> grpc.aio.Channel:
        creds = self.credentials()
        if creds is None:
            return grpc.aio.insecure_channel(self.address, options=self.options())
        return grpc.aio.secure_channel(self.address, creds, options=self.options())

    def with_address(self, address: str) -> ConnectionConfig:
        from dataclasses import replace

        return replace(self, address=address)
