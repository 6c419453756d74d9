"""A gRPC server for the client's own fault handling: it answers Search.Stats, but fails
the next N calls with UNAVAILABLE or answers after a delay, on demand.

The real search service cannot be told to fail exactly N calls, and counting attempts is
how a test proves the client's retry policy; everything else in tests/client runs against
the real suite (`real_suite` in tests/conftest.py).
"""
from __future__ import annotations

import threading
import time
from concurrent import futures
from dataclasses import dataclass, field

import grpc

from mmsearch.search.v1 import search_pb2, search_pb2_grpc


@dataclass
class Knobs:
    unavailable_calls: int = 0  # fail this many upcoming calls with UNAVAILABLE
    delay_s: float = 0.0  # answer each call after this long
    calls: int = 0  # calls received, failed ones included
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Stats(search_pb2_grpc.SearchServicer):
    def __init__(self, knobs: Knobs) -> None:
        self.knobs = knobs

    def Stats(self, request: search_pb2.StatsRequest, context: grpc.ServicerContext) -> search_pb2.StatsResponse:
        with self.knobs.lock:
            self.knobs.calls += 1
            fail = self.knobs.unavailable_calls > 0
            if fail:
                self.knobs.unavailable_calls -= 1
        if fail:
            context.abort(grpc.StatusCode.UNAVAILABLE, "injected outage")
        time.sleep(self.knobs.delay_s)
        return search_pb2.StatsResponse(collection="faults")


class FaultServer:
    def __init__(self) -> None:
        self.knobs = Knobs()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        search_pb2_grpc.add_SearchServicer_to_server(_Stats(self.knobs), self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._server.stop(0)
