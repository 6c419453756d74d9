"""`mmsearch demo`: the whole product in one command, on photos that ship with installed packages.

1. writes scikit-image's and scikit-learn's bundled photos to OUT/photos (plus a CSV in
   the seeds' id,path,label shape) and a horizontally flipped cat to OUT/queries (a
   query only: it is never ingested, so image -> image has to find the original);
2. starts the local suite on free loopback ports (unless --address names a running one);
3. ingests the CSV, re-using `mmsearch ingest`'s progress bar and summary;
4. runs the seeds' kinds of queries (text -> image, text -> text, image -> image,
   image -> text, composed, hybrid), prints a table for each and writes one contact
   sheet per query to OUT/sheets, plus OUT/index.html showing them all.
"""
from __future__ import annotations

import csv
import html
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import ImageOps
from rich.markup import escape
from rich.table import Table

from mmsearch.cli import output
from mmsearch.cli.discovery import read_csv
from mmsearch.client import Fusion, FusionMethod, SearchClient, SearchResult, Target

if TYPE_CHECKING:
    from mmsearch.cli.main import Connection
    from mmsearch.suite import LocalSuite


@dataclass(frozen=True)
class DemoQuery:
    kind: str  # the seeds' name for it
    text: str | None = None
    image: str | None = None  # file name under OUT/queries or OUT/photos
    instruction: str | None = None
    target: Target = Target.IMAGE
    fusion: Fusion | None = None
    filter: str = ""
    expected: str | None = None  # the photo that should rank first, when there is one

    @property
    def description(self) -> str:
        parts = []
        if self.text:
            parts.append(f"“{self.text}”")
        if self.image:
            parts.append(Path(self.image).name)
        if self.instruction:
            parts.append(f"+ “{self.instruction}”")
        if self.fusion:
            parts.append(f"({self.fusion.method.value})")
        if self.filter:
            parts.append(f"where {self.filter}")
        return " ".join(parts)


FLIPPED = "cat_flipped.jpg"

QUERIES: tuple[DemoQuery, ...] = (
    DemoQuery("text → image", text="a cat", expected="cat"),
    DemoQuery("text → image", text="a cup of coffee", expected="coffee"),
    DemoQuery("text → text", text="a cup of espresso", target=Target.CAPTION, expected="coffee"),
    DemoQuery("image → image", image=FLIPPED, expected="cat"),
    DemoQuery("image → text", image=FLIPPED, target=Target.CAPTION, expected="cat"),
    DemoQuery("composed", image="coffee.jpg", instruction="on a pink flower", target=Target.IMAGE),
    DemoQuery("hybrid", text="a tabby cat", target=Target.HYBRID, fusion=Fusion(FusionMethod.RRF), expected="cat"),
    DemoQuery(
        "hybrid + filter",
        text="a rocket",
        target=Target.HYBRID,
        fusion=Fusion(FusionMethod.WEIGHTED),
        filter='metadata["label"] != "rocket"',
    ),
)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48]


def write_photos(out: Path) -> tuple[Path, Path]:
    """Writes the sample photos, their CSV and the flipped query; returns (csv, queries dir)."""
    from services.lite_models.sample_photos import load_sample_photos

    photos_dir, queries_dir = out / "photos", out / "queries"
    photos_dir.mkdir(parents=True, exist_ok=True)
    queries_dir.mkdir(parents=True, exist_ok=True)
    csv_path = photos_dir / "reverse_image_search.csv"
    rows = []
    for photo in load_sample_photos():
        path = photos_dir / f"{photo.name}.jpg"
        if not path.exists():  # stable bytes across re-runs: re-ingest reports "unchanged"
            photo.image.convert("RGB").save(path, format="JPEG", quality=92)
        rows.append({"id": photo.name, "path": path.name, "label": photo.name, "description": photo.description})
        if photo.name == "cat":
            flipped = queries_dir / FLIPPED
            if not flipped.exists():
                ImageOps.mirror(photo.image.convert("RGB")).save(flipped, format="JPEG", quality=92)
    with csv_path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "path", "label", "description"])
        writer.writeheader()
        writer.writerows(rows)
    return csv_path, queries_dir


def run_queries(client: SearchClient, out: Path, top_k: int) -> list[tuple[DemoQuery, SearchResult, Path]]:
    sheets_dir = out / "sheets"
    sheets_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for n, q in enumerate(QUERIES, start=1):
        image_path = None
        if q.image:
            image_path = out / "queries" / q.image
            if not image_path.exists():
                image_path = out / "photos" / q.image
        result = client.search(
            q.text,
            image=image_path,
            instruction=q.instruction,
            target=q.target,
            fusion=q.fusion,
            top_k=top_k,
            filter=q.filter,
        )
        label = output.query_label(q.text, q.image, q.instruction, q.target)
        title = f"{n}. {q.kind}: {q.description}"
        output.console.print()
        output.console.print(output.hits_table(result, title=title))
        line = f"[dim]{output.timings_line(result)}[/]"
        if q.expected:
            top = _label_of(result)
            mark = "[green]✓[/]" if top == q.expected else "[yellow]✗[/]"
            line += f"   top hit: {escape(top) or '-'} {mark} (expected {q.expected})"
        output.console.print(line)
        sheet = sheets_dir / f"{n:02d}_{_slug(q.kind)}_{_slug(q.description)}.png"
        output.write_sheet(
            sheet,
            result,
            label=label,
            text=q.text,
            image=str(image_path) if image_path else None,
            instruction=q.instruction,
            title=f"{q.kind}: {q.description}",
        )
        results.append((q, result, sheet))
    return results


