"""A bare grpc.aio server whose one method waits as long as the request says, then
answers: the floor of a gRPC hop for a call that keeps the server busy for that long,
with none of our code in it (no interceptors, no batcher, no model thread).

    python bench/wait_server.py PORT      # method /bench.Wait/Wait, request: ASCII ms
"""
from __future__ import annotations

import asyncio
import sys
import time

import grpc


async def wait(request: bytes, _context: grpc.aio.ServicerContext) -> bytes:
    # asyncio.sleep alone overshoots by ~0.2 ms (epoll timeouts are whole milliseconds):
    # sleep until 2 ms before the end, then spin, so the wait itself is exact.
    end = time.perf_counter() + float(request.decode() or 0) / 1000
    await asyncio.sleep(max(0.0, end - time.perf_counter() - 0.002))
    while time.perf_counter() < end:
        pass
    return b"ok"


async def main(port: int) -> None:
    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler("bench.Wait", {"Wait": grpc.unary_unary_rpc_method_handler(wait)})
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
