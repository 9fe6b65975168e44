#!/usr/bin/env bash
# Runs the driver-API benchmarks natively and through a vgpu slice, and writes one JSON
# document (machine, driver, date, commit, and per metric {native, vgpu, ratio, goal})
# to $OUT/${BENCH_NAME}-<date>.json.
#
# Run on the GPU machine, from anywhere: bash dist/bench/run.sh   (or bench/run.sh in a
# tree that has dist/ beside it). Environment (all optional):
#   OUT            output folder (default ./bench-out)
#   BENCH_BIN      folder with compiled roundtrip/launch/bandwidth (default: compile here)
#   BENCH_NAME     file-name prefix (default skeleton)
#   VGPU_COMMIT    the commit measured (default: dist/COMMIT, else "unknown")
#   ROUNDTRIP_ARGS, LAUNCH_ARGS, BANDWIDTH_ARGS   arguments for each program (default: none,
#                  i.e. the programs' defaults: 20000 iterations; 100000 launches x 3; 256 MiB x 10)
#   BENCH_GOALS_STRICT=1  exit non-zero when a goal is missed
#   plus those of bench/common.sh (NATIVE_LIB_DIR, CUDA_INC, PROG_TIMEOUT, GPU_CHECK_DEADLINE, ...)
# Exit status: 0 when every run produced its result, 1 otherwise.
set -u

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=bench/common.sh
. "$BENCH_DIR/common.sh"

DIST=$(find_dist "$BENCH_DIR")
OUT=${OUT:-$PWD/bench-out}
BENCH_NAME=${BENCH_NAME:-skeleton}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOGS=$OUT/bench-logs
mkdir -p "$LOGS"
WORK=$(mktemp -d /tmp/vgpu-bench.XXXXXX)
SOCK=$WORK/vgpu.sock
BENCHES=(roundtrip launch bandwidth)
status=0

# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() {
    stop_backend
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ -z "${VGPU_COMMIT:-}" ]; then
    VGPU_COMMIT=$(cat "$DIST/COMMIT" 2>/dev/null || echo unknown)
fi

log "bench: dist=$DIST out=$OUT native=$NATIVE_LIB_DIR"
if [ ! -x "$DIST/bin/vgpu-backend" ] || [ ! -e "$DIST/lib/libcuda.so.1" ]; then
    log "missing $DIST/bin/vgpu-backend or $DIST/lib/libcuda.so.1 (run scripts/stage-dist.sh)"
    exit 1
fi

if [ -z "${BENCH_BIN:-}" ]; then
    BENCH_BIN=$WORK/bin
    mkdir -p "$BENCH_BIN"
    for b in "${BENCHES[@]}"; do
        log "compiling $b"
        if ! compile_c "$BENCH_BIN/$b" "$LOGS/compile-$b.log" "$BENCH_DIR/$b.c" -I"$BENCH_DIR"; then
            log "compiling $b failed:"
            cat "$LOGS/compile-$b.log" >&2
            status=1
        fi
    done
fi

args_for() {
    case $1 in
    roundtrip) echo "${ROUNDTRIP_ARGS:-}" ;;
    launch) echo "${LAUNCH_ARGS:-}" ;;
    bandwidth) echo "${BANDWIDTH_ARGS:-}" ;;
    esac
}

