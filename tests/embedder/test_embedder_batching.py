"""The dynamic batcher alone (pure asyncio): merging, order, backpressure, deadlines."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Self

import grpc
import numpy as np
import pytest

from services.common.deadline import NO_DEADLINE, Deadline
from services.common.errors import DeadlineExceeded, Overloaded
from services.embedder.backends.clip import ClipBackend
from services.embedder.batching import DynamicBatcher
from tests.embedder.conftest import make_settings, metric, serve, text


class Model:
    """Records every batch; the vector of item x is [x, modality code]."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.batches: list[tuple[str, list[Any]]] = []
        self.gate: asyncio.Event | None = None
        self.in_flight = 0
        self.max_in_flight = 0

    async def forward(self, modality: str, items: list[Any], deadline: Deadline) -> np.ndarray:
        self.batches.append((modality, list(items)))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
        finally:
            self.in_flight -= 1
        code = 1.0 if modality == "text" else 2.0
        return np.array([[float(x), code] for x in items], dtype=np.float32)

    def seen(self) -> list[Any]:
        return [x for _m, items in self.batches for x in items]


def batcher(model: Model, **kw: Any) -> DynamicBatcher:
    opts: dict[str, Any] = {"max_batch_size": 8, "max_queue_delay_s": 0.02, "max_queue_items": 64}
    opts.update(kw)
    b = DynamicBatcher(model.forward, **opts)
    b.start()
    return b


async def call(b: DynamicBatcher, modality: str, items: list[Any], deadline: Deadline = NO_DEADLINE) -> np.ndarray:
    with b.admit(len(items)) as admission:
        return await admission.run(modality, items, deadline)


async def test_concurrent_callers_are_merged_and_get_their_own_results() -> None:
    model = Model(delay_s=0.01)
    b = batcher(model)
    try:
        results = await asyncio.gather(*(call(b, "text", [i]) for i in range(40)))
    finally:
        await b.stop()
    for i, out in enumerate(results):
        assert out.tolist() == [[float(i), 1.0]]
    sizes = [len(items) for _m, items in model.batches]
    assert sum(sizes) == 40
    assert max(sizes) == 8 and len(sizes) <= 8  # merged, never above max_batch_size
    assert b.depth == 0


async def test_a_large_call_is_split_across_batches_and_reassembled_in_order() -> None:
    model = Model()
    b = batcher(model, max_batch_size=4)
    try:
        out = await call(b, "image", list(range(10)))
    finally:
        await b.stop()
    assert out[:, 0].tolist() == list(range(10))
    assert [len(items) for _m, items in model.batches] == [4, 4, 2]


async def test_modalities_never_share_a_batch() -> None:
    model = Model(delay_s=0.005)
    b = batcher(model)
    try:
        texts, images = await asyncio.gather(
            asyncio.gather(*(call(b, "text", [i]) for i in range(10))),
            asyncio.gather(*(call(b, "image", [100 + i]) for i in range(10))),
        )
    finally:
        await b.stop()
    for modality, items in model.batches:
        assert all((x >= 100) == (modality == "image") for x in items)
    assert [t[0, 1] for t in texts] == [1.0] * 10 and [i[0, 1] for i in images] == [2.0] * 10


async def test_full_queue_is_refused_at_once() -> None:
    model = Model()
    model.gate = asyncio.Event()
    b = batcher(model, max_batch_size=2, max_queue_items=4, max_queue_delay_s=0.0)
    try:
        first = asyncio.create_task(call(b, "text", [0, 1]))  # taken by the (blocked) model
        await asyncio.sleep(0.01)
        queued = asyncio.create_task(call(b, "text", [2, 3, 4, 5]))  # fills the queue
        await asyncio.sleep(0.01)
        started = time.perf_counter()
        with pytest.raises(Overloaded, match="queue is full"):
            b.admit(1)
        # At once: not after the held model frees room. 0.5 s, not 10 ms: a loaded 2-core CI
        # box may deschedule the test process for longer than the call takes.
        assert time.perf_counter() - started < 0.5
        model.gate.set()
        assert (await first)[:, 0].tolist() == [0, 1]
        assert (await queued)[:, 0].tolist() == [2, 3, 4, 5]
        assert (await call(b, "text", [6]))[:, 0].tolist() == [6]  # room again
    finally:
        model.gate.set()
        await b.stop()


async def test_an_expired_request_is_never_computed() -> None:
    model = Model()
    model.gate = asyncio.Event()
    b = batcher(model, max_queue_delay_s=0.0)
    try:
        busy = asyncio.create_task(call(b, "text", [0]))
        await asyncio.sleep(0.01)
        late = asyncio.create_task(call(b, "text", [1], deadline=Deadline.after(0.05)))
        patient = asyncio.create_task(call(b, "text", [2], deadline=Deadline.after(30)))
        await asyncio.sleep(0.1)  # the first deadline passes while the model is busy
        model.gate.set()
        await busy
        with pytest.raises(DeadlineExceeded):
            await late
        assert (await patient)[:, 0].tolist() == [2]
    finally:
        model.gate.set()
        await b.stop()
    assert 1 not in model.seen()
    assert b.depth == 0


