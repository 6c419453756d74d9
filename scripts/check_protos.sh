#!/usr/bin/env bash
# Fails when the committed generated code (and mmsearch/descriptors.binpb, the descriptor
# set reflection serves) differs from what protos/ generates.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
"$root/scripts/gen_protos.sh" "$tmp" >/dev/null 2>&1
status=0
while IFS= read -r f; do
  if ! cmp -s "$tmp/$f" "$root/$f"; then echo "stale generated file: $f (run scripts/gen_protos.sh)"; status=1; fi
done < <(cd "$tmp" && find mmsearch -type f \( -name '*_pb2*' -o -name 'descriptors.binpb' \) | sort)
[ $status -eq 0 ] && echo "generated code is up to date"
exit $status
