"""The TLS health probe script (deploy/k8s/docker/grpc_health_check.py) against a real
mmsearch server on loopback, over plaintext, TLS and mTLS, the way the production overlay's
exec probes run it: a separate `python` process, exit code 0 = healthy."""
from __future__ import annotations

import asyncio
import datetime as dt
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from k8s_helpers import K8S

SCRIPT = K8S / "docker" / "grpc_health_check.py"

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from services.common.server import GrpcApp, RunningServer, start_server
from services.common.settings import ServerSettings, TlsSettings


@dataclass
class Pki:
    ca: Path
    cert: Path
    key: Path
    other_ca: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key, issuer_name: x509.Name, issuer_key, *, ca: bool, sans: list[str] = ()) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(s) for s in sans]), critical=False)
        # Like examples/certificates.example.yaml: server auth + client auth.
        b = b.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    return b.sign(issuer_key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca_key, other_key, leaf_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = _cert("mmsearch-ca", ca_key, _name("mmsearch-ca"), ca_key, ca=True)
    other = _cert("other-ca", other_key, _name("other-ca"), other_key, ca=True)
    leaf = _cert("embedder", leaf_key, ca.subject, ca_key, ca=False, sans=["embedder", "localhost"])
    (d / "ca.crt").write_bytes(_pem(ca))
    (d / "other.crt").write_bytes(_pem(other))
    (d / "tls.crt").write_bytes(_pem(leaf))
    (d / "tls.key").write_bytes(
        leaf_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return Pki(d / "ca.crt", d / "tls.crt", d / "tls.key", d / "other.crt")


class Ready:
    value = True


def _app(ready: Ready) -> GrpcApp:
    async def readiness() -> bool:
        return ready.value

    return GrpcApp(name="probe-test", service_names=("probe.Test",), register=lambda server: None,
                   readiness=readiness, readiness_interval_s=0.05)


@pytest.fixture
async def server(request: pytest.FixtureRequest, pki: Pki) -> AsyncIterator[tuple[RunningServer, Ready]]:
    mode = request.param
    tls = TlsSettings()
    if mode in ("tls", "mtls"):
        tls = TlsSettings(cert_file=pki.cert, key_file=pki.key, client_ca_file=pki.ca if mode == "mtls" else None)
    settings = ServerSettings(host="127.0.0.1", grpc_port=0, metrics_port=-1, tls=tls)
    ready = Ready()
    running = await start_server(settings, _app(ready))
    yield running, ready
    await running.stop(0.2)


async def probe(port: int, *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(SCRIPT), "--address", f"127.0.0.1:{port}", "--timeout-s", "5", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    return proc.returncode, err.decode()


def tls_args(pki: Pki, *, client_cert: bool = True, ca: Path | None = None) -> list[str]:
    args = ["--tls", "--ca-file", str(ca or pki.ca), "--server-name", "localhost"]
    if client_cert:
        args += ["--cert-file", str(pki.cert), "--key-file", str(pki.key)]
    return args


@pytest.mark.parametrize("server", ["plaintext"], indirect=True)
async def test_plaintext_serving_and_not_serving(server: tuple[RunningServer, Ready]) -> None:
    running, ready = server
    assert (await probe(running.port))[0] == 0
    assert (await probe(running.port, "--service", "probe.Test"))[0] == 0
    code, err = await probe(running.port, "--service", "no.Such")
    assert code == 1 and "NOT_FOUND" in err
    ready.value = False
    await asyncio.sleep(0.3)
    code, err = await probe(running.port)
    assert code == 1 and "NOT_SERVING" in err


@pytest.mark.parametrize("server", ["tls"], indirect=True)
async def test_tls(server: tuple[RunningServer, Ready], pki: Pki) -> None:
    running, _ = server
    assert (await probe(running.port, *tls_args(pki, client_cert=False)))[0] == 0
    # The kubelet's native grpc probe speaks plaintext: it fails against a TLS port.
    assert (await probe(running.port))[0] == 1
    # A certificate from another CA is refused.
    assert (await probe(running.port, *tls_args(pki, client_cert=False, ca=pki.other_ca)))[0] == 1


@pytest.mark.parametrize("server", ["mtls"], indirect=True)
async def test_mtls_needs_the_pod_certificate(server: tuple[RunningServer, Ready], pki: Pki) -> None:
    running, _ = server
    assert (await probe(running.port, *tls_args(pki)))[0] == 0
    code, err = await probe(running.port, *tls_args(pki, client_cert=False))
    assert code == 1, err


async def test_unreachable_and_unreadable(pki: Pki, tmp_path: Path) -> None:
    from tests.conftest import free_port

    code, err = await probe(free_port())
    assert code == 1 and "UNAVAILABLE" in err
    code, err = await probe(free_port(), "--tls", "--ca-file", str(tmp_path / "missing.crt"))
    assert code == 1 and "cannot read" in err
