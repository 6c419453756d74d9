"""Shared fixtures: ports, sample images, a fresh Prometheus view."""
from __future__ import annotations

import dataclasses
import io
import signal
from pathlib import Path

import pytest
from grpc.experimental.aio import init_grpc_aio
from PIL import Image

from mmsearch.suite.process import ManagedProcess, free_port, milvus_spec

# grpc.aio's poller can deadlock when it is shut down and restarted with a fresh event loop
# per test (grpc/grpc#22365, #40989); one early init keeps it alive for the whole session.
init_grpc_aio()


def png_bytes(width: int = 32, height: int = 24, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(width: int = 64, height: int = 48, color: tuple[int, int, int] = (10, 120, 200)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture
def small_png() -> bytes:
    return png_bytes()


class MilvusLiteServer(ManagedProcess):
    """A real `milvus-lite server` process on a loopback port (gRPC, like a Milvus cluster):
    the launcher's Milvus; `start()` returns once it listens (again, on the same port)."""

    def __init__(self, data_dir: str) -> None:
        # SIGTERM, not the launcher's clean-closing SIGINT (0.7 s slower): test data is thrown away.
        super().__init__(dataclasses.replace(milvus_spec(Path(data_dir), free_port()), stop_signal=signal.SIGTERM))

    @property
    def uri(self) -> str:
        return f"http://{self.address}"

    def start(self) -> MilvusLiteServer:
        super().start()
        self.wait_ready(60)
        return self


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    server = MilvusLiteServer(str(tmp_path_factory.mktemp("milvus")))
    server.start()
    yield server
    server.stop()


# --- the real suite as processes, shared by the client and CLI tests --------------------------

SUITE_TOKEN = "tok-shared-suite-7f3a91"
# Indexed metadata fields of the shared suite's collection (typed columns: group_by, decay).
SUITE_INDEXED_FIELDS = "label:string,price:float"


class RealSuite:
    """`LocalSuite` (what `mmsearch up` runs): real embedder, captioner and search processes
    with the offline lite models and embedded Milvus Lite; search requires SUITE_TOKEN."""

    def __init__(self, data_dir: Path) -> None:
        from mmsearch.suite import LocalSuite, SuiteConfig

        self.data_dir = data_dir
        self.token = SUITE_TOKEN
        self._suite = LocalSuite(SuiteConfig(data_dir=data_dir, ports="auto", metrics=True,
                                             env={"SEARCH_AUTH_TOKENS": SUITE_TOKEN,
                                                  # grouping / numeric decay tests (tests/client, tests/cli)
                                                  "SEARCH_INDEXED_FIELDS": SUITE_INDEXED_FIELDS},
                                             start_timeout_s=540))

    @property
    def address(self) -> str:
        return self._suite.search_address

    @property
    def embedder_address(self) -> str:
        return self._suite.embedder_address

    @property
    def captioner_address(self) -> str:
        return self._suite.captioner_address

    def start(self) -> RealSuite:
        self._suite.start()
        return self

    def stop(self) -> None:
        self._suite.stop()


@pytest.fixture(scope="session")
def real_suite(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """One running suite for the session: tests use their own item ids (and filters on
    them) so they do not depend on each other's items."""
    suite = RealSuite(tmp_path_factory.mktemp("real-suite")).start()
    yield suite
    suite.stop()
