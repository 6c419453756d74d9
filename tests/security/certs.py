"""Test PKI made at test time with `cryptography`: a CA, server and client certificates,
and a second, unrelated CA (for "wrong CA" clients and servers).

Nothing is checked in: every run gets fresh keys, written as PEM files, the form a
Kubernetes secret mounts them in.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Pair:
    """A certificate and its key, as PEM files."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    ca: Path  # the CA certificate every service trusts
    server: Pair  # SAN localhost, 127.0.0.1 (signed by `ca`)
    client: Pair  # a client certificate signed by `ca` (mTLS)
    other_ca: Path  # an unrelated CA
    other_client: Pair  # a client certificate signed by `other_ca`
    other_server: Pair  # a server certificate signed by `other_ca`


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mmsearch tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None = None) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.with_suffix(".key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


def _ca(cn: str, days: float = 1) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn)).issuer_name(_name(cn)).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf(ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, cn: str, server: bool, days: float = 1) -> tuple[
        x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn)).issuer_name(ca.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def make_pki(folder: Path, days: float = 1) -> Pki:
    """Certificates valid for `days` (rotation tests renew with a longer life)."""
    folder.mkdir(parents=True, exist_ok=True)

    def pair(name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Pair:
        path = folder / f"{name}.crt"
        _write(path, cert, key)
        return Pair(path, path.with_suffix(".key"))

    ca, ca_key = _ca("mmsearch test CA", days)
    other, other_key = _ca("some other CA")
    _write(folder / "ca.crt", ca)
    _write(folder / "other-ca.crt", other)
    return Pki(
        ca=folder / "ca.crt",
        server=pair("server", *_leaf(ca, ca_key, "localhost", server=True, days=days)),
        client=pair("client", *_leaf(ca, ca_key, "search", server=False, days=days)),
        other_ca=folder / "other-ca.crt",
        other_client=pair("other-client", *_leaf(other, other_key, "intruder", server=False)),
        other_server=pair("other-server", *_leaf(other, other_key, "localhost", server=True)),
    )
