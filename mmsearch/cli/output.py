"""Terminal output of the CLI: tables, JSON, ingest progress, suite logs, contact sheets."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import sys
import threading
from collections.abc import Iterator, Sequence
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from mmsearch.cli.contact_sheet import SheetHit, SheetLayout, SheetQuery, load_image, local_path_of, write_contact_sheet
from mmsearch.client import (
    CollectionInfo,
    Hit,
    IndexCollections,
    IngestOutcome,
    Record,
    Role,
    SearchResult,
    Stats,
    Target,
)


def _width(stream: object) -> int | None:
    """Terminal width on a terminal (or $COLUMNS); 120 when piped, so CI logs keep captions."""
    isatty = getattr(stream, "isatty", lambda: False)
    return None if isatty() or os.environ.get("COLUMNS") else 120


console = Console(highlight=False, width=_width(sys.stdout))
err_console = Console(stderr=True, highlight=False, width=_width(sys.stderr))

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def short_id(item_id: str) -> str:
    """Content-hash ids (64 hex) shortened for tables; `--json` prints them whole."""
    return item_id[:12] + "…" if _HEX64.match(item_id) else item_id


def short_uri(uri: str) -> str:
    path = local_path_of(uri)
    if path is not None:
        return path.name
    return uri


def hit_name(hit: Hit | Record) -> str:
    name = short_uri(hit.uri) if hit.uri else ""
    ident = short_id(hit.id)
    if not name or Path(name).stem == hit.id:
        return name or ident
    return f"{ident} · {name}"


def to_jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Enum):
        return value.value if isinstance(value.value, str) else value.name  # grpc.StatusCode -> its name
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    return value


def print_json(value: Any) -> None:
    console.print_json(json.dumps(to_jsonable(value), ensure_ascii=False))


def print_json_line(value: Any) -> None:
    """One compact JSON document on one line of stdout (JSON lines: never wrapped or styled)."""
    sys.stdout.write(json.dumps(to_jsonable(value), ensure_ascii=False, separators=(",", ":")) + "\n")


def flush_stdout() -> None:
    sys.stdout.flush()


# ---------------------------------------------------------------------------- search


def query_label(
    text: str | None, image: str | None, instruction: str | None, target: Target, source: str | None = None
) -> str:
    """"text → image", "image → text", "image + text → image", "text → hybrid", "like ID → image", ..."""
    if source is None:
        source = "image + text" if instruction else ("image" if image else "text")
    dest = {Target.IMAGE: "image", Target.CAPTION: "text", Target.HYBRID: "hybrid", Target.KEYWORD: "keyword"}[target]
    return f"{source} → {dest}"


def hits_table(result: SearchResult, title: str | None = None) -> Table:
    table = Table(title=Text(title) if title else None, title_justify="left", title_style="bold", expand=False)
    table.add_column("rank", justify="right", style="bold")
    table.add_column("score", justify="right", style="cyan")
    table.add_column("id", no_wrap=True, overflow="ellipsis", max_width=22)
    table.add_column("uri", no_wrap=True, overflow="ellipsis", max_width=26, style="dim")
    table.add_column("caption", overflow="fold", ratio=1)
    for hit in result.hits:
        table.add_row(str(hit.rank), f"{hit.score:.4f}", short_id(hit.id), short_uri(hit.uri), Text(hit.caption))
    if not result.hits:
        table.add_row("", "", "", "", Text("no hits", style="dim"))
    return table


def timings_line(result: SearchResult) -> str:
    t = result.timings
    return f"{len(result.hits)} hits · target {result.target.value} · embed {t.embed_ms:.1f} ms · milvus {t.milvus_ms:.1f} ms · total {t.total_ms:.1f} ms"


def write_sheet(
    out: Path,
    result: SearchResult,
    *,
    label: str,
    text: str | None,
    image: str | None,
    instruction: str | None,
    title: str | None = None,
) -> SheetLayout:
    query_image = load_image(image) if image else None
    query_text = text
    if image:
        # under the picture: its file name; without a picture (a remote URI): the URI itself
        query_text = image if query_image is None else (local_path_of(image) or Path(image)).name
    query = SheetQuery(mode=label, text=query_text, image=query_image, instruction=instruction)
    hits = [
        SheetHit(rank=h.rank, score=h.score, name=hit_name(h), caption=h.caption, image=load_image(h.uri))
        for h in result.hits
    ]
    if title:  # the title already names the query
        subtitle = timings_line(result)
    else:
        subtitle_query = f"“{text}”" if text else f"{query_text}" + (f" + “{instruction}”" if instruction else "")
        subtitle = f"{subtitle_query} · {timings_line(result)}"
    return write_contact_sheet(out, query, hits, title=title, subtitle=subtitle)


# ---------------------------------------------------------------------------- records / stats


def records_table(records: Sequence[Record]) -> Table:
    table = Table(show_lines=True)
    table.add_column("id", overflow="fold", max_width=28)
    table.add_column("uri", overflow="fold", style="dim", max_width=40)
    table.add_column("caption", overflow="fold", ratio=1)
    table.add_column("keywords", overflow="fold")
    table.add_column("metadata", overflow="fold")
    table.add_column("ingested", no_wrap=True, style="dim")
    for r in records:
        table.add_row(
            r.id,
            r.uri,
            Text(r.caption),
            Text(", ".join(r.keywords)),
            Text(json.dumps(r.metadata, ensure_ascii=False) if r.metadata else ""),
            r.ingested_at.strftime("%Y-%m-%d %H:%M:%S") if r.ingested_at else "",
        )
    return table


def stats_table(stats: Stats) -> Table:
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    for f in dataclasses.fields(stats):
        value = getattr(stats, f.name)
        table.add_row(f.name.replace("_", " "), ", ".join(value) or "-" if isinstance(value, tuple) else str(value))
    return table


# ---------------------------------------------------------------------------- index (model change)

_ROLE_STYLES = {Role.LIVE: "bold green", Role.CANDIDATE: "yellow", Role.PREVIOUS: "cyan", Role.RETIRED: "dim"}


def collections_table(listing: IndexCollections) -> Table:
    """`mmsearch index list`: one row per physical collection of the index."""
    table = Table(title=Text(f"index {listing.index}"), title_justify="left", title_style="bold")
    table.add_column("name", no_wrap=True)
    table.add_column("version", justify="right")
    table.add_column("model", overflow="fold")
    table.add_column("dimension", justify="right")
    table.add_column("items", justify="right")
    table.add_column("role", no_wrap=True)
    table.add_column("embedder target", overflow="fold")
    for c in listing.collections:
        table.add_row(
            c.name, str(c.version), Text(c.embedder_model_id), str(c.dimension), str(c.item_count),
            Text(c.role.value, style=_ROLE_STYLES.get(c.role, "")),
            Text(c.embedder_target) if c.embedder_target else Text("none", style="red"),
        )
    if not listing.collections:
        table.add_row("", "", Text("no collections", style="dim"), "", "", "", "")
    return table


def collection_line(c: CollectionInfo) -> Text:
    """"mmsearch__v2 (clip-vit-b-32, 512 dims, 1200 items)"."""
    return Text.assemble((c.name, "bold"), f" ({c.embedder_model_id}, {c.dimension} dims, {c.item_count} items)")


def index_backfill_progress() -> Progress:
    return _counted_progress("[green]{task.fields[copied]} copied[/] [dim]{task.fields[skipped]} skipped[/] "
                             "[red]{task.fields[failed]} failed[/]")


# ---------------------------------------------------------------------------- ingest


class RateColumn(ProgressColumn):
    """Items per second (rich's own speed column speaks bytes)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:5.1f} items/s" if speed else "   -- items/s", style="progress.data.speed")


def _counted_progress(counts: str) -> Progress:
    """A bar with a rate, counts by outcome (rich markup over task fields), elapsed and ETA."""
    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TextColumn(counts),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=err_console,
        transient=False,
    )


