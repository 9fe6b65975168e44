#!/usr/bin/env bash
# Metering accuracy on the GPU machine (issue 7): two tenants run known workloads, first
# natively, where CUDA events around each kernel give their GPU time, then together through
# two slices of one vgpu-scheduler, whose backends bill every session's GPU time to the
# ledger. The ledger's gpu_ns per tenant must be within METER_GOAL_PCT (5 %) of the native
# events, and its kernel count exact.
#
#   OUT=/some/dir bash bench/metering/run.sh        (dist/ beside bench/, or VGPU_DIST)
#   OUT=/some/dir bash dist/bench/metering/run.sh
#
# Tenants (meter_load.c, one stream, an event pair around every kernel):
#   tenant-spin  slice meter-a: SPIN_COUNT x vgpu_timed_spin(SPIN_US) (tests/ptx PTX, loaded
#                as PTX: nothing to compile)
#   tenant-gemm  slice meter-b: 2 fills + GEMM_COUNT bf16 GEMMs n = GEMM_N (gemm_nn of
#                bench/colocation/kernels.cu, nvcc -cubin -arch=sm_90). If nvcc fails or takes
#                over 120 s: SPIN_COUNT2 x vgpu_timed_spin(SPIN_US2) instead (recorded).
#
# Writes $OUT/metering-h100-<date>.json (device, driver, date, commit, per tenant: native
# event ns, the events the program saw through the slice, the ledger's gpu_ns and kernels,
# error %, pass) and logs to $OUT/metering-logs/. The whole run is bounded by METER_BUDGET
# seconds (default 170). Exit status 0 when both tenants are within the goal.
#
# Environment (all optional): OUT, METER_BUDGET, METER_GOAL_PCT, SPIN_COUNT (2000), SPIN_US
# (1000), GEMM_COUNT (1000), GEMM_N (4096), SPIN_COUNT2 (4000), SPIN_US2 (300), SCHED_LOG
# (info), NVCC, VGPU_COMMIT, and those of bench/common.sh (NATIVE_LIB_DIR, CUDA_INC).
# METER_DEVICE=emulated runs the slices on the emulated device (a smoke test of the script
# without a GPU; point NATIVE_LIB_DIR at our library and VGPU_SOCKET at an emulated backend).
set -u

METER_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BENCH_DIR=$(cd "$METER_DIR/.." && pwd)
# shellcheck source=bench/common.sh
. "$BENCH_DIR/common.sh"

