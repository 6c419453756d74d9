"""A minimal app on the shared runtime, used by the runtime tests (and as a subprocess).

It implements the Captioner contract trivially: Caption decodes the image through the
shared intake (so intake errors surface as real gRPC statuses) and sleeps for
`max_words` milliseconds, which lets tests hold a call in flight.
"""
from __future__ import annotations

import asyncio

import grpc

from mmsearch.captioner.v1 import captioner_pb2, captioner_pb2_grpc
from services.common.convert import image_ref_from_proto
from services.common.intake import ImageIntake
from services.common.server import GrpcApp, run
from services.common.settings import ServerSettings


class RuntimeTestSettings(ServerSettings):
    model_config = {**ServerSettings.model_config, "env_prefix": "RUNTIME_TEST_"}


class SleepyCaptioner(captioner_pb2_grpc.CaptionerServicer):
    def __init__(self, settings: ServerSettings) -> None:
        self.intake = ImageIntake(settings.images, settings.uris)

    async def Caption(self, request: captioner_pb2.CaptionRequest, context: grpc.aio.ServicerContext) -> captioner_pb2.CaptionResponse:
        decoded = await self.intake.decode(image_ref_from_proto(request.image))
        await asyncio.sleep(request.max_words / 1000)
        return captioner_pb2.CaptionResponse(
            caption=captioner_pb2.Caption(description=f"{decoded.width}x{decoded.height} {decoded.format}", model_id="test")
        )

    async def Info(self, request: captioner_pb2.InfoRequest, context: grpc.aio.ServicerContext) -> captioner_pb2.InfoResponse:
        return captioner_pb2.InfoResponse(backend="test", model_id="test")


def make_app(settings: ServerSettings) -> GrpcApp:
    servicer = SleepyCaptioner(settings)
    return GrpcApp(
        name="runtime-test",
        service_names=[captioner_pb2.DESCRIPTOR.services_by_name["Captioner"].full_name],
        register=lambda server: captioner_pb2_grpc.add_CaptionerServicer_to_server(servicer, server),
    )


if __name__ == "__main__":
    # The runtime logs {"event": "started", "port": N} as JSON on stderr; tests read it.
    settings = RuntimeTestSettings()
    run(settings, lambda: make_app(settings))