def _label_of(result: SearchResult) -> str:
    if not result.hits:
        return ""
    hit = result.hits[0]
    return str(hit.metadata.get("label") or hit.id)


DEFAULT_LIVE_URL = "http://127.0.0.1:8080/"  # `mmsearch up`'s gateway


def live_page_url(search_address: str | None = None, data_dir: Path = Path("var")) -> str:
    """The search page of a running suite: the gateway URL in `<data_dir>/suite.json` (of the
    suite serving `search_address`, when given), else `mmsearch up`'s default."""
    try:
        state = json.loads((data_dir / "suite.json").read_text())
    except (OSError, ValueError):
        return DEFAULT_LIVE_URL
    url = state.get("gateway_url") if isinstance(state, dict) else None
    if url and (search_address is None or state.get("search_address") == search_address):
        return str(url)
    return DEFAULT_LIVE_URL


def _live_link(url: str) -> str:
    """A link to the live search page that says whether it answers now (an image probe:
    no CORS needed from a file:// page)."""
    u = html.escape(url, quote=True)
    src = json.dumps(url + "static/favicon.svg").replace("<", "\\u003c")  # never ends the script
    return (
        f"<p id='live'>Live search page: <a href='{u}'>{u}</a> "
        "<span id='live-state'>(checking…)</span></p>\n<script>\n"
        "const probe = new Image(), state = document.getElementById('live-state');\n"
        "probe.onload = () => { state.textContent = '(the suite is running: search live)'; };\n"
        "probe.onerror = () => { state.textContent = '(not running now: start it with mmsearch up, then reload)'; };\n"
        f"probe.src = {src};\n</script>"
    )


def write_index(out: Path, results: list[tuple[DemoQuery, SearchResult, Path]], live_url: str = DEFAULT_LIVE_URL) -> Path:
    parts = [
        "<!doctype html><meta charset='utf-8'><title>mmsearch demo</title>",
        "<style>body{font-family:sans-serif;background:#f6f6f3;margin:2em}img{max-width:100%;border:1px solid #ddd}</style>",
        "<h1>mmsearch demo</h1>",
        _live_link(live_url),
    ]
    for n, (q, result, sheet) in enumerate(results, start=1):
        rel = sheet.relative_to(out).as_posix()
        top = _label_of(result)
        parts.append(f"<h2>{n}. {html.escape(q.kind)}: {html.escape(q.description)}</h2>")
        parts.append(f"<p>top hit: {html.escape(top)}</p><a href='{rel}'><img src='{rel}'></a>")
    index = out / "index.html"
    index.write_text("\n".join(parts), encoding="utf-8")
    return index


def run_demo(
    conn: Connection,
    *,
    out: Path,
    data_dir: Path | None = None,
    top_k: int = 8,
    start_timeout_s: float = 300.0,
    verbose: bool = False,
) -> int:
    """Returns the exit code: 1 when ingest failed, else 0 (a surprising ranking only warns)."""
    from mmsearch.cli.main import print_ingest_summary, run_ingest
    from mmsearch.suite import LocalSuite, SuiteConfig  # the servers' side: `demo` needs them

    started = time.monotonic()
    out = out.expanduser().resolve()
    csv_path, _ = write_photos(out)
    items = read_csv(csv_path)
    output.err_console.print(f"wrote {len(items)} sample photos to [bold]{escape(str(csv_path.parent))}[/]")

    suite: LocalSuite | None = None
    address = conn.address
    if not conn.address_given:
        config = SuiteConfig(
            data_dir=data_dir or out / "var", ports="auto", metrics=False, start_timeout_s=start_timeout_s
        )
        printer = output.SuiteLogPrinter(
            quiet_levels=() if verbose else ("debug", "info"), show_unstructured=verbose
        )
        suite = LocalSuite(
            config,
            on_line=printer,
            on_ready=lambda name, addr, took: output.err_console.print(
                f"[bold green]✓[/] {name} ready on {addr} ({took:.1f}s)"
            ),
        )
        output.err_console.print(f"starting the local suite (logs in {escape(str(suite.data_dir / 'logs'))}) …")
        suite.start()
        address = suite.search_address
    try:
        with conn.client(address) as client:
            client.wait_until_ready(timeout=60)
            summary = run_ingest(client, items)
            print_ingest_summary(summary, items)
            if summary.failed:
                return 1
            results = run_queries(client, out, top_k)
            stats = client.stats()
    finally:
        if suite is not None:
            output.err_console.print("stopping the local suite …")
            suite.stop()
    index = write_index(out, results, live_page_url(address if conn.address_given else None))

    table = Table(title="demo summary", title_justify="left", title_style="bold")
    for col in ("#", "query", "top hit", "expected", "contact sheet"):
        table.add_column(col, overflow="fold")
    for n, (q, result, sheet) in enumerate(results, start=1):
        top = _label_of(result)
        expected = q.expected or ""
        style = "" if not expected else ("green" if top == expected else "yellow")
        table.add_row(
            str(n), escape(f"{q.kind}: {q.description}"), f"[{style}]{escape(top)}[/]" if style else escape(top), expected, sheet.name
        )
    output.console.print()
    output.console.print(table)
    output.console.print(
        f"{stats.item_count} items in collection {stats.collection!r} · embedder {stats.embedder_model_id} "
        f"(dim {stats.dimension}) · captioner {stats.captioner_model_id} · {time.monotonic() - started:.0f}s"
    )
    output.console.print(f"contact sheets: [bold]{escape(str(out / 'sheets'))}[/]   (overview: {escape(str(index))})")
    return 0


__all__ = ["QUERIES", "DemoQuery", "run_demo", "write_photos"]