for b in "${BENCHES[@]}"; do
    bin=$BENCH_BIN/$b
    read -r -a args <<<"$(args_for "$b")"
    if [ ! -x "$bin" ]; then
        log "$b: no binary, skipped"
        : >"$LOGS/native-$b.json"
        : >"$LOGS/vgpu-$b.json"
        status=1
        continue
    fi

    log "$b: native"
    run_native "$LOGS/native-$b.json" "$LOGS/native-$b.err" "$bin" "${args[@]}"
    rc=$?
    echo "$rc" >"$LOGS/native-$b.rc"
    [ "$rc" -eq 0 ] || { log "$b: native run failed (status $rc)"; tail -5 "$LOGS/native-$b.err" >&2; }

    if ! backend_alive; then
        if ! start_backend "$DIST" "$SOCK" "$LOGS/backend.log"; then
            log "$b: the backend did not start (see $LOGS/backend.log)"
            status=1
        fi
    fi
    log "$b: vgpu"
    run_vgpu "$DIST" "$SOCK" "$LOGS/vgpu-$b.json" "$LOGS/vgpu-$b.err" "$bin" "${args[@]}"
    rc=$?
    echo "$rc" >"$LOGS/vgpu-$b.rc"
    [ "$rc" -eq 0 ] || { log "$b: vgpu run failed (status $rc)"; tail -5 "$LOGS/vgpu-$b.err" >&2; }
    backend_alive || log "$b: the backend is no longer running (see $LOGS/backend.log)"
done
stop_backend
trim_log "$LOGS/backend.log"

GPU_INFO=$(nvidia-smi --query-gpu=name,driver_version,memory.total,pci.bus_id --format=csv,noheader -i 0 2>/dev/null || true)
CPU_MODEL=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo 2>/dev/null || true)
RESULT=$OUT/$BENCH_NAME-$(date -u +%Y-%m-%d).json
[ -e "$RESULT" ] && RESULT=$OUT/$BENCH_NAME-$(date -u +%Y-%m-%d-%H%M%S).json

GPU_INFO=$GPU_INFO CPU_MODEL=$CPU_MODEL VGPU_COMMIT=$VGPU_COMMIT \
    python3 - "$LOGS" "$RESULT" "$DIST/lib" <<'PYEOF'
import datetime, json, os, sys

logs, result_path, vgpu_lib_dir = sys.argv[1], sys.argv[2], os.path.realpath(sys.argv[3])
gpu = [f.strip() for f in os.environ.get("GPU_INFO", "").split(",")]
strict = os.environ.get("BENCH_GOALS_STRICT") == "1"
errors = []

def load(mode, bench):
    path = os.path.join(logs, f"{mode}-{bench}.json")
    try:
        rc = int(open(os.path.join(logs, f"{mode}-{bench}.rc")).read().strip())
    except (OSError, ValueError):
        rc = None
    try:
        lines = [l for l in open(path).read().splitlines() if l.strip().startswith("{")]
        doc = json.loads(lines[-1]) if lines else None
    except (OSError, ValueError) as e:
        errors.append(f"{mode} {bench}: unreadable result (status {rc}): {e}")
        return None
    if doc is None:
        errors.append(f"{mode} {bench}: no JSON on stdout (status {rc}); see {mode}-{bench}.err")
        return None
    if rc != 0:
        errors.append(f"{mode} {bench}: exit status {rc}")
    lib = os.path.realpath(doc.get("libcuda", ""))
    ours = os.path.dirname(lib) == vgpu_lib_dir
    if (mode == "vgpu") != ours:
        errors.append(f"{mode} {bench}: ran against {lib}, which is the wrong libcuda")
        return None
    return doc

raw = {m: {b: load(m, b) for b in ("roundtrip", "launch", "bandwidth")} for m in ("native", "vgpu")}

def get(doc, *keys):
    for k in keys:
        if not isinstance(doc, dict) or k not in doc:
            return None
        doc = doc[k]
    return doc if isinstance(doc, (int, float)) else None

