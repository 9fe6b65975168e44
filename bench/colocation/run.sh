#!/usr/bin/env bash
# The GPU colocation benchmark (issue 5, acceptance 2 and 3). Run on the GPU machine:
#
#   OUT=/some/dir bash dist/bench/colocation/run.sh      (or bench/colocation/run.sh in a
#                                                         tree that has dist/ beside it)
#
# Compiles kernels.cu (nvcc -cubin -arch=sm_90) and the three programs (gcc, driver API),
# then runs these phases, each time-bounded, each program under `timeout`; the programs of
# one phase start measuring together (start barrier), for COLOC_SECONDS each:
#
#   excl-lc, excl-gemm, excl-train    each program alone, natively (the baselines)
#   vgpu-*                            vgpu-scheduler with slices lc (latency-critical) and be
#                                     (best-effort): lc_decode alone through lc (remoting
#                                     cost), lc_decode + be_gemm, lc_decode + be_train,
#                                     be_gemm alone through be
#   vgpu-shares                       a second scheduler with best-effort slices be70 and be30
#                                     (guarantees 70 and 30), be_gemm through each
#   ts-lc-gemm, ts-lc-train           default time-slicing: two native processes
#   mps{,30,50}-lc-{gemm,train}       under MPS; 30/50: CUDA_MPS_ACTIVE_THREAD_PERCENTAGE
#                                     of the best-effort client
#
# A phase that fails is recorded and the run goes on; phases that no longer fit in
# COLOC_BUDGET are skipped (recorded). At the end everything started is stopped and
# report.py writes $OUT/colocation-<gpu>-<date>.json and prints the table. Logs (every
# program's stdout/stderr, the scheduler's and backends' logs, vgpuctl util samples, MPS
# logs) go to $OUT/colocation-logs/.
#
# Environment (all optional):
#   OUT                   output folder (default ./colocation-out)
#   COLOC_SECONDS         measured seconds per phase (default 10)
#   COLOC_BUDGET          seconds the whole run may take (default 450)
#   COLOC_PHASES          extended regex: run only the phases whose names match
#   COLOC_READY_TIMEOUT   seconds to wait for a phase's programs to be set up (default 45)
#   LC_RATE LC_WEIGHTS_GIB LC_ROWS LC_COLS     lc_decode (200, 2, 4096, 8192)
#   GEMM_N GEMM_DEPTH GEMM_CHUNKS              be_gemm (8192, 2, 1)
#   TRAIN_HIDDEN TRAIN_BATCH TRAIN_LAYERS      be_train (4096, 4096, 4)
#   COLOC_LC_GUARANTEE    compute guarantee of slice lc in % (default 30; be gets the rest)
#   COLOC_VGPU_SETUP      auto (default: --config, then the REST API if the slices do not
#                         come up), config, or api (delete slice default, create the slices)
#   SCHED_LOG             RUST_LOG of the scheduler and its backends (default info)
#   UTIL_INTERVAL         seconds between vgpuctl util samples (default 0.5)
#   NVCC, VGPU_COMMIT, and those of bench/common.sh (NATIVE_LIB_DIR, CUDA_INC, CLIENT_LOG)
# Exit status: 0 when every phase that ran succeeded and the report was written, else 1.
set -u

COLOC_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BENCH_DIR=$(cd "$COLOC_DIR/.." && pwd)
# shellcheck source=bench/common.sh
. "$BENCH_DIR/common.sh"

