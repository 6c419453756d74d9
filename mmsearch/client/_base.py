"""What the blocking and the asyncio client share: options, channel, stubs, defaults."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Self

from grpc_health.v1 import health_pb2_grpc

from mmsearch.client._channel import ConnectionConfig, MiB, PathOrBytes
from mmsearch.search.v1 import search_pb2_grpc

DEFAULT_ADDRESS = "127.0.0.1:50050"
#: The search service's health name (the server also answers for "", the whole server).
SEARCH_SERVICE = "mmsearch.search.v1.Search"


class _Default:
    """Sentinel: "use the client's default timeout" (None means no deadline)."""

    def __repr__(self) -> str:
        return "<client default>"


DEFAULT: Any = _Default()


class ClientBase:
    """Holds one long-lived channel to the Search service and its stubs; subclasses
    say which kind of channel (`_open`), which service (`_make_stub`) and define the calls."""

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        timeout: float | None = 30.0,
        token: str | None = None,
        tls: bool = False,
        root_cert: PathOrBytes | None = None,
        client_cert: PathOrBytes | None = None,
        client_key: PathOrBytes | None = None,
        server_name: str | None = None,
        retry_attempts: int = 4,
        max_message_bytes: int = 64 * MiB,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.config = ConnectionConfig(
            address=address,
            token=token,
            tls=tls,
            root_cert=root_cert,
            client_cert=client_cert,
            client_key=client_key,
            server_name=server_name,
            retry_attempts=retry_attempts,
            max_message_bytes=max_message_bytes,
            extra_options=tuple(options),
        )
        self.timeout = timeout
        self._channel = self._open(self.config)
        self._stub = self._make_stub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def _open(self, config: ConnectionConfig) -> Any:
        raise NotImplementedError

    def _make_stub(self, channel: Any) -> Any:
        """The service's stub on `channel` (Search here; the admin clients take Admin's)."""
        return search_pb2_grpc.SearchStub(channel)

    @classmethod
    def from_config(cls, config: ConnectionConfig, timeout: float | None = 30.0) -> Self:
        return cls(
            config.address,
            timeout=timeout,
            token=config.token,
            tls=config.tls,
            root_cert=config.root_cert,
            client_cert=config.client_cert,
            client_key=config.client_key,
            server_name=config.server_name,
            retry_attempts=config.retry_attempts,
            max_message_bytes=config.max_message_bytes,
            options=config.extra_options,
        )

    @property
    def address(self) -> str:
        return self.config.address

    def _timeout(self, timeout: float | None | object) -> float | None:
        return self.timeout if timeout is DEFAULT else timeout  # type: ignore[return-value]
