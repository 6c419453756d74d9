"""Logs are what docs/operations.md promises: one JSON object per line, tagged with the
service's name, including third-party libraries' records and their tracebacks.

A rejected filter makes pymilvus log the failed RPC with its traceback inside the message
text (and it configures its own plain-text console handler at import): that record must
still be one JSON object, the traceback in its `exception` field.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import grpc
import pytest

from mmsearch.common.v1 import types_pb2
from mmsearch.search.v1 import search_pb2, search_pb2_grpc
from services.common.log import service_name
from tests.reliability.helpers import ROOT, SERVING, ServiceProcess, wait_health

REJECTED = "zz_no_such_field == 1"  # Milvus: unknown field (our own checks let it through)


def json_lines(text: str, where: str) -> list[dict[str, Any]]:
    """Every non-empty line as a JSON object; fails naming the first line that is not one."""
    objects = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            obj = None
        assert isinstance(obj, dict), f"{where} line {n} is not a JSON object: {line[:300]!r}"
        objects.append(obj)
    return objects


@pytest.mark.asyncio(loop_scope="function")
async def test_search_process_logs_a_rejected_filter_as_json(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    embedder = ServiceProcess("embedder", {}, logs)
    search = ServiceProcess("search", {
        "SEARCH_MILVUS_URI": str(tmp_path / "milvus" / "milvus.db"),  # embedded Milvus Lite
        "SEARCH_COLLECTION": "logs", "SEARCH_EMBEDDER_TARGET": embedder.address,
        "SEARCH_CAPTIONER_TARGET": "127.0.0.1:1"}, logs)
    try:
        embedder.start()
        search.start()
        await embedder.wait_ready_async(180)
        await search.wait_ready_async(120)
        await wait_health(search.address, SERVING, 60, "search text", service="search.text")
        async with grpc.aio.insecure_channel(search.address) as channel:
            request = search_pb2.SearchRequest(query=types_pb2.Content(text="a cat"), top_k=1, filter=REJECTED)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await search_pb2_grpc.SearchStub(channel).Search(request, timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "Milvus rejected the filter" in (e.value.details() or "")
    finally:
        search.stop(grace_s=10)
        embedder.stop(grace_s=10)

    records = json_lines(search.log(), "search log")
    assert records, "search logged nothing"
    assert {r.get("service") for r in records} == {"search"}, {r.get("service") for r in records}
    assert any(r.get("logger", "").startswith("services.") for r in records)
    rejections = [r for r in records if "zz_no_such_field" in json.dumps(r)]
    assert rejections, "no log line mentions the rejected filter"
    # pymilvus' traceback is a field of its record, not lines of its own.
    assert any("Traceback" in str(r.get("exception", "")) for r in rejections), rejections
    assert not any("Traceback" in str(r.get("event", "")) for r in records)
    assert {r.get("service") for r in json_lines(embedder.log(), "embedder log")} == {"embedder"}


_LIBRARIES = textwrap.dedent("""
    import logging, warnings
    import pymilvus  # configures its own plain-text console handler at import
    from services.common.log import configure_logging, get_logger
    configure_logging("INFO", json=True, service="gateway")
    logging.getLogger("pymilvus.decorators").error("RPC error: [search], boom\\nTraceback:\\nline 1\\nline 2\\n")
    try:
        raise ValueError("bad\\nvalue")
    except ValueError:
        logging.getLogger("httpx").exception("request failed")
        get_logger("services.gateway").exception("handler failed")
    logging.getLogger("uvicorn.error").warning("multi\\nline")
    warnings.warn("deprecated thing", DeprecationWarning, stacklevel=1)
    raise RuntimeError("uncaught")
""")


def test_library_records_tracebacks_and_uncaught_errors_are_json_objects() -> None:
    proc = subprocess.run([sys.executable, "-W", "always", "-c", _LIBRARIES], check=False, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    records = json_lines(proc.stdout + proc.stderr, "output")
    by_event = {r["event"]: r for r in records}
    assert {r["service"] for r in records} == {"gateway"}
    pymilvus = by_event["RPC error: [search], boom"]
    assert pymilvus["logger"] == "pymilvus.decorators" and pymilvus["exception"].startswith("Traceback:")
    for event in ("request failed", "handler failed", "uncaught exception"):
        assert "Traceback (most recent call last)" in by_event[event]["exception"], event
    assert by_event["multi\nline"]["level"] == "warning"
    assert any("deprecated thing" in r["event"] for r in records)


def test_service_names_are_the_services_not_the_settings_classes() -> None:
    from services.captioner.settings import CaptionerSettings
    from services.embedder.settings import EmbedderSettings
    from services.gateway.settings import GatewaySettings
    from services.search.settings import SearchSettings

    names = [service_name(cls.model_construct())
             for cls in (SearchSettings, EmbedderSettings, CaptionerSettings, GatewaySettings)]
    assert names == ["search", "embedder", "captioner", "gateway"]
