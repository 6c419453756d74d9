"""A client built from the search.v1 stubs of commit 0a674e5 (the last release before this wave), run as its
own process by test_client_wire_compat.py: `python tests/client/old_stub_client.py STUBS_DIR
ADDRESS TOKEN PHOTOS_DIR`. Prints one JSON document with what the old client saw.

It loads the old `search_pb2` / `search_pb2_grpc` under their real module names before
anything imports the current ones (both register the proto file
mmsearch/search/v1/search.proto, so they cannot share a process) and uses only raw stubs.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def load_old_stubs(stubs_dir: Path) -> tuple[object, object]:
    import mmsearch.search.v1  # noqa: F401 - the (empty) package the modules live in

    assert "mmsearch.search.v1.search_pb2" not in sys.modules, "the current stubs are already loaded"
    modules = []
    for name in ("search_pb2", "search_pb2_grpc"):
        full = f"mmsearch.search.v1.{name}"
        spec = importlib.util.spec_from_file_location(full, stubs_dir / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[full] = module
        spec.loader.exec_module(module)
        modules.append(module)
    return modules[0], modules[1]


def main() -> None:
    stubs_dir, address, token, photos = Path(sys.argv[1]), sys.argv[2], sys.argv[3], Path(sys.argv[4])
    pb, pb_grpc = load_old_stubs(stubs_dir)
    import grpc

    from mmsearch.common.v1 import types_pb2

    md = [("authorization", f"Bearer {token}")]
    out: dict[str, object] = {
        # what makes these the old stubs
        "old_has_keyword_target": "TARGET_KEYWORD" in pb.DESCRIPTOR.enum_types_by_name["Target"].values_by_name,
        "old_has_search_all": hasattr(pb_grpc.SearchStub(grpc.insecure_channel("127.0.0.1:1")), "SearchAll"),
    }
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.SearchStub(channel)
        items = [
            pb.IngestItem(id=f"wire-{name}", image=types_pb2.Image(data=(photos / f"{name}.jpg").read_bytes()),
                          metadata_json=json.dumps({"label": name}),
                          caption=pb.CaptionInput(description=caption, keywords=[name]))
            for name, caption in (("cat", "a cat sitting on a sofa"), ("coffee", "a cup of coffee on a table"),
                                  ("rocket", "a rocket launching into the sky"))
        ]
        outcomes = []
        for reply in stub.Ingest(iter([pb.IngestRequest(items=items[:2]), pb.IngestRequest(items=items[2:])]),
                                 metadata=md, timeout=300):
            outcomes += [{"index": o.index, "id": o.id, "status": pb.ItemStatus.Name(o.status)} for o in reply.outcomes]
        out["ingest"] = sorted(outcomes, key=lambda o: o["index"])

        got = stub.Get(pb.GetRequest(ids=["wire-cat", "wire-missing", "wire-rocket"]), metadata=md, timeout=60)
        out["get"] = {"records": [{"id": r.id, "caption": r.caption, "keywords": list(r.keywords),
                                   "metadata_json": r.metadata_json, "content_sha256": r.content_sha256}
                                  for r in got.records], "missing": list(got.missing_ids)}

        mine = 'id like "wire-%"'
        searches = {
            "text_image": pb.SearchRequest(query=types_pb2.Content(text="a photo of a cat"), top_k=3, filter=mine),
            "text_caption": pb.SearchRequest(query=types_pb2.Content(text="a cup of coffee"), top_k=3, filter=mine,
                                             target=pb.TARGET_CAPTION),
            "hybrid_weighted": pb.SearchRequest(
                query=types_pb2.Content(text="a rocket"), top_k=3, filter=mine, target=pb.TARGET_HYBRID,
                fusion=pb.Fusion(method=pb.FUSION_METHOD_WEIGHTED, image_weight=0.7, caption_weight=0.3)),
            "hybrid_rrf_page2": pb.SearchRequest(query=types_pb2.Content(text="a cat"), top_k=2, offset=1,
                                                 filter=mine, target=pb.TARGET_HYBRID),
            "image": pb.SearchRequest(query=types_pb2.Content(image=types_pb2.Image(
                data=(photos / "coffee.jpg").read_bytes())), top_k=3, filter=mine, output_fields=["caption"]),
        }
        out["search"] = {}
        for name, request in searches.items():
            reply = stub.Search(request, metadata=md, timeout=120)
            out["search"][name] = {"target": pb.Target.Name(reply.target),
                                   "hits": [{"rank": h.rank, "id": h.id, "score": h.score, "caption": h.caption}
                                            for h in reply.hits]}
        try:
            stub.Search(pb.SearchRequest(top_k=3), metadata=md, timeout=60)
            out["no_query"] = "OK"
        except grpc.RpcError as e:
            out["no_query"] = e.code().name
        s = stub.Stats(pb.StatsRequest(), metadata=md, timeout=60)
        out["stats"] = {"collection": s.collection, "item_count": s.item_count, "dimension": s.dimension,
                        "metric_type": s.metric_type, "index_type": s.index_type, "milvus_mode": s.milvus_mode}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
