"""A stand-in child for the launcher tests: a real grpc.health.v1 server whose behaviour is chosen by flags.

    python -m tests.cli.fake_service --port N --mode serving|never|crash|stubborn
        [--pidfile F] [--grandchild]

serving: SERVING after a short delay; never: NOT_SERVING forever; crash: logs and
exits 3 before serving; stubborn: SERVING but ignores SIGTERM (must be SIGKILLed).
--grandchild spawns a `sleep` in the same process group (the launcher must stop it too);
--pidfile records "<pid> <grandchild pid>".
"""
from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc


def log(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, "level": "info", **fields}), file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mode", default="serving")
    parser.add_argument("--pidfile")
    parser.add_argument("--grandchild", action="store_true")
    args = parser.parse_args()

    grandchild = subprocess.Popen(["sleep", "600"]) if args.grandchild else None
    if args.pidfile:
        with open(args.pidfile, "w") as f:
            f.write(f"{__import__('os').getpid()} {grandchild.pid if grandchild else 0}")
    log("loading", mode=args.mode)
    if args.mode == "crash":
        print("Traceback (most recent call last):\nRuntimeError: model file missing", file=sys.stderr, flush=True)
        sys.exit(3)
    if args.mode == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    if args.mode != "never":
        time.sleep(0.3)
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        log("started", port=args.port)
    else:
        log("waiting for a model that never loads")

    stop = {"now": False}
    if args.mode != "stubborn":
        signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    while not stop["now"]:
        time.sleep(0.05)
    log("shutting down")
    server.stop(0)


if __name__ == "__main__":
    main()
