#!/usr/bin/env bash
# Creates .venv and installs mmsearch with its dev tools. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first, pinned: the CPU wheel; an unpinned resolve would pull CUDA packages.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev]"