DIST=$(find_dist "$BENCH_DIR")
OUT=${OUT:-$PWD/metering-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOGS=$OUT/metering-logs
mkdir -p "$LOGS"
exec > >(tee -a "$LOGS/run.log") 2>&1

START_TS=$(date +%s)
METER_BUDGET=${METER_BUDGET:-170}
export GPU_CHECK_DEADLINE=$((START_TS + METER_BUDGET)) # bounds run_native / run_vgpu
GOAL_PCT=${METER_GOAL_PCT:-5}
SPIN_COUNT=${SPIN_COUNT:-2000}
SPIN_US=${SPIN_US:-1000}
GEMM_COUNT=${GEMM_COUNT:-1000}
GEMM_N=${GEMM_N:-4096}
SPIN_COUNT2=${SPIN_COUNT2:-4000}
SPIN_US2=${SPIN_US2:-300}
SCHED_LOG=${SCHED_LOG:-info}
METER_DEVICE=${METER_DEVICE:-cuda}
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
if [ -z "${VGPU_COMMIT:-}" ]; then
    VGPU_COMMIT=$(cat "$DIST/COMMIT" 2>/dev/null || echo unknown)
fi
DATE=$(date -u +%Y-%m-%d)
RESULT=$OUT/metering-h100-$DATE.json
WORK=$(mktemp -d /tmp/vgpu-metering.XXXXXX)
SCHED_PID=""
SCHED_DIR=$WORK/sched
API=$SCHED_DIR/state/api.sock

left_s() { echo $((GPU_CHECK_DEADLINE - $(date +%s))); }

stop_scheduler() {
    local i
    [ -n "$SCHED_PID" ] || return 0
    log "stopping vgpu-scheduler pid $SCHED_PID"
    kill -TERM "$SCHED_PID" 2>/dev/null
    for ((i = 0; i < 100; i++)); do
        kill -0 "$SCHED_PID" 2>/dev/null || break
        sleep 0.1
    done
    kill -0 "$SCHED_PID" 2>/dev/null && kill -KILL "$SCHED_PID" 2>/dev/null
    wait "$SCHED_PID" 2>/dev/null
    SCHED_PID=""
}

cleanup() {
    stop_scheduler
    cp "$SCHED_DIR"/*.log "$LOGS/" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 1' INT TERM

fail() {
    log "FAILED: $*"
    printf '{"bench":"metering","date":"%s","commit":"%s","error":"%s"}\n' "$DATE" \
        "$VGPU_COMMIT" "$*" >"$RESULT"
    exit 1
}

# ------------------------------------------------------------------------------ setup

log "metering check: dist $DIST, out $OUT, budget ${METER_BUDGET}s, commit $VGPU_COMMIT"
nvidia-smi -L 2>&1 | head -4
for f in "$DIST/bin/vgpu-scheduler" "$DIST/bin/vgpu-backend" "$DIST/bin/vgpuctl" "$DIST/lib/libcuda.so.1"; do
    [ -e "$f" ] || fail "$f is missing (scripts/stage-dist.sh)"
done
SPIN_PTX=""
for p in "$BENCH_DIR/../tests/ptx" "$DIST/tests/ptx" "$DIST/../tests/ptx"; do
    if [ -f "$p/vgpu_timed_spin.ptx" ]; then
        SPIN_PTX=$(cd "$p" && pwd)/vgpu_timed_spin.ptx
        break
    fi
done
[ -n "$SPIN_PTX" ] || fail "tests/ptx/vgpu_timed_spin.ptx not found"

BIN=$WORK/bin
mkdir -p "$BIN"
log "compiling meter_load.c"
compile_c "$BIN/meter_load" "$LOGS/compile-meter_load.log" "$METER_DIR/meter_load.c" \
    -I"$BENCH_DIR" -I"$BENCH_DIR/colocation" || fail "gcc meter_load.c: see compile-meter_load.log"

B_WORKLOAD=gemm
B_ARGS=()
CUBIN=$BIN/kernels.cubin
log "compiling bench/colocation/kernels.cu (nvcc -cubin -arch=sm_90, at most 120 s)"
if timeout 120 "$NVCC" -cubin -arch=sm_90 -O3 -o "$CUBIN" "$BENCH_DIR/colocation/kernels.cu" \
    >"$LOGS/compile-kernels.log" 2>&1; then
    B_ARGS=(gemm "$CUBIN" "$GEMM_COUNT" "$GEMM_N")
else
    log "nvcc failed or timed out: tenant-gemm runs timed kernels instead (see compile-kernels.log)"
    B_WORKLOAD=spin-fallback
    B_ARGS=(spin "$SPIN_PTX" "$SPIN_COUNT2" "$SPIN_US2")
fi
A_ARGS=(spin "$SPIN_PTX" "$SPIN_COUNT" "$SPIN_US")

# ------------------------------------------------------------------------------ native

log "native: tenant-spin (${A_ARGS[*]})"
run_native "$LOGS/native-a.json" "$LOGS/native-a.err" "$BIN/meter_load" "${A_ARGS[@]}" ||
    fail "native tenant-spin failed: $(tail -3 "$LOGS/native-a.err")"
log "native: tenant-gemm (${B_ARGS[*]})"
run_native "$LOGS/native-b.json" "$LOGS/native-b.err" "$BIN/meter_load" "${B_ARGS[@]}" ||
    fail "native tenant-gemm failed: $(tail -3 "$LOGS/native-b.err")"
cat "$LOGS/native-a.json" "$LOGS/native-b.json"

# ------------------------------------------------------------------------------ vgpu

mkdir -p "$SCHED_DIR"
cat >"$SCHED_DIR/vgpu.toml" <<EOF
device = "$METER_DEVICE"

[[gpu]]
index = 0
memory = "64GiB"

[[slice]]
name = "meter-a"
tenant = "tenant-spin"
class = "best-effort"
compute_guarantee_pct = 50
memory_limit = "16GiB"
attach = true

[[slice]]
name = "meter-b"
tenant = "tenant-gemm"
class = "best-effort"
compute_guarantee_pct = 50
memory_limit = "16GiB"
attach = true
EOF
log "starting vgpu-scheduler (state $SCHED_DIR/state)"
env RUST_LOG="$SCHED_LOG" LD_LIBRARY_PATH="$NATIVE_LIB_DIR" \
    "$DIST/bin/vgpu-scheduler" --config "$SCHED_DIR/vgpu.toml" --state-dir "$SCHED_DIR/state" \
    --device "$METER_DEVICE" --backend "$DIST/bin/vgpu-backend" >"$SCHED_DIR/scheduler.log" 2>&1 &
SCHED_PID=$!
SOCK_A=$SCHED_DIR/state/slices/meter-a.sock
SOCK_B=$SCHED_DIR/state/slices/meter-b.sock
for ((i = 0; i < 300; i++)); do
    [ -S "$SOCK_A" ] && [ -S "$SOCK_B" ] && break
    kill -0 "$SCHED_PID" 2>/dev/null || fail "vgpu-scheduler exited: $(tail -5 "$SCHED_DIR/scheduler.log")"
    sleep 0.1
done
if ! [ -S "$SOCK_A" ] || ! [ -S "$SOCK_B" ]; then
    fail "the slices' backends did not listen within 30 s"
fi
log "both slices listen; running the tenants together through them"

run_vgpu "$DIST" "$SOCK_A" "$LOGS/vgpu-a.json" "$LOGS/vgpu-a.err" "$BIN/meter_load" "${A_ARGS[@]}" &
PID_A=$!
run_vgpu "$DIST" "$SOCK_B" "$LOGS/vgpu-b.json" "$LOGS/vgpu-b.err" "$BIN/meter_load" "${B_ARGS[@]}" &
PID_B=$!
wait "$PID_A" || fail "tenant-spin through its slice failed: $(tail -3 "$LOGS/vgpu-a.err")"
wait "$PID_B" || fail "tenant-gemm through its slice failed: $(tail -3 "$LOGS/vgpu-b.err")"
cat "$LOGS/vgpu-a.json" "$LOGS/vgpu-b.json"

# The ledger: reports come once a second; wait until every kernel is in (or 30 s).
kernels_of() { sed -n 's/.*"kernels":\([0-9]*\).*/\1/p' "$1" | head -1; }
ledger_kernels() {
    "$DIST/bin/vgpuctl" --scheduler "$API" usage --tenant "$1" --format jsonl 2>/dev/null |
        sed -n 's/.*"kernels":\([0-9]*\).*/\1/p' | awk '{ s += $1 } END { print s + 0 }'
}
WANT_A=$(kernels_of "$LOGS/vgpu-a.json")
WANT_B=$(kernels_of "$LOGS/vgpu-b.json")
log "waiting for the ledger: $WANT_A kernels of tenant-spin, $WANT_B of tenant-gemm"
for ((i = 0; i < 300; i++)); do
    [ "$(ledger_kernels tenant-spin)" -ge "$WANT_A" ] && [ "$(ledger_kernels tenant-gemm)" -ge "$WANT_B" ] && break
    [ "$(left_s)" -gt 5 ] || break
    sleep 0.1
done
for t in tenant-spin tenant-gemm; do
    "$DIST/bin/vgpuctl" --scheduler "$API" usage --tenant "$t" --format jsonl >"$LOGS/ledger-$t.jsonl" ||
        log "vgpuctl usage --tenant $t failed"
done
"$DIST/bin/vgpuctl" --scheduler "$API" util --json >"$LOGS/util.json" 2>/dev/null
stop_scheduler

# ------------------------------------------------------------------------------ report

DEVICE=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
DRIVER=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1)
python3 - "$RESULT" "$LOGS" "$GOAL_PCT" "$DATE" "$VGPU_COMMIT" "${DEVICE:-unknown}" \
    "${DRIVER:-unknown}" "$B_WORKLOAD" "${A_ARGS[*]}" "${B_ARGS[*]}" <<'PY'
import json, sys
out, logs, goal, date, commit, device, driver, b_workload, a_args, b_args = sys.argv[1:]
goal = float(goal)

def one(path):
    with open(path) as f:
        return json.loads(f.read().strip().splitlines()[-1])

def ledger(tenant):
    gpu = kernels = records = 0
    sessions = set()
    with open(f"{logs}/ledger-{tenant}.jsonl") as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                gpu += r["gpu_ns"]; kernels += r["kernels"]; records += 1
                sessions.add((r["backend"], r["session"]))
    return gpu, kernels, records, len(sessions)

tenants = {}
ok = True
for tenant, tag, workload, args in (("tenant-spin", "a", "spin", a_args),
                                    ("tenant-gemm", "b", b_workload, b_args)):
    native, vgpu = one(f"{logs}/native-{tag}.json"), one(f"{logs}/vgpu-{tag}.json")
    gpu, kernels, records, sessions = ledger(tenant)
    err = 100.0 * (gpu - native["event_ns"]) / native["event_ns"]
    passed = abs(err) <= goal and kernels == vgpu["kernels"]
    ok = ok and passed
    tenants[tenant] = {
        "workload": workload, "args": args,
        "native_event_ns": native["event_ns"], "native_wall_ns": native["wall_ns"],
        "vgpu_event_ns": vgpu["event_ns"], "vgpu_wall_ns": vgpu["wall_ns"],
        "kernels_launched": vgpu["kernels"], "ledger_kernels": kernels,
        "ledger_gpu_ns": gpu, "ledger_records": records, "ledger_sessions": sessions,
        "error_pct_vs_native": round(err, 3),
        "error_pct_vs_vgpu_events": round(100.0 * (gpu - vgpu["event_ns"]) / vgpu["event_ns"], 3),
        "pass": passed,
    }
doc = {"bench": "metering", "device": device, "driver": driver, "date": date,
       "commit": commit, "goal_pct": goal, "mode": "both tenants at once, one slice each",
       "tenants": tenants, "pass": ok}
with open(out, "w") as f:
    json.dump(doc, f, indent=2)
    f.write("\n")
print(f"{'tenant':<12} {'native ms':>10} {'ledger ms':>10} {'err %':>7} {'kernels':>15} pass")
for t, v in tenants.items():
    print(f"{t:<12} {v['native_event_ns']/1e6:>10.1f} {v['ledger_gpu_ns']/1e6:>10.1f} "
          f"{v['error_pct_vs_native']:>7.2f} {v['ledger_kernels']:>7}/{v['kernels_launched']:<7} {v['pass']}")
sys.exit(0 if ok else 1)
PY
STATUS=$?
log "wrote $RESULT (took $(($(date +%s) - START_TS)) s)"
exit $STATUS
