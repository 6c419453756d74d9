"""Every filter example in the contract and the docs runs on the default embedded Milvus
Lite, or the text beside it says it needs a Milvus server (and then Lite really refuses
it, with Milvus' message). Examples are read from the files, so a new one is checked too."""
from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from mmsearch.common.v1 import types_pb2
from mmsearch.search.v1 import search_pb2, search_pb2_grpc
from tests.search.conftest import start_embedder, start_search

pytestmark = pytest.mark.asyncio(loop_scope="module")
ROOT = Path(__file__).resolve().parents[2]
SOURCES = [ROOT / "protos/mmsearch/search/v1/search.proto", ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
           *sorted((ROOT / "mmsearch/client").glob("*.py")), ROOT / "mmsearch/cli/main.py"]
# What makes a code span a filter expression: a stored field or a Milvus filter function.
_FIELD = re.compile(r"metadata\[|array_contains|json_contains|ingested_at_ms|caption_pending ==|\bid (?:like|in|==|!=)")
_OPERATOR = re.compile(r"==|!=|>=|<=| > | < | in \[| like |array_contains|json_contains")
_SPAN = re.compile(r"`([^`\n]+)`")
_FLAG = re.compile(r"""(?:--filter|-f|filter=)\s*'([^']+)'""")
SERVER_ONLY = re.compile(r"needs a Milvus server|works on a server|Milvus server only", re.IGNORECASE)


def _paragraphs(path: Path) -> list[str]:
    """One line per paragraph (markdown) or comment block (proto), so a code span or a
    remark wrapped over lines is seen whole; code-block lines stay as they are."""
    out: list[str] = []
    block: list[str] = []
    fenced = False
    for line in path.read_text().splitlines():
        text = line.strip()
        if text.startswith("```"):
            fenced = not fenced
        prose = text.removeprefix("//").strip() if path.suffix == ".proto" and text.startswith("//") else text
        if not fenced and prose and not text.startswith("```") and (path.suffix != ".proto" or text.startswith("//")):
            block.append(prose)
            continue
        if block:
            out.append(" ".join(block))
            block = []
        out.append(line)
    return out + ([" ".join(block)] if block else [])


def filter_examples() -> dict[str, tuple[str, bool]]:
    """expression -> (where it is written, whether its sentence says it needs a server)."""
    found: dict[str, tuple[str, bool]] = {}
    for path in SOURCES:
        for number, paragraph in enumerate(_paragraphs(path), 1):
            for sentence in re.split(r"(?<=[.;:])\s+(?=[A-Z`(])", paragraph):
                candidates = [m.replace('\\"', '"') for m in _FLAG.findall(sentence)]
                candidates += [s for s in _SPAN.findall(sentence) if not s.startswith(("-", "mmsearch ", "SEARCH_"))]
                for expr in candidates:
                    if _FIELD.search(expr) and _OPERATOR.search(expr) and "{" not in expr and "…" not in expr:
                        where = f"{path.relative_to(ROOT)} (paragraph {number})"
                        found.setdefault(expr, (where, bool(SERVER_ONLY.search(sentence))))
    return found


EXAMPLES = filter_examples()


async def test_the_examples_are_found() -> None:
    """The extractor sees the contract's and the docs' examples (it is not vacuous)."""
    where = {w.split(" ")[0] for w, _ in EXAMPLES.values()}
    assert "protos/mmsearch/search/v1/search.proto" in where and "docs/search.md" in where
    assert len(EXAMPLES) >= 8
    assert any(server_only for _, server_only in EXAMPLES.values())


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def stub(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[search_pb2_grpc.SearchStub]:
    """The default set-up: Milvus Lite embedded in search (a file URI)."""
    embedder = await start_embedder()
    uri = str(tmp_path_factory.mktemp("lite") / "milvus.db")
    search = await start_search(uri, embedder.address, "127.0.0.1:1", collection="examples")
    async with grpc.aio.insecure_channel(search.address) as channel:
        stub = search_pb2_grpc.SearchStub(channel)
        from tests.search.test_search_ingest_duplicates import item, jpeg, run

        await run(stub, [item(jpeg(32, seed=i), f"example-{i}", label) for i, label in enumerate(["cat", "dog"])], 2)
        yield stub
    await search.stop(0.5)
    await embedder.stop(0.5)


@pytest.mark.parametrize("expr", list(EXAMPLES))
async def test_every_filter_example_runs_on_embedded_milvus_lite(stub: search_pb2_grpc.SearchStub, expr: str) -> None:
    where, server_only = EXAMPLES[expr]
    request = search_pb2.SearchRequest(query=types_pb2.Content(text="a cat"), top_k=5, filter=expr)
    if not server_only:
        await stub.Search(request, timeout=30)  # raises on a refusal
        return
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.Search(request, timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, where
    assert "Milvus rejected the filter" in (e.value.details() or ""), where