DIST=$(find_dist "$BENCH_DIR")
OUT=${OUT:-$PWD/colocation-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOGS=$OUT/colocation-logs
mkdir -p "$LOGS"
exec > >(tee -a "$LOGS/run.log") 2>&1

WORK=$(mktemp -d /tmp/vgpu-coloc.XXXXXX)
BIN=$WORK/bin
mkdir -p "$BIN"
START_TS=$(date +%s)
COLOC_BUDGET=${COLOC_BUDGET:-450}
DEADLINE=$((START_TS + COLOC_BUDGET))
SECS=${COLOC_SECONDS:-10}
READY_TIMEOUT=${COLOC_READY_TIMEOUT:-45}
LC_RATE=${LC_RATE:-200}
LC_WEIGHTS_GIB=${LC_WEIGHTS_GIB:-2}
LC_ROWS=${LC_ROWS:-4096}
LC_COLS=${LC_COLS:-8192}
GEMM_N=${GEMM_N:-8192}
GEMM_DEPTH=${GEMM_DEPTH:-2}
# 32 kernels of 256 rows per GEMM (about 0.34 ms each on an H100): a scheduler that hands the
# GPU over at kernel boundaries can do no better than one such kernel of latency.
GEMM_CHUNKS=${GEMM_CHUNKS:-32}
# The backends' bound on queued GPU work: one GEMM kernel.
export VGPU_MAX_INFLIGHT_US=${VGPU_MAX_INFLIGHT_US:-150}
TRAIN_HIDDEN=${TRAIN_HIDDEN:-4096}
TRAIN_BATCH=${TRAIN_BATCH:-4096}
TRAIN_LAYERS=${TRAIN_LAYERS:-4}
# The decode step needs about 17 % of the GPU (0.85 ms every 5 ms), but its measured busy time
# also holds the time its kernels wait behind the best-effort kernel in flight; a guarantee
# below what it measures lets the policy demote it when best-effort lags its own guarantee.
LC_GUARANTEE=${COLOC_LC_GUARANTEE:-50}
BE_GUARANTEE=$((100 - LC_GUARANTEE))
VGPU_SETUP=${COLOC_VGPU_SETUP:-auto}
SCHED_LOG=${SCHED_LOG:-info}
UTIL_INTERVAL=${UTIL_INTERVAL:-0.5}
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
if [ -z "${VGPU_COMMIT:-}" ]; then
    VGPU_COMMIT=$(cat "$DIST/COMMIT" 2>/dev/null || echo unknown)
fi
export VGPU_COMMIT

RUNNING_PIDS=() # programs of the phase in progress (their `timeout` processes)
UTIL_PID=""
SCHED_PID=""
SCHED_API=""
SCHED_BACKEND_PIDS=()
MPS_CTL=""
MPS_STARTED=0
MPS_PIPE=$WORK/mps/pipe
MPS_LOG=$WORK/mps/log
REPORT_DONE=0
FAILED=0
: >"$LOGS/phases.tsv"
: >"$LOGS/sessions.tsv"

left_s() { echo $((DEADLINE - $(date +%s))); }

# phase_record NAME STATUS DETAIL   (STATUS: ok, failed, skipped)
phase_record() {
    printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$LOGS/phases.tsv"
    [ "$2" = failed ] && FAILED=1
    log "phase $1: $2${3:+ ($3)}"
}

# session_record NAME STATUS DETAIL   (a vgpu scheduler session or MPS)
session_record() {
    printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$LOGS/sessions.tsv"
    log "session $1: $2${3:+ ($3)}"
}

phase_selected() {
    [ -z "${COLOC_PHASES:-}" ] && return 0
    [[ $1 =~ $COLOC_PHASES ]]
}

# any_selected NAME...: true when one of the phases is selected.
any_selected() {
    local name
    for name in "$@"; do
        phase_selected "$name" && return 0
    done
    return 1
}

# ------------------------------------------------------------------------------ cleanup

# kill_pid PID [GRACE_TENTHS]: SIGTERM, then SIGKILL after the grace period (default 5 s).
kill_pid() {
    local pid=$1 grace=${2:-50} i
    [ -n "$pid" ] || return 0
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null
    for ((i = 0; i < grace; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    log "pid $pid ignored SIGTERM, killing it"
    kill -KILL "$pid" 2>/dev/null
    return 0
}

stop_util_poller() {
    [ -n "$UTIL_PID" ] || return 0
    : >"$UTIL_DIR/.stop" 2>/dev/null
    local i
    for ((i = 0; i < 60; i++)); do
        kill -0 "$UTIL_PID" 2>/dev/null || break
        sleep 0.1
    done
    kill_pid "$UTIL_PID" 10
    wait "$UTIL_PID" 2>/dev/null
    UTIL_PID=""
}

sched_stop() {
    local pid
    [ -n "$SCHED_PID" ] || return 0
    log "stopping vgpu-scheduler pid $SCHED_PID"
    kill_pid "$SCHED_PID" 100
    wait "$SCHED_PID" 2>/dev/null
    # Backends it started and did not stop (by the pids the API reported).
    for pid in "${SCHED_BACKEND_PIDS[@]}"; do
        if kill -0 "$pid" 2>/dev/null; then
            log "backend pid $pid outlived the scheduler, stopping it"
            kill_pid "$pid" 30
        fi
    done
    SCHED_PID=""
    SCHED_API=""
    SCHED_BACKEND_PIDS=()
}

# Processes of our MPS daemon: nvidia-cuda-mps-* whose environment names our pipe directory.
mps_pids() {
    local p
    for p in /proc/[0-9]*; do
        case $(cat "$p/comm" 2>/dev/null) in
        nvidia-cuda-mps*)
            if tr '\0' '\n' <"$p/environ" 2>/dev/null | grep -qx "CUDA_MPS_PIPE_DIRECTORY=$MPS_PIPE"; then
                echo "${p#/proc/}"
            fi
            ;;
        esac
    done
}

mps_env() {
    env CUDA_MPS_PIPE_DIRECTORY="$MPS_PIPE" CUDA_MPS_LOG_DIRECTORY="$MPS_LOG" \
        LD_LIBRARY_PATH="$NATIVE_LIB_DIR" PATH="$(dirname "$MPS_CTL"):$PATH" "$@"
}

mps_stop() {
    local i pid
    [ "$MPS_STARTED" = 1 ] || return 0
    log "stopping MPS (echo quit | nvidia-cuda-mps-control)"
    echo quit | mps_env timeout 20 "$MPS_CTL" >>"$LOGS/mps-control.out" 2>&1
    for ((i = 0; i < 100; i++)); do
        [ -z "$(mps_pids)" ] && break
        sleep 0.1
    done
    for pid in $(mps_pids); do
        log "MPS process $pid still running after quit, killing it"
        kill_pid "$pid" 20
    done
    mkdir -p "$LOGS/mps-log"
    cp -r "$MPS_LOG"/. "$LOGS/mps-log/" 2>/dev/null
    MPS_STARTED=0
}

stop_everything() {
    local pid f
    for pid in "${RUNNING_PIDS[@]}"; do
        kill_pid "$pid" 30
    done
    RUNNING_PIDS=()
    stop_util_poller
    sched_stop
    mps_stop
    stop_backend # a plain backend (fallback of the vgpu session), see common.sh
    for f in "$LOGS"/scheduler-*.log "$LOGS"/backend-*.log; do
        trim_log "$f"
    done
}

make_report() {
    local gpu_info
    [ "$REPORT_DONE" = 1 ] && return 0
    REPORT_DONE=1
    gpu_info=$(timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total,pci.bus_id,compute_mode \
        --format=csv,noheader -i 0 2>/dev/null || true)
    log "writing the report"
    GPU_INFO=$gpu_info SECS=$SECS LC_RATE=$LC_RATE LC_WEIGHTS_GIB=$LC_WEIGHTS_GIB \
        LC_ROWS=$LC_ROWS LC_COLS=$LC_COLS GEMM_N=$GEMM_N GEMM_DEPTH=$GEMM_DEPTH \
        GEMM_CHUNKS=$GEMM_CHUNKS TRAIN_HIDDEN=$TRAIN_HIDDEN TRAIN_BATCH=$TRAIN_BATCH \
        TRAIN_LAYERS=$TRAIN_LAYERS LC_GUARANTEE=$LC_GUARANTEE BE_GUARANTEE=$BE_GUARANTEE \
        NATIVE_LIB_DIR=$NATIVE_LIB_DIR RUN_SECONDS=$(($(date +%s) - START_TS)) \
        timeout 60 python3 "$COLOC_DIR/report.py" "$LOGS" "$OUT" "$DIST/lib" || FAILED=1
}

# shellcheck disable=SC2317 # called by the EXIT trap
on_exit() {
    stop_everything
    make_report
    rm -rf "$WORK"
}
trap on_exit EXIT
trap 'log "interrupted"; exit 130' INT TERM

# ------------------------------------------------------------------------------ set-up

log "colocation: dist=$DIST out=$OUT commit=$VGPU_COMMIT seconds/phase=$SECS budget=${COLOC_BUDGET}s"
{
    echo "== date"; date -u
    echo "== nvidia-smi"; timeout 20 nvidia-smi 2>&1
    echo "== nvidia-smi -q (compute mode, clocks)"
    timeout 20 nvidia-smi -q -d COMPUTE,CLOCK,PERFORMANCE -i 0 2>&1
    echo "== nvcc"; "$NVCC" --version 2>&1
    echo "== gcc"; gcc --version 2>&1 | head -1
    echo "== dist"; ls -lR "$DIST/bin" "$DIST/lib" 2>&1
    echo "== mps"; command -v nvidia-cuda-mps-control 2>&1
    echo "== cpus"; nproc
} >"$LOGS/environment.log" 2>&1

# The run tool may drop modes and symbolic links on the way: put them back.
for f in "$DIST"/bin/*; do
    [ -f "$f" ] && [ ! -x "$f" ] && chmod +x "$f"
done
[ -e "$DIST/lib/libcuda.so.1" ] && [ ! -e "$DIST/lib/libcuda.so" ] && ln -sf libcuda.so.1 "$DIST/lib/libcuda.so"

log "compiling kernels.cu (nvcc -cubin -arch=sm_90)"
CUBIN=$BIN/kernels.cubin
if ! timeout 240 "$NVCC" -cubin -arch=sm_90 -O3 -Xptxas -v -o "$CUBIN" "$COLOC_DIR/kernels.cu" \
    >"$LOGS/compile-kernels.log" 2>&1; then
    log "nvcc failed:"
    tail -30 "$LOGS/compile-kernels.log"
    phase_record compile failed "nvcc kernels.cu: see compile-kernels.log"
    exit 1
fi
for p in lc_decode be_gemm be_train; do
    log "compiling $p"
    if ! compile_c "$BIN/$p" "$LOGS/compile-$p.log" "$COLOC_DIR/$p.c" -I"$BENCH_DIR" -I"$COLOC_DIR"; then
        cat "$LOGS/compile-$p.log"
        phase_record compile failed "gcc $p.c: see compile-$p.log"
        exit 1
    fi
done
log "compiled in $(($(date +%s) - START_TS)) s"

prog_cmd() {
    case $1 in
    lc) echo "$BIN/lc_decode $CUBIN $SECS $LC_RATE $LC_WEIGHTS_GIB $LC_ROWS $LC_COLS" ;;
    gemm) echo "$BIN/be_gemm $CUBIN $SECS $GEMM_N $GEMM_DEPTH $GEMM_CHUNKS" ;;
    train) echo "$BIN/be_train $CUBIN $SECS $TRAIN_HIDDEN $TRAIN_BATCH $TRAIN_LAYERS" ;;
    esac
}

# ------------------------------------------------------------------------------ phases

# util_poller API_SOCKET DIR: samples `vgpuctl util --json` (else GET /v1/util) into
# DIR/NNNN.json with the time in DIR/NNNN.t, until DIR/.stop exists.
util_poller() {
    local api=$1 dir=$2 n=0 f
    mkdir -p "$dir"
    while [ ! -e "$dir/.stop" ]; do
        n=$((n + 1))
        f=$dir/$(printf %04d "$n")
        date +%s.%N >"$f.t"
        if ! timeout 3 "$DIST/bin/vgpuctl" --scheduler "$api" util --json >"$f.json" 2>"$f.err" ||
            ! grep -q '^[[:space:]]*[[{]' "$f.json"; then
            [ -s "$f.json" ] && mv "$f.json" "$f.vgpuctl-out"
            timeout 3 python3 "$COLOC_DIR/api.py" "$api" GET /v1/util >"$f.json" 2>>"$f.err"
        fi
        sleep "$UTIL_INTERVAL"
    done
}

# run_phase NAME SPEC...   SPEC = TAG,PROGRAM,MODE
#   PROGRAM: lc | gemm | train;  MODE: native | mps | mpsPCT | vgpu=SOCKET
# Writes colocation-logs/NAME.TAG.{cmd,json,err,rc}. UTIL_API (if set): sample utilization.
# Returns 0 when it ran and every program succeeded (or the phase is not selected), 1 when
# it failed, 2 when it was skipped for lack of time.
run_phase() {
    local phase=$1 left limit pdir spec tag prog mode t_setup i rc st detail
    shift
    phase_selected "$phase" || return 0
    left=$(left_s)
    if [ "$left" -lt $((SECS + 20)) ]; then
        phase_record "$phase" skipped "out of time (${left}s of the budget left)"
        return 2
    fi
    limit=$((READY_TIMEOUT + SECS * 2 + 30))
    [ "$limit" -gt $((left - 5)) ] && limit=$((left - 5))
    pdir=$WORK/phase-$phase
    rm -rf "$pdir"
    mkdir -p "$pdir"
    local -a pids=() tags=() cmd envs
    log "phase $phase: $*"
    for spec in "$@"; do
        IFS=, read -r tag prog mode <<<"$spec"
        read -r -a cmd <<<"$(prog_cmd "$prog")"
        envs=(COLOC_READY="$pdir/$tag.ready" COLOC_GO="$pdir/go" COLOC_GO_TIMEOUT_S="$READY_TIMEOUT")
        case $mode in
        native) envs+=(LD_LIBRARY_PATH="$NATIVE_LIB_DIR") ;;
        mps*)
            envs+=(LD_LIBRARY_PATH="$NATIVE_LIB_DIR" CUDA_MPS_PIPE_DIRECTORY="$MPS_PIPE"
                CUDA_MPS_LOG_DIRECTORY="$MPS_LOG")
            [ -n "${mode#mps}" ] && envs+=(CUDA_MPS_ACTIVE_THREAD_PERCENTAGE="${mode#mps}")
            ;;
        vgpu=*) envs+=(LD_LIBRARY_PATH="$DIST/lib" VGPU_SOCKET="${mode#vgpu=}" RUST_LOG="$CLIENT_LOG") ;;
        *)
            log "bad mode $mode"
            return 1
            ;;
        esac
        echo "$mode ${envs[*]} ${cmd[*]}" >"$LOGS/$phase.$tag.cmd"
        env "${envs[@]}" timeout -k 5 "$limit" "${cmd[@]}" >"$LOGS/$phase.$tag.json" \
            2>"$LOGS/$phase.$tag.err" &
        pids+=("$!")
        tags+=("$tag")
        RUNNING_PIDS+=("$!")
    done

    # Start barrier: wait until every program is set up (or has died), then say go.
    t_setup=$(date +%s)
    while :; do
        local all=1
        for i in "${!tags[@]}"; do
            [ -e "$pdir/${tags[$i]}.ready" ] && continue
            kill -0 "${pids[$i]}" 2>/dev/null && all=0
        done
        [ "$all" = 1 ] && break
        if [ $(($(date +%s) - t_setup)) -ge "$READY_TIMEOUT" ]; then
            # A program that is not set up by now is stuck (e.g. an MPS server that never
            # came): stop it rather than wait for its timeout; the phase is then a failure.
            for i in "${!tags[@]}"; do
                if [ ! -e "$pdir/${tags[$i]}.ready" ] && kill -0 "${pids[$i]}" 2>/dev/null; then
                    log "phase $phase: ${tags[$i]} not set up after ${READY_TIMEOUT}s, stopping it"
                    echo "run.sh: not set up after ${READY_TIMEOUT}s, stopped" >>"$LOGS/$phase.${tags[$i]}.err"
                    kill_pid "${pids[$i]}" 50
                fi
            done
            break
        fi
        sleep 0.05
    done
    : >"$pdir/go"
    log "phase $phase: go after $(($(date +%s) - t_setup)) s of set-up"
    if [ -n "${UTIL_API:-}" ]; then
        UTIL_DIR=$LOGS/$phase.util
        util_poller "$UTIL_API" "$UTIL_DIR" &
        UTIL_PID=$!
    fi

    st=ok
    detail=""
    for i in "${!tags[@]}"; do
        wait "${pids[$i]}"
        rc=$?
        echo "$rc" >"$LOGS/$phase.${tags[$i]}.rc"
        if [ "$rc" -ne 0 ]; then
            st=failed
            detail+="${tags[$i]} exit $rc: $(tail -1 "$LOGS/$phase.${tags[$i]}.err" | cut -c1-200); "
        fi
        log "  $phase ${tags[$i]}: exit $rc $(head -c 600 "$LOGS/$phase.${tags[$i]}.json")"
    done
    RUNNING_PIDS=()
    stop_util_poller
    phase_record "$phase" "$st" "$detail"
    [ "$st" = ok ]
}

# ------------------------------------------------------------------------------ vgpu sessions

# write_config FILE SLICE_SPEC...   SLICE_SPEC = NAME:CLASS:GUARANTEE
# The scheduler's TOML config (schema: the SliceSpec fields of the REST API, one [[slice]]
# table each).
write_config() {
    local file=$1 spec name class pct
    shift
    {
        echo "# Written by bench/colocation/run.sh"
        echo 'device = "cuda"'
        for spec in "$@"; do
            IFS=: read -r name class pct <<<"$spec"
            printf '\n[[slice]]\nname = "%s"\ntenant = "bench"\ngpu = 0\nclass = "%s"\n' "$name" "$class"
            printf 'compute_guarantee_pct = %s\ncompute_max_pct = 100\nweight = 1\nattach = true\n' "$pct"
        done
    } >"$file"
}

# sched_launch SESSION STATE_DIR [CONFIG]: starts vgpu-scheduler, waits for its API socket.
sched_launch() {
    local session=$1 w=$2 cfg=${3:-} i
    local -a args=(--state-dir "$w" --device cuda --backend "$DIST/bin/vgpu-backend")
    [ -n "$cfg" ] && args+=(--config "$cfg")
    mkdir -p "$w"
    log "starting vgpu-scheduler ${args[*]} (log: scheduler-$session.log)"
    echo "=== vgpu-scheduler ${args[*]}" >>"$LOGS/scheduler-$session.log"
    env RUST_LOG="$SCHED_LOG" LD_LIBRARY_PATH="$NATIVE_LIB_DIR" \
        "$DIST/bin/vgpu-scheduler" "${args[@]}" >>"$LOGS/scheduler-$session.log" 2>&1 &
    SCHED_PID=$!
    SCHED_API=$w/api.sock
    for ((i = 0; i < 400; i++)); do
        [ -S "$SCHED_API" ] && return 0
        if ! kill -0 "$SCHED_PID" 2>/dev/null; then
            wait "$SCHED_PID"
            log "vgpu-scheduler exited with status $? (see scheduler-$session.log)"
            SCHED_PID=""
            return 1
        fi
        sleep 0.05
    done
    log "vgpu-scheduler did not create $SCHED_API within 20 s"
    sched_stop
    return 1
}

# wait_sockets STATE_DIR SECONDS NAME...: waits until every slice socket exists.
wait_sockets() {
    local w=$1 secs=$2 i name all
    shift 2
    for ((i = 0; i < secs * 20; i++)); do
        all=1
        for name in "$@"; do
            [ -S "$w/slices/$name.sock" ] || all=0
        done
        [ "$all" = 1 ] && return 0
        kill -0 "$SCHED_PID" 2>/dev/null || return 1
        sleep 0.05
    done
    return 1
}

api() { timeout 15 python3 "$COLOC_DIR/api.py" "$SCHED_API" "$@"; }

# vgpu_session SESSION SLICE_SPEC...: a scheduler with these slices attached; sets SCHED_*.
# Tries the config first (COLOC_VGPU_SETUP auto|config), then the REST API (auto|api).
vgpu_session() {
    local session=$1 w spec name class pct names=() body pid
    shift
    for spec in "$@"; do names+=("${spec%%:*}"); done
    if [ ! -x "$DIST/bin/vgpu-scheduler" ]; then
        session_record "$session" failed "no $DIST/bin/vgpu-scheduler"
        return 1
    fi
    if [ "$VGPU_SETUP" != api ]; then
        w=$WORK/sched-$session-config
        write_config "$WORK/$session.toml" "$@"
        cp "$WORK/$session.toml" "$LOGS/$session.toml"
        if sched_launch "$session" "$w" "$WORK/$session.toml" && wait_sockets "$w" 20 "${names[@]}"; then
            session_record "$session" ok "slices from --config $session.toml"
        else
            log "$session: the slices did not come up from the config"
            sched_stop
            w=""
        fi
    fi
    if [ -z "${SCHED_PID:-}" ] && [ "$VGPU_SETUP" != config ]; then
        w=$WORK/sched-$session-api
        if sched_launch "$session" "$w"; then
            api DELETE /v1/slices/default >>"$LOGS/scheduler-$session.api.log" 2>&1
            for spec in "$@"; do
                IFS=: read -r name class pct <<<"$spec"
                body=$(printf '{"name":"%s","tenant":"bench","gpu":0,"class":"%s","compute_guarantee_pct":%s,"compute_max_pct":100,"weight":1,"attach":true}' \
                    "$name" "$class" "$pct")
                api POST /v1/slices "$body" >>"$LOGS/scheduler-$session.api.log" 2>&1 ||
                    log "$session: creating slice $name failed (see scheduler-$session.api.log)"
                # In case the slice exists but is not attached.
                [ -S "$w/slices/$name.sock" ] ||
                    api POST "/v1/slices/$name/attach" >>"$LOGS/scheduler-$session.api.log" 2>&1
            done
            if wait_sockets "$w" 30 "${names[@]}"; then
                session_record "$session" ok "slices created through the REST API"
            else
                session_record "$session" failed "slice sockets missing after 30 s (see scheduler-$session.log, scheduler-$session.api.log)"
                sched_stop
                return 1
            fi
        else
            session_record "$session" failed "the scheduler did not start (see scheduler-$session.log)"
            return 1
        fi
    fi
    if [ -z "${SCHED_PID:-}" ]; then
        session_record "$session" failed "the slices did not come up"
        return 1
    fi
    SCHED_STATE=$w
    api GET /v1/slices >"$LOGS/$session.slices.json" 2>>"$LOGS/scheduler-$session.api.log"
    timeout 5 "$DIST/bin/vgpuctl" --scheduler "$SCHED_API" list >"$LOGS/$session.vgpuctl-list.txt" 2>&1
    for pid in $(python3 -c 'import json,sys
try:
    print(" ".join(str(s.get("backend_pid")) for s in json.load(open(sys.argv[1])) if s.get("backend_pid")))
except Exception:
    pass' "$LOGS/$session.slices.json"); do
        SCHED_BACKEND_PIDS+=("$pid")
    done
    log "$session: slices up (${names[*]}), backends ${SCHED_BACKEND_PIDS[*]:-unknown}"
    return 0
}

# ------------------------------------------------------------------------------ MPS

mps_start() {
    local d
    MPS_CTL=$(command -v nvidia-cuda-mps-control || true)
    if [ -z "$MPS_CTL" ]; then
        for d in "$(dirname "$NATIVE_LIB_DIR")/bin" /usr/local/nvidia/bin /usr/bin /usr/local/cuda/bin; do
            [ -x "$d/nvidia-cuda-mps-control" ] && MPS_CTL=$d/nvidia-cuda-mps-control && break
        done
    fi
    if [ -z "$MPS_CTL" ]; then
        session_record mps failed "nvidia-cuda-mps-control not found"
        return 1
    fi
    mkdir -p "$MPS_PIPE" "$MPS_LOG"
    log "starting MPS: $MPS_CTL -d (pipe $MPS_PIPE)"
    if ! mps_env timeout 20 "$MPS_CTL" -d >>"$LOGS/mps-control.out" 2>&1; then
        session_record mps failed "nvidia-cuda-mps-control -d failed (see mps-control.out)"
        return 1
    fi
    MPS_STARTED=1
    sleep 0.5
    if ! echo get_server_list | mps_env timeout 10 "$MPS_CTL" >>"$LOGS/mps-control.out" 2>&1; then
        session_record mps failed "the MPS control daemon does not answer (see mps-control.out)"
        mps_stop
        return 1
    fi
    session_record mps ok "$MPS_CTL"
}

# ------------------------------------------------------------------------------ the run

# 1. Exclusive, native.
run_phase excl-lc "lc,lc,native"
run_phase excl-gemm "be,gemm,native"
run_phase excl-train "be,train,native"

# 2. vgpu: lc (latency-critical) + be (best-effort).
if any_selected vgpu-excl-lc vgpu-lc-gemm vgpu-lc-train vgpu-excl-gemm; then
    if [ "$(left_s)" -lt $((SECS + 40)) ]; then
        session_record vgpu skipped "out of time"
    elif vgpu_session vgpu "lc:latency-critical:$LC_GUARANTEE" "be:best-effort:$BE_GUARANTEE"; then
        UTIL_API=$SCHED_API
        LC_SOCK=$SCHED_STATE/slices/lc.sock
        BE_SOCK=$SCHED_STATE/slices/be.sock
        run_phase vgpu-excl-lc "lc,lc,vgpu=$LC_SOCK"
        run_phase vgpu-lc-gemm "lc,lc,vgpu=$LC_SOCK" "be,gemm,vgpu=$BE_SOCK"
        run_phase vgpu-lc-train "lc,lc,vgpu=$LC_SOCK" "be,train,vgpu=$BE_SOCK"
        run_phase vgpu-excl-gemm "be,gemm,vgpu=$BE_SOCK"
        UTIL_API=""
        sched_stop
    elif phase_selected vgpu-excl-lc; then
        # No scheduler: still show the remoting cost, through a plain backend.
        if start_backend "$DIST" "$WORK/plain.sock" "$LOGS/backend-plain.log"; then
            run_phase vgpu-excl-lc "lc,lc,vgpu=$WORK/plain.sock"
            stop_backend
        fi
    fi
fi

# 3. vgpu: two best-effort slices, 70 % and 30 %.
if phase_selected vgpu-shares; then
    if [ "$(left_s)" -lt $((SECS + 40)) ]; then
        session_record shares skipped "out of time"
    elif vgpu_session shares "be70:best-effort:70" "be30:best-effort:30"; then
        UTIL_API=$SCHED_API
        run_phase vgpu-shares "be70,gemm,vgpu=$SCHED_STATE/slices/be70.sock" \
            "be30,gemm,vgpu=$SCHED_STATE/slices/be30.sock"
        UTIL_API=""
        sched_stop
    fi
fi

# 4. Default time-slicing: two native processes.
run_phase ts-lc-gemm "lc,lc,native" "be,gemm,native"
run_phase ts-lc-train "lc,lc,native" "be,train,native"

# 5. MPS (the best-effort client limited to 30 % and 50 % of the SMs, or not at all).
if any_selected mps-lc-gemm mps30-lc-gemm mps50-lc-gemm mps-lc-train mps30-lc-train mps50-lc-train; then
    if [ "$(left_s)" -lt $((SECS + 30)) ]; then
        session_record mps skipped "out of time"
    elif mps_start; then
        # When the first MPS phase fails, MPS itself is likely broken here: skip the rest.
        mps_ok=1
        for spec in "mps-lc-gemm:gemm:mps" "mps30-lc-gemm:gemm:mps30" "mps50-lc-gemm:gemm:mps50" \
            "mps-lc-train:train:mps" "mps30-lc-train:train:mps30" "mps50-lc-train:train:mps50"; do
            IFS=: read -r name prog mode <<<"$spec"
            phase_selected "$name" || continue
            if [ "$mps_ok" = 1 ]; then
                run_phase "$name" "lc,lc,mps" "be,$prog,$mode"
                [ $? -eq 1 ] && mps_ok=0
            else
                phase_record "$name" skipped "an earlier MPS phase failed"
            fi
        done
        mps_stop
    fi
fi

stop_everything
make_report
log "done in $(($(date +%s) - START_TS)) s"
[ "$FAILED" = 0 ]
