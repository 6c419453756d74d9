"""TLS / mTLS credentials for servers and for the channels between services."""
from __future__ import annotations

import grpc

from services.common.settings import ClientTlsSettings, TlsSettings


def server_credentials(tls: TlsSettings) -> grpc.ServerCredentials | None:
    """None means plaintext. With `client_ca_file`, clients must present a certificate."""
    if not tls.enabled:
        return None
    assert tls.cert_file is not None and tls.key_file is not None
    pair = (tls.key_file.read_bytes(), tls.cert_file.read_bytes())
    if tls.client_ca_file is None:
        return grpc.ssl_server_credentials([pair])
    return grpc.ssl_server_credentials(
        [pair], root_certificates=tls.client_ca_file.read_bytes(), require_client_auth=True
    )


def channel_credentials(tls: ClientTlsSettings) -> grpc.ChannelCredentials | None:
    """None means an insecure channel."""
    if not tls.enabled:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=tls.ca_file.read_bytes() if tls.ca_file else None,
        private_key=tls.key_file.read_bytes() if tls.key_file else None,
        certificate_chain=tls.cert_file.read_bytes() if tls.cert_file else None,
    )
