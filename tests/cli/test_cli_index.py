"""`mmsearch index ...` (the Admin service) through typer's CliRunner, over real gRPC on
loopback to the in-process Admin servicer of tests/cli/fake_service.py (`FakeAdmin`, which
follows admin.proto); the end-to-end test against the search service's Admin lives with
the server."""
from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from typer.testing import CliRunner

from mmsearch.cli.main import app
from tests.cli.fake_service import UNREADABLE, FakeAdmin, FakeAdminServer

runner = CliRunner()  # click >= 8.2: result.stdout and result.stderr apart, result.output both
ITEMS = [f"item-{i}" for i in range(5)]


@pytest.fixture
def server() -> Iterator[FakeAdminServer]:
    s = FakeAdminServer(FakeAdmin(items=ITEMS, unreadable={"item-3"}))
    yield s
    s.stop()


def cli(server: FakeAdminServer, *args: str, input: str | None = None, token: str | None = None):
    return runner.invoke(app, ["--address", server.address, "--timeout", "10", "index", *args], input=input,
                         env={"MMSEARCH_TOKEN": token, "COLUMNS": "200"})


def test_list_table_and_json(server: FakeAdminServer) -> None:
    result = cli(server, "list")
    assert result.exit_code == 0, result.output
    for words in ("index mmsearch", "name", "version", "model", "dimension", "items", "role", "embedder target",
                  "mmsearch__v1", "lite-embed-v1", "384", "live", "127.0.0.1:50051"):
        assert words in result.stdout, words
    cli(server, "create", "--model", "clip-vit-b-32")
    data = json.loads(cli(server, "list", "--json").stdout)
    assert data["index"] == "mmsearch"
    assert data["collections"] == [
        {"name": "mmsearch__v1", "version": 1, "embedder_model_id": "lite-embed-v1", "dimension": 384,
         "item_count": 5, "role": "live", "embedder_target": "127.0.0.1:50051"},
        {"name": "mmsearch__v2", "version": 2, "embedder_model_id": "clip-vit-b-32", "dimension": 512,
         "item_count": 0, "role": "candidate", "embedder_target": "127.0.0.1:50061"},
    ]


def test_create(server: FakeAdminServer) -> None:
    result = cli(server, "create", "--model", "clip-vit-b-32")
    assert result.exit_code == 0, result.output
    assert "created candidate mmsearch__v2 (clip-vit-b-32, 512 dims, 0 items)" in result.stdout
    assert "127.0.0.1:50061" in result.stdout and "mmsearch index backfill" in result.stdout
    again = cli(server, "create", "--model", "clip-vit-b-32")
    assert again.exit_code == 1 and "Traceback" not in again.output
    assert "CreateCandidate failed: FAILED_PRECONDITION: a candidate already exists" in again.stderr
    unknown = cli(server, "drop", "mmsearch__v2", "--yes")
    assert unknown.exit_code == 0
    unknown = cli(server, "create", "--model", "no-such-model", "--json")
    assert unknown.exit_code == 1 and "SEARCH_MODEL_EMBEDDERS" in unknown.stderr
    assert cli(server, "create").exit_code == 2  # --model is required


def test_backfill_progress_failures_and_exit_code(server: FakeAdminServer) -> None:
    assert cli(server, "backfill").exit_code == 1  # no candidate yet: NOT_FOUND
    cli(server, "create", "--model", "clip-vit-b-32")

    part = cli(server, "backfill", "--max-items", "2", "--rate", "100")
    assert part.exit_code == 0, part.output
    assert "2 copied · 0 skipped · 0 failed of 5 live items" in part.stdout
    assert "index backfill" in part.stderr and "2/5" in part.stderr  # the progress bar, with counts
    assert "2 copied" in part.stderr and "0 failed" in part.stderr
    assert server.admin.calls[-1][1].max_items_per_s == 100  # type: ignore[attr-defined]

    rest = cli(server, "backfill")
    assert rest.exit_code == 1, rest.output
    assert "2 copied · 2 skipped · 1 failed of 5 live items" in rest.stdout
    assert f"failed item-3: FAILED_PRECONDITION: {UNREADABLE}" in rest.stdout
    assert "5/5" in rest.stderr

    data = json.loads(cli(server, "backfill", "--json").stdout)
    assert data["progress"] == {"total": 5, "copied": 0, "skipped": 4, "failed": 1}
    failed = [o for o in data["outcomes"] if o["status"] == "failed"]
    assert failed == [{"id": "item-3", "status": "failed", "code": "FAILED_PRECONDITION", "message": UNREADABLE}]

    server.admin.unreadable.clear()
    assert cli(server, "backfill").exit_code == 0
    assert cli(server, "backfill", "--rate", "-1").exit_code == 2


