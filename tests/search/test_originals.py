"""The original store (services/search/originals.py): a local folder, and S3 through boto3
against a real S3 wire-protocol server (moto's server mode on loopback)."""
from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from moto.server import ThreadedMotoServer
from pydantic import SecretStr

from services.common.errors import Unavailable
from services.search.originals import (
    ORIGINALS_ERRORS,
    LocalOriginals,
    OriginalStore,
    S3Originals,
    content_key,
    originals_from,
)
from services.search.pending import PendingImages
from services.search.settings import OriginalsSettings

CAT = b"\xff\xd8\xff\xe0 a cat, not really a JPEG" + bytes(range(256)) * 40
DOG = b"\x89PNG\r\n\x1a\n a dog" + os.urandom(5000)


def errors(store: str, op: str) -> float:
    return ORIGINALS_ERRORS.labels(store, op)._value.get()


# --- local ------------------------------------------------------------------------------

async def test_local_round_trip_content_addressed(tmp_path: Path) -> None:
    store = LocalOriginals(tmp_path / "originals")
    cat, dog = content_key(CAT), content_key(DOG)
    assert cat == hashlib.sha256(CAT).hexdigest()
    await store.put_many([(cat, CAT), (dog, DOG), (cat, CAT)])
    assert await store.get(cat) == CAT
    assert await store.get(dog) == DOG
    assert await store.has(cat) and await store.has(dog)
    # folder/ab/cd/<sha>.img, nothing else left behind (no temp files).
    path = tmp_path / "originals" / cat[:2] / cat[2:4] / f"{cat}.img"
    assert path.read_bytes() == CAT
    files = sorted(p.name for p in (tmp_path / "originals").rglob("*") if p.is_file())
    assert files == sorted([f"{cat}.img", f"{dog}.img"])


async def test_local_missing_is_none(tmp_path: Path) -> None:
    store = LocalOriginals(tmp_path / "never-created")
    key = content_key(b"nothing")
    assert await store.get(key) is None
    assert not await store.has(key)
    await store.put_many([])  # nothing to do, no folder needed


async def test_local_corrupt_is_none_and_rewritten(tmp_path: Path) -> None:
    store = LocalOriginals(tmp_path)
    key = content_key(CAT)
    await store.put_many([(key, CAT)])
    path = store.path(key)
    path.write_bytes(CAT[:-10] + b"0123456789")  # same size, other bytes: bit rot
    before = errors("local", "get")
    assert await store.get(key) is None
    assert errors("local", "get") == before + 1
    path.write_bytes(CAT[:100])  # a short file (say a copy cut off) is replaced by the next put
    await store.put_many([(key, CAT)])
    assert await store.get(key) == CAT


async def test_local_overwrite_is_atomic(tmp_path: Path) -> None:
    """Readers racing many writers of the same object only ever see the whole object."""
    store = LocalOriginals(tmp_path)
    data = os.urandom(2_000_000)
    key = content_key(data)
    await store.put_many([(key, data)])
    path = store.path(key)

    async def rewrite() -> None:
        for _ in range(5):
            await asyncio.to_thread(path.unlink, True)  # gone, so put_many writes it again
            await store.put_many([(key, data)])

    async def read() -> list[bytes | None]:
        seen = []
        for _ in range(20):
            try:
                seen.append(await asyncio.to_thread(path.read_bytes))
            except FileNotFoundError:
                seen.append(None)
        return seen

    results = await asyncio.gather(rewrite(), rewrite(), read())
    seen = results[2]
    assert all(s in (data, None) for s in seen), {len(s) for s in seen if s is not None}
    assert data in seen
    await store.put_many([(key, data)])
    assert await store.get(key) == data
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp files left


async def test_local_put_failures_never_raise(tmp_path: Path) -> None:
    # A file where the folder should be: every write fails (as root too).
    (tmp_path / "not-a-folder").write_bytes(b"")
    store = LocalOriginals(tmp_path / "not-a-folder")
    before = errors("local", "put")
    await store.put_many([(content_key(CAT), CAT), (content_key(DOG), DOG)])  # no exception
    assert errors("local", "put") == before + 2


