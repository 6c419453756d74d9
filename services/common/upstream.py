"""One kit for calling a remote model API (DashScope, OpenAI-compatible endpoints).

Every remote backend (the embedder's DashScope backend, the captioner's DashScope and
OpenAI-compatible backends) is only the protocol of its upstream: one attempt, which
raises `UpstreamError` classified by `kind`. Everything around the attempt lives here,
once:

- **classification** — `UpstreamError` kinds, `kind_for_status` (HTTP status) and
  `dashscope_kind` (DashScope's error codes), and the one table from kind to domain
  error (`UpstreamError.to_service_error`);
- **secret scrubbing** — `scrub`; `UpstreamCaller` scrubs every upstream message it
  logs or returns of the secrets it was given (the API key);
- **retries** — exponential backoff with full jitter, bounded by attempts and a time
  budget that never outlives the caller's `Deadline` (`services/common/retries.py`,
  on tenacity);
- **a concurrency limit** — at most `max_concurrency` attempts in flight; up to
  `max_waiting` more calls wait (None: no bound), beyond that a call is `Overloaded` at
  once. A slot is held per attempt, never while sleeping between attempts;
- **the deadline** — waiting, attempts and backoff all end at the caller's deadline;
  each attempt's timeout is `request_timeout_s` capped by the time left;
- **image upload** — `reencode_for_upload` and `data_uri`.

No gRPC here: errors are services.common `ServiceError`s.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any, Literal, TypeVar

from PIL import Image
from tenacity import RetryCallState

from services.common.deadline import Deadline
from services.common.errors import DeadlineExceeded, InvalidInput, Overloaded, ServiceError, UpstreamExhausted
from services.common.images import DecodedImage
from services.common.log import get_logger
from services.common.retries import upstream_retrying
from services.common.settings import RetrySettings

log = get_logger(__name__)
T = TypeVar("T")

# --- classification ---------------------------------------------------------------------

ErrorKind = Literal["rate_limited", "server", "timeout", "connection", "rejected", "auth", "malformed"]
RETRYABLE: frozenset[str] = frozenset({"rate_limited", "server", "timeout", "connection"})


class UpstreamError(Exception):
    """One failed attempt, classified so the retry policy and the domain error follow.

    `message` is what the upstream said; `UpstreamCaller` scrubs secrets from it before
    it is logged or returned.
    """

    def __init__(self, kind: ErrorKind, message: str, status: int | None = None, code: str | None = None) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind: ErrorKind = kind
        self.message = message
        self.status = status
        self.code = code

    @property
    def retryable(self) -> bool:
        return self.kind in RETRYABLE

    def describe(self) -> str:
        parts = []
        if self.status is not None:
            parts.append(f"HTTP {self.status}")
        if self.code:
            parts.append(str(self.code))
        head = " ".join(parts)
        return f"{head}: {self.message}" if head else self.message

    def to_service_error(self, upstream: str, attempts: int) -> ServiceError:
        """The domain error once retries are over (the contract in the protos and docs)."""
        what = self.describe()
        tries = f" after {attempts} attempt{'s' if attempts != 1 else ''}"
        if self.kind == "rejected":
            return InvalidInput(f"{upstream} rejected the request: {what}")
        if self.kind == "rate_limited":
            return Overloaded(f"{upstream} is rate limiting us{tries}: {what}")
        if self.kind == "timeout":
            return DeadlineExceeded(f"{upstream} did not answer in time{tries}: {what}")
        # UpstreamExhausted: our retries are spent (or cannot help); callers' gRPC retry
        # policies must not multiply them.
        if self.kind == "auth":
            return UpstreamExhausted(
                f"{upstream} refused the server's credentials or model (check configuration): {what}")
        if self.kind == "malformed":
            return UpstreamExhausted(f"{upstream} returned a malformed response: {what}")
        return UpstreamExhausted(f"{upstream} is unavailable{tries}: {what}")


def kind_for_status(status: int) -> ErrorKind:
    """Default classification of an HTTP status from a model endpoint."""
    if status == 429:
        return "rate_limited"
    if status == 408:
        return "timeout"
    if status in (409, 425) or status >= 500:
        return "server"
    if status in (401, 403, 404):
        return "auth"
    return "rejected"  # 400, 413, 415, 422: this input is not acceptable


# DashScope error codes (the `code` field of an error body) that decide the outcome
# regardless of the HTTP status.
_DS_REJECTED = ("DataInspectionFailed", "InvalidParameter", "InvalidImage", "InvalidInput", "BadRequest")
_DS_AUTH = ("InvalidApiKey", "AccessDenied", "Arrearage", "ModelNotFound", "Model.AccessDenied", "Unauthorized")
_DS_THROTTLE = ("Throttling", "RateQuota", "LimitRequests")
_DS_SERVER = ("InternalError", "ServiceUnavailable", "SystemError", "ModelUnavailable", "ModelServingError")


def dashscope_kind(status: int, code: str | None) -> ErrorKind:
    """Classification of a DashScope error answer (its code first, then the status)."""
    code = code or ""
    if code.startswith(_DS_THROTTLE) or "Throttling" in code:
        return "rate_limited"
    if code.startswith(_DS_AUTH):
        return "auth"
    if code.startswith(_DS_REJECTED) or "DataInspection" in code:
        return "rejected"
    if code.startswith(_DS_SERVER):
        return "server"
    return kind_for_status(status)


def scrub(message: object, *secrets: str | None) -> str:
    """The upstream's message as text, with any secret replaced and length bounded."""
    text = message if isinstance(message, str) else repr(message)
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    text = " ".join(text.split())
    return text if len(text) <= 500 else text[:500] + "…"


