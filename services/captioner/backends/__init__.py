"""Captioning backends: one file each, chosen by `CAPTIONER_BACKEND`."""

from __future__ import annotations

from services.captioner.backends.base import BackendCaption, CaptionBackend, CaptionJob
from services.captioner.settings import CaptionerSettings
from services.common.upstream import UpstreamError

__all__ = ["BackendCaption", "CaptionBackend", "CaptionJob", "UpstreamError", "make_backend"]


def make_backend(settings: CaptionerSettings) -> CaptionBackend:
    """The configured backend (imported lazily: lite pulls in torch, the others do not)."""
    if settings.backend == "lite":
        from services.captioner.backends.lite import LiteBackend

        return LiteBackend(settings)
    if settings.backend == "dashscope":
        from services.captioner.backends.dashscope import DashScopeBackend

        return DashScopeBackend(settings)
    if settings.backend == "openai":
        from services.captioner.backends.openai import OpenAIBackend

        return OpenAIBackend(settings)
    raise ValueError(f"unknown captioner backend {settings.backend!r}")
