#!/usr/bin/env bash
# Quick start: builds the release binaries, starts a vgpu-backend, and runs the
# C driver-API sample client through it with our libcuda.so.1.
#
# Device: $VGPU_DEVICE if set (emulated | cuda:N), else cuda:0 when
# `nvidia-smi -L` works, else emulated.
# Env: VGPU_MEMORY_LIMIT (bytes, default 1 GiB), CC (default cc).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo=$(pwd)

step() { printf '\n==> %s\n' "$*"; }

if [[ -n "${VGPU_DEVICE:-}" ]]; then
    device=$VGPU_DEVICE
elif nvidia-smi -L >/dev/null 2>&1; then
    device=cuda:0
else
    device=emulated
fi
memory_limit=${VGPU_MEMORY_LIMIT:-$((1 << 30))}

step "Building release binaries (vgpu-backend, libcuda.so)"
cargo build --release -p vgpu-backend -p vgpu-cuda
target=$repo/target/release
for f in "$target/vgpu-backend" "$target/libcuda.so"; do
    [[ -f $f ]] || { echo "missing $f after the build" >&2; exit 1; }
done

work=$(mktemp -d "${TMPDIR:-/tmp}/vgpu-quickstart.XXXXXX")
backend_pid=
cleanup() {
    if [[ -n $backend_pid ]] && kill -0 "$backend_pid" 2>/dev/null; then
        echo "==> Stopping vgpu-backend (pid $backend_pid)"
        kill "$backend_pid" 2>/dev/null || true
        wait "$backend_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT INT TERM

# The client loads our library as libcuda.so.1; the backend must not (on a GPU
# host it loads the real one), so only the client gets this directory.
mkdir -p "$work/lib"
ln -s "$target/libcuda.so" "$work/lib/libcuda.so.1"
ln -s "$target/libcuda.so" "$work/lib/libcuda.so"

socket=$work/vgpu.sock
step "Starting vgpu-backend --device $device --memory-limit $memory_limit"
NO_COLOR=1 "$target/vgpu-backend" --socket "$socket" --device "$device" \
    --memory-limit "$memory_limit" >"$work/backend.log" 2>&1 &
backend_pid=$!

printf 'Waiting for %s ' "$socket"
for _ in $(seq 300); do
    if ! kill -0 "$backend_pid" 2>/dev/null; then
        echo
        echo "vgpu-backend exited early; its log:" >&2
        cat "$work/backend.log" >&2
        exit 1
    fi
    # Ready once the socket exists and the backend says it listens on it.
    [[ -S $socket ]] && grep -q "listening on" "$work/backend.log" && break
    printf '.'
    sleep 0.1
done
echo
if [[ ! -S $socket ]] || ! grep -q "listening on" "$work/backend.log"; then
    echo "vgpu-backend was not listening on $socket within 30 s; its log:" >&2
    cat "$work/backend.log" >&2
    exit 1
fi
echo "vgpu-backend is listening (pid $backend_pid)"

step "Compiling the C sample client (tests/c/driver_api_client.c)"
"${CC:-cc}" -std=gnu11 -O1 -Wall -Wextra \
    -I "$repo/tests/c/include" -I "$repo/tests/c" \
    "$repo/tests/c/driver_api_client.c" -o "$work/driver_api_client" \
    -L "$work/lib" -lcuda -Wl,-rpath,"$work/lib"

if [[ $device == emulated ]]; then
    expect_execution=${VGPU_EXPECT_EXECUTION:-0}
else
    expect_execution=${VGPU_EXPECT_EXECUTION:-1}
fi
step "Running the client through $socket (kernels execute: $expect_execution)"
status=0
VGPU_SOCKET=$socket LD_LIBRARY_PATH=$work/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} \
    VGPU_EXPECT_EXECUTION=$expect_execution "$work/driver_api_client" || status=$?

if [[ $status -ne 0 ]]; then
    step "The client failed (exit $status); backend log:"
    cat "$work/backend.log"
    exit "$status"
fi
step "Quick start passed on device $device"
