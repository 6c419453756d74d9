"""Local HTTP servers that speak DashScope's and OpenAI's chat protocols on the wire.

DashScope cannot be reached from tests, and a GPU vLLM is not around, so the real SDKs
talk to these instead. Each server validates the request the way the real endpoint
would (path, bearer key, message shape) and answers with scripted replies: the exact
JSON bodies of the real APIs, error bodies included, optionally after a delay.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

DASHSCOPE_PATH = "/api/v1/services/aigc/multimodal-generation/generation"
OPENAI_PATH = "/v1/chat/completions"


@dataclass
class Reply:
    status: int = 200
    body: Any = None  # dict -> JSON, str/bytes -> sent as is
    delay_s: float = 0.0
    content_type: str = "application/json"


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class FakeUpstream:
    """A threaded HTTP server on 127.0.0.1 with a queue of scripted replies.

    `script` replies are used first, in order; then `default` answers every request.
    """

    protocol: str  # "dashscope" or "openai"
    api_key: str
    text: str = "A cat sleeps on a sofa.\n\nKeywords: cat, sofa, sleeping, pet, indoor"
    script: deque[Reply] = field(default_factory=deque)
    requests: list[Recorded] = field(default_factory=list)
    default: Reply | None = None

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._release = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = None
                reply = fake._handle(self.path, dict(self.headers), body)
                if reply.delay_s:
                    fake._release.wait(reply.delay_s)
                payload = reply.body
                if isinstance(payload, (dict, list)):
                    payload = json.dumps(payload, ensure_ascii=False)
                if isinstance(payload, str):
                    payload = payload.encode()
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", reply.content_type)
                    self.send_header("Content-Length", str(len(payload or b"")))
                    self.end_headers()
                    self.wfile.write(payload or b"")
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (deadline): fine

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._server.block_on_close = False
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    # --- lifecycle ------------------------------------------------------------------

    def start(self) -> FakeUpstream:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()

    @property
    def base_url(self) -> str:
        """What CAPTIONER_BASE_URL is set to for this protocol."""
        port = self._server.server_address[1]
        return f"http://127.0.0.1:{port}/api/v1" if self.protocol == "dashscope" else f"http://127.0.0.1:{port}/v1"

    @property
    def calls(self) -> int:
        with self._lock:
            return len(self.requests)

    # --- protocol -------------------------------------------------------------------

    def _handle(self, path: str, headers: dict[str, str], body: Any) -> Reply:
        with self._lock:
            self.requests.append(Recorded(path, headers, body))
            scripted = self.script.popleft() if self.script else None
        expected = DASHSCOPE_PATH if self.protocol == "dashscope" else OPENAI_PATH
        if path != expected:
            return self.error(404, "NotFound", f"no route {path}")
        auth = {k.lower(): v for k, v in headers.items()}.get("authorization", "")
        if auth != f"Bearer {self.api_key}":
            return self.error(401, "InvalidApiKey", "Invalid API-key provided.")
        problem = self._validate(body)
        if problem:
            return self.error(400, "InvalidParameter", problem)
        if scripted is not None:
            return scripted
        return self.default or self.ok()

    def _validate(self, body: Any) -> str | None:
        try:
            if self.protocol == "dashscope":
                content = body["input"]["messages"][0]["content"]
                image = next(part["image"] for part in content if "image" in part)
                text = next(part["text"] for part in content if "text" in part)
            else:
                content = body["messages"][0]["content"]
                image = next(p["image_url"]["url"] for p in content if p["type"] == "image_url")
                text = next(p["text"] for p in content if p["type"] == "text")
            if not body.get("model"):
                return "Model not specified"
        except (KeyError, TypeError, IndexError, StopIteration):
            return "messages must hold an image and a text part"
        if not str(image).startswith("data:image/") or ";base64," not in str(image):
            return "image must be a base64 data URI"
        if not text:
            return "text must not be empty"
        return None

    def ok(self, text: str | None = None) -> Reply:
        text = self.text if text is None else text
        request_id = str(uuid.uuid4())
        if self.protocol == "dashscope":
            return Reply(
                200,
                {
                    "output": {
                        "choices": [
                            {
                                "finish_reason": "stop",
                                "message": {"role": "assistant", "content": [{"text": text}]},
                            }
                        ]
                    },
                    "usage": {"input_tokens": 1266, "output_tokens": 41, "image_tokens": 1230},
                    "request_id": request_id,
                },
            )
        return Reply(
            200,
            {
                "id": f"chatcmpl-{request_id}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": "Qwen/Qwen2.5-VL-7B-Instruct",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text, "tool_calls": []},
                        "logprobs": None,
                        "finish_reason": "stop",
                        "stop_reason": None,
                    }
                ],
                "usage": {"prompt_tokens": 1266, "total_tokens": 1307, "completion_tokens": 41},
            },
        )

    def error(self, status: int, code: str, message: str, delay_s: float = 0.0) -> Reply:
        if self.protocol == "dashscope":
            body: dict[str, Any] = {"request_id": str(uuid.uuid4()), "code": code, "message": message}
        else:
            body = {"error": {"message": message, "type": code, "param": None, "code": code}}
        return Reply(status, body, delay_s)
