"""Server reflection describes the contract with its .proto comments (limits, errors).

A client driven by reflection alone (`grpcurl describe`) must see what protos/ documents,
so the client side here uses no generated mmsearch code: only grpc, the reflection
protocol's own messages and `descriptor_pb2`. The servers are the shared runtime
(`start_server`: health, reflection, interceptors) serving each public service.
"""
from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.common.server import GrpcApp, RunningServer, contract_descriptor_set, start_server
from tests.common.runtime_app import RuntimeTestSettings

# service -> (message or "" for the service itself, field or "", a sentence of its comment)
CASES = {
    "mmsearch.search.v1.Search": [
        ("", "", "FAILED_PRECONDITION: the embedder serves another model than the one that built the collection"),
        ("SearchRequest", "top_k",
         "Number of hits to return, 1 to `max_top_k` (default server limit 1,000). 0 is INVALID_ARGUMENT."),
    ],
    "mmsearch.embedder.v1.Embedder": [
        ("", "", "RESOURCE_EXHAUSTED: the batching queue is full; retry with backoff."),
        ("EmbedRequest", "items", "The items to embed, 1 to `InfoResponse.max_batch_items` of them."),
    ],
    "mmsearch.captioner.v1.Captioner": [
        ("", "", "RESOURCE_EXHAUSTED: the upstream throttled us (HTTP 429) past the retry budget"),
    ],
}


def _servicer_registration(service: str):  # type: ignore[no-untyped-def]
    """Registers the generated base servicer (every method UNIMPLEMENTED): reflection and
    health do not depend on what the methods do."""
    from mmsearch.captioner.v1 import captioner_pb2_grpc
    from mmsearch.embedder.v1 import embedder_pb2_grpc
    from mmsearch.search.v1 import search_pb2_grpc

    module, name = {
        "mmsearch.search.v1.Search": (search_pb2_grpc, "Search"),
        "mmsearch.embedder.v1.Embedder": (embedder_pb2_grpc, "Embedder"),
        "mmsearch.captioner.v1.Captioner": (captioner_pb2_grpc, "Captioner"),
    }[service]
    servicer = getattr(module, f"{name}Servicer")()
    return lambda server: getattr(module, f"add_{name}Servicer_to_server")(servicer, server)


@pytest.fixture(params=sorted(CASES))
async def running(request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, RunningServer]]:
    service: str = request.param
    settings = RuntimeTestSettings(host="127.0.0.1", grpc_port=0, metrics_port=-1)
    app = GrpcApp(name=service.split(".")[1], service_names=[service], register=_servicer_registration(service))
    server = await start_server(settings, app)
    yield service, server
    await server.stop(0.5)


async def _reflect(address: str, request: reflection_pb2.ServerReflectionRequest) -> reflection_pb2.ServerReflectionResponse:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = [r async for r in stub.ServerReflectionInfo(iter([request]), timeout=10)]
    assert len(replies) == 1
    return replies[0]


async def _files_containing(address: str, symbol: str) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    reply = await _reflect(address, reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol))
    assert reply.HasField("file_descriptor_response"), reply
    files = [descriptor_pb2.FileDescriptorProto.FromString(b)
             for b in reply.file_descriptor_response.file_descriptor_proto]
    return {f.name: f for f in files}


def _comment_at(file: descriptor_pb2.FileDescriptorProto, path: list[int]) -> str:
    for location in file.source_code_info.location:
        if list(location.path) == path:
            return " ".join(location.leading_comments.split() + location.trailing_comments.split())
    return ""


def _path(file: descriptor_pb2.FileDescriptorProto, service: str, message: str, field: str) -> list[int]:
    """The source-info path of the service itself, or of `message.field`."""
    if not message:
        name = service.rsplit(".", 1)[1]
        return [6, [s.name for s in file.service].index(name)]  # FileDescriptorProto.service = 6
    m = [m.name for m in file.message_type].index(message)  # FileDescriptorProto.message_type = 4
    f = [f.name for f in file.message_type[m].field].index(field)  # DescriptorProto.field = 2
    return [4, m, 2, f]


async def test_reflection_serves_the_proto_comments(running: tuple[str, RunningServer]) -> None:
    service, server = running
    files = await _files_containing(server.address, service)
    owner = next(f for f in files.values() if any(f"{f.package}.{s.name}" == service for s in f.service))
    for message, field, sentence in CASES[service]:
        where = f"{service} {message}.{field}".rstrip(".")
        assert sentence in _comment_at(owner, _path(owner, service, message, field)), where
    # Its imports come along, with their comments too.
    types = files["mmsearch/common/v1/types.proto"]
    assert any("UTF-8 text" in loc.leading_comments for loc in types.source_code_info.location)


async def test_reflection_still_lists_services_and_health_answers(running: tuple[str, RunningServer]) -> None:
    service, server = running
    reply = await _reflect(server.address, reflection_pb2.ServerReflectionRequest(list_services=""))
    names = {s.name for s in reply.list_services_response.service}
    assert {service, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names
    # The other services' files are still served (from the default pool, without comments).
    for symbol in ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"):
        assert any(any(s.name == symbol.rsplit(".", 1)[1] for s in f.service)
                   for f in (await _files_containing(server.address, symbol)).values()), symbol
    unknown = await _reflect(server.address, reflection_pb2.ServerReflectionRequest(file_containing_symbol="no.Such"))
    assert unknown.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
    async with grpc.aio.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", service):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_descriptor_set_matches_the_generated_code() -> None:
    """mmsearch/descriptors.binpb describes what the generated modules do (comments aside):
    scripts/check_protos.sh regenerates both; this catches a set left behind."""
    from google.protobuf import descriptor_pool

    # Loaded into the default pool by importing them.
    import mmsearch.captioner.v1.captioner_pb2
    import mmsearch.embedder.v1.embedder_pb2
    import mmsearch.search.v1.search_pb2  # noqa: F401

    descriptor_set = contract_descriptor_set()
    assert descriptor_set is not None
    names = {f.name for f in descriptor_set.file}
    assert {"mmsearch/search/v1/search.proto", "mmsearch/embedder/v1/embedder.proto",
            "mmsearch/captioner/v1/captioner.proto", "mmsearch/common/v1/types.proto"} <= names
    for stored in descriptor_set.file:
        assert stored.source_code_info.location, stored.name
        if not stored.name.startswith("mmsearch/"):
            continue  # well-known types: protobuf's runtime has its own copy
        generated = descriptor_pb2.FileDescriptorProto()
        descriptor_pool.Default().FindFileByName(stored.name).CopyToProto(generated)
        without_comments = descriptor_pb2.FileDescriptorProto()
        without_comments.CopyFrom(stored)
        without_comments.ClearField("source_code_info")
        _clear_json_names(without_comments.message_type)  # protoc fills them in sets only
        assert without_comments == generated, f"{stored.name}: run scripts/gen_protos.sh"


def _clear_json_names(messages) -> None:  # type: ignore[no-untyped-def]
    for m in messages:
        for f in (*m.field, *m.extension):
            f.ClearField("json_name")
        _clear_json_names(m.nested_type)
