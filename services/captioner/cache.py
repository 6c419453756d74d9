"""A bounded LRU of finished captions, so re-ingesting the same image does not pay twice.

Keyed by what determines the answer: the image content hash, the final prompt, the
language, the word limit and the model. Only successes are stored. Single event loop,
so no lock is needed.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Generic, TypeVar

from services.captioner import metrics

V = TypeVar("V")


@dataclass(frozen=True)
class CacheKey:
    image_sha256: str
    prompt: str
    language: str
    max_words: int
    model_id: str


class CaptionCache(Generic[V]):
    def __init__(self, max_entries: int) -> None:
        self.max_entries = max(0, max_entries)
        self._data: OrderedDict[CacheKey, V] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: CacheKey) -> V | None:
        if not self.enabled:
            return None
        value = self._data.get(key)
        if value is None:
            metrics.CACHE_MISSES.inc()
            return None
        self._data.move_to_end(key)
        metrics.CACHE_HITS.inc()
        return value

    def put(self, key: CacheKey, value: V) -> None:
        if not self.enabled:
            return
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)
        metrics.CACHE_ENTRIES.set(len(self._data))

    def clear(self) -> None:
        self._data.clear()
        metrics.CACHE_ENTRIES.set(0)
