"""A local server speaking DashScope's multimodal-embedding HTTP protocol.

The real API cannot be reached from tests, so this stands in for it on 127.0.0.1, with
the same path, headers, request body and response / error JSON:

  POST {base}/services/embeddings/multimodal-embedding/multimodal-embedding
  Authorization: Bearer <key>
  {"model": "multimodal-embedding-v1", "input": {"contents": [{"text": ...} | {"image": ...}]},
   "parameters": {}}
  200 {"output": {"embeddings": [{"index": 0, "embedding": [...], "type": "text"}]},
       "usage": {"input_tokens": 4, "image_count": 0, "duration": 0}, "request_id": "..."}
  4xx/5xx {"code": "Throttling.RateQuota", "message": "...", "request_id": "..."}

Vectors are deterministic per content (seeded by its hash), so tests can check that each
caller gets the vector of its own item. `script` queues canned failures for the next
requests; `requests` records what arrived.
"""

from __future__ import annotations

import hashlib
import json
import threading
import uuid
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

PATH = "/api/v1/services/embeddings/multimodal-embedding/multimodal-embedding"

THROTTLED = (429, {"code": "Throttling.RateQuota", "message": "Requests rate limit exceeded, please try again later."})
INTERNAL_ERROR = (
    500,
    {
        "code": "InternalError",
        "message": "An internal error has occured, please try again later or contact service support.",
    },
)
BAD_GATEWAY = (502, {"code": "InternalError.Timeout", "message": "Upstream model service timed out."})


def fake_vector(content: dict[str, str], dimension: int) -> np.ndarray:
    key = json.dumps(content, sort_keys=True).encode()
    seed = int.from_bytes(hashlib.sha256(key).digest()[:8], "little")
    return np.random.default_rng(seed).standard_normal(dimension).astype(np.float32)


@dataclass
class FakeDashScope:
    api_key: str
    dimension: int = 1024
    model: str = "multimodal-embedding-v1"
    max_contents: int = 20
    max_images: int = 1
    script: deque[tuple[int, dict[str, Any]]] = field(default_factory=deque)
    # Answer every request with this failure (a 5xx storm) when set.
    always: tuple[int, dict[str, Any]] | None = None
    requests: list[dict[str, Any]] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def base_url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/api/v1"

    def start(self) -> FakeDashScope:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status, payload = fake.handle(self.path, dict(self.headers), body)
                raw = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.send_header("X-Request-Id", payload.get("request_id", ""))
                self.end_headers()
                self.wfile.write(raw)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="fake-dashscope", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def calls(self) -> list[list[dict[str, str]]]:
        return [r["body"]["input"]["contents"] for r in self.requests if r["path"] == PATH]

    # --- protocol ----------------------------------------------------------------------

    def handle(self, path: str, headers: dict[str, str], raw: bytes) -> tuple[int, dict[str, Any]]:
        request_id = str(uuid.uuid4())
        try:
            body = json.loads(raw)
        except ValueError:
            return 400, {
                "code": "InvalidParameter",
                "message": "Request body is not valid JSON.",
                "request_id": request_id,
            }
        with self._lock:
            self.requests.append({"path": path, "headers": headers, "body": body})
            canned = self.script.popleft() if self.script else self.always
        if path != PATH:
            return 404, {"code": "NotFound", "message": f"No route for {path}", "request_id": request_id}
        auth = {k.lower(): v for k, v in headers.items()}.get("authorization", "")
        if auth != f"Bearer {self.api_key}":
            return 401, {"code": "InvalidApiKey", "message": "Invalid API-key provided.", "request_id": request_id}
        if canned is not None:
            status, payload = canned
            return status, {**payload, "request_id": request_id}
        if body.get("model") != self.model:
            return 400, {"code": "InvalidParameter", "message": "Model not exist.", "request_id": request_id}
        contents = (body.get("input") or {}).get("contents")
        if not isinstance(contents, list) or not contents:
            return 400, {"code": "InvalidParameter", "message": "input.contents is required", "request_id": request_id}
        images = sum(1 for c in contents if "image" in c)
        if len(contents) > self.max_contents or images > self.max_images:
            return 400, {
                "code": "InvalidParameter",
                "message": f"too many contents ({len(contents)}) or images ({images}) in one request",
                "request_id": request_id,
            }
        embeddings = []
        for i, content in enumerate(contents):
            kind = "image" if "image" in content else "text"
            if kind == "image" and not str(content["image"]).startswith(("data:image/", "http")):
                return 400, {
                    "code": "InvalidParameter",
                    "message": "image must be a URL or data URI",
                    "request_id": request_id,
                }
            embeddings.append({"index": i, "embedding": fake_vector(content, self.dimension).tolist(), "type": kind})
        tokens = sum(len(str(c.get("text", "")).split()) for c in contents)
        return 200, {
            "output": {"embeddings": embeddings},
            "usage": {"input_tokens": tokens, "image_count": images, "duration": 0},
            "request_id": request_id,
        }
