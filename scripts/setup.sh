#!/usr/bin/env bash
# Creates .venv and installs mmsearch with its servers and dev tools. Safe to re-run.
# (A client-only install is `pip install mmsearch`; the servers are the "server" extra.)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first, pinned: the CPU wheel; an unpinned resolve would pull CUDA packages.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[server,dev]"
