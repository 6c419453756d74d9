"""Offline captions from ImageNet: EfficientNet-Lite0's top labels as keywords.

It is a classifier, not a captioner, and says so: the description is a template that
names the top labels with their probabilities ("Possibly a tabby cat (39%) or an
Egyptian Mau (37%).") and admits it when nothing is likely. It always answers in
English (the class names are English) and ignores custom prompts. The model code and
weights are shared with the embedder's lite backend (services.lite_models).
"""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from services.captioner.backends.base import BackendCaption, CaptionBackend, CaptionJob
from services.captioner.parsing import clean_keywords
from services.captioner.settings import CaptionerSettings
from services.common.images import PixelNeed

if TYPE_CHECKING:
    from services.lite_models.imagenet import ImageNetClassifier

#: Top probability at or above which the description states the label plainly.
CONFIDENT = 0.6
#: Top probability below which the description says the image is unclear to the model.
UNSURE = 0.2


def _article(name: str) -> str:
    if name.lower().startswith(("a ", "an ", "the ")):
        return name
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def _pct(p: float) -> str:
    return f"{p * 100:.0f}%" if p >= 0.01 else "<1%"


def describe(top: list[tuple[str, float]]) -> str:
    """An honest one-sentence description of ranked (label, probability) pairs."""
    if not top:
        return "The image could not be recognised."
    (n1, p1), rest = top[0], top[1:]
    if p1 >= CONFIDENT:
        return f"Most likely {_article(n1)} ({_pct(p1)})."
    if p1 >= UNSURE:
        if rest and rest[0][1] >= UNSURE / 2:
            n2, p2 = rest[0]
            return f"Possibly {_article(n1)} ({_pct(p1)}) or {_article(n2)} ({_pct(p2)})."
        return f"Possibly {_article(n1)} ({_pct(p1)})."
    guesses = ", ".join(f"{n} ({_pct(p)})" for n, p in top[:3])
    return f"Unclear image; low-confidence guesses: {guesses}."


def _keyword(name: str) -> str:
    # "a cat having a striped coat" -> "cat having a striped coat"
    for art in ("a ", "an ", "the "):
        if name.lower().startswith(art):
            return name[len(art) :]
    return name


class LiteBackend(CaptionBackend):
    name = "lite"
    remote = False
    # The classifier centre-crops 224/256 of the short side to 224 px (lite_models/imagenet.py,
    # not imported here: it loads torch).
    pixel_need = PixelNeed(short_side=256)

    def __init__(self, settings: CaptionerSettings, classifier: ImageNetClassifier | None = None) -> None:
        self.top_k = settings.lite_top_k
        self.min_keyword_prob = settings.lite_min_keyword_prob
        self.max_keywords = settings.max_keywords
        self._classifier = classifier
        self.runtime = settings.lite_runtime
        self.model_id = classifier.model_id if classifier is not None else settings.model_name
        # The model runs on its own small pool: torch already uses several cores per run.
        self._pool = ThreadPoolExecutor(max_workers=settings.lite_threads, thread_name_prefix="captioner-lite")

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self._classifier is None:
            from services.lite_models.imagenet import ImageNetClassifier

            load = functools.partial(ImageNetClassifier, runtime=self.runtime)
            self._classifier = await loop.run_in_executor(self._pool, load)
            self.model_id = self._classifier.model_id
        # Warm-up: the first run pays for lazy init and allocation, not the first caller.
        warm = Image.new("RGB", (224, 224), (127, 127, 127))
        await loop.run_in_executor(self._pool, self._classifier.predict_proba, [warm])

    def ready(self) -> bool:
        return self._classifier is not None

    async def aclose(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def caption(self, job: CaptionJob, timeout_s: float) -> BackendCaption:
        classifier = self._classifier
        if classifier is None:
            raise RuntimeError("lite model is not loaded")
        loop = asyncio.get_running_loop()
        probs = await loop.run_in_executor(self._pool, classifier.predict_proba, [job.image])
        return self.caption_from_probs(classifier, probs[0])

    def caption_from_probs(self, classifier: ImageNetClassifier, row: np.ndarray) -> BackendCaption:
        """The caption of one image's class probabilities: its top labels, a templated
        description and the labels as keywords (also the models process' captions)."""
        top = classifier.top_k(row, self.top_k)
        names = [name for i, (name, p) in enumerate(top) if i == 0 or p >= self.min_keyword_prob]
        raw = "\n".join(f"{name}\t{p:.4f}" for name, p in top)
        return BackendCaption(
            raw_text=raw,
            description=describe(top),
            keywords=clean_keywords([_keyword(n) for n in names], self.max_keywords),
        )
