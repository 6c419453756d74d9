"""A launcher process for the shutdown tests: `LocalSuite` over fake children, run until a signal.

    python -m tests.cli.fake_launcher DATA_DIR N_CHILDREN
"""
from __future__ import annotations

import sys
from pathlib import Path

from mmsearch.suite import LocalSuite, SuiteConfig, install_interrupt_handlers, wait_forever
from tests.cli.launcher_support import fake_spec


def main() -> None:
    data_dir, n = Path(sys.argv[1]), int(sys.argv[2])
    specs = [fake_spec(f"child{i}", "serving", data_dir, grandchild=True) for i in range(n)]
    install_interrupt_handlers()
    suite = LocalSuite(SuiteConfig(data_dir=data_dir, start_timeout_s=30, stop_grace_s=5), processes=specs)
    try:
        with suite:
            print("READY", flush=True)
            wait_forever(suite, poll_s=0.1)
    except KeyboardInterrupt:
        print("STOPPED", flush=True)


if __name__ == "__main__":
    main()
