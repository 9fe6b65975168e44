#!/usr/bin/env bash
# Builds everything, then runs the tests. The end-to-end tests (crate
# vgpu-tests) run the built vgpu-backend binary and the guest libcuda.so,
# which `cargo test` alone does not build.
#
# Usage: scripts/test.sh               # cargo test --workspace
#        scripts/test.sh -p vgpu-tests # extra arguments replace --workspace
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

echo "==> cargo build --workspace"
cargo build --workspace
if [[ $# -eq 0 ]]; then
    set -- --workspace
fi
echo "==> cargo test $*"
cargo test "$@"
