#!/usr/bin/env python3
"""grpc.health.v1 probe for pods whose gRPC port speaks TLS or mTLS.

Kubernetes' native `grpc:` probe only speaks plaintext (it has no TLS or credential
settings), so once a service serves TLS (the production-gpu overlay) its probes run this
script as an `exec` probe instead. It exits 0 when the server answers SERVING and 1
otherwise (NOT_SERVING, unknown service, TLS failure, timeout, connection refused), and
prints why on stderr, which the kubelet records in the pod's events.

It needs only grpcio and grpcio-health-checking, which every mmsearch image has.

    python /opt/mmsearch/bin/grpc_health_check.py --address 127.0.0.1:50051 \
        --tls --ca-file /etc/mmsearch/tls/ca.crt \
        --cert-file /etc/mmsearch/tls/tls.crt --key-file /etc/mmsearch/tls/tls.key \
        --server-name localhost
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


def check(
    address: str,
    service: str = "",
    timeout_s: float = 3.0,
    tls: bool = False,
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
    server_name: str | None = None,
) -> tuple[bool, str]:
    """Returns (serving, reason)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    options: list[tuple[str, str]] = []
    if tls:
        creds = grpc.ssl_channel_credentials(
            root_certificates=_read(ca_file), private_key=_read(key_file), certificate_chain=_read(cert_file)
        )
        if server_name:
            # The probe dials 127.0.0.1; the certificate names the service (and `localhost`).
            options.append(("grpc.ssl_target_name_override", server_name))
        channel = grpc.secure_channel(address, creds, options=options)
    else:
        channel = grpc.insecure_channel(address)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as e:
            return False, f"{e.code().name}: {e.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return response.status == health_pb2.HealthCheckResponse.SERVING, status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--address", default="127.0.0.1:50051", help="host:port of the gRPC server")
    parser.add_argument("--service", default="", help="health service name; empty = the whole server")
    parser.add_argument("--timeout-s", type=float, default=3.0)
    parser.add_argument("--tls", action="store_true", help="dial with TLS (see the file flags)")
    parser.add_argument("--ca-file", help="CA bundle that signed the server certificate")
    parser.add_argument("--cert-file", help="client certificate, for servers that require mTLS")
    parser.add_argument("--key-file", help="client private key, for servers that require mTLS")
    parser.add_argument("--server-name", help="name to verify in the server certificate (e.g. localhost)")
    args = parser.parse_args(argv)
    try:
        serving, reason = check(
            args.address, args.service, args.timeout_s, args.tls,
            args.ca_file, args.cert_file, args.key_file, args.server_name,
        )
    except OSError as e:  # unreadable certificate files
        serving, reason = False, f"cannot read TLS files: {e}"
    if not serving:
        print(f"health check of {args.address} failed: {reason}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
