"""`mmsearch`: run the local suite, ingest, search (with contact sheets), manage items.

Connection options (`--address`, `--token`, TLS) come before the command and also
read the environment (MMSEARCH_ADDRESS, MMSEARCH_TOKEN, ...):

    mmsearch up
    mmsearch ingest photos/reverse_image_search.csv
    mmsearch search --text "a cat" --out cat.png
    mmsearch --address search.prod:443 --tls --token "$TOKEN" stats
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from mmsearch.cli import output
from mmsearch.cli.discovery import DiscoveryError, LocalItem, discover
from mmsearch.client import (
    DEFAULT_ADDRESS,
    AdminClient,
    BackfillOutcome,
    BackfillProgress,
    BackfillStatus,
    ConnectionConfig,
    Example,
    Fusion,
    FusionMethod,
    IndexBackfillOutcome,
    IndexBackfillProgress,
    IndexBackfillStatus,
    IngestItem,
    IngestSummary,
    IngestUpdate,
    SearchAllProgress,
    SearchClient,
    SearchError,
    SearchResult,
    SwitchResult,
    Target,
    check_health,
)
from mmsearch.client._convert import duration_ms

T = TypeVar("T")

app = typer.Typer(
    name="mmsearch",
    help="Multimodal image search on Milvus: run the local suite, ingest images, search by text, image or both.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class Mode(str, Enum):
    image = "image"
    caption = "caption"
    hybrid = "hybrid"
    keyword = "keyword"


class FusionChoice(str, Enum):
    rrf = "rrf"
    weighted = "weighted"


@dataclass
class Connection:
    """The global options: where the search service is and how to talk to it."""

    address: str = DEFAULT_ADDRESS
    address_given: bool = False
    token: str | None = None
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str | None = None
    timeout: float = 30.0

    def config(self, address: str | None = None) -> ConnectionConfig:
        return ConnectionConfig(
            address=address or self.address,
            token=self.token,
            tls=self.tls,
            root_cert=self.ca_file,
            client_cert=self.cert_file,
            client_key=self.key_file,
            server_name=self.server_name,
        )

    def client(self, address: str | None = None) -> SearchClient:
        return SearchClient.from_config(self.config(address), timeout=self.timeout)

    def admin(self) -> AdminClient:
        """A client of the Admin service (served by the search process, on its address)."""
        return AdminClient.from_config(self.config(), timeout=self.timeout)

    def call(self, fn: Callable[[SearchClient], T]) -> T:
        """Runs `fn` with a client; a failed call becomes the CLI's error message and exit 1."""
        with self.client() as client:
            try:
                return fn(client)
            except SearchError as e:
                raise _call_error(e, self.address) from None


def _conn(ctx: typer.Context) -> Connection:
    obj = ctx.find_root().obj
    return obj if isinstance(obj, Connection) else Connection()