# --- image upload -----------------------------------------------------------------------

#: Formats every OpenAI-compatible / DashScope VLM endpoint accepts as a data URI.
VLM_UPLOAD_FORMATS: Mapping[str, str] = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
#: Formats DashScope's multimodal-embedding API accepts as a data URI.
DASHSCOPE_EMBEDDING_FORMATS: Mapping[str, str] = {"JPEG": "image/jpeg", "PNG": "image/png", "BMP": "image/bmp"}

_QUALITIES = (90, 75, 60, 45)
_MIN_SIDE = 64


def reencode_for_upload(
    decoded: DecodedImage,
    data: bytes,
    *,
    max_bytes: int,
    max_side: int | None = None,
    formats: Mapping[str, str] = VLM_UPLOAD_FORMATS,
) -> tuple[bytes, str]:
    """The bytes and MIME type to send upstream.

    The caller's bytes when they are small enough (`max_bytes`, `max_side` of the source
    image) and in one of `formats`; otherwise a JPEG of the decoded image with the long
    side capped at `max_side`, at falling quality and then smaller sizes until it fits
    `max_bytes` (or the long side reaches 64 px).
    """
    mime = formats.get(decoded.format or "")
    if mime is not None and len(data) <= max_bytes and (max_side is None or max(decoded.source_size) <= max_side):
        return data, mime
    img = decoded.image  # possibly already shrunk at decode (PixelNeed)
    if max_side is not None and max(img.size) > max_side:
        img = img.copy()
        img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    qualities = iter(_QUALITIES)
    quality = next(qualities)
    while True:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        out = buf.getvalue()
        if len(out) <= max_bytes:
            return out, "image/jpeg"
        lower = next(qualities, None)
        if lower is not None:
            quality = lower
            continue
        if max(img.size) <= _MIN_SIDE:
            return out, "image/jpeg"
        scale = max(0.5, min(0.9, (max_bytes / len(out)) ** 0.5))
        img = img.resize((max(1, int(img.width * scale)), max(1, int(img.height * scale))), Image.Resampling.LANCZOS)


def data_uri(payload: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(payload).decode('ascii')}"


# --- the caller -------------------------------------------------------------------------


class UpstreamObserver:
    """Metrics hooks of an `UpstreamCaller`; each service counts in its own series.

    The defaults do nothing."""

    def attempt_outcome(self, error: UpstreamError | None) -> None:
        """After each attempt that got an answer or an `UpstreamError` (None: success)."""

    def attempt_seconds(self, seconds: float) -> None:
        """After every attempt, also one cut off by the deadline."""

    def retrying(self, error: BaseException | None) -> None:
        """Before each backoff sleep."""

    def inflight(self, delta: int) -> None:
        """Attempts holding a slot."""

    def waiting(self, delta: int) -> None:
        """Calls waiting for a slot."""


def _retryable(error: BaseException) -> bool:
    return isinstance(error, UpstreamError) and error.retryable


