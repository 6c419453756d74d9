"""Shared fixtures: ports, sample images, a fresh Prometheus view."""
from __future__ import annotations

import io
import socket
from pathlib import Path

import pytest
from grpc.experimental.aio import init_grpc_aio
from PIL import Image

# grpc.aio's poller can deadlock when it is shut down and restarted with a fresh event loop
# per test (grpc/grpc#22365, #40989); one early init keeps it alive for the whole session.
init_grpc_aio()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def wait_for_port(port: int, timeout_s: float = 60.0) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s} s")


class MilvusLiteServer:
    """A real `milvus-lite server` process on a loopback port (gRPC, like a Milvus cluster)."""

    def __init__(self, data_dir: str) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.proc: "subprocess.Popen[bytes] | None" = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        import shutil
        import subprocess
        import sys
        from pathlib import Path

        exe = shutil.which("milvus-lite") or str(Path(sys.executable).parent / "milvus-lite")
        self.proc = subprocess.Popen(
            [exe, "server", "--data-dir", self.data_dir, "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        wait_for_port(self.port)

    def stop(self, kill: bool = False) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill() if kill else self.proc.terminate()
            self.proc.wait(timeout=30)


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

    def start(self) -> "RealSuite":
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
