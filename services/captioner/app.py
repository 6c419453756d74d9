"""Wires settings, backend, domain service and servicer into the shared gRPC runtime."""

from __future__ import annotations

import grpc

from mmsearch.captioner.v1 import captioner_pb2_grpc
from services.captioner.backends import make_backend
from services.captioner.service import CaptionService
from services.captioner.servicer import SERVICE_NAME, CaptionerServicer
from services.captioner.settings import CaptionerSettings
from services.common.server import GrpcApp


def captioner_app(service: CaptionService) -> GrpcApp:
    """The captioner as a GrpcApp around an already built service (tests build their own)."""

    def register(server: grpc.aio.Server) -> None:
        captioner_pb2_grpc.add_CaptionerServicer_to_server(CaptionerServicer(service), server)

    return GrpcApp(
        name="captioner",
        service_names=(SERVICE_NAME,),
        register=register,
        # Lite loads EfficientNet-Lite0 and runs a warm-up image here: health stays
        # NOT_SERVING until it is done.
        on_start=service.start,
        on_stop=service.aclose,
        readiness=service.ready,
    )


def build_app(settings: CaptionerSettings) -> GrpcApp:
    """The configured captioner: backend chosen by CAPTIONER_BACKEND."""
    return captioner_app(CaptionService(settings, make_backend(settings)))
