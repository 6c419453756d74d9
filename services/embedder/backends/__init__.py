"""Backends behind one interface (`base.py`), chosen by `EMBEDDER_BACKEND`.

Imports are lazy so a deployment only needs the dependencies of the backend it runs.
"""

from __future__ import annotations

from services.embedder.backends.base import EmbeddingBackend
from services.embedder.settings import EmbedderSettings


def create_backend(settings: EmbedderSettings) -> EmbeddingBackend:
    if settings.backend == "lite":
        from services.embedder.backends.lite import LiteBackend

        return LiteBackend.from_settings(settings)
    if settings.backend == "clip":
        from services.embedder.backends.clip import ClipBackend

        return ClipBackend.from_settings(settings)
    if settings.backend == "bge":
        from services.embedder.backends.bge import VisualizedBgeBackend

        return VisualizedBgeBackend.from_settings(settings)
    if settings.backend == "dashscope":
        from services.embedder.backends.dashscope import DashScopeBackend

        return DashScopeBackend.from_settings(settings)
    raise ValueError(f"unknown embedder backend {settings.backend!r}")
