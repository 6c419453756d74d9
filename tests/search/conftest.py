"""The real suite on loopback for search tests: Milvus Lite server, lite embedder and
captioner services, and the search service, all speaking gRPC."""
from __future__ import annotations

import io
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from PIL import Image, ImageOps

from mmsearch.common.v1 import types_pb2
from mmsearch.search.v1 import search_pb2, search_pb2_grpc
from services.common.server import RunningServer, start_server
from services.common.settings import UriSettings
from services.lite_models.sample_photos import load_sample_photos
from services.search.app import SearchService
from services.search.settings import SearchSettings


def jpeg(image: Image.Image, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@dataclass
class Photo:
    name: str
    data: bytes
    flipped: bytes


@pytest.fixture(scope="session")
def photos() -> dict[str, Photo]:
    return {
        p.name: Photo(p.name, jpeg(p.image), jpeg(ImageOps.mirror(p.image.convert("RGB"))))
        for p in load_sample_photos()
    }


async def start_embedder() -> RunningServer:
    from services.embedder.app import create_app as build_app
    from services.embedder.settings import EmbedderSettings

    settings = EmbedderSettings(host="127.0.0.1", grpc_port=0, metrics_port=-1)
    return await start_server(settings, build_app(settings))


async def start_captioner() -> RunningServer:
    from services.captioner.app import build_app
    from services.captioner.settings import CaptionerSettings

    settings = CaptionerSettings(host="127.0.0.1", grpc_port=0, metrics_port=-1)
    return await start_server(settings, build_app(settings))


async def start_search(milvus_uri: str, embedder: str, captioner: str, file_root: Path | None = None,
                       **overrides: object) -> RunningServer:
    settings = SearchSettings(
        host="127.0.0.1", grpc_port=0, metrics_port=-1, milvus_uri=milvus_uri, embedder_target=embedder,
        captioner_target=captioner, uris=UriSettings(file_root=file_root), upstream_timeout_s=30,
        **overrides,  # type: ignore[arg-type]
    )
    return await start_server(settings, SearchService(settings).app())


def ingest_requests(items: Iterable[search_pb2.IngestItem], chunk: int = 4) -> list[search_pb2.IngestRequest]:
    items = list(items)
    return [search_pb2.IngestRequest(items=items[i : i + chunk]) for i in range(0, len(items), chunk)]


async def ingest(stub: search_pb2_grpc.SearchStub, items: Iterable[search_pb2.IngestItem]) -> tuple[
        dict[int, search_pb2.ItemOutcome], search_pb2.IngestProgress]:
    outcomes: dict[int, search_pb2.ItemOutcome] = {}
    progress = search_pb2.IngestProgress()
    async for reply in stub.Ingest(iter(ingest_requests(items))):
        for o in reply.outcomes:
            assert o.index not in outcomes, "an item got two outcomes"
            outcomes[o.index] = o
        progress = reply.progress
    return outcomes, progress


def text_query(text: str, target: int = search_pb2.TARGET_IMAGE, **kw: object) -> search_pb2.SearchRequest:
    kw.setdefault("top_k", 5)
    return search_pb2.SearchRequest(query=types_pb2.Content(text=text), target=target, **kw)  # type: ignore[arg-type]


def image_query(data: bytes, target: int = search_pb2.TARGET_IMAGE, **kw: object) -> search_pb2.SearchRequest:
    kw.setdefault("top_k", 5)
    return search_pb2.SearchRequest(query=types_pb2.Content(image=types_pb2.Image(data=data)), target=target, **kw)  # type: ignore[arg-type]


async def channel_to(server: RunningServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield channel


def create_legacy_collection(uri: str, name: str, model_id: str, dimension: int) -> None:
    """A collection as search created it before deferred captions and the keyword leg (no
    caption_pending, no keyword fields: Milvus Lite cannot add fields to an existing one)."""
    from pymilvus import DataType, MilvusClient

    from services.search.milvus_store import PROP_DIM, PROP_MODEL

    client = MilvusClient(uri=uri)
    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=256)
    for field, length in (("content_sha256", 64), ("fingerprint", 64), ("uri", 2048), ("caption", 4096),
                          ("embedder_model_id", 256), ("captioner_model_id", 256)):
        schema.add_field(field, DataType.VARCHAR, max_length=length)
    schema.add_field("keywords", DataType.ARRAY, element_type=DataType.VARCHAR, max_capacity=32, max_length=128)
    schema.add_field("metadata", DataType.JSON)
    schema.add_field("ingested_at_ms", DataType.INT64)
    schema.add_field("image_vector", DataType.FLOAT_VECTOR, dim=dimension)
    schema.add_field("caption_vector", DataType.FLOAT_VECTOR, dim=dimension)
    index = client.prepare_index_params()
    for field in ("image_vector", "caption_vector"):
        index.add_index(field, index_type="HNSW", metric_type="COSINE", params={"M": 16, "efConstruction": 200})
    client.drop_collection(name)
    client.create_collection(name, schema=schema, index_params=index,
                             properties={PROP_MODEL: model_id, PROP_DIM: str(dimension)})
    client.close()
