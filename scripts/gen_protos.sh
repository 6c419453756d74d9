#!/usr/bin/env bash
# Regenerates the Python code (messages, gRPC stubs, mypy stubs) from protos/, and
# mmsearch/descriptors.binpb: a FileDescriptorSet of every contract file and its imports
# with the .proto comments (source info), which server reflection serves.
# Usage: scripts/gen_protos.sh [OUT_DIR]   (default: the repository root)
# CI runs it into a temporary folder and fails when the committed code differs.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$root}"
py="${PYTHON:-python}"
mapfile -t protos < <(cd "$root/protos" && find mmsearch -name '*.proto' | sort)
mkdir -p "$out/mmsearch"
(cd "$root/protos" && "$py" -m grpc_tools.protoc -I . \
  --python_out="$out" --grpc_python_out="$out" \
  --mypy_out="$out" --mypy_grpc_out="$out" \
  --descriptor_set_out="$out/mmsearch/descriptors.binpb" --include_source_info --include_imports \
  "${protos[@]}")
# Package markers so `import mmsearch.search.v1.search_pb2` works from an install.
for d in $(cd "$out" && find mmsearch -type d \( -path 'mmsearch/common*' -o -path 'mmsearch/embedder*' -o -path 'mmsearch/captioner*' -o -path 'mmsearch/search*' -o -path 'mmsearch/admin*' \)); do
  [ -f "$out/$d/__init__.py" ] || : > "$out/$d/__init__.py"
done
