#!/usr/bin/env bash
# Quick start: builds the release binaries, starts the vgpu-scheduler with its embedded
# defaults (one GPU, one best-effort slice "default" attached at start, which starts one
# vgpu-backend), shows the slice with vgpuctl, runs the C driver-API sample client through
# the slice with our libcuda.so.1, and shows the slice's utilization.
#
# Device: $VGPU_DEVICE if set (emulated | cuda), else cuda when `nvidia-smi -L` works, else
# emulated. Env: CC (default cc), VGPU_KEEP_RUNNING=1 to leave the scheduler running
# (Ctrl-C stops it).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo=$(pwd)

step() { printf '\n==> %s\n' "$*"; }

if [[ -n "${VGPU_DEVICE:-}" ]]; then
    device=${VGPU_DEVICE%%:*}
elif nvidia-smi -L >/dev/null 2>&1; then
    device=cuda
else
    device=emulated
fi
case $device in
emulated | cuda) ;;
*)
    echo "VGPU_DEVICE must be emulated or cuda (got $device)" >&2
    exit 2
    ;;
esac

step "Building release binaries (vgpu-scheduler, vgpu-backend, vgpuctl, libcuda.so)"
cargo build --release -p vgpu-scheduler -p vgpu-backend -p vgpuctl -p vgpu-cuda
target=${CARGO_TARGET_DIR:-$repo/target}/release
for f in vgpu-scheduler vgpu-backend vgpuctl libcuda.so; do
    [[ -f $target/$f ]] || { echo "missing $target/$f after the build" >&2; exit 1; }
done

work=$(mktemp -d "${TMPDIR:-/tmp}/vgpu-quickstart.XXXXXX")
state=$work/state
sched_pid=
cleanup() {
    if [[ -n $sched_pid ]] && kill -0 "$sched_pid" 2>/dev/null; then
        echo "==> Stopping vgpu-scheduler (pid $sched_pid) and its backends"
        kill "$sched_pid" 2>/dev/null || true
        wait "$sched_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT INT TERM

# The client loads our library as libcuda.so.1; the backends must not (on a GPU host they
# load the real one), so only the client gets this directory.
mkdir -p "$work/lib"
ln -s "$target/libcuda.so" "$work/lib/libcuda.so.1"
ln -s "$target/libcuda.so" "$work/lib/libcuda.so"

step "Starting vgpu-scheduler --state-dir $state --device $device (embedded defaults)"
NO_COLOR=1 "$target/vgpu-scheduler" --state-dir "$state" --device "$device" \
    --backend "$target/vgpu-backend" >"$work/scheduler.log" 2>&1 &
sched_pid=$!

socket=$state/slices/default.sock
printf 'Waiting for the default slice at %s ' "$socket"
for _ in $(seq 300); do
    if ! kill -0 "$sched_pid" 2>/dev/null; then
        echo
        echo "vgpu-scheduler exited early; its log:" >&2
        cat "$work/scheduler.log" >&2
        exit 1
    fi
    [[ -S $socket ]] && break
    printf '.'
    sleep 0.1
done
echo
if [[ ! -S $socket ]]; then
    echo "The default slice's backend did not listen on $socket within 30 s; the log:" >&2
    cat "$work/scheduler.log" >&2
    exit 1
fi

vgpuctl() { "$target/vgpuctl" --scheduler "$state/api.sock" "$@"; }
step "vgpuctl list"
vgpuctl list

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
step "Running the client through the default slice (kernels execute: $expect_execution)"
status=0
VGPU_SOCKET=$socket LD_LIBRARY_PATH=$work/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} \
    VGPU_EXPECT_EXECUTION=$expect_execution "$work/driver_api_client" || status=$?

if [[ $status -ne 0 ]]; then
    step "The client failed (exit $status); scheduler and backend log:"
    cat "$work/scheduler.log"
    exit "$status"
fi

step "vgpuctl util"
vgpuctl util

step "Quick start passed on device $device"
if [[ ${VGPU_KEEP_RUNNING:-0} == 1 ]]; then
    echo "The scheduler keeps running: vgpuctl --scheduler $state/api.sock list  (Ctrl-C stops it)"
    wait "$sched_pid"
fi
