"""Embedded Milvus Lite's own gRPC server logs an error with a traceback for each RPC it
does not implement (pymilvus tries AllocTimestamp first); only those records are dropped."""
from __future__ import annotations

import logging
import sys

from services.search.milvus_store import _MILVUS_LITE_NOISE


def record(error: BaseException) -> logging.LogRecord:
    try:
        raise error
    except BaseException:
        exc_info = sys.exc_info()
    return logging.LogRecord("grpc._server", logging.ERROR, __file__, 1, "Exception calling application: %s",
                             (error,), exc_info)


def test_only_milvus_lites_unimplemented_methods_are_dropped() -> None:
    assert not _MILVUS_LITE_NOISE.filter(record(NotImplementedError("Method not implemented!")))
    assert _MILVUS_LITE_NOISE.filter(record(NotImplementedError("something else")))
    assert _MILVUS_LITE_NOISE.filter(record(RuntimeError("Method not implemented!")))
    assert _MILVUS_LITE_NOISE.filter(logging.LogRecord("grpc._server", logging.ERROR, __file__, 1, "no exc", (), None))