def ingest_progress() -> Progress:
    return _counted_progress("[green]{task.fields[stored]} stored[/] [dim]{task.fields[unchanged]} unchanged[/] "
                             "[red]{task.fields[failed]} failed[/]")


def backfill_progress() -> Progress:
    return _counted_progress("[green]{task.fields[captioned]} captioned[/] [dim]{task.fields[skipped]} skipped[/] "
                             "[red]{task.fields[failed]} failed[/]")


@contextlib.contextmanager
def stream_progress(limit: int) -> Iterator[tuple[Progress, TaskID]]:
    """`search --all`: hits streamed so far, on stderr (stdout carries the JSON lines)."""
    progress = Progress(SpinnerColumn(), TextColumn("[bold]search --all"), BarColumn(), MofNCompleteColumn(),
                        RateColumn(), TimeElapsedColumn(), console=err_console, transient=True)
    with progress:
        yield progress, progress.add_task("search", total=limit or None)


def failures_table(
    failures: Sequence[IngestOutcome], names: Sequence[str], limit: int = 50, title: str = "failed items"
) -> Table:
    table = Table(title=title, title_justify="left", title_style="bold red")
    table.add_column("#", justify="right")
    table.add_column("item", overflow="fold")
    table.add_column("code", style="red", no_wrap=True)
    table.add_column("reason", overflow="fold", ratio=1)
    for o in failures[:limit]:
        name = names[o.index] if o.index < len(names) else o.id
        code = o.error_code.name if o.error_code else ""
        table.add_row(str(o.index), name, code + (" (local)" if o.local else ""), Text(o.error_message))
    if len(failures) > limit:
        table.add_row("", f"… and {len(failures) - limit} more", "", "")
    return table


# ---------------------------------------------------------------------------- suite logs

_COLORS = {"milvus": "magenta", "embedder": "cyan", "captioner": "yellow", "search": "green"}
_LEVEL_STYLES = {"warning": "yellow", "error": "bold red", "critical": "bold red", "debug": "dim"}


class SuiteLogPrinter:
    """Prints children's log lines as `[embedder] info  started port=50051`, coloured per service."""

    def __init__(
        self, target: Console | None = None, quiet_levels: Sequence[str] = (), show_unstructured: bool = True
    ) -> None:
        self.console = target or err_console
        self.quiet_levels = {lvl.lower() for lvl in quiet_levels}
        # Non-JSON lines (tracebacks, third-party prints); a start-up failure quotes them anyway.
        self.show_unstructured = show_unstructured
        self.width = 10
        self._lock = threading.Lock()

    def __call__(self, name: str, line: str) -> None:
        from mmsearch.suite.process import format_log_line  # server side: `mmsearch up` / `demo` only

        level, message = format_log_line(line)
        if level.lower() in self.quiet_levels or (not level and not self.show_unstructured):
            return
        text = Text()
        text.append(f"[{name}]".ljust(self.width + 2), style=_COLORS.get(name, "blue"))
        if level:
            text.append(f"{level.lower():<7} ", style=_LEVEL_STYLES.get(level.lower(), "dim"))
        text.append(message)
        with self._lock:
            self.console.print(text, soft_wrap=True)
