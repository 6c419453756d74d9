"""The local suite launcher: `mmsearch up`, `LocalSuite(...)` for tests and the demo."""
from mmsearch.suite.launcher import (
    DEFAULT_METRICS_PORTS,
    DEFAULT_PORTS,
    LocalSuite,
    SuiteConfig,
    free_port,
    install_interrupt_handlers,
    wait_forever,
)
from mmsearch.suite.process import ManagedProcess, ProcessSpec, SuiteError, format_log_line

__all__ = [
    "DEFAULT_METRICS_PORTS",
    "DEFAULT_PORTS",
    "LocalSuite",
    "ManagedProcess",
    "ProcessSpec",
    "SuiteConfig",
    "SuiteError",
    "format_log_line",
    "free_port",
    "install_interrupt_handlers",
    "wait_forever",
]
