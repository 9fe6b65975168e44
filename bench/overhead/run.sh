#!/usr/bin/env bash
# Issue 3 overhead benchmarks, natively and through a vgpu slice in the same run:
# gpt2_train.py (training-step time, goal slice <= 1.05x native) and decode_loop.py
# (per-token time of a small-kernel decode loop, goal <= 1.15x). Each runs ROUNDS times in
# each mode, alternating ABBA (native, slice, slice, native, ...) to cancel drift. Writes
# $OUT/overhead-<device>-<date>.json and prints a summary and "result: <path>".
#
# Run on the GPU machine from the repository root with dist/ staged:
#   OUT=/some/dir bash bench/overhead/run.sh
# Environment (optional): OUT (./overhead-out), DIST, PYTHON (python3), ROUNDS (2),
# GPT2_ARGS (e.g. "--seq 512"), DECODE_ARGS, OVERHEAD_TIMEOUT (300 s a run),
# VGPU_BACKEND_ARGS (default "--memory-limit 68719476736"), VGPU_COMMIT, and those of
# bench/common.sh (NATIVE_LIB_DIR, VGPU_DEVICE, BACKEND_LOG).
# Exit status: 0 when every run produced a result (goals missed or not), 1 otherwise.
set -u
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=bench/common.sh
. "$HERE/../common.sh"
if [ -n "${DIST:-${VGPU_DIST:-}}" ]; then
    DIST=$(cd "${DIST:-$VGPU_DIST}" && pwd)
elif [ -e "$HERE/../../bin/vgpu-backend" ]; then # running from dist/bench/overhead
    DIST=$(cd "$HERE/../.." && pwd)
else
    DIST=$(cd "$HERE/../.." && pwd)/dist
fi
OUT=${OUT:-$PWD/overhead-out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
LOGS=$OUT/overhead-logs
mkdir -p "$LOGS"
PYTHON=${PYTHON:-python3}
ROUNDS=${ROUNDS:-2}
OVERHEAD_TIMEOUT=${OVERHEAD_TIMEOUT:-300}
export VGPU_BACKEND_ARGS=${VGPU_BACKEND_ARGS:---memory-limit 68719476736}
VGPU_COMMIT=${VGPU_COMMIT:-$(cat "$DIST/COMMIT" 2>/dev/null || echo unknown)}
# The caller's LD_LIBRARY_PATH stays, after the driver's folder (each run reports the
# libcuda it loaded, and a run with the wrong one is rejected).
BASE_LD=${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
WORK=$(mktemp -d /tmp/vgpu-overhead.XXXXXX)
SOCK=$WORK/vgpu.sock
status=0

# shellcheck disable=SC2317 # run by the trap
cleanup() {
    stop_backend
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ ! -x "$DIST/bin/vgpu-backend" ] && [ -f "$DIST/bin/vgpu-backend" ]; then chmod +x "$DIST/bin/vgpu-backend"; fi
if [ ! -x "$DIST/bin/vgpu-backend" ] || [ ! -e "$DIST/lib/libcuda.so.1" ]; then
    log "missing $DIST/bin/vgpu-backend or $DIST/lib/libcuda.so.1 (run scripts/stage-dist.sh)"
    exit 1
fi
log "overhead: dist=$DIST out=$OUT native=$NATIVE_LIB_DIR rounds=$ROUNDS"
start_backend "$DIST" "$SOCK" "$LOGS/backend.log" || status=1

# one BENCH MODE ROUND: runs BENCH once; its stdout goes to LOGS/BENCH.MODE.ROUND.json.
one() {
    local bench=$1 mode=$2 round=$3 rc base=$LOGS/$1.$2.$3
    local -a args envs
    case $bench in
    gpt2_train) read -r -a args <<<"${GPT2_ARGS:-}" ;;
    *) read -r -a args <<<"${DECODE_ARGS:-}" ;;
    esac
    if [ "$mode" = native ]; then
        envs=(LD_LIBRARY_PATH="$NATIVE_LIB_DIR$BASE_LD")
    else
        if ! backend_alive; then
            log "backend not running; restarting it"
            start_backend "$DIST" "$SOCK" "$LOGS/backend.log" || status=1
        fi
        envs=(LD_LIBRARY_PATH="$DIST/lib$BASE_LD" VGPU_SOCKET="$SOCK")
    fi
    log "$bench: $mode (round $round)"
    env "${envs[@]}" PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}" PYTHONDONTWRITEBYTECODE=1 \
        timeout -k 10 "$OVERHEAD_TIMEOUT" "$PYTHON" "$HERE/$bench.py" "${args[@]}" \
        >"$base.json" 2>"$base.err" </dev/null
    rc=$?
    echo "$rc" >"$base.rc"
    if [ "$rc" -ne 0 ]; then
        log "$bench $mode round $round failed (status $rc): $(tail -1 "$base.err")"
        status=1
    else
        log "$bench $mode: $(tail -1 "$base.json" | cut -c1-150)"
    fi
}

