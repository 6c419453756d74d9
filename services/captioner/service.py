"""The captioning domain: validate, look up the cache, call the backend, parse, count.

No gRPC here: the servicer converts protobuf to these dataclasses and back, and errors
are services.common `ServiceError`s that the error-mapping interceptor turns into codes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field, replace

from services.captioner import metrics
from services.captioner.backends.base import CaptionBackend, CaptionJob
from services.captioner.cache import CacheKey, CaptionCache
from services.captioner.parsing import clean_keywords, limit_words, parse_caption
from services.captioner.settings import CaptionerSettings
from services.common.deadline import NO_DEADLINE, Deadline
from services.common.errors import DeadlineExceeded, InvalidInput, ServiceError
from services.common.images import DecodedImage, PixelNeed, decode_image, sha256_hex
from services.common.intake import ImageIntake, ImageRef
from services.common.log import get_logger
from services.common.upstream import UpstreamCaller, reencode_for_upload

log = get_logger(__name__)

LANGUAGE_INSTRUCTIONS = {
    "en": "Answer in English.",
    "zh": "请用简体中文回答。",
}


@dataclass(frozen=True)
class CaptionRequest:
    image: ImageRef
    prompt: str = ""  # empty: the configured default prompt
    language: str | None = None  # "en" / "zh"; None: the configured default
    max_words: int = 0  # 0: the configured default


@dataclass(frozen=True)
class Caption:
    description: str
    keywords: list[str] = field(default_factory=list)
    raw_text: str = ""
    model_id: str = ""
    cached: bool = False


@dataclass(frozen=True)
class ServiceInfo:
    backend: str
    model_id: str
    max_batch_items: int
    max_image_bytes: int


@dataclass(frozen=True)
class _Resolved:
    prompt: str
    language: str
    max_words: int


class CaptionService:
    def __init__(self, settings: CaptionerSettings, backend: CaptionBackend, intake: ImageIntake | None = None) -> None:
        self.settings = settings
        self.backend = backend
        self.intake = intake or ImageIntake(settings.images, settings.uris)
        self.cache: CaptionCache[Caption] = CaptionCache(settings.cache_size)
        # The one upstream kit: concurrency limit + wait line, retries, deadline, scrubbing.
        # The lite backend runs through it too (limit and deadline; never retried).
        self.upstream = UpstreamCaller(
            backend.name,
            settings.retry,
            max_concurrency=settings.max_concurrency,
            max_waiting=settings.max_waiting,
            request_timeout_s=settings.request_timeout_s,
            secrets=[settings.api_key.get_secret_value() if settings.api_key else None],
            observer=metrics.UpstreamMetrics(backend.name),
        )
        self._started = False

    # --- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        await self.backend.start()
        self._started = True
        metrics.set_model_info(self.backend.name, self.backend.model_id)
        log.info("captioner backend ready", backend=self.backend.name, model=self.backend.model_id)

    async def aclose(self) -> None:
        await self.backend.aclose()
        await self.intake.aclose()

    async def ready(self) -> bool:
        return self._started and self.backend.ready()

    def info(self) -> ServiceInfo:
        return ServiceInfo(
            self.backend.name, self.backend.model_id, self.settings.max_batch_items, self.settings.images.max_bytes
        )

    # --- captioning -----------------------------------------------------------------

    async def caption(self, request: CaptionRequest, deadline: Deadline = NO_DEADLINE) -> Caption:
        """One caption within the caller's `deadline` (and `call_deadline_s`)."""
        return await self._counted(self._caption(request, self._bound(deadline)))

    async def caption_batch(
        self, requests: Sequence[CaptionRequest], deadline: Deadline = NO_DEADLINE
    ) -> list[Caption | ServiceError]:
        """Each request gets its caption or its own error; one bad image fails nothing else."""
        self.check_batch_size(len(requests))
        bounded = self._bound(deadline)

        async def one(index: int, request: CaptionRequest) -> Caption | ServiceError:
            try:
                return await self._counted(self._caption(request, bounded))
            except ServiceError as e:
                return e
            except Exception:
                log.exception("caption failed", item=index, backend=self.backend.name)
                return ServiceError("internal error")

        return list(await asyncio.gather(*(one(i, r) for i, r in enumerate(requests))))

    def check_batch_size(self, n: int) -> None:
        if n == 0:
            raise InvalidInput("requests is empty (send 1 to max_batch_items requests)")
        if n > self.settings.max_batch_items:
            raise InvalidInput(f"batch has {n} requests, more than max_batch_items={self.settings.max_batch_items}")

    # --- internals ------------------------------------------------------------------

    def _bound(self, deadline: Deadline) -> Deadline:
        """The caller's deadline, or `call_deadline_s` from now when that comes first."""
        return deadline.sooner(self.settings.call_deadline_s)

    async def _counted(self, work: Awaitable[Caption]) -> Caption:
        outcome = "ok"
        try:
            return await work
        except ServiceError as e:
            outcome = e.kind.value
            raise
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except BaseException:
            outcome = "internal"
            raise
        finally:
            metrics.CAPTIONS.labels(self.backend.name, outcome).inc()

    def _resolve(self, request: CaptionRequest) -> _Resolved:
        s = self.settings
        if len(request.prompt) > s.max_prompt_chars:
            raise InvalidInput(
                f"prompt is {len(request.prompt)} characters, more than the limit of {s.max_prompt_chars}"
            )
        if request.max_words < 0 or request.max_words > s.max_words_limit:
            raise InvalidInput(f"max_words must be between 0 and {s.max_words_limit}, got {request.max_words}")
        if request.language not in (None, "en", "zh"):
            raise InvalidInput(f"unsupported language {request.language!r} (use en or zh)")
        language = request.language or s.default_language
        max_words = request.max_words or s.default_max_words
        custom = request.prompt.strip()
        if not custom:
            template = s.default_prompt_zh if language == "zh" else s.default_prompt
            return _Resolved(template.replace("{max_words}", str(max_words)), language, max_words)
        prompt = custom
        if "{max_words}" in prompt:
            prompt = prompt.replace("{max_words}", str(max_words))
        elif request.max_words:
            prompt += f"\nUse at most {max_words} words for the description."
        if request.language:
            prompt += "\n" + LANGUAGE_INSTRUCTIONS[language]
        return _Resolved(prompt, language, max_words)

    async def _caption(self, request: CaptionRequest, deadline: Deadline) -> Caption:
        resolved = self._resolve(request)
        try:
            async with asyncio.timeout(deadline.cap(None, floor=0.0)):
                data = await self.intake.read(request.image)
        except TimeoutError:
            raise DeadlineExceeded("deadline exceeded while reading the image") from None
        # The lite model ignores prompt and language: do not split its cache by them.
        prompt, language = (resolved.prompt, resolved.language) if self.backend.remote else ("", "")
        key = CacheKey(sha256_hex(data), prompt, language, resolved.max_words, self.backend.model_id)
        hit = self.cache.get(key)
        if hit is not None:
            return replace(hit, cached=True)

        job = await self._prepare(data, resolved, deadline)
        result = await self.upstream.call(
            lambda timeout_s: self.backend.caption(job, timeout_s),
            deadline,
            retries=self.backend.remote,
        )
        if result.description is not None:
            description, keywords = result.description, result.keywords or []
        else:
            parsed = parse_caption(result.raw_text, self.settings.max_keywords)
            description, keywords = parsed.description, parsed.keywords
        caption = Caption(
            description=limit_words(description, resolved.max_words),
            keywords=clean_keywords(keywords, self.settings.max_keywords),
            raw_text=result.raw_text,
            model_id=self.backend.model_id,
        )
        self.cache.put(key, caption)
        return caption

    async def _prepare(self, data: bytes, resolved: _Resolved, deadline: Deadline) -> CaptionJob:
        """Decodes (validating limits) and, for remote backends, encodes the upload; off the loop."""
        s = self.settings

        def work() -> CaptionJob:
            need = PixelNeed(long_side=s.upload_max_side_px) if self.backend.remote else self.backend.pixel_need
            decoded: DecodedImage = decode_image(data, s.images, need)
            upload, mime = b"", ""
            if self.backend.remote:
                upload, mime = reencode_for_upload(
                    decoded, data, max_bytes=s.upload_max_bytes, max_side=s.upload_max_side_px
                )
            return CaptionJob(decoded.image, resolved.prompt, resolved.language, resolved.max_words, upload, mime)

        try:
            async with asyncio.timeout(deadline.cap(None, floor=0.0)):
                return await asyncio.to_thread(work)
        except TimeoutError:
            raise DeadlineExceeded("deadline exceeded while decoding the image") from None