async def test_a_cancelled_caller_is_dropped_before_compute() -> None:
    model = Model()
    model.gate = asyncio.Event()
    b = batcher(model, max_queue_delay_s=0.0)
    try:
        busy = asyncio.create_task(call(b, "text", [0]))
        await asyncio.sleep(0.01)
        gone = asyncio.create_task(call(b, "text", [1]))
        await asyncio.sleep(0.01)
        gone.cancel()
        await asyncio.sleep(0.01)
        assert b.depth == 0  # its admission was released with the cancellation
        model.gate.set()
        await busy
        assert (await call(b, "text", [2]))[:, 0].tolist() == [2]
    finally:
        model.gate.set()
        await b.stop()
    assert 1 not in model.seen()


async def test_a_model_error_reaches_every_caller_of_the_batch_and_batching_goes_on() -> None:
    calls = 0

    async def flaky(modality: str, items: list[Any], deadline: Deadline) -> np.ndarray:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.sleep(0.02)
            raise RuntimeError("boom")
        return np.ones((len(items), 2), dtype=np.float32)

    b = DynamicBatcher(flaky, max_batch_size=8, max_queue_delay_s=0.01, max_queue_items=64)
    b.start()
    try:
        results = await asyncio.gather(*(call(b, "text", [i]) for i in range(3)), return_exceptions=True)
        assert all(isinstance(r, RuntimeError) for r in results)
        assert (await call(b, "text", [9])).shape == (1, 2)
    finally:
        await b.stop()


async def test_remote_style_batches_run_concurrently_up_to_max_in_flight() -> None:
    model = Model(delay_s=0.05)
    b = batcher(model, max_batch_size=2, max_in_flight=3, max_queue_delay_s=0.0)
    try:
        await asyncio.gather(*(call(b, "text", [i, i + 100]) for i in range(6)))
    finally:
        await b.stop()
    assert model.max_in_flight == 3


async def test_idle_model_waits_at_most_the_queue_delay() -> None:
    model = Model()
    b = batcher(model, max_queue_delay_s=0.05)
    try:
        started = time.perf_counter()
        await call(b, "text", [1])
        elapsed = time.perf_counter() - started
    finally:
        await b.stop()
    assert 0.04 <= elapsed < 0.5


async def closed_loop(b: DynamicBatcher, callers: int, calls_each: int, think_s: float) -> None:
    """Callers that each send their next 1-item call a little after the last answer (caller
    c after think_s * (1 + c): over a network the answers and next calls spread out too)."""

    async def caller(c: int) -> None:
        for i in range(calls_each):
            await call(b, "text", [c * 1000 + i])
            await asyncio.sleep(think_s * (1 + c))

    await asyncio.gather(*(caller(c) for c in range(callers)))


def mean_batch(model: Model, skip: int = 2) -> float:
    sizes = [len(items) for _m, items in model.batches[skip:]]
    return sum(sizes) / len(sizes)


async def test_regathering_keeps_closed_loop_callers_in_one_batch() -> None:
    # 8 callers, a 30 ms model, 1-8 ms from an answer to the next call: without regathering
    # the callers answered last are still on their way back when the others start, so
    # batches split into two halves for good; waiting for them keeps batches full.
    split, whole = Model(delay_s=0.03), Model(delay_s=0.03)
    for model, regather_s in ((split, 0.0), (whole, 0.05)):
        b = batcher(model, max_queue_delay_s=0.0, regather_s=regather_s)
        try:
            await closed_loop(b, callers=8, calls_each=12, think_s=0.001)
        finally:
            await b.stop()
    assert mean_batch(split) <= 6, [len(items) for _m, items in split.batches]
    assert mean_batch(whole) >= 7, [len(items) for _m, items in whole.batches]
    assert sorted(whole.seen()) == sorted(c * 1000 + i for c in range(8) for i in range(12))


async def test_a_lone_caller_never_waits_for_regathering() -> None:
    model = Model(delay_s=0.005)
    b = batcher(model, max_queue_delay_s=0.0, regather_s=5.0)
    try:
        started = time.perf_counter()
        for i in range(10):
            await call(b, "text", [i])
        elapsed = time.perf_counter() - started
    finally:
        await b.stop()
    assert elapsed < 2.0, "a batch of one caller must not open a regather window"
    assert all(len(items) == 1 for _m, items in model.batches)


# --- through the real gRPC service (tiny CLIP; the model thread is held busy on purpose) ---


class HeldModel:
    """Blocks the single model thread until released, and records what the model computed."""

    def __init__(self, served: Any, backend: ClipBackend, monkeypatch: pytest.MonkeyPatch) -> None:
        self.gate = threading.Event()
        self.computed: list[list[Any]] = []
        forward = backend.forward

        def spy(modality: Any, batch: list[Any]) -> np.ndarray:
            self.computed.append(list(batch))
            return forward(modality, batch)

        monkeypatch.setattr(backend, "forward", spy)
        served.engine.model_executor.submit(self.gate.wait)

    def release(self) -> None:
        self.gate.set()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release()  # also when the test fails: never leave the model thread blocked


