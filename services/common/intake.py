"""Image intake for servicers: inline bytes or a URI -> validated, decoded image."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

from services.common.errors import InvalidInput
from services.common.images import DecodedImage, decode_image
from services.common.settings import ImageLimits, UriSettings
from services.common.uris import UriFetcher


@dataclass(frozen=True)
class ImageRef:
    """An image as the caller gave it: exactly one of `data` and `uri`."""

    data: bytes | None = None
    uri: str | None = None


class ImageIntake:
    def __init__(self, limits: ImageLimits, uris: UriSettings) -> None:
        self.limits = limits
        self.fetcher = UriFetcher(uris, limits.max_bytes)

    async def read(self, ref: ImageRef) -> bytes:
        if ref.uri:
            return await self.fetcher.fetch(ref.uri)
        if ref.data is None:
            raise InvalidInput("image is missing (set image.data or image.uri)")
        return ref.data

    async def decode(self, ref: ImageRef) -> DecodedImage:
        data = await self.read(ref)
        # Decoding is CPU work; keep it off the event loop.
        return await asyncio.to_thread(decode_image, data, self.limits)

    async def aclose(self) -> None:
        await self.fetcher.aclose()
