"""HandlerCache: an interceptor's wrapped handler is reused while the inner one is the same."""
from __future__ import annotations

import grpc

from services.common.interceptors import HandlerCache


async def _behaviour(request: bytes, _context: object) -> bytes:
    return request


def test_reuses_the_wrap_of_the_same_inner_handler_and_replaces_it_otherwise() -> None:
    cache, made = HandlerCache(), []

    def make(inner: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        made.append(inner)
        return grpc.unary_unary_rpc_method_handler(inner.unary_unary)

    first = grpc.unary_unary_rpc_method_handler(_behaviour)
    wrapped = cache.wrap("/s.S/M", first, make)
    assert cache.wrap("/s.S/M", first, make) is wrapped and made == [first]
    other = grpc.unary_unary_rpc_method_handler(_behaviour)  # e.g. the startup gate's refusal
    assert cache.wrap("/s.S/M", other, make) is not wrapped and made == [first, other]
    assert cache.wrap("/s.S/M", first, make) is not wrapped  # one entry per method: replaced again
    assert cache.wrap("/s.S/Other", first, make) is not None
    assert cache.wrap("/s.S/Unknown", None, make) is None and len(made) == 4
    assert len(cache._entries) == 2  # unknown methods leave nothing behind