async def wait_until(predicate: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def test_grpc_callers_are_merged_into_batches_in_order(
    clip_dir: Any, clip_backend: ClipBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(backend="clip", model_dir=clip_dir, max_model_batch_size=16)
    words = [f"{w}" for w in ("a", "the", "photo", "of", "cat", "dog", "red", "car")] * 2
    async with serve(settings, clip_backend) as served:
        alone = {w: (await served.embed(text(w))).embeddings[0].values for w in set(words)}
        batcher = served.engine.batcher
        with HeldModel(served, clip_backend, monkeypatch) as held:
            busy = asyncio.create_task(served.embed(text("photo")))  # occupies the held model
            await wait_until(lambda: batcher.in_flight == 1 and batcher.depth == 0)
            batches_before = metric("embedder_batch_size_count", modality="text")
            calls = [asyncio.create_task(served.embed(text(w))) for w in words]
            await wait_until(lambda: batcher.depth == len(words))
        replies = await asyncio.gather(*calls)
        await busy
    for w, reply in zip(words, replies, strict=True):
        np.testing.assert_allclose(reply.embeddings[0].values, alone[w], atol=1e-5)
    assert [len(b) for b in held.computed] == [1, len(words)]  # 16 callers, one forward
    assert metric("embedder_batch_size_count", modality="text") - batches_before == 1


async def test_grpc_full_queue_is_resource_exhausted_at_once(
    clip_dir: Any, clip_backend: ClipBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(
        backend="clip", model_dir=clip_dir, max_batch_items=4, max_model_batch_size=4, max_queue_items=8
    )
    async with serve(settings, clip_backend) as served:
        batcher = served.engine.batcher
        with HeldModel(served, clip_backend, monkeypatch) as held:
            first = asyncio.create_task(served.embed(*[text("a")] * 4))  # taken by the held model
            await wait_until(lambda: batcher.in_flight == 1 and batcher.depth == 0)
            waiting = [asyncio.create_task(served.embed(*[text("cat")] * 4)) for _ in range(2)]
            await wait_until(lambda: batcher.depth == 8)
            started = time.perf_counter()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await served.embed(text("dog"))
            assert time.perf_counter() - started < 1.0
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "queue is full" in caught.value.details()
            held.release()
            assert len((await first).embeddings) == 4
            assert all(len(r.embeddings) == 4 for r in await asyncio.gather(*waiting))
            assert len((await served.embed(text("dog"))).embeddings) == 1  # room again


async def test_grpc_expired_deadline_is_not_computed(
    clip_dir: Any, clip_backend: ClipBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(backend="clip", model_dir=clip_dir)
    async with serve(settings, clip_backend) as served:
        batcher = served.engine.batcher
        with HeldModel(served, clip_backend, monkeypatch) as held:
            busy = asyncio.create_task(served.embed(text("a")))
            await wait_until(lambda: batcher.in_flight == 1 and batcher.depth == 0)
            late = asyncio.create_task(served.embed(text("the red car"), timeout=0.3))
            patient = asyncio.create_task(served.embed(text("dog"), timeout=30))
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await late
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await asyncio.sleep(0.1)
            held.release()
            await busy
            assert len((await patient).embeddings) == 1
            await asyncio.sleep(0.05)
    computed = [t for batch in held.computed for t in batch]
    assert computed == ["a", "dog"]  # the expired call never reached the model
    assert batcher.depth == 0


async def test_a_modality_can_cap_its_own_batch_size() -> None:
    model = Model()
    b = batcher(model, max_batch_size=8, batch_size_by_modality={"image": 3})
    try:
        await asyncio.gather(call(b, "image", list(range(100, 107))), call(b, "text", list(range(7))))
    finally:
        await b.stop()
    assert max(len(items) for m, items in model.batches if m == "image") == 3
    assert max(len(items) for m, items in model.batches if m == "text") == 7


async def test_with_two_model_threads_a_forward_runs_while_the_other_thread_is_held(
    clip_dir: Any, clip_backend: ClipBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EMBEDDER_MODEL_THREADS=2 (the local suite's models process): two forwards at once.
    With one thread the held thread would block this call (the tests above rely on it)."""
    settings = make_settings(backend="clip", model_dir=clip_dir, model_threads=2)
    async with serve(settings, clip_backend) as served:
        alone = (await served.embed(text("a red car"))).embeddings[0].values
        with HeldModel(served, clip_backend, monkeypatch) as held:
            reply = await asyncio.wait_for(served.embed(text("a red car")), 10)
            assert len(held.computed) == 1  # computed while the other thread is held
        assert list(reply.embeddings[0].values) == pytest.approx(list(alone), abs=1e-6)
