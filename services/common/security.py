"""TLS / mTLS credentials for servers and for the channels between services.

Certificates are renewed under running processes (cert-manager rewrites the mounted
Secret; Kubernetes swaps the files atomically): servers pick new files up at the next TLS
handshake (`grpc.dynamic_ssl_server_credentials`), and search's upstream channels are
rebuilt when their files change (`channels.ReloadingChannel`). Every loaded certificate's
expiry is exported as `mmsearch_tls_certificate_expiry_timestamp_seconds`.
"""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import grpc
from prometheus_client import Gauge

from services.common.log import get_logger
from services.common.settings import ClientTlsSettings, TlsSettings

log = get_logger(__name__)

CERT_EXPIRY = Gauge(
    "mmsearch_tls_certificate_expiry_timestamp_seconds",
    "notAfter of each certificate this process has loaded (Unix seconds): the first one in each file. "
    "role: server (the gRPC server's certificate), server_client_ca (the CA that signs clients, mTLS), "
    "client (the certificate this process presents upstream), client_ca (the CA it trusts upstream).",
    ["role", "file"],
)
CERT_RELOADS = Gauge(
    "mmsearch_tls_certificate_loaded_timestamp_seconds",
    "When this process last (re)loaded the files of this role (Unix seconds).",
    ["role"],
)


def certificate_expiry(pem: bytes) -> float | None:
    """notAfter of the first certificate in a PEM bundle, as Unix seconds."""
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificate(pem).not_valid_after_utc.timestamp()
    except ValueError:
        return None


def _export(role: str, path: Path | None, pem: bytes | None) -> None:
    if path is None or pem is None:
        return
    expiry = certificate_expiry(pem)
    if expiry is not None:
        CERT_EXPIRY.labels(role, str(path)).set(expiry)


def files_stamp(paths: Iterable[Path | None]) -> tuple[tuple[int, int, int], ...]:
    """What changes when a file is replaced (Kubernetes swaps a symlink: stat follows it)."""
    out = []
    for p in paths:
        if p is None:
            continue
        try:
            st = os.stat(p)
            out.append((st.st_ino, st.st_mtime_ns, st.st_size))
        except OSError:
            out.append((0, 0, 0))
    return tuple(out)


def _key_matches(cert_pem: bytes, key_pem: bytes) -> bool:
    """A cert / key pair read in the middle of an update must not be served."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        cert_pub = x509.load_pem_x509_certificate(cert_pem).public_key()
        key_pub = serialization.load_pem_private_key(key_pem, password=None).public_key()
    except (ValueError, TypeError):
        return False
    raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return cert_pub.public_bytes(*raw) == key_pub.public_bytes(*raw)


class ReloadingServerCredentials:
    """Server credentials that follow the certificate files.

    gRPC asks `fetch` at each new TLS handshake; it re-reads the files only when their
    stamp changed (and at most every `min_check_interval_s`), returns the new configuration
    once, then None ("keep the current one"). Established connections and their calls are
    untouched; a half-written or mismatched pair is ignored (the old one stays) until the
    files are consistent again.
    """

    def __init__(self, tls: TlsSettings, min_check_interval_s: float = 1.0) -> None:
        assert tls.cert_file is not None and tls.key_file is not None
        self.tls = tls
        self.min_check_interval_s = min_check_interval_s
        self._lock = threading.Lock()
        self._checked = 0.0
        self._stamp = files_stamp(self._paths())
        config = self._load()
        if config is None:
            raise ValueError(f"TLS certificate {tls.cert_file} does not match its key {tls.key_file}")
        self._initial = config
        self.reloads = 0

    def _paths(self) -> list[Path | None]:
        return [self.tls.cert_file, self.tls.key_file, self.tls.client_ca_file]

    def _load(self) -> grpc.ServerCertificateConfiguration | None:
        tls = self.tls
        assert tls.cert_file is not None and tls.key_file is not None
        cert, key = tls.cert_file.read_bytes(), tls.key_file.read_bytes()
        if not _key_matches(cert, key):
            return None
        ca = tls.client_ca_file.read_bytes() if tls.client_ca_file else None
        _export("server", tls.cert_file, cert)
        _export("server_client_ca", tls.client_ca_file, ca)
        CERT_RELOADS.labels("server").set(time.time())
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        now = time.monotonic()
        with self._lock:
            if now - self._checked < self.min_check_interval_s:
                return None
            self._checked = now
            stamp = files_stamp(self._paths())
            if stamp == self._stamp:
                return None
            try:
                config = self._load()
            except OSError as e:  # mid-swap: try again at a later handshake
                log.warning("TLS files unreadable; keeping the current certificate", error=str(e))
                return None
            if config is None:
                log.warning("TLS certificate and key do not match (mid-update?); keeping the current ones",
                            cert=str(self.tls.cert_file))
                return None
            self._stamp = stamp
            self.reloads += 1
            log.info("TLS certificate reloaded", cert=str(self.tls.cert_file), reloads=self.reloads)
            return config

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._initial, self.fetch, require_client_authentication=self.tls.client_ca_file is not None
        )


def server_credentials(tls: TlsSettings) -> grpc.ServerCredentials | None:
    """None means plaintext. With `client_ca_file`, clients must present a certificate.
    Renewed files are picked up without a restart (see `ReloadingServerCredentials`)."""
    if not tls.enabled:
        return None
    return ReloadingServerCredentials(tls).credentials()


def channel_credentials(tls: ClientTlsSettings) -> grpc.ChannelCredentials | None:
    """None means an insecure channel."""
    if not tls.enabled:
        return None
    ca = tls.ca_file.read_bytes() if tls.ca_file else None
    cert = tls.cert_file.read_bytes() if tls.cert_file else None
    _export("client_ca", tls.ca_file, ca)
    _export("client", tls.cert_file, cert)
    CERT_RELOADS.labels("client").set(time.time())
    return grpc.ssl_channel_credentials(
        root_certificates=ca,
        private_key=tls.key_file.read_bytes() if tls.key_file else None,
        certificate_chain=cert,
    )


def client_pair_consistent(tls: ClientTlsSettings) -> bool:
    """The client certificate matches its key (or there is none): safe to build a channel."""
    if tls.cert_file is None or tls.key_file is None:
        return True
    try:
        return _key_matches(tls.cert_file.read_bytes(), tls.key_file.read_bytes())
    except OSError:
        return False


def client_files_stamp(tls: ClientTlsSettings | None) -> tuple[tuple[int, int, int], ...]:
    if tls is None or not tls.enabled:
        return ()
    return files_stamp([tls.ca_file, tls.cert_file, tls.key_file])
