"""The gateway as its own process (`python -m services.gateway`, what the Deployment runs)
in front of the suite's search: /metrics on its own port, a narrower file root than
search's (stored URIs outside it are refused), SIGTERM ends it cleanly. And the thumbnail
confinement itself, on files and symlinks (no suite needed).
"""
from __future__ import annotations

import io
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from mmsearch.suite import ManagedProcess, ProcessSpec, free_port
from services.gateway.settings import GatewaySettings
from services.gateway.thumbnails import NoThumbnail, Thumbnailer
from tests.conftest import jpeg_bytes
from tests.gateway.conftest import ROOT, GatewaySuite

# --- confinement (no suite) ------------------------------------------------------------------


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "photos").mkdir(parents=True)
    (root / "photos" / "ok.jpg").write_bytes(jpeg_bytes(640, 480))
    (tmp_path / "secret.jpg").write_bytes(jpeg_bytes(64, 48))
    (root / "photos" / "escape.jpg").symlink_to(tmp_path / "secret.jpg")
    (root / "photos" / "notes.jpg").write_bytes(b"not an image")
    return root


def render(root: Path | None, uri: str, size: int = 128) -> bytes:
    return Thumbnailer(GatewaySettings(file_root=root, metrics_port=-1)).render(uri, size)


def test_a_file_inside_the_root_becomes_a_small_jpeg(root: Path) -> None:
    image = Image.open(io.BytesIO(render(root, (root / "photos" / "ok.jpg").as_uri(), 128)))
    assert image.format == "JPEG" and image.size == (128, 96)
    # A request cannot ask for more than GATEWAY_THUMBNAIL_MAX_PX.
    big = Image.open(io.BytesIO(render(root, (root / "photos" / "ok.jpg").as_uri(), 5000)))
    assert max(big.size) == GatewaySettings().thumbnail_max_px


@pytest.mark.parametrize(
    ("uri", "status", "outcome", "message"),
    [
        ("{root}/photos/escape.jpg", 403, "refused", "outside the allowed root"),  # symlink out
        ("{root}/photos/../../secret.jpg", 403, "refused", "'..'"),
        ("file:///etc/passwd", 403, "refused", "outside the allowed root"),
        ("file://otherhost{root}/photos/ok.jpg", 403, "refused", "must not name a host"),
        ("{root}/photos/gone.jpg", 404, "missing", "gone"),
        ("{root}/photos/notes.jpg", 404, "invalid", "not a recognised image"),
        ("upload:red.png", 404, "no_file", "not ingested from a file:// URI"),
        ("", 404, "no_file", "not ingested from a file:// URI"),
        ("https://example.com/cat.jpg", 404, "no_file", "not ingested from a file:// URI"),
    ],
)
def test_never_an_arbitrary_file(root: Path, uri: str, status: int, outcome: str, message: str) -> None:
    if uri.startswith("{root}"):
        uri = "file://" + uri.format(root=root)
    elif "{root}" in uri:
        uri = uri.format(root=root)
    with pytest.raises(NoThumbnail) as info:
        render(root, uri)
    assert (info.value.status, info.value.outcome) == (status, outcome)
    assert message in info.value.message


def test_no_root_no_thumbnails(root: Path) -> None:
    with pytest.raises(NoThumbnail) as info:
        render(None, (root / "photos" / "ok.jpg").as_uri())
    assert info.value.status == 404 and "GATEWAY_FILE_ROOT" in info.value.message


# --- the process ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def standalone(gateway_suite: GatewaySuite, tmp_path_factory: pytest.TempPathFactory) -> Iterator[
        tuple[str, int, ManagedProcess]]:
    http_port, metrics_port = free_port(), free_port()
    env = {"GATEWAY_HOST": "127.0.0.1", "GATEWAY_HTTP_PORT": str(http_port),
           "GATEWAY_METRICS_PORT": str(metrics_port), "GATEWAY_SEARCH_TARGET": gateway_suite.search_address,
           # Narrower than search's file root: the photos are stored, but outside this one.
           "GATEWAY_FILE_ROOT": str(gateway_suite.queries), "GATEWAY_SHUTDOWN_GRACE_S": "2"}
    proc = ManagedProcess(ProcessSpec("gateway", [sys.executable, "-m", "services.gateway"],
                                      f"127.0.0.1:{http_port}", env, ready="tcp", cwd=str(ROOT)),
                          log_file=tmp_path_factory.mktemp("standalone-gateway") / "gateway.log")
    try:
        proc.start().wait_ready(60)
        yield f"http://127.0.0.1:{http_port}", metrics_port, proc
    finally:
        proc.stop(grace_s=0)


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_and_a_narrower_file_root(standalone: tuple[str, int, ManagedProcess],
                                         gateway_suite: GatewaySuite) -> None:
    base, metrics_port, _proc = standalone
    with httpx.Client(base_url=base, headers=gateway_suite.auth, timeout=120) as http:
        assert http.post("/v1/search", json={"query": {"text": "a cat"}, "topK": 1}).json()["hits"][0]["id"] == "cat"
        assert http.post("/v1/search", json={"topK": 0}).status_code == 400
        refused = http.get("/v1/thumbnail", params={"id": "cat"})
        assert refused.status_code == 403 and "outside the allowed root" in refused.json()["message"]
    samples = scrape(metrics_port)

    def value(name: str, **labels: str) -> float:
        return sum(v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items())

    assert value("http_requests_total", handler="/v1/search", method="POST", status="200") == 1
    assert value("http_requests_total", handler="/v1/search", method="POST", status="400") == 1
    assert value("http_requests_total", handler="/v1/thumbnail", status="403") == 1
    assert value("http_request_duration_seconds_count", handler="/v1/search") == 2
    assert value("grpc_client_handled_total", grpc_method="Search", grpc_code="OK", grpc_type="unary") == 1
    assert value("grpc_client_handled_total", grpc_method="Search", grpc_code="InvalidArgument") == 1
    assert value("gateway_thumbnails_total", outcome="refused") == 1


def test_sigterm_stops_it_cleanly(standalone: tuple[str, int, ManagedProcess]) -> None:
    base, _port, proc = standalone
    assert httpx.get(base + "/healthz").status_code == 200
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(30)
    output = proc.log()
    assert code == 0, output[-3000:]
    assert time.monotonic() - started < 10
    assert "server stopped" in output


def test_the_demo_finds_the_running_suites_page(tmp_path: Path) -> None:
    import json

    from mmsearch.cli.demo import DEFAULT_LIVE_URL, live_page_url

    assert live_page_url(None, tmp_path) == DEFAULT_LIVE_URL  # no suite.json
    (tmp_path / "suite.json").write_text(json.dumps(
        {"search_address": "127.0.0.1:6000", "gateway_url": "http://127.0.0.1:6080/"}))
    assert live_page_url(None, tmp_path) == "http://127.0.0.1:6080/"
    assert live_page_url("127.0.0.1:6000", tmp_path) == "http://127.0.0.1:6080/"
    assert live_page_url("127.0.0.1:7000", tmp_path) == DEFAULT_LIVE_URL  # another suite's file