# (metric name, unit, path in the program's JSON, goal)
# goal: ("max", v) -> the vgpu value must be <= v; ("min_ratio", r) -> vgpu/native >= r.
SPEC = [
    ("roundtrip_ctx_synchronize_p50_us", "us", ("roundtrip", "ctx_synchronize_us", "p50"), ("max", 15.0)),
    ("roundtrip_ctx_synchronize_p90_us", "us", ("roundtrip", "ctx_synchronize_us", "p90"), None),
    ("roundtrip_ctx_synchronize_p99_us", "us", ("roundtrip", "ctx_synchronize_us", "p99"), None),
    ("roundtrip_dtoh_4b_p50_us", "us", ("roundtrip", "dtoh_4b_us", "p50"), ("max", 15.0)),
    ("roundtrip_dtoh_4b_p90_us", "us", ("roundtrip", "dtoh_4b_us", "p90"), None),
    ("roundtrip_dtoh_4b_p99_us", "us", ("roundtrip", "dtoh_4b_us", "p99"), None),
    ("launch_empty_us", "us", ("launch", "empty", "best_us"), ("max", 2.0)),
    ("launch_two_ptr_params_us", "us", ("launch", "two_ptr_params", "best_us"), ("max", 2.0)),
    ("launch_empty_submit_us", "us", ("launch", "empty", "best_submit_us"), None),
    ("launch_two_ptr_params_submit_us", "us", ("launch", "two_ptr_params", "best_submit_us"), None),
    ("copy_pinned_htod_gbps", "GB/s", ("bandwidth", "pinned", "htod_gbps"), ("min_ratio", 0.8)),
    ("copy_pinned_dtoh_gbps", "GB/s", ("bandwidth", "pinned", "dtoh_gbps"), ("min_ratio", 0.8)),
    ("copy_pageable_htod_gbps", "GB/s", ("bandwidth", "pageable", "htod_gbps"), None),
    ("copy_pageable_dtoh_gbps", "GB/s", ("bandwidth", "pageable", "dtoh_gbps"), None),
]

metrics, missed = {}, []
for name, unit, (bench, *path), goal in SPEC:
    native = get(raw["native"][bench], *path)
    vgpu = get(raw["vgpu"][bench], *path)
    ratio = round(vgpu / native, 4) if native and vgpu is not None else None
    entry = {"native": native, "vgpu": vgpu, "ratio": ratio, "unit": unit, "goal": None, "met": None}
    if goal is not None:
        kind, value = goal
        if kind == "max":
            entry["goal"] = {"vgpu_max": value, "text": f"vgpu <= {value:g} {unit}"}
            entry["met"] = None if vgpu is None else vgpu <= value
        else:
            entry["goal"] = {"ratio_min": value, "text": f"vgpu >= {value:.0%} of native"}
            entry["met"] = None if ratio is None else ratio >= value
        if entry["met"] is not True:
            missed.append(name)
    metrics[name] = entry

doc = {
    "schema": "vgpu-bench/1",
    "name": os.path.basename(result_path)[: -len(".json")],
    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    "commit": os.environ.get("VGPU_COMMIT", "unknown"),
    "machine": {
        "gpu": gpu[0] if gpu and gpu[0] else (raw["native"]["roundtrip"] or {}).get("device"),
        "driver": gpu[1] if len(gpu) > 1 else None,
        "gpu_memory": gpu[2] if len(gpu) > 2 else None,
        "pci_bus_id": gpu[3] if len(gpu) > 3 else None,
        "cuda_driver_api_version": (raw["native"]["roundtrip"] or {}).get("driver_version"),
        "cpu": os.environ.get("CPU_MODEL") or None,
        "cpus": os.cpu_count(),
        "kernel": os.uname().release,
    },
    "metrics": metrics,
    "goals_missed": missed,
    "errors": errors,
    "raw": raw,
}
with open(result_path, "w") as f:
    json.dump(doc, f, indent=2)
    f.write("\n")

def fmt(v):
    return "-" if v is None else f"{v:.3f}"

print(f"{'metric':36} {'native':>10} {'vgpu':>10} {'ratio':>8}  goal")
for name, m in metrics.items():
    goal = "" if m["goal"] is None else f"{m['goal']['text']}: " + {True: "met", False: "MISSED", None: "no data"}[m["met"]]
    print(f"{name:36} {fmt(m['native']):>10} {fmt(m['vgpu']):>10} {fmt(m['ratio']):>8}  {goal}")
for e in errors:
    print(f"error: {e}")
print(f"result: {result_path}")
sys.exit(1 if errors or (strict and missed) else 0)
PYEOF
py_status=$?
[ "$py_status" -eq 0 ] || status=1
exit "$status"
