#!/usr/bin/env bash
# The README's main job (after scripts/setup.sh): start the local suite, index the sample
# photos, run every kind of query, write contact sheets under ${1:-out/demo}.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec mmsearch demo --out "${1:-out/demo}"
