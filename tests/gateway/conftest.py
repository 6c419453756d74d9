"""One real suite for every gateway test: `mmsearch up` (embedder, captioner, search with
embedded Milvus Lite and the offline lite models, and the gateway) with a bearer token,
a file root holding the sample photos, and the photos ingested through the gateway's own
NDJSON endpoint (by file:// URI, so they have thumbnails) plus one upload (inline bytes, no
thumbnail).
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from mmsearch.cli.demo import write_photos
from mmsearch.suite import free_port
from tests.cli.launcher_support import start_up
from tests.conftest import png_bytes

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "tok-gateway-tests-5c21"
START_TIMEOUT_S = 540
# Small bounds so the 413 tests send little.
MAX_BODY_BYTES = 2 * 1024 * 1024
MAX_UPLOAD_BYTES = 4 * 1024 * 1024
INLINE_ID = "gw-inline-red"


@dataclass
class GatewaySuite:
    base_url: str
    search_address: str
    token: str
    demo_dir: Path  # the file root: photos/ and queries/
    photos: Path
    queries: Path
    data_dir: Path
    log: Path

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def client(self, **kw: object) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=120, **kw)  # type: ignore[arg-type]


def _ingest_photos(suite: GatewaySuite) -> None:
    lines = []
    for path in sorted(suite.photos.glob("*.jpg")):
        lines.append(json.dumps({"id": path.stem, "image": {"uri": path.as_uri()},
                                 "metadataJson": json.dumps({"label": path.stem})}))
    with suite.client() as http:
        reply = http.post("/v1/ingest", content="\n".join(lines) + "\n", headers=suite.auth)
        assert reply.status_code == 200, reply.text
        outcomes = [o for line in reply.text.splitlines() for o in json.loads(line)["result"]["outcomes"]]
        assert len(outcomes) == len(lines)
        bad = [o for o in outcomes if o["status"] not in ("ITEM_STATUS_STORED", "ITEM_STATUS_UNCHANGED")]
        assert not bad, bad
        # One item as inline bytes (an upload): it has no file, so no thumbnail.
        reply = http.post("/v1/ingest/upload", headers=suite.auth,
                          files=[("file", ("red.png", png_bytes(64, 48, (220, 20, 20)), "image/png"))],
                          data={"metadata_json": json.dumps({"label": "inline"})})
        assert reply.status_code == 200, reply.text
        (outcome,) = [o for line in reply.text.splitlines() for o in json.loads(line)["result"]["outcomes"]]
        assert outcome["status"] in ("ITEM_STATUS_STORED", "ITEM_STATUS_UNCHANGED"), reply.text


@pytest.fixture(scope="session")
def gateway_suite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewaySuite]:
    base = tmp_path_factory.mktemp("gateway-suite")
    demo_dir = base / "demo"
    write_photos(demo_dir)
    data_dir = base / "var"
    ports = {name: free_port() for name in ("search", "embedder", "captioner", "http")}
    log = base / "up.log"
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "SEARCH_AUTH_TOKENS": TOKEN,
           "GATEWAY_MAX_BODY_BYTES": str(MAX_BODY_BYTES), "GATEWAY_MAX_UPLOAD_BYTES": str(MAX_UPLOAD_BYTES),
           "SEARCH_SHUTDOWN_GRACE_S": "2", "GATEWAY_SHUTDOWN_GRACE_S": "2"}
    proc, state = start_up(data_dir, [
        "--file-root", str(demo_dir), "--no-metrics", "--start-timeout", str(START_TIMEOUT_S),
        "--search-port", str(ports["search"]), "--embedder-port", str(ports["embedder"]),
        "--captioner-port", str(ports["captioner"]), "--http-port", str(ports["http"]),
    ], services=3, log=log, timeout_s=START_TIMEOUT_S, env=env)  # models (embedder + captioner), search, gateway
    try:
        assert state["gateway_url"] == f"http://127.0.0.1:{ports['http']}/"
        suite = GatewaySuite(
            base_url=f"http://127.0.0.1:{ports['http']}", search_address=f"127.0.0.1:{ports['search']}",
            token=TOKEN, demo_dir=demo_dir, photos=demo_dir / "photos", queries=demo_dir / "queries",
            data_dir=data_dir, log=log,
        )
        _ingest_photos(suite)
        yield suite
    finally:
        proc.stop(grace_s=60)
