"""The local suite launcher: `mmsearch up`, `LocalSuite(...)` for tests and the demo, and the
one way to run a service process (`ManagedProcess`), which the tests and bench/ use too."""
from mmsearch.suite.launcher import (
    DEFAULT_METRICS_PORTS,
    DEFAULT_PORTS,
    LocalSuite,
    SuiteConfig,
    install_interrupt_handlers,
    wait_forever,
)
from mmsearch.suite.process import (
    ManagedProcess,
    ProcessSpec,
    SuiteError,
    format_log_line,
    free_port,
    milvus_spec,
    service_spec,
)

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
    "milvus_spec",
    "service_spec",
    "wait_forever",
]
