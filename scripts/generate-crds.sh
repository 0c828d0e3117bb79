#!/usr/bin/env bash
# Writes the CRDs generated from src/api (`statekeeper crd`) into crds/ and the chart's crds/,
# one file per kind. tests/manifests.rs fails when they differ from the code.
set -euo pipefail
cd "$(dirname "$0")/.."
all=$(cargo run --quiet --locked -- crd)
for dir in crds charts/statekeeper/crds; do
  printf '%s\n' "$all" | awk -v dir="$dir" '
    /^---$/ { if (doc != "") write(); doc = $0 "\n"; next }
    { doc = doc $0 "\n" }
    /^  name: .*\.statekeeper\.dev$/ && name == "" { name = $2 }
    function write() { printf "%s", doc > (dir "/" name ".yaml"); close(dir "/" name ".yaml"); name = "" }
    END { write() }'
done