def test_promote_refused_without_force_then_forced_and_rollback(server: FakeAdminServer) -> None:
    cli(server, "create", "--model", "clip-vit-b-32")
    cli(server, "backfill")
    refused = cli(server, "promote")
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    assert "Promote failed: FAILED_PRECONDITION: counts differ" in refused.stderr
    assert "mmsearch__v2 has 4 items" in refused.stderr and "mmsearch__v1 has 5" in refused.stderr
    assert "--force" in refused.stderr
    assert json.loads(cli(server, "list", "--json").stdout)["collections"][0]["role"] == "live"

    server.admin.ingest("item-5")
    server.admin.live.items.add("item-6")  # a live item the candidate lacks: the catch-up copies it
    promoted = cli(server, "promote", "--force")
    assert promoted.exit_code == 0, promoted.output
    assert "live:     mmsearch__v2 (clip-vit-b-32, 512 dims, 6 items)" in promoted.stdout
    assert "previous: mmsearch__v1 (lite-embed-v1, 384 dims, 7 items)" in promoted.stdout
    assert "caught up: 1 items" in promoted.stdout
    roles = {c["name"]: c["role"] for c in json.loads(cli(server, "list", "--json").stdout)["collections"]}
    assert roles == {"mmsearch__v1": "previous", "mmsearch__v2": "live"}

    refused = cli(server, "rollback")  # v1 has 7, live v2 has 6
    assert refused.exit_code == 1 and "Rollback failed: FAILED_PRECONDITION" in refused.stderr
    back = cli(server, "rollback", "--force", "--json")
    assert back.exit_code == 0, back.output
    data = json.loads(back.stdout)
    assert (data["live"]["name"], data["live"]["role"], data["previous"]["name"]) == (
        "mmsearch__v1", "live", "mmsearch__v2")
    assert data["caught_up"] == 0


def test_drop_needs_confirmation(server: FakeAdminServer) -> None:
    cli(server, "create", "--model", "clip-vit-b-32")
    no = cli(server, "drop", "mmsearch__v2", input="n\n")
    assert no.exit_code == 1 and "not dropped" in no.stderr
    eof = cli(server, "drop", "mmsearch__v2")  # no answer on stdin
    assert eof.exit_code == 1 and "not dropped" in eof.stderr
    assert not any(method == "DropCollection" for method, _ in server.admin.calls)

    yes = cli(server, "drop", "mmsearch__v2", input="y\n")
    assert yes.exit_code == 0 and "dropped mmsearch__v2" in yes.stdout
    live = cli(server, "drop", "mmsearch__v1", "--yes")
    assert live.exit_code == 1 and "DropCollection failed: FAILED_PRECONDITION" in live.stderr
    assert "may not be dropped" in live.stderr
    assert cli(server, "drop", "nope", "-y").exit_code == 1


def test_token_scope_and_unreachable() -> None:
    server = FakeAdminServer(FakeAdmin(tokens={"ops": {"admin"}, "reader": {"search"}}))
    try:
        assert cli(server, "list", token="ops").exit_code == 0
        denied = cli(server, "list", token="reader")
        assert denied.exit_code == 1 and "PERMISSION_DENIED" in denied.stderr and '"admin" scope' in denied.stderr
        missing = cli(server, "list")
        assert missing.exit_code == 1 and "UNAUTHENTICATED" in missing.stderr and "MMSEARCH_TOKEN" in missing.stderr
    finally:
        server.stop()
    down = runner.invoke(app, ["--address", "127.0.0.1:1", "--timeout", "2", "index", "list"])
    assert down.exit_code == 1 and "UNAVAILABLE" in down.output and "Traceback" not in down.output


def test_help_lists_index_commands() -> None:
    result = runner.invoke(app, ["index", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for command in ("list", "create", "backfill", "promote", "rollback", "drop"):
        assert command in result.output