class UpstreamCaller:
    """Runs attempts against one upstream the bounded way (see the module docstring).

    `name` names the upstream in log lines and error messages ("dashscope", "openai").
    `secrets` (the API key) never appear in what is logged or returned.
    """

    def __init__(
        self,
        name: str,
        retry: RetrySettings,
        *,
        max_concurrency: int,
        request_timeout_s: float,
        max_waiting: int | None = None,
        secrets: Iterable[str | None] = (),
        observer: UpstreamObserver | None = None,
    ) -> None:
        self.name = name
        self.retry = retry
        self.max_concurrency = max_concurrency
        self.max_waiting = max_waiting
        self.request_timeout_s = request_timeout_s
        self.secrets = tuple(s for s in secrets if s)
        self.observer = observer or UpstreamObserver()
        self._semaphore: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiting = 0

    def scrub(self, message: object) -> str:
        return scrub(message, *self.secrets)

    def _sem(self) -> asyncio.Semaphore:
        # One semaphore per serving loop (tests start several loops in one process).
        loop = asyncio.get_running_loop()
        if self._semaphore is None or self._loop is not loop:
            self._semaphore, self._loop = asyncio.Semaphore(self.max_concurrency), loop
        return self._semaphore

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        semaphore = self._sem()
        if semaphore.locked():
            if self.max_waiting is not None and self._waiting >= self.max_waiting:
                raise Overloaded(
                    f"the {self.name} upstream is at its concurrency limit ({self.max_concurrency} in flight, "
                    f"{self._waiting} waiting); retry later"
                )
            self._waiting += 1
            self.observer.waiting(1)
            try:
                await semaphore.acquire()
            finally:
                self._waiting -= 1
                self.observer.waiting(-1)
        else:
            await semaphore.acquire()
        self.observer.inflight(1)
        try:
            yield
        finally:
            self.observer.inflight(-1)
            semaphore.release()

    def _before_sleep(self, state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        self.observer.retrying(error)
        log.warning(
            f"{self.name} call failed; retrying",
            upstream=self.name,
            attempt=state.attempt_number,
            error_kind=getattr(error, "kind", type(error).__name__),
            status=getattr(error, "status", None),
            code=getattr(error, "code", None),
            error=self.scrub(getattr(error, "message", str(error))),
            sleep_s=round(state.upcoming_sleep, 3),
        )

    async def call(
        self, attempt: Callable[[float], Awaitable[T]], deadline: Deadline, *, retries: bool = True
    ) -> T:
        """Runs `attempt(timeout_s)` until it succeeds, fails for good, or time is up.

        `attempt` raises `UpstreamError` for upstream failures; anything else propagates
        as it is. Raises services.common errors only for upstream failures: the kind's
        domain error once retries are over, `DeadlineExceeded` when the deadline ends it,
        `Overloaded` when the wait line for a slot is full.
        """
        deadline.check(f"calling {self.name}")
        settings = self.retry if retries else self.retry.model_copy(update={"max_attempts": 1})
        attempts = 0
        result: Any = None
        try:
            async with asyncio.timeout(deadline.remaining()):
                # Gives up with the upstream's error rather than sleep past the deadline.
                retrying = upstream_retrying(settings, _retryable, deadline.remaining(), self._before_sleep)
                async for try_ in retrying:
                    with try_:
                        async with self._slot():
                            attempts += 1
                            timeout_s = deadline.cap(self.request_timeout_s)
                            assert timeout_s is not None
                            start = time.perf_counter()
                            try:
                                result = await attempt(timeout_s)
                            except UpstreamError as e:
                                e.message = self.scrub(e.message)
                                self.observer.attempt_outcome(e)
                                raise
                            finally:
                                self.observer.attempt_seconds(time.perf_counter() - start)
                            self.observer.attempt_outcome(None)
        except TimeoutError:
            raise DeadlineExceeded(
                f"{self.name} did not answer before the deadline "
                f"({attempts} attempt{'s' if attempts != 1 else ''})"
            ) from None
        except UpstreamError as e:
            if e.retryable and deadline.expired():
                raise DeadlineExceeded(
                    f"{self.name} did not answer before the deadline (last: {e.describe()})"
                ) from None
            raise e.to_service_error(self.name, attempts) from None
        return result