for round in $(seq 1 "$ROUNDS"); do
    for bench in gpt2_train decode_loop; do
        if [ $((round % 2)) -eq 1 ]; then
            one "$bench" native "$round"
            one "$bench" slice "$round"
        else
            one "$bench" slice "$round"
            one "$bench" native "$round"
        fi
    done
done
stop_backend
trim_log "$LOGS/backend.log"

GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader -i 0 2>/dev/null | head -1)
DRIVER=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader -i 0 2>/dev/null | head -1)
SLUG=$(echo "${GPU_NAME:-unknown}" | tr '[:upper:]' '[:lower:]' | sed -e 's/^nvidia //' -e 's/[^a-z0-9]\+/-/g' -e 's/^-//' -e 's/-$//')
RESULT=$OUT/overhead-$SLUG-$(date -u +%Y-%m-%d).json
[ -e "$RESULT" ] && RESULT=$OUT/overhead-$SLUG-$(date -u +%Y-%m-%d-%H%M%S).json

GPU_NAME=$GPU_NAME DRIVER=$DRIVER VGPU_COMMIT=$VGPU_COMMIT ROUNDS=$ROUNDS \
    "$PYTHON" - "$LOGS" "$RESULT" "$DIST/lib/libcuda.so.1" <<'PYEOF' || status=1
import datetime, json, os, statistics, sys

logs, result, ours = sys.argv[1], sys.argv[2], os.path.realpath(sys.argv[3])
rounds = int(os.environ["ROUNDS"])
SPEC = {"gpt2_train": ("step_ms", 1.05, "training step, GPT-2 small, batch 8"),
        "decode_loop": ("token_ms", 1.15, "decode loop, ms per token")}
errors, benches = [], {}
for bench, (prefix, goal, what) in SPEC.items():
    modes = {}
    for mode in ("native", "slice"):
        runs = []
        for r in range(1, rounds + 1):
            base = os.path.join(logs, f"{bench}.{mode}.{r}")
            try:
                lines = [l for l in open(base + ".json") if l.lstrip().startswith("{")]
                doc = json.loads(lines[-1])
            except (OSError, ValueError, IndexError):
                errors.append(f"{bench} {mode} round {r}: no result (see {base}.err)")
                continue
            lib = os.path.realpath(doc.get("libcuda", "none"))
            if (lib == ours) != (mode == "slice"):
                errors.append(f"{bench} {mode} round {r}: loaded the wrong libcuda ({lib})")
                continue
            runs.append(doc)
        med = [d[f"{prefix}_median"] for d in runs]
        p90 = [d[f"{prefix}_p90"] for d in runs]
        modes[mode] = {"median_ms": statistics.mean(med) if med else None,
                       "p90_ms": statistics.mean(p90) if p90 else None,
                       "run_medians_ms": med, "runs": runs}
    n, s = modes["native"]["median_ms"], modes["slice"]["median_ms"]
    ratio = round(s / n, 4) if n and s else None
    n90, s90 = modes["native"]["p90_ms"], modes["slice"]["p90_ms"]
    benches[bench] = {"what": what, "unit": "ms", "native": modes["native"], "slice": modes["slice"],
                      "ratio": ratio, "ratio_p90": round(s90 / n90, 4) if n90 and s90 else None,
                      "goal_ratio": goal, "met": None if ratio is None else ratio <= goal}
doc = {"schema": "vgpu-overhead/1",
       "device": os.environ.get("GPU_NAME") or "unknown", "driver": os.environ.get("DRIVER") or None,
       "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
       "commit": os.environ.get("VGPU_COMMIT", "unknown"), "rounds": rounds,
       "method": "ABBA-ordered runs; median_ms is the mean of the runs' medians; ratio = slice/native",
       "goals": {"gpt2_train": 1.05, "decode_loop": 1.15},
       "benchmarks": benches, "errors": errors}
with open(result, "w") as f:
    json.dump(doc, f, indent=1)
fmt = lambda v: "-" if v is None else f"{v:.3f}"
print(f"\noverhead (commit {doc['commit']}, {doc['device']})")
print(f"{'benchmark':<12} {'native ms':>10} {'slice ms':>10} {'ratio':>7} {'p90 ratio':>9} {'goal':>6}  met")
for b, e in benches.items():
    print(f"{b:<12} {fmt(e['native']['median_ms']):>10} {fmt(e['slice']['median_ms']):>10} "
          f"{fmt(e['ratio']):>7} {fmt(e['ratio_p90']):>9} {e['goal_ratio']:>6}  "
          f"{ {True: 'yes', False: 'NO', None: '-'}[e['met']] }")
for e in errors:
    print("error:", e)
sys.exit(1 if errors else 0)
PYEOF
echo "result: $RESULT"
exit $status
