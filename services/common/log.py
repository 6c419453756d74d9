"""Structured logging: one JSON object per line (or readable console lines for humans).

Every record goes through one handler on the root logger: structlog's own events and the
stdlib `logging` records of third-party libraries (pymilvus, grpc, httpx, uvicorn, ...),
which `structlog.stdlib.ProcessorFormatter` renders the same way. Exceptions are a field
of the object (`exception`), never extra lines; every object carries `service`.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import structlog

# pymilvus writes the traceback of a failed RPC into the message text ("...\nTraceback:\n
# ..."): it is moved to the `exception` field, like exc_info of any other record.
_TRACEBACK_MARKERS = ("\nTraceback:\n", "\nTraceback (most recent call last):\n")


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever `sys.stderr` is when a record comes (like logging's last-resort
    handler): records logged at exit (Milvus Lite's atexit) never hit a stream that a test
    runner swapped in and closed meanwhile."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def service_name(settings: Any) -> str:
    """The service a settings object configures, as logs name it: its env prefix
    (`SEARCH_` -> "search", `EMBEDDER_`, `CAPTIONER_`, `GATEWAY_`)."""
    config: Mapping[str, Any] = getattr(settings, "model_config", {}) or {}
    prefix = str(config.get("env_prefix") or type(settings).__name__)
    return prefix.rstrip("_").lower()


def _add_service(service: str) -> structlog.types.Processor:
    def add(logger: Any, method: str, event: structlog.types.EventDict) -> structlog.types.EventDict:
        event.setdefault("service", service)
        return event

    return add


def _split_embedded_traceback(logger: Any, method: str, event: structlog.types.EventDict) -> structlog.types.EventDict:
    text = event.get("event")
    if isinstance(text, str) and "exception" not in event and "exc_info" not in event:
        for marker in _TRACEBACK_MARKERS:
            head, found, tail = text.partition(marker)
            if found:
                event["event"] = head
                event["exception"] = (marker.lstrip("\n") + tail).rstrip()
                break
    return event


def _adopt_library_loggers() -> None:
    """Libraries that configured their own console handlers at import (pymilvus:
    `propagate=False` plus a plain-text StreamHandler) log through the root handler instead.
    Loggers set up later than this are not seen: services import their libraries first."""
    consoles = {id(s) for s in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__) if s is not None}
    for logger in list(logging.root.manager.loggerDict.values()):
        if not isinstance(logger, logging.Logger):
            continue  # a PlaceHolder
        console = [h for h in logger.handlers
                   if type(h) is logging.StreamHandler and id(getattr(h, "stream", None)) in consoles]
        for handler in console:
            logger.removeHandler(handler)
        if console or not logger.handlers:
            logger.propagate = True


def _quiet_progress_bars() -> None:
    """Progress bars (tqdm: transformers' "Loading weights", hub downloads) write bare
    lines to stderr; JSON logs go without them. An explicit HF_HUB_DISABLE_PROGRESS_BARS
    wins. Libraries imported later read the variable; those imported already are told."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if os.environ["HF_HUB_DISABLE_PROGRESS_BARS"].lower() not in ("1", "true", "yes", "on"):
        return
    for module, disable in (("huggingface_hub.utils", "disable_progress_bars"),
                            ("transformers.utils.logging", "disable_progress_bar")):
        loaded = sys.modules.get(module)
        if loaded is not None and hasattr(loaded, disable):
            getattr(loaded, disable)()


def _log_uncaught(log: logging.Logger) -> None:
    """An uncaught exception (main thread or another) is one error record, not a bare
    traceback on stderr."""

    def excepthook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        if issubclass(kind, KeyboardInterrupt):
            sys.__excepthook__(kind, value, tb)
            return
        log.critical("uncaught exception", exc_info=(kind, value, tb))

    def thread_excepthook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        thread = args.thread.name if args.thread is not None else "?"
        log.error("uncaught exception in thread %s", thread,
                  exc_info=(args.exc_type, args.exc_value or args.exc_type(), args.exc_traceback))

    sys.excepthook = excepthook
    threading.excepthook = thread_excepthook


def configure_logging(level: str = "INFO", json: bool = True, service: str = "") -> None:
    """Routes stdlib and structlog records through one renderer, tagged with the service."""
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if service:
        # A processor, not a context variable: records from threads (pymilvus' executor,
        # Milvus Lite's server manager) carry it too.
        shared.insert(1, _add_service(service))
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if json
        # Plain tracebacks: rich's would print local variables.
        else structlog.dev.ConsoleRenderer(colors=False, exception_formatter=structlog.dev.plain_traceback)
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = _StderrHandler()
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, _split_embedded_traceback] if json else shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                # JSON: the traceback is the `exception` field (a string; the renderer
                # escapes its newlines). Console: ConsoleRenderer prints it itself.
                *([structlog.processors.format_exc_info] if json else []),
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    _adopt_library_loggers()
    logging.captureWarnings(True)  # warnings.warn(...) -> the "py.warnings" logger
    if json:
        _quiet_progress_bars()
        _log_uncaught(logging.getLogger("uncaught"))


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.stdlib.get_logger(name)
