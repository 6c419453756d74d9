"""Tenancy pieces alone: the filter checker, the token file and its reloads, the hashing
CLI, and the store's defence in depth (foreign rows dropped even when the tenant filter is
not applied) on a real embedded Milvus Lite."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from services.common.errors import InvalidInput
from services.common.principal import ALL_SCOPES, Principal, acting_as
from services.common.tokens import TokenRegistry, hash_token, parse_token_file
from services.search import milvus_store
from services.search.milvus_store import LegQuery, MilvusStore, SearchOptions, StoredRow
from services.search.settings import SearchSettings
from services.search.validation import check_filter

ALPHA = Principal("alpha", ALL_SCOPES, "alpha-test")
BETA = Principal("beta", ALL_SCOPES, "beta-test")


@pytest.mark.parametrize("expr", [
    "", 'caption like "%(%"', "(a == 1) and b in [1, 2]", 'metadata["tenant"] == "x"', "x == 'it\\'s' and (y > 1)",
    'id == "a)b"', "tenants_count > 1 and retenant == 2",
])
def test_filters_that_stay_inside_their_parentheses_pass(expr: str) -> None:
    assert check_filter(expr, 2048) == expr.strip()


@pytest.mark.parametrize("expr", [
    "a == 1) or (true", ")(", "((a == 1)", "a in [1, 2", "a == 1]", '(a == "x)"', 'a == "unterminated',
    "a == 'x\\'", "tenant == 'x'", "Tenant != 'x'", "(tenant)", "x == 1 or tenant in ['a']", "[(])",
])
def test_filters_that_could_escape_or_name_the_tenant_are_refused(expr: str) -> None:
    with pytest.raises(InvalidInput):
        check_filter(expr, 2048)


def test_token_file_holds_hashes_scopes_and_tenants() -> None:
    config = parse_token_file(
        "tokens:\n"
        f"  - {{name: reader, sha256: {hash_token('t1').upper()}, tenant: shop, scopes: [search]}}\n"
        "clients:\n"
        "  - {identity: ingest.shop.internal, tenant: shop, scopes: 'ingest,delete'}\n")
    reader = config.by_hash[hash_token("t1")]
    assert (reader.tenant, reader.scopes, reader.identity) == ("shop", frozenset({"search"}), "reader")
    assert reader.allows("search") and not reader.allows("ingest")
    client = config.by_identity["ingest.shop.internal"]
    assert client.scopes == frozenset({"ingest", "delete"}) and client.identity == "ingest.shop.internal"
    assert Principal("x", frozenset({"admin"}), "a").allows("delete")


@pytest.mark.parametrize("text, message", [
    ('{"tokens": [{"sha256": "plaintext-token", "scopes": ["search"]}]}', "64 hex"),
    (f'{{"tokens": [{{"sha256": "{"a" * 64}", "scopes": ["write"]}}]}}', "unknown scope"),
    (f'{{"tokens": [{{"sha256": "{"a" * 64}"}}]}}', "scopes"),
    (f'{{"tokens": [{{"sha256": "{"a" * 64}", "scopes": ["search"], "tenant": "a~b"}}]}}', "tenant"),
    ('{"clients": [{"scopes": ["search"]}]}', "identity"),
    ("tokens: [unclosed", "YAML"),
])
def test_bad_token_files_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_token_file(text)


def test_registry_follows_the_file_and_keeps_the_last_good_one(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"

    def write(obj: object) -> None:
        tmp = tmp_path / "tokens.tmp"
        tmp.write_text(obj if isinstance(obj, str) else json.dumps(obj))
        os.replace(tmp, path)

    write({"tokens": [{"name": "a", "sha256": hash_token("ta"), "tenant": "alpha", "scopes": ["search"]}]})
    registry = TokenRegistry(path, ["legacy"], min_check_interval_s=0.0)
    assert registry.for_token(b"ta") is not None and registry.for_token(b"ta").tenant == "alpha"  # type: ignore[union-attr]
    legacy = registry.for_token(b"legacy")
    assert legacy is not None and legacy.tenant == "default" and legacy.scopes == ALL_SCOPES
    assert legacy.identity == "sha256:" + hash_token("legacy")[:12]
    assert registry.for_token(b"nope") is None and registry.for_token(b"") is None
    write({"tokens": [{"name": "b", "sha256": hash_token("tb"), "tenant": "beta", "scopes": ["admin"]}]})
    assert registry.for_token(b"ta") is None and registry.for_token(b"tb") is not None
    write("tokens: [broken")  # a bad edit: the previous tokens stay
    assert registry.for_token(b"tb") is not None
    path.unlink()  # no file: no file token (fail closed); plaintext ones still work
    assert registry.for_token(b"tb") is None and registry.for_token(b"legacy") is not None
    with pytest.raises(ValueError):  # a broken file at start-up is an error, not "no tokens"
        (tmp_path / "bad.json").write_text("{")
        TokenRegistry(tmp_path / "bad.json")


def test_registry_rechecks_at_most_once_per_interval(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"tokens": [{"sha256": hash_token("ta"), "scopes": ["search"]}]}))
    registry = TokenRegistry(path, min_check_interval_s=1.0)
    assert registry.for_token(b"ta") is not None
    path.write_text(json.dumps({"tokens": []}))
    assert registry.for_token(b"ta") is not None  # checked less than a second ago: not yet
    time.sleep(1.1)
    assert registry.for_token(b"ta") is None


def test_hash_cli_prints_the_sha256() -> None:
    out = subprocess.run([sys.executable, "-m", "services.common.tokens", "hash"], input="s3cret\n",
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == hash_token("s3cret")
    new = subprocess.run([sys.executable, "-m", "services.common.tokens", "new"], capture_output=True, text=True,
                         check=True).stdout.split()
    assert len(new) == 2 and hash_token(new[0]) == new[1]


@pytest.mark.asyncio
async def test_the_store_drops_other_tenants_rows_even_without_the_tenant_filter(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = MilvusStore(SearchSettings(milvus_uri=str(tmp_path / "m.db"), collection="tenancy"))
    try:
        await store.ensure_collection("model", 4)
        rng = np.random.default_rng(3)
        for who in (ALPHA, BETA):
            with acting_as(who):
                await store.upsert([
                    StoredRow(f"item-{i}", "0" * 64, "0" * 64, "", who.tenant, [], {"owner": who.tenant}, "model", "",
                              0, v, v) for i, v in enumerate(rng.normal(size=(5, 4)).astype(np.float32))])
        # Simulate a filter that failed to confine the search: every row is a candidate.
        monkeypatch.setattr(milvus_store.Tenancy, "scope", lambda self, expr: expr)
        query = LegQuery("image_vector", rng.normal(size=4).astype(np.float32))
        with acting_as(ALPHA):
            hits = await store.search(query, 10, 0, SearchOptions(output_fields=["metadata"]))
            assert sorted(h.id for h in hits) == [f"item-{i}" for i in range(5)]
            assert {h.entity["metadata"]["owner"] for h in hits} == {"alpha"}
            exported = [h async for batch in store.iterate(query, SearchOptions(output_fields=["metadata"]), 100, 0)
                        for h in batch]
            assert {h.entity["metadata"]["owner"] for h in exported} == {"alpha"} and len(exported) == 5
            assert set(await store.get(["item-0"])) == {"item-0"}
            assert (await store.get(["item-0"]))["item-0"]["metadata"]["owner"] == "alpha"
        with acting_as(BETA):
            assert (await store.get(["item-0"]))["item-0"]["metadata"]["owner"] == "beta"
            assert await store.delete(["item-0", "item-1"]) == 2
        with acting_as(ALPHA):
            assert sorted(await store.get([f"item-{i}" for i in range(5)])) == [f"item-{i}" for i in range(5)]
        monkeypatch.undo()
        with acting_as(ALPHA):
            assert await store.count() == 5
        with acting_as(BETA):
            assert await store.count() == 3
    finally:
        await store.close()