def _fail(message: str, code: int = 1, hint: str = "") -> typer.Exit:
    """Prints `error: message` (taken literally: server messages may hold brackets) and a hint."""
    output.err_console.print(Text.assemble(("error: ", "bold red"), message), highlight=False, soft_wrap=True)
    if hint:
        output.err_console.print(hint, highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _call_error(e: SearchError, address: str) -> typer.Exit:
    hint = ""
    if e.code.name == "UNAVAILABLE":
        hint = f"  is the suite running? start it with [bold]mmsearch up[/] (or pass --address; now {escape(address)})"
    elif e.code.name == "UNAUTHENTICATED":
        hint = "  pass --token or set MMSEARCH_TOKEN"
    return _fail(f"{e.method or 'call'} failed: {e.code.name}: {e.details}", hint=hint)


@app.callback()
def main(
    ctx: typer.Context,
    address: Annotated[
        str | None, typer.Option(envvar="MMSEARCH_ADDRESS", help=f"Search service host:port (default {DEFAULT_ADDRESS}).")
    ] = None,
    token: Annotated[str | None, typer.Option(envvar="MMSEARCH_TOKEN", help="Bearer token.", show_default=False)] = None,
    tls: Annotated[bool, typer.Option("--tls/--no-tls", envvar="MMSEARCH_TLS", help="Use TLS (system roots unless --ca-file).")] = False,
    ca_file: Annotated[Path | None, typer.Option(envvar="MMSEARCH_CA_FILE", help="CA bundle for the server certificate (implies --tls).")] = None,
    cert_file: Annotated[Path | None, typer.Option(envvar="MMSEARCH_CERT_FILE", help="Client certificate for mTLS.")] = None,
    key_file: Annotated[Path | None, typer.Option(envvar="MMSEARCH_KEY_FILE", help="Client key for mTLS.")] = None,
    server_name: Annotated[str | None, typer.Option(envvar="MMSEARCH_SERVER_NAME", help="Override the TLS server name.")] = None,
    timeout: Annotated[float, typer.Option(envvar="MMSEARCH_TIMEOUT", help="Deadline per call, seconds.")] = 30.0,
) -> None:
    ctx.obj = Connection(
        address=address or DEFAULT_ADDRESS,
        address_given=address is not None,
        token=token or None,
        tls=tls,
        ca_file=ca_file,
        cert_file=cert_file,
        key_file=key_file,
        server_name=server_name,
        timeout=timeout,
    )


# ---------------------------------------------------------------------------- servers

#: How to get the servers when only the client distribution is installed (pyproject.toml).
SERVER_INSTALL = 'pip install "mmsearch[server]"'


def missing_server_packages() -> list[str]:
    """The distributions of mmsearch's "server" extra that are not installed ([] when the
    extra is complete, or when mmsearch runs from a checkout without installed metadata)."""
    import re
    from importlib import metadata

    try:
        requirements = metadata.requires("mmsearch") or []
    except metadata.PackageNotFoundError:
        return []
    missing = []
    for requirement in requirements:
        spec, _, marker = requirement.partition(";")
        if not re.search(r"""extra\s*==\s*["']server["']""", marker):
            continue
        name = re.match(r"[A-Za-z0-9._-]+", spec.strip())
        if name is None:
            continue
        try:
            metadata.distribution(name.group(0))
        except metadata.PackageNotFoundError:
            missing.append(name.group(0))
    return missing


def _require_servers(command: str) -> None:
    """`mmsearch up` / `demo` run the services: with only the client installed, one line that
    says how to install them (exit 1) instead of an ImportError traceback."""
    missing = missing_server_packages()
    if not missing:
        try:  # the suite and the services' sample photos, imported only by these commands
            import mmsearch.suite  # noqa: F401
            import services  # noqa: F401
        except ImportError as e:
            missing = [e.name or str(e)]
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise _fail(f"`mmsearch {command}` needs the mmsearch servers, which are not installed (missing: {shown}); "
                    f"install them with: {SERVER_INSTALL}")


# ---------------------------------------------------------------------------- up


@app.command()
def up(
    data_dir: Annotated[Path, typer.Option(help="Where Milvus Lite data, logs and suite.json live.")] = Path("var"),
    milvus_server: Annotated[bool, typer.Option("--milvus-server", help="Run Milvus Lite as a gRPC server process instead of embedded.")] = False,
    milvus_uri: Annotated[str | None, typer.Option(envvar="MMSEARCH_MILVUS_URI", help="Use an existing Milvus (http://host:19530) instead of starting one.")] = None,
    embedder_backend: Annotated[str | None, typer.Option(help="Embedder backend (lite, clip, bge, dashscope); default: its settings.")] = None,
    captioner_backend: Annotated[str | None, typer.Option(help="Captioner backend (lite, dashscope, openai); default: its settings.")] = None,
    search_port: Annotated[int, typer.Option(help="Search service port.")] = 50050,
    embedder_port: Annotated[int, typer.Option(help="Embedder port.")] = 50051,
    captioner_port: Annotated[int, typer.Option(help="Captioner port.")] = 50052,
    milvus_port: Annotated[int, typer.Option(help="Milvus Lite server port (with --milvus-server).")] = 19530,
    metrics: Annotated[bool, typer.Option("--metrics/--no-metrics", help="Prometheus endpoints on 9100-9102.")] = True,
    file_root: Annotated[Path | None, typer.Option(help="Folder the search service may read file:// URIs from.")] = None,
    start_timeout: Annotated[float, typer.Option(help="Seconds each service may take to become SERVING.")] = 300.0,
    log_level: Annotated[str | None, typer.Option(help="Services' log level (DEBUG, INFO, ...).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Show only warnings and errors from the services.")] = False,
    defer_captions: Annotated[bool, typer.Option("--defer-captions", help="When captioning fails, store items with their caption pending (SEARCH_ON_CAPTION_FAILURE=defer) for `mmsearch backfill`.")] = False,
    keep_going: Annotated[bool, typer.Option("--keep-going", help="When a service dies after start-up, report it and keep the others serving (search degrades) instead of stopping everything.")] = False,
    gateway: Annotated[bool, typer.Option("--gateway/--no-gateway", help="Run the HTTP/JSON API and search page (services/gateway).")] = True,
    http_port: Annotated[int, typer.Option(help="HTTP port of the gateway (search page and HTTP/JSON API).")] = 8080,
) -> None:
    """Start Milvus (embedded Milvus Lite by default), the embedder, the captioner and the search service; Ctrl-C stops them."""
    _require_servers("up")
    from mmsearch.suite import LocalSuite, SuiteConfig, SuiteError, install_interrupt_handlers, wait_forever

    config = SuiteConfig(
        data_dir=data_dir,
        search_port=search_port,
        embedder_port=embedder_port,
        captioner_port=captioner_port,
        milvus_port=milvus_port,
        metrics=metrics,
        milvus="server" if milvus_server else "embedded",
        milvus_uri=milvus_uri,
        embedder_backend=embedder_backend,
        captioner_backend=captioner_backend,
        file_root=file_root,
        log_level=log_level,
        start_timeout_s=start_timeout,
        gateway=gateway,
        gateway_port=http_port,
        env={"SEARCH_ON_CAPTION_FAILURE": "defer"} if defer_captions else {},
    )
    printer = output.SuiteLogPrinter(quiet_levels=("debug", "info") if quiet else ())
    ready_lines: list[str] = []

    def on_ready(name: str, address: str, took: float) -> None:
        output.err_console.print(f"[bold green]✓[/] {name} ready on {address} ({took:.1f}s)")
        ready_lines.append(f"{name:<10} {address}")

    def report_death(error: SuiteError) -> None:  # --keep-going
        output.err_console.print(Text.assemble(("error: ", "bold red"), str(error)), highlight=False, soft_wrap=True)
        output.err_console.print(
            f"[yellow]--keep-going:[/] the other services keep running ({', '.join(suite.alive) or 'none'}); "
            "search serves what it can without it (mmsearch health shows what is down). Ctrl-C stops everything.",
            highlight=False)

    suite = LocalSuite(config, on_line=printer, on_ready=on_ready)
    restore = install_interrupt_handlers()
    output.err_console.print(
        f"starting the mmsearch suite · data in [bold]{escape(str(suite.data_dir))}[/] · Milvus: {escape(suite.milvus_uri)}"
    )
    try:
        with suite:
            output.err_console.print(
                Panel.fit(
                    "\n".join(ready_lines)
                    + (f"\n\nsearch page: {suite.gateway_url}" if suite.gateway_url else "")
                    + f"\n\ntry:  mmsearch --address {suite.search_address} demo"
                    + "\n      mmsearch ingest PATH;  mmsearch search --text 'a cat' --out cat.png"
                    + "\n\nCtrl-C stops everything",
                    title="mmsearch suite ready",
                    border_style="green",
                )
            )
            wait_forever(suite, keep_going=keep_going, on_death=report_death)
    except KeyboardInterrupt:
        output.err_console.print("stopped: all services shut down")
    except SuiteError as e:
        raise _fail(str(e)) from None
    finally:
        restore()


# ---------------------------------------------------------------------------- ingest


def _ingest_items(items: list[LocalItem]) -> list[IngestItem]:
    return [IngestItem(image=it.path, id=it.id, metadata=it.metadata or None) for it in items]


def run_ingest(client: SearchClient, items: list[LocalItem], chunk_size: int = 8, show_progress: bool = True) -> IngestSummary:
    """Streams items with a progress bar fed by the server's counts; returns the summary."""
    summary = IngestSummary()
    with output.ingest_progress() as progress:
        task = progress.add_task("ingest", total=len(items), stored=0, unchanged=0, failed=0, visible=show_progress)

        def on_update(update: IngestUpdate) -> None:
            p = update.progress
            progress.update(task, completed=p.done, stored=p.stored, unchanged=p.unchanged, failed=p.failed)

        summary = client.ingest_all(_ingest_items(items), chunk_size=chunk_size, on_update=on_update)
    return summary


def print_ingest_summary(summary: IngestSummary, items: list[LocalItem]) -> None:
    duplicates = summary.duplicates
    line = (
        f"[green]{summary.stored} stored[/] · {summary.unchanged} unchanged · "
        + (f"[yellow]{len(duplicates)} duplicate ids[/] · " if duplicates else "")
        + (f"[yellow]{summary.progress.deferred} deferred (caption pending: mmsearch backfill)[/] · "
           if summary.progress.deferred else "")
        + f"[{'red' if summary.failed else 'dim'}]{summary.failed} failed[/] of {len(items)} items"
    )
    output.console.print(line)
    names = [str(it.path) for it in items]
    if duplicates:  # not an error: the first item with the id was processed
        output.console.print(output.failures_table(duplicates, names, title="duplicate ids (not stored)"))
    if summary.failures:
        output.console.print(output.failures_table(summary.failures, names))


@app.command()
def ingest(
    ctx: typer.Context,
    path: Annotated[str, typer.Argument(help="A folder (recursive), a glob ('photos/**/*.jpg'), an image, or a CSV with id,path,label.")],
    chunk_size: Annotated[int, typer.Option(min=1, max=256, help="Items per stream message.")] = 8,
    as_json: Annotated[bool, typer.Option("--json", help="Print every outcome as JSON.")] = False,
) -> None:
    """Index images: caption, embed and store them. Exit code 1 when any item failed."""
    conn = _conn(ctx)
    try:
        items = discover(path)
    except DiscoveryError as e:
        raise _fail(str(e)) from None
    summary = conn.call(lambda client: run_ingest(client, items, chunk_size, show_progress=not as_json))
    if as_json:
        output.print_json(
            {
                "stored": summary.stored,
                "unchanged": summary.unchanged,
                "failed": summary.failed,
                "duplicate": len(summary.duplicates),
                "outcomes": [
                    {**output.to_jsonable(o), "path": str(items[o.index].path)} for o in summary.outcomes
                ],
            }
        )
    else:
        print_ingest_summary(summary, items)
    if summary.failed:
        raise typer.Exit(1)


# ---------------------------------------------------------------------------- search


@dataclass
class QuerySpec:
    text: str | None = None
    image: str | None = None
    instruction: str | None = None
    like: str | None = None
    # Multi-example query: (TEXT, PATH, URI or id:ID as given on the command line, weight).
    examples: list[tuple[str, float]] = field(default_factory=list)
    target: Target = Target.IMAGE
    legs: dict[str, float] | list[str] | None = None
    fusion: Fusion | None = None
    top_k: int = 10
    offset: int = 0
    filter: str = ""
    min_score: float | None = None
    group_by: str | None = None
    group_size: int = 0
    boost_recency: str | None = None

    @property
    def label(self) -> str:
        if self.examples:
            n_neg = sum(1 for _, w in self.examples if w < 0)
            source = f"{len(self.examples) - n_neg} examples" + (f", {n_neg} not" if n_neg else "")
            return output.query_label(None, None, None, self.target, source=source)
        if self.like is not None:
            return output.query_label(None, None, None, self.target, source=f"like {self.like}")
        return output.query_label(self.text, self.image, self.instruction, self.target)

    def query_kwargs(self) -> dict[str, Any]:
        """The query part of a search (shared by Search and SearchAll)."""
        kwargs: dict[str, Any] = {"target": self.target, "filter": self.filter, "min_score": self.min_score}
        if self.examples:
            kwargs["examples"] = [cli_example(spec, weight) for spec, weight in self.examples]
        elif self.like is not None:
            kwargs["like"] = self.like
        elif self.text is not None:
            kwargs["text"] = self.text
        else:
            kwargs["image"], kwargs["instruction"] = self.image, self.instruction
        return kwargs

    def run(self, client: SearchClient) -> SearchResult:
        return client.search(
            **self.query_kwargs(),
            legs=self.legs,
            fusion=self.fusion,
            top_k=self.top_k,
            offset=self.offset,
            group_by=self.group_by,
            group_size=self.group_size,
            boost_recency=self.boost_recency,
        )


def cli_example(spec: str, weight: float) -> Example:
    """`--example` / `--not`: `id:ID` is a stored item, an existing file or a URI is an image, else text."""
    if spec.startswith("id:"):
        return Example(id=spec[3:], weight=weight)
    if "://" in spec or Path(spec).expanduser().is_file():
        return Example(image=spec if "://" in spec else Path(spec).expanduser(), weight=weight)
    return Example(text=spec, weight=weight)


def parse_legs(spec: str) -> dict[str, float] | list[str]:
    """`image,caption,keyword` (RRF) or `image=0.5,caption=0.3,keyword=0.2` (weighted)."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    weighted = ["=" in p for p in parts]
    if not parts or (any(weighted) and not all(weighted)):
        raise ValueError(f"--legs {spec!r}: give legs as image,caption,keyword or with a weight each, "
                         "image=0.5,caption=0.3,keyword=0.2")
    names = [p.split("=", 1)[0].strip().lower() for p in parts]
    for name in names:
        if name not in ("image", "caption", "keyword"):
            raise ValueError(f"--legs: unknown leg {name!r}: image, caption or keyword")
    if len(set(names)) != len(names):
        raise ValueError(f"--legs {spec!r}: a leg is named twice")
    if not all(weighted):
        return names
    legs: dict[str, float] = {}
    for name, part in zip(names, parts, strict=True):
        try:
            legs[name] = float(part.split("=", 1)[1])
        except ValueError:
            raise ValueError(f"--legs: weight of {name} is not a number: {part!r}") from None
    return legs


def _check_search_options(query: QuerySpec, *, mode_given: bool, all_hits: bool, out: Path | None) -> None:
    """Bad combinations: a clear message, exit code 2."""
    direct = [n for n, v in (("--text", query.text), ("--image", query.image), ("--like", query.like)) if v is not None]
    if query.examples:
        if not any(w > 0 for _, w in query.examples):
            raise _fail("--not needs something to be like: --text, --image, --like or --example", 2)
    elif len(direct) != 1:
        raise _fail("give exactly one query: --text, --image (add --instruction for a composed query), --like ID, "
                    "or --example / --not (repeatable)", 2)
    if query.instruction is not None and query.image is None:
        raise _fail("--instruction needs --image", 2)
    if query.instruction is not None and query.examples:
        raise _fail("--instruction goes with a single --image query, not with --example / --not", 2)
    if query.image is not None and "://" not in query.image and not Path(query.image).expanduser().is_file():
        raise _fail(f"--image {query.image}: no such file", 2)
    if query.legs is not None and mode_given and query.target is not Target.HYBRID:
        raise _fail(f"--legs fuses several legs: it goes with --mode hybrid, not --mode {query.target.value}", 2)
    if query.target is Target.KEYWORD and (query.image is not None or query.examples):
        raise _fail("--mode keyword matches words: it takes --text (or --like ID), not images or examples", 2)
    if query.group_size and not query.group_by:
        raise _fail("--group-size needs --group-by FIELD", 2)
    if query.group_by and query.offset:
        raise _fail("--group-by does not page: leave out --offset", 2)
    if all_hits:
        if query.target in (Target.HYBRID, Target.KEYWORD):
            raise _fail("--all streams one vector target (--mode image or caption), not hybrid / --legs or "
                        "keyword (keyword hits page within --top-k / --offset)", 2)
        for flag, used in (("--group-by", query.group_by), ("--boost-recency", query.boost_recency),
                           ("--offset", query.offset), ("--out", out)):
            if used:
                raise _fail(f"--all streams every hit in rank order: leave out {flag}", 2)


def stream_all(conn: Connection, query: QuerySpec, limit: int, batch_size: int) -> int:
    """`--all`: every hit as one JSON line on stdout, progress on stderr; returns the count."""
    count = 0

    def run(client: SearchClient) -> int:
        nonlocal count
        with output.stream_progress(limit) as (progress, task):
            def on_progress(p: SearchAllProgress) -> None:
                output.flush_stdout()  # the previous batch's lines
                progress.update(task, completed=p.sent)

            for hit in client.search_all(limit=limit, batch_size=batch_size, on_progress=on_progress,
                                         **query.query_kwargs()):
                output.print_json_line(hit)
                count += 1
        return count

    conn.call(run)
    output.err_console.print(f"{count} hits streamed · {query.label}")
    return count


@app.command()
def search(
    ctx: typer.Context,
    text: Annotated[str | None, typer.Option("--text", "-t", help="Text query.")] = None,
    image: Annotated[str | None, typer.Option("--image", "-i", help="Query image: a local path, or a URI the server reads.")] = None,
    instruction: Annotated[str | None, typer.Option(help="With --image: a composed query ('the same in black').")] = None,
    like: Annotated[str | None, typer.Option("--like", help="More like this stored item (its id); the item itself is left out.")] = None,
    example: Annotated[list[str] | None, typer.Option("--example", "-e", help="Like this (repeatable): a text, an image path or URI, or id:ID (a stored item).")] = None,
    not_: Annotated[list[str] | None, typer.Option("--not", help="Not like this (repeatable, weight -1): a text, an image path or URI, or id:ID.")] = None,
    mode: Annotated[Mode | None, typer.Option("--mode", "-m", help="What to search: image or caption vectors, keyword (BM25 over captions and keywords), or hybrid (legs fused); default image, hybrid with --legs.", show_default=False)] = None,
    legs: Annotated[str | None, typer.Option("--legs", help="Hybrid legs: image,caption,keyword (RRF) or with weights image=0.5,caption=0.3,keyword=0.2 (weighted fusion).")] = None,
    fusion: Annotated[FusionChoice | None, typer.Option(help="Hybrid fusion; default rrf, weighted when --legs has weights.", show_default=False)] = None,
    image_weight: Annotated[float, typer.Option(help="Weighted fusion: weight of image scores.")] = 0.0,
    caption_weight: Annotated[float, typer.Option(help="Weighted fusion: weight of caption scores.")] = 0.0,
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="Number of hits.")] = 10,
    offset: Annotated[int, typer.Option(min=0, help="Skip this many best hits (pagination).")] = 0,
    filter: Annotated[str, typer.Option("--filter", "-f", help="Milvus expression, e.g. 'metadata[\"label\"] == \"cat\"'.")] = "",
    min_score: Annotated[float | None, typer.Option("--min-score", help="Drop hits scoring below this (higher is better; meaning per metric in docs/search.md).")] = None,
    group_by: Annotated[str | None, typer.Option("--group-by", help="At most --group-size hits per value of this indexed field (mmsearch stats lists them).")] = None,
    group_size: Annotated[int, typer.Option("--group-size", min=0, max=16, help="Hits per group with --group-by (0: 1).")] = 0,
    boost_recency: Annotated[str | None, typer.Option("--boost-recency", help="Boost recent items: the age at which the boost halves, e.g. 7d, 12h, 30m, or milliseconds.")] = None,
    all_hits: Annotated[bool, typer.Option("--all", help="Stream every hit in rank order as JSON lines (one hit per line; progress on stderr); image or caption mode.")] = False,
    limit: Annotated[int, typer.Option(min=0, help="With --all: stop after this many hits (0: all that match).")] = 0,
    batch_size: Annotated[int, typer.Option(min=0, max=1000, help="With --all: hits per message (0: the server's 256).")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write a contact sheet PNG here.")] = None,
) -> None:
    """Search by text, image, image + instruction, a stored item (--like) or examples (--example / --not); print a table, optionally write a contact sheet or stream every hit (--all)."""
    conn = _conn(ctx)
    try:
        leg_spec = parse_legs(legs) if legs is not None else None
        if boost_recency is not None and duration_ms(boost_recency) <= 0:
            raise ValueError(f"--boost-recency {boost_recency}: must be > 0")
    except ValueError as e:
        raise _fail(str(e), 2) from None
    target = Target(mode.value) if mode is not None else (Target.HYBRID if leg_spec is not None else Target.IMAGE)
    examples: list[tuple[str, float]] = []
    if example or not_:
        if image is not None:
            examples.append((image, 1.0))
        if text is not None:
            examples.append((text, 1.0))
        if like is not None:
            examples.append((f"id:{like}", 1.0))
        examples += [(e, 1.0) for e in example or []] + [(n, -1.0) for n in not_ or []]
    query = QuerySpec(
        text=text,
        image=image,
        instruction=instruction,
        like=like,
        examples=examples,
        target=target,
        legs=leg_spec,
        fusion=Fusion(FusionMethod(fusion.value if fusion else ("weighted" if isinstance(leg_spec, dict) else "rrf")),
                      image_weight=image_weight, caption_weight=caption_weight)
        if target is Target.HYBRID
        else None,
        top_k=top_k,
        offset=offset,
        filter=filter,
        min_score=min_score,
        group_by=group_by,
        group_size=group_size,
        boost_recency=boost_recency,
    )
    _check_search_options(query, mode_given=mode is not None, all_hits=all_hits, out=out)
    if all_hits:
        stream_all(conn, query, limit, batch_size)
        return
    result = conn.call(query.run)
    if as_json:
        output.print_json({"query": output.to_jsonable(query) | {"label": query.label}, **output.to_jsonable(result)})
    else:
        output.console.print(output.hits_table(result, title=query.label))
        output.console.print(f"[dim]{output.timings_line(result)}[/]")
    if out is not None:
        layout = output.write_sheet(out, result, label=query.label, text=text if text is not None else query.label,
                                    image=image if not query.examples else None, instruction=instruction)
        output.err_console.print(f"contact sheet: [bold]{escape(str(out))}[/] ({layout.size[0]}x{layout.size[1]}, {len(layout.tiles)} tiles)")


# ---------------------------------------------------------------------------- records


@app.command()
def get(
    ctx: typer.Context,
    ids: Annotated[list[str], typer.Argument(help="Item ids.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show stored items by id. Exit code 1 when any id is not stored."""
    conn = _conn(ctx)
    result = conn.call(lambda client: client.get(ids))
    if as_json:
        output.print_json(result)
    else:
        if result.records:
            output.console.print(output.records_table(result.records))
        for missing in result.missing_ids:
            output.console.print(f"[yellow]not found:[/] {escape(missing)}")
    if result.missing_ids:
        raise typer.Exit(1)


@app.command()
def delete(
    ctx: typer.Context,
    ids: Annotated[list[str], typer.Argument(help="Item ids.")],
) -> None:
    """Delete stored items by id (unknown ids are ignored)."""
    conn = _conn(ctx)
    deleted = conn.call(lambda client: client.delete(ids))
    output.console.print(f"deleted {deleted} of {len(ids)} ids")


@app.command()
def stats(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Describe the collection: item count, models, index, Milvus mode."""
    conn = _conn(ctx)
    result = conn.call(lambda client: client.stats())
    if as_json:
        output.print_json(result)
    else:
        output.console.print(output.stats_table(result))


@app.command()
def backfill(
    ctx: typer.Context,
    max_items: Annotated[int, typer.Option(help="At most this many pending items (0: all).")] = 0,
    rate: Annotated[float, typer.Option(help="Items per second (0: the server's ceiling, SEARCH_BACKFILL_MAX_ITEMS_PER_S).")] = 0.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (every outcome and the totals).")] = False,
) -> None:
    """Caption the items whose caption is pending (deferred while the captioner was down).

    Resumable and idempotent: run it again after an interruption; items already captioned
    are skipped. Exit 1 when any item failed (it stays pending).
    """
    conn = _conn(ctx)

    def run(client: SearchClient) -> tuple[list[BackfillOutcome], BackfillProgress]:
        outcomes: list[BackfillOutcome] = []
        progress = BackfillProgress()
        with output.backfill_progress() as bar:
            task = bar.add_task("backfill", total=None, captioned=0, failed=0, skipped=0, visible=not as_json)
            for update in client.backfill(max_items=max_items, max_items_per_s=rate):
                outcomes.extend(update.outcomes)
                progress = update.progress
                bar.update(task, total=progress.total, completed=progress.done, captioned=progress.captioned,
                           failed=progress.failed, skipped=progress.skipped)
        return outcomes, progress

    outcomes, progress = conn.call(run)
    failures = [o for o in outcomes if o.status is BackfillStatus.FAILED]
    if as_json:
        output.print_json({"progress": progress, "outcomes": outcomes})
    else:
        output.console.print(
            f"[green]{progress.captioned} captioned[/] · {progress.skipped} skipped · "
            f"[{'red' if failures else 'dim'}]{progress.failed} failed[/] of {progress.total} pending items"
        )
        for o in failures[:20]:
            output.console.print(Text.assemble(("  failed ", "red"), o.id, ": ", o.message), soft_wrap=True)
    if failures:
        raise typer.Exit(1)


# Search's per-capability health names (docs/operations.md, "Search health").
SEARCH_CAPABILITIES = ("search.text", "ingest", "ingest.caption")


def _health_or_error(conn: Connection, address: str, service: str) -> str:
    try:
        return check_health(conn.config(address), service=service, timeout=min(conn.timeout, 5.0))
    except SearchError as e:
        return e.code.name


@app.command()
def health(
    ctx: typer.Context,
    embedder_address: Annotated[str, typer.Option(envvar="MMSEARCH_EMBEDDER_ADDRESS", help="Embedder host:port.")] = "127.0.0.1:50051",
    captioner_address: Annotated[str, typer.Option(envvar="MMSEARCH_CAPTIONER_ADDRESS", help="Captioner host:port.")] = "127.0.0.1:50052",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """grpc.health.v1 status of the search service, the embedder and the captioner. Exit 1 unless all SERVING.

    A SERVING search also lists its capabilities that are NOT_SERVING ("degraded": it answers
    the calls that do not need the missing upstream; docs/operations.md).
    """
    conn = _conn(ctx)
    rows: list[dict[str, Any]] = []
    for name, address in (("search", conn.address), ("embedder", embedder_address), ("captioner", captioner_address)):
        try:
            status = check_health(conn.config(address), timeout=min(conn.timeout, 5.0))
        except SearchError as e:
            status = f"{e.code.name}: {e.details}"
        row: dict[str, Any] = {"service": name, "address": address, "status": status}
        if name == "search" and status == "SERVING":
            row["degraded"] = [
                capability for capability in SEARCH_CAPABILITIES
                if _health_or_error(conn, address, capability) not in ("SERVING", "SERVICE_UNKNOWN")
            ]
        rows.append(row)
    if as_json:
        output.print_json(rows)
    else:
        table = Table()
        for col in ("service", "address", "status"):
            table.add_column(col)
        for row in rows:
            style = "green" if row["status"] == "SERVING" else "red"
            degraded = f" [yellow](degraded: {', '.join(row['degraded'])} not serving)[/]" if row.get("degraded") else ""
            table.add_row(row["service"], row["address"], f"[{style}]{escape(row['status'])}[/]{degraded}")
        output.console.print(table)
    if any(row["status"] != "SERVING" for row in rows):
        raise typer.Exit(1)


# ---------------------------------------------------------------------------- demo


@app.command()
def demo(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder: photos, queries, contact sheets.")] = Path("out/demo"),
    data_dir: Annotated[Path | None, typer.Option(help="Suite data dir when the demo starts its own suite [default: OUT/var].")] = None,
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="Hits per query.")] = 8,
    start_timeout: Annotated[float, typer.Option(help="Seconds each service may take to become SERVING.")] = 300.0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Stream the services' logs.")] = False,
) -> None:
    """Start the suite (unless --address is given), index the sample photos, run every kind of query, write contact sheets."""
    _require_servers("demo")
    from mmsearch.cli.demo import run_demo
    from mmsearch.suite import SuiteError

    conn = _conn(ctx)
    try:
        code = run_demo(
            conn,
            out=out,
            data_dir=data_dir,
            top_k=top_k,
            start_timeout_s=start_timeout,
            verbose=verbose,
        )
    except SuiteError as e:
        raise _fail(str(e)) from None
    except SearchError as e:
        raise _call_error(e, conn.address) from None
    if code:
        raise typer.Exit(code)



# ---------------------------------------------------------------------------- index (model change)

index_app = typer.Typer(
    name="index",
    help="Change the embedding model without downtime: list the index's collections, create a candidate for a "
         "new model, backfill it, promote it, roll back, drop old versions (the Admin service; needs the \"admin\" "
         "scope with scoped tokens).",
    no_args_is_help=True,
    rich_markup_mode="rich",
)
app.add_typer(index_app, name="index")

#: What to say after an Admin call's error, by status code (after the one-line error).
_ADMIN_HINTS = {
    "PERMISSION_DENIED": "  the token needs the \"admin\" scope",
    "ABORTED": "  another backfill, promote or rollback is running on the server; retry later",
}


def _admin_call(ctx: typer.Context, fn: Callable[[AdminClient], T], hints: dict[str, str] | None = None) -> T:
    """Runs `fn` with an admin client; a failed call prints one line (status and the
    server's message), maybe a hint, and exits 1."""
    conn = _conn(ctx)
    with conn.admin() as client:
        try:
            return fn(client)
        except SearchError as e:
            hint = {**_ADMIN_HINTS, **(hints or {})}.get(e.code.name)
            if hint is None:
                raise _call_error(e, conn.address) from None
            raise _fail(f"{e.method or 'call'} failed: {e.code.name}: {e.details}", hint=hint) from None


@index_app.command("list")
def index_list(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """The index's collections: name, version, model, dimension, items, role, embedder target."""
    listing = _admin_call(ctx, lambda client: client.list_collections())
    if as_json:
        output.print_json(listing)
    else:
        output.console.print(output.collections_table(listing))


@index_app.command("create")
def index_create(
    ctx: typer.Context,
    model: Annotated[str, typer.Option("--model", "-m", help="The new embedder model id (the server maps it to an embedder: SEARCH_MODEL_EMBEDDERS).", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Create the candidate collection for a new model; from then on ingest writes to both."""
    candidate = _admin_call(ctx, lambda client: client.create_candidate(model))
    if as_json:
        output.print_json(candidate)
        return
    output.console.print(Text.assemble("created candidate ", output.collection_line(candidate),
                                       f" · embedder {candidate.embedder_target or 'none'}"), soft_wrap=True)
    output.console.print("next: [bold]mmsearch index backfill[/], then [bold]mmsearch index promote[/]")


@index_app.command("backfill")
def index_backfill(
    ctx: typer.Context,
    rate: Annotated[float, typer.Option(min=0.0, help="Items per second (0: as fast as the embedder allows).")] = 0.0,
    max_items: Annotated[int, typer.Option(min=0, help="Stop after this many items (0: all); run again to continue.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (every outcome and the totals).")] = False,
) -> None:
    """Re-embed the live items into the candidate with its model (ids, captions, metadata kept).

    Resumable and idempotent: items already in the candidate are skipped. Exit 1 when any
    item failed.
    """

    def run(client: AdminClient) -> tuple[list[IndexBackfillOutcome], IndexBackfillProgress]:
        outcomes: list[IndexBackfillOutcome] = []
        progress = IndexBackfillProgress()
        with output.index_backfill_progress() as bar:
            task = bar.add_task("index backfill", total=None, copied=0, skipped=0, failed=0, visible=not as_json)
            for update in client.backfill(max_items_per_s=rate, max_items=max_items):
                outcomes.extend(update.outcomes)
                progress = update.progress
                bar.update(task, total=progress.total, completed=progress.done, copied=progress.copied,
                           skipped=progress.skipped, failed=progress.failed)
        return outcomes, progress

    outcomes, progress = _admin_call(ctx, run)
    failures = [o for o in outcomes if o.status is IndexBackfillStatus.FAILED]
    if as_json:
        output.print_json({"progress": progress, "outcomes": outcomes})
    else:
        output.console.print(
            f"[green]{progress.copied} copied[/] · {progress.skipped} skipped · "
            f"[{'red' if failures else 'dim'}]{progress.failed} failed[/] of {progress.total} live items"
        )
        for o in failures[:20]:
            code = f"{o.code.name}: " if o.code else ""
            output.console.print(Text.assemble(("  failed ", "red"), o.id, ": ", code, o.message), soft_wrap=True)
        if len(failures) > 20:
            output.console.print(f"  … and {len(failures) - 20} more (--json lists them all)")
    if failures or progress.failed:
        raise typer.Exit(1)


def _print_switch(result: SwitchResult, as_json: bool) -> None:
    if as_json:
        output.print_json(result)
        return
    output.console.print(Text.assemble(("live:     ", "bold green"), output.collection_line(result.live)), soft_wrap=True)
    output.console.print(Text.assemble(("previous: ", "bold"), output.collection_line(result.previous)), soft_wrap=True)
    output.console.print(f"caught up: {result.caught_up} items copied before the switch")


_FORCE_HINT = {"FAILED_PRECONDITION": "  when the counts differ, --force switches anyway"}


@index_app.command("promote")
def index_promote(
    ctx: typer.Context,
    force: Annotated[bool, typer.Option("--force", help="Switch even when the candidate's item count differs from the live one after catch-up.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Make the candidate live: catch up, compare counts (a difference needs --force), swap the alias."""
    result = _admin_call(ctx, lambda client: client.promote(force=force), hints=_FORCE_HINT)
    _print_switch(result, as_json)


@index_app.command("rollback")
def index_rollback(
    ctx: typer.Context,
    force: Annotated[bool, typer.Option("--force", help="Switch even when the item counts differ after catch-up.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Swap the alias back to the previous collection (same catch-up and count check)."""
    result = _admin_call(ctx, lambda client: client.rollback(force=force), hints=_FORCE_HINT)
    _print_switch(result, as_json)


@index_app.command("drop")
def index_drop(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The collection to drop (mmsearch index list names them); never the live one.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Drop a collection that is not live (a failed candidate, a version no longer needed for rollback)."""
    if not yes:
        try:
            confirmed = typer.confirm(f"drop collection {name} and every item in it?", default=False,
                                      err=True)
        except (typer.Abort, EOFError):
            confirmed = False
        if not confirmed:
            raise _fail(f"{name} not dropped (confirm, or pass --yes)")
    _admin_call(ctx, lambda client: client.drop_collection(name))
    output.console.print(f"dropped {escape(name)}")


if __name__ == "__main__":  # python -m mmsearch.cli.main
    app()
