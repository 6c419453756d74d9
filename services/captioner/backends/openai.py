"""Any OpenAI-compatible chat-completions endpoint serving a vision model.

This is how teams self-host Qwen2.5-VL / Qwen3-VL (`vllm serve Qwen/Qwen2.5-VL-7B-Instruct`,
then CAPTIONER_BASE_URL=http://vllm:8000/v1); DashScope's compatible mode
(https://dashscope.aliyuncs.com/compatible-mode/v1) speaks it too. The image is an
`image_url` content part holding a data URI. The SDK's own retries are off
(`max_retries=0`): the shared upstream kit's retry policy is the only one
(services/common/upstream.py, which also scrubs the API key from every message).
"""

from __future__ import annotations

from typing import Any

import openai
from openai import AsyncOpenAI

from services.captioner.backends.base import BackendCaption, CaptionBackend, CaptionJob
from services.captioner.settings import CaptionerSettings
from services.common.upstream import UpstreamError, kind_for_status

#: vLLM without --api-key accepts any key, but the SDK insists on one.
PLACEHOLDER_KEY = "EMPTY"


def _error_message(error: openai.APIStatusError) -> tuple[str, str | None]:
    """(message, code) from an OpenAI-style `{"error": {...}}` or vLLM-style body."""
    body: Any = error.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            message = inner.get("message") or error.message
            code = inner.get("code") or inner.get("type")
            return str(message), (str(code) if code is not None else None)
        if isinstance(inner, str):
            return inner, None
    return error.message, None


class OpenAIBackend(CaptionBackend):
    name = "openai"

    def __init__(self, settings: CaptionerSettings) -> None:
        self.model_id = settings.model_name
        self._api_key = settings.api_key.get_secret_value() if settings.api_key else None
        self._base_url = settings.base_url or None
        self._max_tokens = settings.max_output_tokens
        self._temperature = settings.temperature
        self._timeout_s = settings.request_timeout_s
        self._client: AsyncOpenAI | None = None

    async def start(self) -> None:
        self._client = AsyncOpenAI(
            api_key=self._api_key or PLACEHOLDER_KEY,
            base_url=self._base_url,
            max_retries=0,
            timeout=self._timeout_s,
        )

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def caption(self, job: CaptionJob, timeout_s: float) -> BackendCaption:
        if self._client is None:
            await self.start()
        assert self._client is not None
        extra: dict[str, Any] = {}
        if self._temperature is not None:
            extra["temperature"] = self._temperature
        try:
            completion = await self._client.chat.completions.create(
                model=self.model_id,
                messages=[
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": job.data_uri}},
                            {"type": "text", "text": job.prompt},
                        ],
                    }
                ],
                max_tokens=self._max_tokens,
                timeout=timeout_s,
                **extra,
            )
        except openai.APITimeoutError:
            raise UpstreamError("timeout", f"no answer within {timeout_s:.1f}s") from None
        except openai.APIConnectionError as e:
            raise UpstreamError("connection", str(e.__cause__ or e)) from None
        except openai.APIResponseValidationError as e:
            raise UpstreamError("malformed", e.message, status=e.status_code) from None
        except openai.APIStatusError as e:
            message, code = _error_message(e)
            raise UpstreamError(
                kind_for_status(e.status_code), str(message), status=e.status_code, code=code
            ) from None
        except ValueError as e:  # a body that is not JSON
            raise UpstreamError("malformed", f"{type(e).__name__}: {e}") from None
        try:
            text = completion.choices[0].message.content
        except (AttributeError, IndexError, TypeError) as e:
            raise UpstreamError("malformed", f"unexpected response shape ({type(e).__name__})") from None
        if not isinstance(text, str) or not text.strip():
            finish = getattr(completion.choices[0], "finish_reason", None) if completion.choices else None
            if finish == "content_filter":
                raise UpstreamError("rejected", "the model's content filter blocked the answer", code="content_filter")
            raise UpstreamError("malformed", "the response has no text content")
        return BackendCaption(raw_text=text)
