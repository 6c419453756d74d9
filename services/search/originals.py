"""The original bytes of ingested images, kept so a model change can re-embed them.

Search stores vectors, not pixels. Items ingested by URI are read again from their URI;
items ingested as inline bytes can only be re-embedded into a new model's collection if
their bytes were kept: with SEARCH_ORIGINALS__DIR or SEARCH_ORIGINALS__S3_BUCKET set,
Ingest keeps them here.

The store is content-addressed by the SHA-256 hex of the bytes (the row's
`content_sha256`): no tenant and no id are involved, identical images are stored once, and
an object can be checked against its key (`get` treats an object whose bytes do not hash to
its key as missing). Two implementations:

- `LocalOriginals(folder)`: `folder/ab/cd/<sha>.img`, written atomically (a temp file in
  the same folder, then `os.replace`: a reader never sees half a file). In Kubernetes the
  folder must be a volume shared by every search pod (ReadWriteMany).
- `S3Originals(settings)`: S3-compatible object storage (AWS S3, MinIO) through boto3,
  key = prefix + sha; one client, its blocking calls in worker threads.

`put_many` never raises (like PendingImages.put_many): without its original an item is
still stored, it just cannot be re-embedded from inline bytes later; a failure is logged
and counted in `search_originals_errors_total{op="put"}`. `get` returns None for a missing
or corrupt object and raises `Unavailable` when the store cannot answer (a retry may work).

boto3 is imported only when an S3 store is built, so this module stays importable by the
domain without it.
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import re
import secrets
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter

from services.common.errors import Unavailable
from services.common.log import get_logger

if TYPE_CHECKING:
    from services.search.settings import OriginalsSettings

log = get_logger(__name__)

ORIGINALS_ERRORS = Counter(
    "search_originals_errors_total",
    "Original-store failures by store (local, s3) and operation (put, get: unreadable or corrupt).",
    ["store", "op"],
)

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def content_key(data: bytes) -> str:
    """The key of `data` in an original store (the row's `content_sha256`)."""
    return hashlib.sha256(data).hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a reader sees the old file or the whole new one.

    A uniquely named temp file in the same folder (so the rename stays on one filesystem
    and two writers of the same path never share a temp file), then `os.replace`.
    """
    # Opened with "x" (never an existing file) and the usual mode (0666 less the umask, as a
    # plain write gets; mkstemp's 0600 would lock out other users of a shared volume).
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _check_key(key: str) -> str:
    if not _SHA256_HEX.fullmatch(key):
        raise ValueError(f"not a lowercase SHA-256 hex digest: {key[:80]!r}")
    return key


class OriginalStore(ABC):
    """The port: original image bytes by the SHA-256 hex of those bytes.

    Implementations provide three blocking primitives (run in worker threads here):
    `_write`, `_read` (None when missing) and `_exists`; any other failure raises.
    """

    #: A short name for logs and the metric's `store` label.
    kind: str = "store"
    #: How many blocking calls one put_many runs at once.
    concurrency: int = 4

    # --- the primitives ---------------------------------------------------------------
    @abstractmethod
    def _write(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def _read(self, key: str) -> bytes | None: ...

    @abstractmethod
    def _exists(self, key: str) -> bool: ...

    # --- the port -----------------------------------------------------------------------
    async def put_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Keep each (sha256_hex, bytes). Never raises: failures are logged and counted."""
        if not items:
            return
        unique = dict(items)  # one write per content, even if a batch repeats an image
        gate = asyncio.Semaphore(self.concurrency)

        async def one(key: str, data: bytes) -> BaseException | None:
            async with gate:
                try:
                    await asyncio.to_thread(self._write, _check_key(key), data)
                    return None
                except Exception as e:  # noqa: BLE001 - never fails the ingest
                    return e

        errors = [e for e in await asyncio.gather(*(one(k, d) for k, d in unique.items())) if e is not None]
        if errors:
            ORIGINALS_ERRORS.labels(self.kind, "put").inc(len(errors))
            log.warning("could not keep original images", store=self.describe(), failed=len(errors),
                        items=len(unique), error=_describe(errors[0]))

    async def get(self, sha256_hex: str) -> bytes | None:
        """The bytes whose SHA-256 is `sha256_hex`; None if missing or corrupt."""
        key = _check_key(sha256_hex)
        try:
            data = await asyncio.to_thread(self._read, key)
        except Exception as e:
            ORIGINALS_ERRORS.labels(self.kind, "get").inc()
            log.warning("could not read an original image", store=self.describe(), sha256=key, error=_describe(e))
            raise Unavailable(f"the original store ({self.kind}) cannot be read: {_describe(e)}") from e
        if data is None:
            return None
        if hashlib.sha256(data).hexdigest() != key:
            ORIGINALS_ERRORS.labels(self.kind, "get").inc()
            log.warning("corrupt original image ignored (its bytes do not match its SHA-256)",
                        store=self.describe(), sha256=key, size=len(data))
            return None
        return data

    async def has(self, sha256_hex: str) -> bool:
        """Whether an object is stored under `sha256_hex` (not checked against its bytes)."""
        key = _check_key(sha256_hex)
        try:
            return await asyncio.to_thread(self._exists, key)
        except Exception as e:
            raise Unavailable(f"the original store ({self.kind}) cannot be read: {_describe(e)}") from e

    def describe(self) -> str:
        return self.kind



def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:300]


