"""One ImageNet classifier behind both lite backends, with a small LRU cache of class
probabilities keyed by the SHA-256 of the image's encoded bytes.

Ingest captions an image, then embeds the same bytes: the second call finds the
probabilities here and runs no forward (and, when both contracts decode alike, no
decode either). Forwards run on the embedder engine's model threads (EMBEDDER_MODEL_THREADS).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import numpy as np
from prometheus_client import Counter

CLASSIFIER_IMAGES = Counter(
    "models_classifier_images_total",
    "Images run through the shared ImageNet classifier (one forward row each)",
)
CLASSIFIER_CACHE = Counter(
    "models_classifier_cache_total",
    "Class-probability cache lookups of the shared classifier, by result",
    ["result"],
)


@dataclass(frozen=True)
class KeyedImage:
    """An image on its way to the classifier: the SHA-256 of its bytes, and either its
    preprocessed pixels (HWC float32) or its class probabilities already known."""

    key: str
    pixels: np.ndarray | None = None
    probs: np.ndarray | None = None


class SharedClassifier:
    def __init__(self, cache_size: int) -> None:
        self.cache_size = cache_size
        self.classifier: Any = None  # services.lite_models.imagenet.ImageNetClassifier, once loaded
        self.executor: Executor | None = None  # the embedder engine's model thread(s)
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def attach(self, classifier: Any) -> None:
        self.classifier = classifier

    def lookup(self, key: str) -> np.ndarray | None:
        """The cached probabilities of an image (counted as a hit or a miss)."""
        row = self._get(key)
        CLASSIFIER_CACHE.labels("hit" if row is not None else "miss").inc()
        return row

    def _get(self, key: str) -> np.ndarray | None:
        with self._lock:
            row = self._cache.get(key)
            if row is not None:
                self._cache.move_to_end(key)
        return row

    def _put(self, key: str, row: np.ndarray) -> None:
        with self._lock:
            self._cache[key] = row
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    def probs(self, items: Sequence[KeyedImage]) -> np.ndarray:
        """[N, 1000] class probabilities; one batched forward for the items not known yet.
        Runs on a model thread. Two at once may both compute an image neither found cached
        (a caption and an Embed of it in flight together): the same row, stored twice."""
        import torch

        out: list[np.ndarray | None] = [item.probs for item in items]
        todo = [i for i, row in enumerate(out) if row is None]
        for i in list(todo):  # filled by another call since this item was prepared
            row = self._get(items[i].key)
            if row is not None:
                out[i] = row
                todo.remove(i)
        if todo:
            pixels = np.stack([items[i].pixels for i in todo])  # type: ignore[misc]
            tensor = torch.from_numpy(pixels).permute(0, 3, 1, 2)  # NHWC buffer = channels_last
            probs = self.classifier.forward_proba(tensor)
            CLASSIFIER_IMAGES.inc(len(todo))
            for j, i in enumerate(todo):
                row = np.array(probs[j], dtype=np.float32)
                self._put(items[i].key, row)
                out[i] = row
        return np.stack(out)  # type: ignore[arg-type]