async def test_local_read_only_folder_never_raises(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        store = LocalOriginals(folder)
        before = errors("local", "put")
        await store.put_many([(content_key(CAT), CAT), (content_key(DOG), DOG)])  # no exception
        assert errors("local", "put") == before + 2
        assert await store.get(content_key(CAT)) is None
    finally:
        folder.chmod(0o700)


async def test_put_with_a_bad_key_never_raises_get_does(tmp_path: Path) -> None:
    store = LocalOriginals(tmp_path)
    before = errors("local", "put")
    await store.put_many([("../../etc/passwd", CAT), (content_key(DOG), DOG)])
    assert errors("local", "put") == before + 1
    assert await store.get(content_key(DOG)) == DOG
    assert list(tmp_path.glob("*.img")) == []
    with pytest.raises(ValueError):
        await store.get("ABC")


async def test_local_unreadable_is_unavailable(tmp_path: Path) -> None:
    store = LocalOriginals(tmp_path)
    key = content_key(CAT)
    store.path(key).mkdir(parents=True)  # a folder where the file should be: not "missing"
    with pytest.raises(Unavailable):
        await store.get(key)


async def test_pending_images_still_write_their_files(tmp_path: Path) -> None:
    """PendingImages shares write_atomic; its layout (one file per id) is unchanged."""
    pending = PendingImages(tmp_path)
    await pending.put_many([("a", CAT), ("b", DOG)])
    assert await pending.get("a") == CAT and await pending.get("b") == DOG
    name = f"{hashlib.sha256(b'a').hexdigest()}.img"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, f"{hashlib.sha256(b'b').hexdigest()}.img"])
    assert oct((tmp_path / name).stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    await pending.remove("a")
    assert await pending.get("a") is None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_factory(tmp_path: Path) -> None:
    assert originals_from(OriginalsSettings()) is None
    local = originals_from(OriginalsSettings(dir=tmp_path))
    assert isinstance(local, LocalOriginals) and local.folder == tmp_path
    with pytest.raises(ValueError, match="not both"):
        originals_from(OriginalsSettings(dir=tmp_path, s3_bucket="b"))
    with pytest.raises(ValueError, match="both"):
        originals_from(OriginalsSettings(s3_bucket="b", s3_access_key=SecretStr("k")))


# --- S3 (moto's server: the S3 wire protocol on loopback) -----------------------------------

ACCESS, SECRET = "AKIAORIGINALSTEST", "originals-secret"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture()
def bucket(s3_endpoint: str, request: pytest.FixtureRequest) -> str:
    name = f"originals-{request.node.name.replace('_', '-')[:40].lower()}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="eu-west-1", aws_access_key_id=ACCESS,
                 aws_secret_access_key=SECRET).create_bucket(
        Bucket=name, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    return name


def s3_settings(endpoint: str, bucket: str, **kw: object) -> OriginalsSettings:
    values: dict[str, object] = {"s3_endpoint": endpoint, "s3_bucket": bucket, "s3_region": "eu-west-1",
                                 "s3_access_key": SecretStr(ACCESS), "s3_secret_key": SecretStr(SECRET)}
    values.update(kw)
    return OriginalsSettings.model_validate(values)


def raw_client(endpoint: str):  # type: ignore[no-untyped-def]
    return boto3.client("s3", endpoint_url=endpoint, region_name="eu-west-1", aws_access_key_id=ACCESS,
                        aws_secret_access_key=SECRET)


async def test_s3_round_trip_with_prefix(s3_endpoint: str, bucket: str) -> None:
    store = originals_from(s3_settings(s3_endpoint, bucket, s3_prefix="team-a/originals/"))
    assert isinstance(store, S3Originals)
    cat, dog = content_key(CAT), content_key(DOG)
    assert not await store.has(cat)
    assert await store.get(cat) is None  # missing -> None, not an error
    await store.put_many([(cat, CAT), (dog, DOG)])
    assert await store.get(cat) == CAT and await store.get(dog) == DOG
    assert await store.has(dog)
    # key = prefix + sha, in the configured bucket
    keys = sorted(o["Key"] for o in raw_client(s3_endpoint).list_objects_v2(Bucket=bucket)["Contents"])
    assert keys == sorted([f"team-a/originals/{cat}", f"team-a/originals/{dog}"])
    # another prefix is another store
    other = originals_from(s3_settings(s3_endpoint, bucket, s3_prefix="team-b/"))
    assert other is not None and await other.get(cat) is None


async def test_s3_default_prefix_and_concurrent_puts(s3_endpoint: str, bucket: str) -> None:
    store = S3Originals(s3_settings(s3_endpoint, bucket))
    blobs = [os.urandom(1000 + i) for i in range(30)]
    await store.put_many([(content_key(b), b) for b in blobs])
    got = await asyncio.gather(*(store.get(content_key(b)) for b in blobs))
    assert got == blobs
    keys = {o["Key"] for o in raw_client(s3_endpoint).list_objects_v2(Bucket=bucket)["Contents"]}
    assert keys == {f"mmsearch-originals/{content_key(b)}" for b in blobs}


async def test_s3_corrupt_object_is_none(s3_endpoint: str, bucket: str) -> None:
    store = S3Originals(s3_settings(s3_endpoint, bucket))
    key = content_key(CAT)
    raw_client(s3_endpoint).put_object(Bucket=bucket, Key=f"mmsearch-originals/{key}", Body=DOG)
    before = errors("s3", "get")
    assert await store.get(key) is None
    assert errors("s3", "get") == before + 1


async def test_s3_credentials_come_from_settings(s3_endpoint: str, bucket: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # No credentials in the environment: the settings' keys are what the client signs with.
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    store = S3Originals(s3_settings(s3_endpoint, bucket))
    creds = store.client._request_signer._credentials
    assert (creds.access_key, creds.secret_key) == (ACCESS, SECRET)
    assert store.client.meta.region_name == "eu-west-1"
    assert store.client.meta.endpoint_url == s3_endpoint
    await store.put_many([(content_key(CAT), CAT)])
    assert await store.get(content_key(CAT)) == CAT


async def test_s3_outage_put_never_raises_get_is_unavailable(bucket: str) -> None:
    # A closed port: the store cannot answer at all.
    store = S3Originals(s3_settings(f"http://127.0.0.1:{_free_port()}", bucket))
    before = errors("s3", "put")
    await store.put_many([(content_key(CAT), CAT)])  # logged and counted, not raised
    assert errors("s3", "put") == before + 1
    with pytest.raises(Unavailable):
        await store.get(content_key(CAT))


async def test_s3_missing_bucket_put_never_raises(s3_endpoint: str) -> None:
    store = S3Originals(s3_settings(s3_endpoint, "no-such-bucket"))
    before = errors("s3", "put")
    await store.put_many([(content_key(CAT), CAT)])
    assert errors("s3", "put") == before + 1


def test_the_port_is_abstract() -> None:
    with pytest.raises(TypeError):
        OriginalStore()  # type: ignore[abstract]