class LocalOriginals(OriginalStore):
    """Files under `folder/ab/cd/<sha>.img` (two levels of 256 subfolders)."""

    kind = "local"

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / key[2:4] / f"{key}.img"

    def _write(self, key: str, data: bytes) -> None:
        path = self.path(key)
        try:
            if path.stat().st_size == len(data):
                return  # content-addressed: already kept (a short/corrupt file is rewritten)
        except FileNotFoundError:
            pass
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data)

    def _read(self, key: str) -> bytes | None:
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError:
            return None

    def _exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def describe(self) -> str:
        return f"local:{self.folder}"


class S3Originals(OriginalStore):
    """S3-compatible object storage: key = prefix + sha, one boto3 client (thread-safe)."""

    kind = "s3"
    concurrency = 8

    def __init__(self, settings: OriginalsSettings, *, client: Any = None) -> None:
        if not settings.s3_bucket:
            raise ValueError("S3Originals needs SEARCH_ORIGINALS__S3_BUCKET")
        self.bucket = settings.s3_bucket
        self.prefix = settings.s3_prefix
        self.client = client if client is not None else _s3_client(settings, self.concurrency)
        from botocore.exceptions import ClientError

        self._client_error = ClientError

    def _key(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def _missing(self, e: Exception) -> bool:
        if not isinstance(e, self._client_error):
            return False
        err = e.response.get("Error", {})
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return err.get("Code") in ("NoSuchKey", "404", "NotFound") or status == 404

    def _write(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data,
                               ContentType="application/octet-stream")

    def _read(self, key: str) -> bytes | None:
        try:
            reply = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as e:
            if self._missing(e):
                return None
            raise
        body = reply["Body"]
        try:
            return bytes(body.read())
        finally:
            body.close()

    def _exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except Exception as e:
            if self._missing(e):
                return False
            raise

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


def _s3_client(settings: OriginalsSettings, pool: int) -> Any:
    import boto3
    from botocore.config import Config

    access = settings.s3_access_key.get_secret_value() if settings.s3_access_key else None
    secret = settings.s3_secret_key.get_secret_value() if settings.s3_secret_key else None
    if (access is None) != (secret is None):
        raise ValueError("set both SEARCH_ORIGINALS__S3_ACCESS_KEY and SEARCH_ORIGINALS__S3_SECRET_KEY, or neither")
    config = Config(
        region_name=settings.s3_region or None,
        connect_timeout=5,
        read_timeout=30,
        retries={"max_attempts": 3, "mode": "standard"},
        max_pool_connections=max(10, pool),
        # A custom endpoint (MinIO, a cluster-internal service) has no per-bucket DNS names.
        s3={"addressing_style": "path"} if settings.s3_endpoint else {},
    )
    # A session per store: boto3's default session is shared module state and not thread-safe.
    session = boto3.session.Session()
    return session.client(
        "s3",
        endpoint_url=settings.s3_endpoint or None,
        aws_access_key_id=access,
        aws_secret_access_key=secret,
        config=config,
    )


def originals_from(settings: OriginalsSettings) -> OriginalStore | None:
    """The store the settings name; None when neither a folder nor a bucket is set."""
    if settings.dir is not None and settings.s3_bucket:
        raise ValueError("set SEARCH_ORIGINALS__DIR or SEARCH_ORIGINALS__S3_BUCKET, not both")
    if settings.s3_bucket:
        return S3Originals(settings)
    if settings.dir is not None:
        return LocalOriginals(settings.dir)
    return None
