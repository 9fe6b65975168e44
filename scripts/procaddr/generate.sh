#!/usr/bin/env bash
# Generates the cuGetProcAddress table from the real driver. Run on the GPU machine:
#   bash scripts/procaddr/generate.sh OUT_FILE [LIBCUDA]
# LIBCUDA defaults to /usr/local/nvidia/lib64/libcuda.so.1. Needs cc and nm.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT_FILE=${1:?usage: generate.sh OUT_FILE [LIBCUDA]}
LIBCUDA=${2:-/usr/local/nvidia/lib64/libcuda.so.1}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cc -O2 -o "$WORK/probe" "$HERE/probe.c" -ldl
nm -D --defined-only "$LIBCUDA" | awk '$2 ~ /^[TtWi]$/ {print}' >"$WORK/names"
# Names real applications asked cuGetProcAddress for (reference traces), exported or not.
grep -v '^#' "$HERE/traced-names.txt" | awk '{print "0 X " $1}' >>"$WORK/names"
echo "probing $(wc -l <"$WORK/names") exported symbols of $(readlink -f "$LIBCUDA")" >&2
{
    echo "# cuGetProcAddress_v2 table probed from $(readlink -f "$LIBCUDA") on $(date -u +%Y-%m-%d)"
    if [ -r /proc/driver/nvidia/version ]; then
        head -1 /proc/driver/nvidia/version | sed 's/^/# /'
    fi
    "$WORK/probe" "$LIBCUDA" "$WORK/names"
} >"$OUT_FILE"
echo "wrote $(grep -vc '^#' "$OUT_FILE") rows to $OUT_FILE" >&2
