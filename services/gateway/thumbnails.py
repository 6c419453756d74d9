"""Thumbnails of stored items, read from their file:// URI under the file root.

The gateway never opens a path a caller names: it asks search for the item (with the
caller's token, so search's auth decides who may see it), takes the stored `uri`, and
confines it with `UriFetcher.resolve_file` (the code search itself uses: no '..', no
symlink out of the root). Items ingested as inline bytes have no file to show.
"""
from __future__ import annotations

import io
from urllib.parse import urlsplit

from PIL import Image

from services.common.errors import InvalidInput
from services.common.images import PixelNeed, decode_image
from services.common.settings import ImageLimits, UriSettings
from services.common.uris import UriFetcher
from services.gateway.settings import GatewaySettings


class NoThumbnail(Exception):
    """Why an item has no thumbnail: `outcome` is the metric label, `status` the HTTP one."""

    def __init__(self, status: int, outcome: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.outcome = outcome
        self.message = message


class Thumbnailer:
    def __init__(self, settings: GatewaySettings) -> None:
        self._root = settings.file_root
        self._limits: ImageLimits = settings.images
        self._max_px = settings.thumbnail_max_px
        self._fetcher = UriFetcher(UriSettings(file_root=settings.file_root), settings.images.max_bytes)

    def render(self, uri: str, size: int) -> bytes:
        """JPEG bytes of the image at a stored file:// URI, longest side <= size. Blocking."""
        if urlsplit(uri).scheme.lower() != "file":
            raise NoThumbnail(404, "no_file", "the item was not ingested from a file:// URI: no thumbnail")
        if self._root is None:
            raise NoThumbnail(404, "refused", "thumbnails are off: the gateway has no file root (GATEWAY_FILE_ROOT)")
        try:
            path = self._fetcher.resolve_file(uri)
        except InvalidInput as e:
            raise NoThumbnail(403, "refused", e.message) from None
        try:
            if not path.is_file():
                raise NoThumbnail(404, "missing", "the item's file is gone from the file root")
            if path.stat().st_size > self._limits.max_bytes:
                raise NoThumbnail(404, "invalid", f"the item's file is over {self._limits.max_bytes} bytes")
            data = path.read_bytes()
        except OSError:
            raise NoThumbnail(404, "missing", "the item's file cannot be read") from None
        size = max(16, min(size, self._max_px))
        try:
            decoded = decode_image(data, self._limits, PixelNeed(long_side=size))
        except InvalidInput as e:
            raise NoThumbnail(404, "invalid", e.message) from None
        image = decoded.image
        image.thumbnail((size, size), Image.Resampling.LANCZOS)
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=85)
        return out.getvalue()
