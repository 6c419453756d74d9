"""v1 stays wire-compatible: a client built from the search.v1 stubs of commit 0a674e5 (the
last release before DUPLICATE / DEFERRED outcomes, Backfill, tenants' errors, legs,
like_id, examples, min_score, group_by, decay, SearchAll and the new Stats fields) runs
Ingest, Get, Search and Stats against the current server (the real suite) and gets the
same answers the current client gets."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mmsearch.client import Fusion, FusionMethod, IngestItem, ItemStatus, SearchClient, Target
from services.lite_models.sample_photos import load_sample_photos
from tests.conftest import RealSuite

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(__file__).with_name("data") / "search_v1_0a674e5"
COMMIT = "0a674e5"
STUBS = ("search_pb2.py", "search_pb2_grpc.py")


def test_the_copies_are_the_stubs_of_that_commit() -> None:
    for name in STUBS:
        shown = subprocess.run(["git", "show", f"{COMMIT}:mmsearch/search/v1/{name}"], cwd=ROOT,
                               capture_output=True, check=False)
        if shown.returncode != 0:
            pytest.skip(f"git has no commit {COMMIT} here (shallow clone?): {shown.stderr.decode()[:200]}")
        assert shown.stdout == (DATA / f"{name}.txt").read_bytes(), f"{name}.txt is not {COMMIT}'s {name}"


@pytest.fixture(scope="module")
def old_client_run(real_suite: RealSuite, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("wire-compat")
    stubs = root / "stubs"
    stubs.mkdir()
    for name in STUBS:
        (stubs / name).write_bytes((DATA / f"{name}.txt").read_bytes())
    photos = root / "photos"
    photos.mkdir()
    for photo in load_sample_photos(["cat", "coffee", "rocket"]):
        photo.image.convert("RGB").save(photos / f"{photo.name}.jpg", format="JPEG", quality=92)
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("old_stub_client.py")), str(stubs), real_suite.address,
         real_suite.token, str(photos)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"out": json.loads(proc.stdout.strip().splitlines()[-1]), "photos": photos}


@pytest.fixture(scope="module")
def client(real_suite: RealSuite):  # type: ignore[no-untyped-def]
    with SearchClient(real_suite.address, timeout=120.0, token=real_suite.token) as c:
        yield c


def test_it_really_is_the_old_contract(old_client_run: dict) -> None:
    out = old_client_run["out"]
    assert out["old_has_keyword_target"] is False and out["old_has_search_all"] is False


def test_old_ingest_and_get(old_client_run: dict, client: SearchClient) -> None:
    out, photos = old_client_run["out"], old_client_run["photos"]
    assert [(o["index"], o["id"]) for o in out["ingest"]] == [(0, "wire-cat"), (1, "wire-coffee"), (2, "wire-rocket")]
    assert {o["status"] for o in out["ingest"]} <= {"ITEM_STATUS_STORED", "ITEM_STATUS_UNCHANGED"}
    assert out["get"]["missing"] == ["wire-missing"]
    assert [r["id"] for r in out["get"]["records"]] == ["wire-cat", "wire-rocket"]
    cat = out["get"]["records"][0]
    assert cat["caption"] == "a cat sitting on a sofa" and cat["keywords"] == ["cat"]
    assert json.loads(cat["metadata_json"]) == {"label": "cat"}
    # The same items through the current client (bytes, as the old client sent them): stored
    # exactly as the old client stored them, so nothing changes.
    new = client.get(["wire-cat", "wire-rocket"])
    assert [(r.id, r.caption, r.content_sha256) for r in new.records] == [
        (r["id"], r["caption"], r["content_sha256"]) for r in out["get"]["records"]]
    again = client.ingest_all([
        IngestItem(image=(photos / f"{name}.jpg").read_bytes(), id=f"wire-{name}", metadata={"label": name}, caption=caption,
                   keywords=[name])
        for name, caption in (("cat", "a cat sitting on a sofa"), ("coffee", "a cup of coffee on a table"),
                              ("rocket", "a rocket launching into the sky"))])
    assert [o.status for o in again.outcomes] == [ItemStatus.UNCHANGED] * 3, again.outcomes


def _same_hits(old: dict, new: list) -> None:  # type: ignore[type-arg]
    assert [(h["rank"], h["id"]) for h in old["hits"]] == [(h.rank, h.id) for h in new]
    for o, n in zip(old["hits"], new, strict=True):
        assert o["score"] == pytest.approx(n.score, abs=1e-4)


def test_old_searches_match_the_current_client(old_client_run: dict, client: SearchClient) -> None:
    out, photos = old_client_run["out"]["search"], old_client_run["photos"]
    mine = 'id like "wire-%"'
    assert out["text_image"]["target"] == "TARGET_IMAGE" and out["text_image"]["hits"][0]["id"] == "wire-cat"
    _same_hits(out["text_image"], client.search("a photo of a cat", top_k=3, filter=mine).hits)
    assert out["text_caption"]["hits"][0]["id"] == "wire-coffee"
    _same_hits(out["text_caption"], client.search("a cup of coffee", target="caption", top_k=3, filter=mine).hits)
    assert out["hybrid_weighted"]["target"] == "TARGET_HYBRID" and out["hybrid_weighted"]["hits"][0]["id"] == "wire-rocket"
    weighted = Fusion(FusionMethod.WEIGHTED, image_weight=0.7, caption_weight=0.3)
    _same_hits(out["hybrid_weighted"],
               client.search("a rocket", target=Target.HYBRID, fusion=weighted, top_k=3, filter=mine).hits)
    assert [h["rank"] for h in out["hybrid_rrf_page2"]["hits"]] == [2, 3]
    _same_hits(out["hybrid_rrf_page2"], client.search("a cat", target="hybrid", top_k=2, offset=1, filter=mine).hits)
    assert out["image"]["hits"][0]["id"] == "wire-coffee" and out["image"]["hits"][0]["caption"]
    _same_hits(out["image"], client.search(image=photos / "coffee.jpg", top_k=3, filter=mine,
                                           output_fields=["caption"]).hits)


def test_old_errors_and_stats(old_client_run: dict, client: SearchClient) -> None:
    out = old_client_run["out"]
    assert out["no_query"] == "INVALID_ARGUMENT"
    stats = client.stats()
    old = out["stats"]
    assert old["item_count"] >= 3
    assert (old["collection"], old["dimension"], old["metric_type"], old["index_type"], old["milvus_mode"]) == (
        stats.collection, stats.dimension, stats.metric_type, stats.index_type, stats.milvus_mode)
