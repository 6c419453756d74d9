"""Qwen-VL on DashScope through the official `dashscope` SDK.

Uses `AioMultiModalConversation.call`, the asyncio twin of the tutorial's
`MultiModalConversation.call` (same SDK, same HTTP protocol: POST
{base}/services/aigc/multimodal-generation/generation), so a deadline cancels the HTTP
request instead of leaving a thread blocked. The base URL is passed per call
(`base_address`) rather than by mutating the process-wide `dashscope.base_http_api_url`.
The image goes inline as a data URI; the SDK's own retries are not used (one policy, ours:
services/common/upstream.py, which also scrubs the API key from every message).
"""

from __future__ import annotations

import json
import os
from http import HTTPStatus
from typing import Any

import aiohttp

from services.captioner.backends.base import BackendCaption, CaptionBackend, CaptionJob
from services.captioner.settings import CaptionerSettings
from services.common.errors import InvalidInput
from services.common.upstream import UpstreamError, dashscope_kind


def _response_text(output: Any) -> str:
    """The assistant text of a multimodal-generation response (list of content parts)."""
    choices = output["choices"] if isinstance(output, dict) else output.choices
    message = choices[0]["message"]
    content = message["content"]
    if isinstance(content, str):
        return content
    parts = [part.get("text", "") for part in content if isinstance(part, dict)]
    if not any(parts):
        raise ValueError("no text part in the response")
    return "".join(parts)


class DashScopeBackend(CaptionBackend):
    name = "dashscope"

    def __init__(self, settings: CaptionerSettings) -> None:
        self.model_id = settings.model_name
        self._api_key = settings.api_key.get_secret_value() if settings.api_key else None
        self._base_url = settings.base_url or None
        self._max_tokens = settings.max_output_tokens
        self._temperature = settings.temperature
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if not self._api_key:  # settings fall back to DASHSCOPE_API_KEY
            raise RuntimeError("the dashscope backend needs CAPTIONER_API_KEY (or DASHSCOPE_API_KEY)")
        # Our own session: closed with the service, bound to the serving event loop.
        self._session = aiohttp.ClientSession(trust_env=True)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def caption(self, job: CaptionJob, timeout_s: float) -> BackendCaption:
        from dashscope import AioMultiModalConversation

        _refuse_local_paths(job.prompt)
        messages = [{"role": "user", "content": [{"image": job.data_uri}, {"text": job.prompt}]}]
        extra: dict[str, Any] = {}
        if self._base_url:
            extra["base_address"] = self._base_url
        if self._temperature is not None:
            extra["temperature"] = self._temperature
        try:
            response = await AioMultiModalConversation.call(
                model=self.model_id,
                messages=messages,
                api_key=self._api_key,
                max_tokens=self._max_tokens,
                request_timeout=timeout_s,
                session=self._session,
                **extra,
            )
        except (TimeoutError, aiohttp.ServerTimeoutError) as e:
            raise UpstreamError("timeout", f"no answer within {timeout_s:.1f}s ({type(e).__name__})") from None
        except aiohttp.ClientConnectionError as e:
            raise UpstreamError("connection", str(e) or type(e).__name__) from None
        except (aiohttp.ContentTypeError, json.JSONDecodeError, ValueError, TypeError, KeyError) as e:
            raise UpstreamError("malformed", f"{type(e).__name__}: {e}") from None
        except aiohttp.ClientError as e:
            raise UpstreamError("connection", f"{type(e).__name__}: {e}") from None
        status = int(getattr(response, "status_code", 0) or 0)
        if status != HTTPStatus.OK:
            code = getattr(response, "code", None) or None
            message = str(getattr(response, "message", "") or "(no message)")
            raise UpstreamError(dashscope_kind(status, code), message, status=status, code=code)
        try:
            text = _response_text(response.output)
        except (AttributeError, KeyError, IndexError, TypeError, ValueError) as e:
            raise UpstreamError("malformed", f"unexpected response shape ({type(e).__name__}: {e})") from None
        return BackendCaption(raw_text=text)


def _refuse_local_paths(prompt: str) -> None:
    """The SDK uploads any message text that names a local file (or file:// URI) to
    DashScope's storage before the call. A caller's prompt must never do that."""
    candidate = prompt.strip()
    if candidate.startswith(("file://", "oss://")):
        raise InvalidInput("prompt must not be a file:// or oss:// reference")
    if len(candidate) < 4096 and "\n" not in candidate:
        try:
            if os.path.isfile(os.path.expanduser(candidate)):
                raise InvalidInput("prompt must not be a path to a file")
        except (OSError, ValueError):
            pass
