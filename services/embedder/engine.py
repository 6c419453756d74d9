"""The embedding engine: validate -> decode + preprocess (worker pool) -> batcher -> vectors.

Domain logic only (no gRPC): the servicer hands it domain `Content` items and a deadline,
and maps the `ServiceError`s it raises to status codes. It owns the threads: one model
thread (all forwards of a local backend run there, in order) and a pool for image work.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image

from services.common.content import ComposedContent, Content, ImageContent, TextContent
from services.common.deadline import NO_DEADLINE, Deadline
from services.common.errors import DeadlineExceeded, InvalidInput, ServiceError, Unavailable, at_index
from services.common.images import decode_image
from services.common.intake import ImageIntake
from services.common.log import get_logger
from services.embedder import metrics
from services.embedder.backends.base import (
    BackendInfo,
    EmbeddingBackend,
    FatalModelError,
    LocalBackend,
    Modality,
    RemoteBackend,
)
from services.embedder.batching import ITEMS_TOTAL, DynamicBatcher
from services.embedder.settings import EmbedderSettings

log = get_logger(__name__)


def _warmup_png() -> bytes:
    gradient = np.linspace(0, 255, 96 * 96 * 3, dtype=np.float32).reshape(96, 96, 3).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(gradient).save(buf, format="PNG")
    return buf.getvalue()


class EmbeddingEngine:
    def __init__(self, settings: EmbedderSettings, backend: EmbeddingBackend) -> None:
        self.settings = settings
        self.backend = backend
        self.intake = ImageIntake(settings.images, settings.uris)
        self._model_thread: ThreadPoolExecutor | None = None
        self._workers: ThreadPoolExecutor | None = None
        self._batcher: DynamicBatcher | None = None
        self._info: BackendInfo | None = None
        self._failed: str | None = None
        self._consecutive_errors = 0

    # --- lifecycle -------------------------------------------------------------------------

    @property
    def info(self) -> BackendInfo:
        if self._info is None:
            raise Unavailable("the model is not loaded yet")
        return self._info

    @property
    def ready(self) -> bool:
        return self._info is not None and self._failed is None

    @property
    def batcher(self) -> DynamicBatcher:
        if self._batcher is None:
            raise Unavailable("the model is not loaded yet")
        return self._batcher

    @property
    def model_executor(self) -> ThreadPoolExecutor:
        """The thread(s) local forwards run on: one unless EMBEDDER_MODEL_THREADS says more
        (tests use it to hold the model busy)."""
        if self._model_thread is None:
            raise Unavailable("the model is not loaded yet")
        return self._model_thread

    async def start(self) -> None:
        """Loads the model, runs a warm-up batch, then starts batching."""
        loop = asyncio.get_running_loop()
        self._workers = ThreadPoolExecutor(self.settings.preprocess_workers, thread_name_prefix="embedder-prep")
        backend = self.backend
        if isinstance(backend, LocalBackend):
            self._model_thread = ThreadPoolExecutor(self.settings.model_threads, thread_name_prefix="embedder-model")
            started = time.perf_counter()
            await loop.run_in_executor(self._model_thread, backend.load)
            log.info("model loaded", backend=backend.name, seconds=round(time.perf_counter() - started, 2))
            in_flight = self.settings.model_threads
        elif isinstance(backend, RemoteBackend):
            await backend.start()
            in_flight = backend.max_in_flight
        else:  # pragma: no cover - programming error
            raise TypeError(f"unsupported backend type {type(backend).__name__}")
        info = backend.info
        if self.settings.model_id:
            info = BackendInfo(
                info.backend, self.settings.model_id, info.dimension, info.modalities, info.composed_native
            )
        if isinstance(backend, LocalBackend):
            await self._warm_up(info)
        self._batcher = DynamicBatcher(
            self._forward,
            max_batch_size=self.settings.max_model_batch_size,
            max_queue_delay_s=self.settings.max_queue_delay_s,
            regather_s=self.settings.batch_regather_ms / 1000.0,
            max_queue_items=self.settings.max_queue_items,
            max_in_flight=in_flight,
            batch_size_by_modality={
                m.value: n for m in info.modalities if (n := backend.max_batch_size(m)) is not None
            },
        )
        self._batcher.start()
        self._info = info
        metrics.set_model_info(info.backend, info.model_id, info.dimension)
        log.info(
            "embedder ready",
            backend=info.backend,
            model_id=info.model_id,
            dimension=info.dimension,
            modalities=[m.value for m in info.modalities],
        )

    async def _warm_up(self, info: BackendInfo) -> None:
        """One small batch per modality, so the first real call pays no lazy init."""
        assert isinstance(self.backend, LocalBackend) and self._model_thread is not None
        loop = asyncio.get_running_loop()
        png = _warmup_png()
        decoded = decode_image(png, self.settings.images, self.backend.pixel_need)
        started = time.perf_counter()
        for modality in info.modalities:
            if modality is Modality.TEXT:
                item = self.backend.preprocess_text("warm-up: a photo of a cat")
            elif modality is Modality.IMAGE:
                item = self.backend.preprocess_image(decoded, png)
            else:
                item = self.backend.preprocess_composed(decoded, png, "the same in red")
            vectors = await loop.run_in_executor(self._model_thread, self.backend.forward, modality, [item, item])
            if vectors.shape != (2, info.dimension) or not np.all(np.isfinite(vectors)):
                raise RuntimeError(f"warm-up of {modality} returned {vectors.shape}, expected (2, {info.dimension})")
        log.info("warm-up done", seconds=round(time.perf_counter() - started, 2))

    async def stop(self) -> None:
        if self._batcher is not None:
            await self._batcher.stop()
        await self.intake.aclose()
        await self.backend.aclose()
        for pool in (self._workers, self._model_thread):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)

    def mark_failed(self, reason: str) -> None:
        if self._failed is None:
            log.error("model failed; health turns NOT_SERVING", reason=reason)
        self._failed = reason

    # --- embedding -------------------------------------------------------------------------

    def validate(self, items: Sequence[Content]) -> None:
        """Cheap checks before anything is admitted; errors name the item index."""
        limit = self.settings.max_batch_items
        if not items:
            raise InvalidInput(f"items is empty: send 1 to {limit} items")
        if len(items) > limit:
            raise InvalidInput(f"too many items: {len(items)}, the limit is {limit} per call")
        info = self.info
        for i, item in enumerate(items):
            try:
                if isinstance(item, TextContent):
                    self._check_text(item.text, "text")
                elif isinstance(item, ComposedContent):
                    if Modality.COMPOSED not in info.modalities and Modality.IMAGE not in info.modalities:
                        raise InvalidInput(f"the {info.backend} backend does not embed composed items")
                    self._check_text(item.instruction, "composed.instruction")
                elif isinstance(item, ImageContent) and Modality.IMAGE not in info.modalities:
                    raise InvalidInput(f"the {info.backend} backend does not embed images")
            except ServiceError as e:
                raise at_index(i, e) from None

    def _check_text(self, text: str, field: str) -> None:
        if not text or not text.strip():
            raise InvalidInput(f"{field} is empty")
        if len(text) > self.settings.max_text_chars:
            raise InvalidInput(
                f"{field} is {len(text)} characters, more than the limit of {self.settings.max_text_chars}"
            )

    async def embed(self, items: Sequence[Content], deadline: Deadline = NO_DEADLINE) -> np.ndarray:
        """Vectors [len(items), dimension] in request order, L2-normalised."""
        if self._failed is not None:
            raise Unavailable(f"the model has failed and is not serving: {self._failed}")
        batcher = self.batcher
        self.validate(items)
        if deadline.expired():
            raise DeadlineExceeded("deadline exceeded before embedding started")
        native = self.info.composed_native
        model_items = sum(2 if isinstance(c, ComposedContent) and not native else 1 for c in items)
        with batcher.admit(model_items) as admission:
            prepared = await self._preprocess_all(items)
            # Group by the queue each item (or part of it) goes to, remembering positions.
            groups: dict[Modality, list[Any]] = {m: [] for m in Modality}
            where: list[tuple[Any, ...]] = []
            for item, prep in zip(items, prepared, strict=True):
                if isinstance(item, TextContent):
                    where.append((Modality.TEXT, len(groups[Modality.TEXT])))
                    groups[Modality.TEXT].append(prep)
                elif isinstance(item, ImageContent):
                    where.append((Modality.IMAGE, len(groups[Modality.IMAGE])))
                    groups[Modality.IMAGE].append(prep)
                elif native:
                    where.append((Modality.COMPOSED, len(groups[Modality.COMPOSED])))
                    groups[Modality.COMPOSED].append(prep)
                else:
                    image_prep, text_prep = prep
                    where.append((None, len(groups[Modality.IMAGE]), len(groups[Modality.TEXT])))
                    groups[Modality.IMAGE].append(image_prep)
                    groups[Modality.TEXT].append(text_prep)
            modalities = [m for m in Modality if groups[m]]
            if len(modalities) == 1:  # the common case: no extra task for a gather
                results = [await admission.run(modalities[0], groups[modalities[0]], deadline)]
            else:
                results = await asyncio.gather(*(admission.run(m, groups[m], deadline) for m in modalities))
        vectors = dict(zip(modalities, results, strict=True))
        out = np.empty((len(items), self.info.dimension), dtype=np.float32)
        composed_rows: list[int] = []
        for row, (item, pos) in enumerate(zip(items, where, strict=True)):
            if pos[0] is None:
                composed_rows.append(row)
            else:
                out[row] = vectors[pos[0]][pos[1]]
        if composed_rows:
            img = np.stack([vectors[Modality.IMAGE][where[r][1]] for r in composed_rows])
            txt = np.stack([vectors[Modality.TEXT][where[r][2]] for r in composed_rows])
            weights = np.array([self._instruction_weight(items[r]) for r in composed_rows], dtype=np.float32)
            out[composed_rows] = self.backend.compose(img, txt, weights)
        for item in items:
            ITEMS_TOTAL.labels(_modality_of(item).value).inc()
        return out

    def _instruction_weight(self, item: Content) -> float:
        assert isinstance(item, ComposedContent)
        return item.instruction_weight or self.settings.composed_instruction_weight

    async def _preprocess_all(self, items: Sequence[Content]) -> list[Any]:
        # Texts are prepared inline (cheap); images go to the worker pool concurrently.
        results: list[Any] = [None] * len(items)
        pending: dict[int, Any] = {}
        for i, item in enumerate(items):
            if isinstance(item, TextContent):
                results[i] = self.backend.preprocess_text(item.text)
            else:
                pending[i] = self._preprocess(i, item)
        if pending:
            done = await asyncio.gather(*pending.values(), return_exceptions=True)
            for i, result in zip(pending, done, strict=True):
                if isinstance(result, BaseException):
                    raise result  # the first failing item, by index, is reported
                results[i] = result
        return results

    async def _preprocess(self, index: int, item: Content) -> Any:
        backend = self.backend
        try:
            if isinstance(item, TextContent):
                return backend.preprocess_text(item.text)
            data = await self.intake.read(item.image)
            loop = asyncio.get_running_loop()
            if isinstance(item, ImageContent):
                return await loop.run_in_executor(self._workers, self._prepare_image, data)
            return await loop.run_in_executor(self._workers, self._prepare_composed, data, item.instruction)
        except ServiceError as e:
            raise at_index(index, e) from None

    def _prepare_image(self, data: bytes) -> Any:
        return self.backend.preprocess_image(decode_image(data, self.settings.images, self.backend.pixel_need), data)

    def _prepare_composed(self, data: bytes, instruction: str) -> Any:
        decoded = decode_image(data, self.settings.images, self.backend.pixel_need)
        if self.info.composed_native:
            return self.backend.preprocess_composed(decoded, data, instruction)
        return self.backend.preprocess_image(decoded, data), self.backend.preprocess_text(instruction)

    async def _forward(self, modality: str, batch: list[Any], deadline: Deadline) -> np.ndarray:
        """Runs one merged batch; tracks errors that mean the model cannot serve."""
        backend = self.backend
        try:
            if isinstance(backend, RemoteBackend):
                vectors = await backend.aforward(Modality(modality), batch, deadline)
            else:
                assert isinstance(backend, LocalBackend)
                loop = asyncio.get_running_loop()
                vectors = await loop.run_in_executor(
                    self._model_thread, backend.forward_safely, Modality(modality), batch
                )
        except ServiceError:
            raise  # upstream / input problems are the caller's outcome, not a model fault
        except FatalModelError as e:
            self.mark_failed(str(e))
            raise Unavailable(f"the model has failed: {e}") from e
        except Exception as e:
            self._consecutive_errors += 1
            log.exception("model forward failed", modality=modality, batch=len(batch))
            if self._consecutive_errors >= self.settings.fatal_error_threshold:
                self.mark_failed(f"{self._consecutive_errors} consecutive model errors, last: {type(e).__name__}")
            raise Unavailable(f"the model failed on this batch ({type(e).__name__}); retry") from e
        self._consecutive_errors = 0
        return np.asarray(vectors, dtype=np.float32)


def _modality_of(item: Content) -> Modality:
    if isinstance(item, TextContent):
        return Modality.TEXT
    if isinstance(item, ImageContent):
        return Modality.IMAGE
    return Modality.COMPOSED
