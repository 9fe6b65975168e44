#!/usr/bin/env bash
# The fault-isolation benchmark (issue 7): three tenants share one GPU; one of them faults
# (or is killed) every few seconds; the other two must see no error and little dip.
# Run on the GPU machine from the repository root (dist/ staged by scripts/stage-dist.sh):
#
#   OUT=/some/dir bash bench/faults/run.sh        (or dist/bench/faults/run.sh)
#
# Compiles worker.c and faulter.c (gcc, driver API only), then runs these phases, each
# FAULTS_SECONDS long (baselines FAULTS_BASE_SECONDS), tenants a and b always `worker`s
# (the survivors), tenant c as the scenario says:
#
#   vgpu-base           vgpu-scheduler --device cuda with slices a, b, c (one backend each);
#                       c is a worker too: the no-fault baseline
#   vgpu-fault          c is the faulter: runs FAULT_EVERY_MS, then vgpu_fault (kind 0
#                       illegal address and kind 1 trap, alternately), exits; restarted at once
#   vgpu-fault-same-slice  the same, but c runs on survivor a's slice (its own connection,
#                       so its own worker process)
#   vgpu-kill           c runs normally and is SIGKILLed every KILL_EVERY_S seconds
#   vgpu-backend-kill   c's *backend* is SIGKILLed every BACKEND_KILL_EVERY_S seconds of
#                       its uptime; the scheduler restarts it, c restarts on errors
#   mps-base, mps-fault, mps-kill         the same tenants natively under MPS (NVIDIA
#                       documents that a fatal fault reaches every client of the server)
#   native-base, native-fault, native-kill  plain native processes (time-slicing)
#
# Every program runs under `timeout` and its own watchdog; a phase that fails is recorded
# and the run goes on; phases that no longer fit in FAULTS_BUDGET are skipped (recorded).
# MPS, the scheduler, its backends and every tenant are stopped on exit (trap). Then
# report.py writes $OUT/faults-<gpu>-<date>.json and prints the table: per phase the
# survivors' errors (goal 0), their throughput dip (min 100 ms window / median) and total
# vs the mode's baseline, and the faulting tenant's recovery time (median / max: fault or
# kill -> a new process has completed a kernel). Logs go to $OUT/faults-logs/.
#
# Environment (all optional):
#   OUT                    output folder (default ./faults-out)
#   FAULTS_SECONDS         seconds per fault/kill phase (default 60)
#   FAULTS_BASE_SECONDS    seconds per baseline phase (default 10)
#   FAULTS_BUDGET          seconds the whole run may take (default 470)
#   FAULTS_PHASES          extended regex: run only the phases whose names match
#   FAULTS_DEVICE          cuda (default) or emulated (a dry run of the vgpu phases on a
#                          machine without a GPU; MPS and native phases are skipped)
#   FAULT_EVERY_MS         the faulter's normal run before each fault (default 3000)
#   KILL_EVERY_S           seconds between tenant kills (default 3)
#   BACKEND_KILL_EVERY_S   backend uptime before each backend kill (default 10: the
#                          scheduler's restart backoff resets after 10 s up)
#   KERNEL_US GRID BLOCK   the steady kernel: vgpu_timed_spin for KERNEL_US on GRID blocks
#                          of BLOCK threads (default 500, 8, 128)
#   FAULTS_PTX_DIR         where vgpu_timed_spin.ptx and vgpu_fault.ptx are (default
#                          tests/ptx of this tree, else dist/tests/ptx)
#   FAULTS_RECOVER_S       a worker's in-process recovery attempts after an error (3)
#   SCHED_LOG              RUST_LOG of the scheduler and backends (default info)
#   GPU_MEMORY             the GPU memory declared to the scheduler (default: nvidia-smi's)
#   VGPU_COMMIT, and those of bench/common.sh (NATIVE_LIB_DIR, CUDA_INC, CLIENT_LOG)
# Exit status: 0 when every phase that ran completed and the report was written, else 1.
set -u
export LC_ALL=C

FAULTS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BENCH_DIR=$(cd "$FAULTS_DIR/.." && pwd)
# shellcheck source=bench/common.sh
. "$BENCH_DIR/common.sh"

DIST=$(find_dist "$BENCH_DIR")
OUT=${OUT:-$PWD/faults-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOGS=$OUT/faults-logs
mkdir -p "$LOGS"
exec > >(tee -a "$LOGS/run.log") 2>&1

WORK=$(mktemp -d /tmp/vgpu-faults.XXXXXX)
BIN=$WORK/bin
mkdir -p "$BIN"
START_TS=$(date +%s)
BUDGET=${FAULTS_BUDGET:-470}
DEADLINE=$((START_TS + BUDGET))
SECS=${FAULTS_SECONDS:-60}
BASE_SECS=${FAULTS_BASE_SECONDS:-10}
DEVICE=${FAULTS_DEVICE:-cuda}
FAULT_EVERY_MS=${FAULT_EVERY_MS:-3000}
KILL_EVERY_S=${KILL_EVERY_S:-3}
BACKEND_KILL_EVERY_S=${BACKEND_KILL_EVERY_S:-10}
KERNEL_US=${KERNEL_US:-500}
GRID=${GRID:-8}
BLOCK=${BLOCK:-128}
SCHED_LOG=${SCHED_LOG:-info}
RESTART_DELAY=0.05
export FAULTS_RECOVER_S=${FAULTS_RECOVER_S:-3}
if [ -z "${VGPU_COMMIT:-}" ]; then
    VGPU_COMMIT=$(cat "$DIST/COMMIT" 2>/dev/null || git -C "$BENCH_DIR" rev-parse HEAD 2>/dev/null || echo unknown)
fi
export VGPU_COMMIT

PTX_DIR=${FAULTS_PTX_DIR:-}
for d in "$BENCH_DIR/../tests/ptx" "$DIST/tests/ptx"; do
    [ -z "$PTX_DIR" ] && [ -f "$d/vgpu_fault.ptx" ] && PTX_DIR=$(cd "$d" && pwd)
done
SPIN_MODULE=${PTX_DIR:-.}/vgpu_timed_spin.ptx
FAULT_MODULE=${PTX_DIR:-.}/vgpu_fault.ptx

SCHED_PID=""
SCHED_STATE=""
MPS_CTL=""
MPS_STARTED=0
MPS_PIPE=$WORK/mps/pipe
MPS_LOG=$WORK/mps/log
LOOP_PIDS=()
REPORT_DONE=0
FAILED=0
: >"$LOGS/phases.tsv"

left_s() { echo $((DEADLINE - $(date +%s))); }

# Wall-clock time: seconds with microseconds, and milliseconds.
now_s() { if [ -n "${EPOCHREALTIME:-}" ]; then echo "$EPOCHREALTIME"; else date +%s.%N; fi; }
now_ms() {
    local t=${EPOCHREALTIME:-}
    if [ -n "$t" ]; then
        t=${t/./}
        echo $((10#$t / 1000))
    else
        date +%s%3N
    fi
}

# phase_record NAME STATUS DETAIL [START END]
phase_record() {
    printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${4:-}" "${5:-}" >>"$LOGS/phases.tsv"
    [ "$2" = failed ] && FAILED=1
    log "phase $1: $2${3:+ ($3)}"
}

phase_selected() {
    [ -z "${FAULTS_PHASES:-}" ] && return 0
    [[ $1 =~ $FAULTS_PHASES ]]
}

# ------------------------------------------------------------------------------ processes

# kill_pid PID [GRACE_TENTHS]: SIGTERM, then SIGKILL after the grace period (default 3 s).
kill_pid() {
    local pid=$1 grace=${2:-30} i
    [ -n "$pid" ] || return 0
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null
    for ((i = 0; i < grace; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null
    return 0
}

# The children of PID, a `timeout` we started (the program it runs); nothing if PID is
# no longer a `timeout` (it ended, and the pid may have been reused).
children_of() {
    local pid=$1 c
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = timeout ] || return 0
    c=$(cat "/proc/$pid/task/$pid/children" 2>/dev/null)
    [ -z "$c" ] && c=$(ps -o pid= --ppid "$pid" 2>/dev/null)
    # shellcheck disable=SC2086 # one line of pids, split on purpose
    echo $c
}

# The pid of the vgpu-backend listening on SOCKET (by its command line), or nothing.
backend_pid() {
    local sock=$1 real f p cmd
    real=$(readlink -f "$sock" 2>/dev/null || echo "$sock")
    # shellcheck disable=SC2013 # /proc paths have no spaces
    for f in $(grep -lsaF -e "$sock" -e "$real" /proc/[0-9]*/cmdline 2>/dev/null); do
        cmd=$(tr '\0' ' ' 2>/dev/null <"$f") || continue
        case $cmd in
        *" --worker "*) ;; # a worker process of that backend, not the backend
        *vgpu-backend*"--socket $sock "* | *vgpu-backend*"--socket $real "*)
            p=${f#/proc/}
            echo "${p%/cmdline}"
            return 0
            ;;
        esac
    done
}

stop_loops() {
    local pid c f
    # The programs first (their `timeout`s were recorded per tenant), then the loops.
    for f in "$WORK"/phase-*/*.tpid; do
        [ -f "$f" ] || continue
        pid=$(cat "$f" 2>/dev/null)
        [ -n "$pid" ] || continue
        [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = timeout ] || continue
        for c in $(children_of "$pid"); do kill -KILL "$c" 2>/dev/null; done
        kill -KILL "$pid" 2>/dev/null
    done
    rm -f "$WORK"/phase-*/*.tpid
    for pid in ${LOOP_PIDS[@]+"${LOOP_PIDS[@]}"}; do
        kill_pid "$pid" 10
        wait "$pid" 2>/dev/null
    done
    LOOP_PIDS=()
}

# ------------------------------------------------------------------------------ tenants

# mode_env MODE: sets ENVS for a tenant in MODE (native | mps | vgpu=SOCKET).
mode_env() {
    case $1 in
    native) ENVS=(LD_LIBRARY_PATH="$NATIVE_LIB_DIR") ;;
    mps) ENVS=(LD_LIBRARY_PATH="$NATIVE_LIB_DIR" CUDA_MPS_PIPE_DIRECTORY="$MPS_PIPE"
        CUDA_MPS_LOG_DIRECTORY="$MPS_LOG") ;;
    vgpu=*) ENVS=(LD_LIBRARY_PATH="$DIST/lib" VGPU_SOCKET="${1#vgpu=}" RUST_LOG="$CLIENT_LOG") ;;
    *) ENVS=() ;;
    esac
}

# tenant_loop PHASE_DIR PHASE TAG MODE ROLE END_MS: runs the tenant's program until END_MS,
# starting a new process whenever one exits early. ROLE: worker (steady), faulter (faults
# every FAULT_EVERY_MS), victim (steady, killed from outside). Appends every process's
# output to faults-logs/PHASE.TAG.out with INCARNATION/EXIT lines around it.
tenant_loop() {
    local pdir=$1 phase=$2 tag=$3 mode=$4 role=$5 end_ms=$6
    local out=$LOGS/$phase.$tag.out err=$LOGS/$phase.$tag.err n=0 left_ms rc kind run tpid
    local -a cmd
    mode_env "$mode"
    while :; do
        left_ms=$((end_ms - $(now_ms)))
        [ "$left_ms" -gt 300 ] || break
        n=$((n + 1))
        case $role in
        faulter)
            kind=$(((n - 1) % 2))
            run=$FAULT_EVERY_MS
            # Too little time left for a fault and its recovery: run to the end instead.
            if [ $((left_ms - 1500)) -lt "$run" ]; then
                kind=-1
                run=$left_ms
            fi
            cmd=("$BIN/faulter" "$SPIN_MODULE" "$FAULT_MODULE" "$run" "$kind" "$KERNEL_US" "$GRID" "$BLOCK")
            ;;
        victim)
            cmd=("$BIN/faulter" "$SPIN_MODULE" "$FAULT_MODULE" "$left_ms" -1 "$KERNEL_US" "$GRID" "$BLOCK")
            ;;
        *)
            cmd=("$BIN/worker" "$SPIN_MODULE" "$((left_ms / 1000)).$(printf %03d $((left_ms % 1000)))"
                "$KERNEL_US" "$GRID" "$BLOCK")
            ;;
        esac
        echo "INCARNATION t=$(now_s) n=$n" >>"$out"
        env ${ENVS[@]+"${ENVS[@]}"} timeout -k 3 $((left_ms / 1000 + 45)) "${cmd[@]}" >>"$out" 2>>"$err" &
        tpid=$!
        echo "$tpid" >"$pdir/$tag.tpid"
        wait "$tpid" 2>/dev/null
        rc=$?
        echo "EXIT t=$(now_s) n=$n rc=$rc" >>"$out"
        if [ "$rc" = 0 ] && [ "$role" != faulter ]; then
            break
        fi
        sleep "$RESTART_DELAY"
    done
}

first_oks() {
    local n
    n=$(grep -c '^FIRST_OK' "$1" 2>/dev/null) || true
    echo "${n:-0}"
}

# wait_first_ok FILE COUNT TIMEOUT_MS: until FILE has more than COUNT FIRST_OK lines.
wait_first_ok() {
    local f=$1 count=$2 limit=$(($(now_ms) + $3))
    while [ "$(now_ms)" -lt "$limit" ]; do
        [ "$(first_oks "$f")" -gt "$count" ] && return 0
        sleep 0.02
    done
    return 1
}

# sleep_until MS LIMIT_MS: sleeps until MS; false when LIMIT_MS comes first.
sleep_until() {
    while [ "$(now_ms)" -lt "$1" ]; do
        [ "$(now_ms)" -ge "$2" ] && return 1
        sleep 0.02
    done
    return 0
}

# tenant_killer PHASE_DIR PHASE TAG END_MS: SIGKILLs the tenant's process every
# KILL_EVERY_S seconds, once it has recovered from the previous kill.
tenant_killer() {
    local pdir=$1 phase=$2 tag=$3 end_ms=$4 out=$LOGS/$2.$3.out events=$LOGS/$2.events
    local before kill_ms next tpid c
    wait_first_ok "$out" 0 30000 || return 0
    next=$(($(now_ms) + KILL_EVERY_S * 1000))
    while sleep_until "$next" $((end_ms - 1500)); do
        tpid=$(cat "$pdir/$tag.tpid" 2>/dev/null)
        c=$(children_of "${tpid:-0}")
        c=${c%% *}
        before=$(first_oks "$out")
        if [ -n "$c" ] && kill -KILL "$c" 2>/dev/null; then
            kill_ms=$(now_ms)
            echo "KILL t=$(now_s) pid=$c" >>"$events"
        else
            next=$(($(now_ms) + 200))
            continue
        fi
        wait_first_ok "$out" "$before" 30000 && echo "TENANT_BACK t=$(now_s)" >>"$events"
        next=$((kill_ms + KILL_EVERY_S * 1000))
        [ "$(now_ms)" -gt $((next - 500)) ] && next=$(($(now_ms) + 500))
    done
}

# backend_killer PHASE TAG SOCKET END_MS: SIGKILLs the backend serving SOCKET once it has
# been up BACKEND_KILL_EVERY_S seconds; records when the scheduler restarted it and when
# the tenant worked again.
backend_killer() {
    local phase=$1 tag=$2 sock=$3 end_ms=$4 out=$LOGS/$1.$2.out events=$LOGS/$1.events
    local pid new before limit next
    wait_first_ok "$out" 0 30000 || return 0
    next=$(($(now_ms) + BACKEND_KILL_EVERY_S * 1000))
    while sleep_until "$next" $((end_ms - 3000)); do
        pid=$(backend_pid "$sock")
        if [ -z "$pid" ]; then
            echo "INFO t=$(now_s) no backend found for $sock" >>"$events"
            next=$(($(now_ms) + 500))
            continue
        fi
        before=$(first_oks "$out")
        kill -KILL "$pid" 2>/dev/null && echo "BACKEND_KILL t=$(now_s) pid=$pid" >>"$events"
        limit=$(($(now_ms) + 30000))
        new=""
        while [ "$(now_ms)" -lt "$limit" ]; do
            new=$(backend_pid "$sock")
            [ -n "$new" ] && [ "$new" != "$pid" ] && break
            new=""
            sleep 0.02
        done
        if [ -z "$new" ]; then
            echo "INFO t=$(now_s) the backend was not restarted within 30 s" >>"$events"
            return 0
        fi
        echo "BACKEND_UP t=$(now_s) pid=$new" >>"$events"
        next=$(($(now_ms) + BACKEND_KILL_EVERY_S * 1000))
        wait_first_ok "$out" "$before" 30000 && echo "TENANT_BACK t=$(now_s)" >>"$events"
    done
}

# run_phase NAME SCENARIO SECONDS MODE_A MODE_B MODE_C
#   SCENARIO: base | fault | kill | backend-kill (MODE_C must then be vgpu=SOCKET)
run_phase() {
    local name=$1 scenario=$2 secs=$3 ma=$4 mb=$5 mc=$6 left pdir start_ms end_ms t0
    local role_c=worker st=ok detail="" pid limit tag
    phase_selected "$name" || return 0
    left=$(left_s)
    if [ "$left" -lt $((secs + 15)) ]; then
        phase_record "$name" skipped "out of time (${left}s of the budget left)"
        return 0
    fi
    case $scenario in
    fault) role_c=faulter ;;
    kill) role_c=victim ;;
    esac
    pdir=$WORK/phase-$name
    mkdir -p "$pdir"
    : >"$LOGS/$name.events"
    log "phase $name: $scenario for ${secs}s; a=$ma b=$mb c=$mc ($role_c)"
    t0=$(now_s)
    start_ms=$(now_ms)
    end_ms=$((start_ms + secs * 1000))
    LOOP_PIDS=()
    tenant_loop "$pdir" "$name" a "$ma" worker "$end_ms" &
    LOOP_PIDS+=("$!")
    tenant_loop "$pdir" "$name" b "$mb" worker "$end_ms" &
    LOOP_PIDS+=("$!")
    tenant_loop "$pdir" "$name" c "$mc" "$role_c" "$end_ms" &
    LOOP_PIDS+=("$!")
    case $scenario in
    kill)
        tenant_killer "$pdir" "$name" c "$end_ms" &
        LOOP_PIDS+=("$!")
        ;;
    backend-kill)
        backend_killer "$name" c "${mc#vgpu=}" "$end_ms" &
        LOOP_PIDS+=("$!")
        ;;
    esac
    # Everything ends by itself at end_ms; give it 60 s more, then stop what is left.
    limit=$((end_ms + 60000))
    for pid in "${LOOP_PIDS[@]}"; do
        while kill -0 "$pid" 2>/dev/null && [ "$(now_ms)" -lt "$limit" ]; do
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            st=failed
            detail="a tenant did not finish 60 s after the phase's end; stopped"
        fi
    done
    stop_loops
    for tag in a b c; do
        [ -s "$LOGS/$name.$tag.err" ] && trim_log "$LOGS/$name.$tag.err"
        grep -q '^READY' "$LOGS/$name.$tag.out" 2>/dev/null || {
            st=failed
            detail+="tenant $tag never got ready (see $name.$tag.out/.err); "
        }
    done
    phase_record "$name" "$st" "$detail" "$t0" "$((end_ms / 1000)).$(printf %03d $((end_ms % 1000)))"
}

# ------------------------------------------------------------------------------ vgpu

api() { timeout 15 python3 "$FAULTS_DIR/report.py" api "$SCHED_STATE/api.sock" "$@"; }

find_bin() {
    local name=$1 c
    for c in "$DIST/bin/$name" "$BENCH_DIR/../target/release/$name"; do
        [ -x "$c" ] && echo "$c" && return 0
    done
    command -v "$name" 2>/dev/null
}

sched_start() {
    local sched backend mem i cfg=$WORK/faults.toml
    sched=$(find_bin vgpu-scheduler)
    backend=$(find_bin vgpu-backend)
    if [ -z "$sched" ] || [ -z "$backend" ]; then
        phase_record vgpu-session failed "no vgpu-scheduler or vgpu-backend in $DIST/bin (stage-dist)"
        return 1
    fi
    if [ "$DEVICE" = emulated ]; then
        mem=${GPU_MEMORY:-8GiB}
    else
        mem=${GPU_MEMORY:-$(timeout 20 nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits -i 0 2>/dev/null | head -1 | tr -d ' ')MiB}
        [ "$mem" = MiB ] && mem=80GiB
    fi
    {
        echo "# Written by bench/faults/run.sh: three best-effort slices on GPU 0"
        echo "device = \"$DEVICE\""
        printf '\n[[gpu]]\nindex = 0\nmemory = "%s"\n' "$mem"
        for s in a:33 b:33 c:34; do
            printf '\n[[slice]]\nname = "%s"\ntenant = "t-%s"\ngpu = 0\nclass = "best-effort"\n' "${s%%:*}" "${s%%:*}"
            printf 'compute_guarantee_pct = %s\ncompute_max_pct = 100\nmemory_limit = "1GiB"\nattach = true\n' "${s##*:}"
        done
    } >"$cfg"
    cp "$cfg" "$LOGS/faults.toml"
    SCHED_STATE=$WORK/sched
    mkdir -p "$SCHED_STATE"
    log "starting $sched --state-dir $SCHED_STATE --device $DEVICE --config faults.toml"
    env RUST_LOG="$SCHED_LOG" LD_LIBRARY_PATH="$NATIVE_LIB_DIR" \
        "$sched" --state-dir "$SCHED_STATE" --device "$DEVICE" --config "$cfg" --backend "$backend" \
        >>"$LOGS/scheduler.log" 2>&1 &
    SCHED_PID=$!
    for ((i = 0; i < 600; i++)); do
        if [ -S "$SCHED_STATE/slices/a.sock" ] && [ -S "$SCHED_STATE/slices/b.sock" ] &&
            [ -S "$SCHED_STATE/slices/c.sock" ]; then
            log "slices a, b, c up after $((i * 50)) ms"
            return 0
        fi
        if ! kill -0 "$SCHED_PID" 2>/dev/null; then
            wait "$SCHED_PID"
            phase_record vgpu-session failed "vgpu-scheduler exited with status $? (see scheduler.log)"
            SCHED_PID=""
            return 1
        fi
        sleep 0.05
    done
    phase_record vgpu-session failed "the slice sockets did not appear within 30 s (see scheduler.log)"
    sched_stop
    return 1
}

sched_stop() {
    local pid tag
    [ -n "$SCHED_PID" ] || return 0
    api GET /v1/slices >"$LOGS/vgpu.slices.json" 2>>"$LOGS/scheduler.api.log"
    local -a backends=()
    for tag in a b c; do
        pid=$(backend_pid "$SCHED_STATE/slices/$tag.sock")
        [ -n "$pid" ] && backends+=("$pid")
    done
    log "stopping vgpu-scheduler pid $SCHED_PID"
    kill_pid "$SCHED_PID" 100
    wait "$SCHED_PID" 2>/dev/null
    for pid in ${backends[@]+"${backends[@]}"}; do
        if kill -0 "$pid" 2>/dev/null; then
            log "backend pid $pid outlived the scheduler, stopping it"
            kill_pid "$pid" 30
        fi
    done
    SCHED_PID=""
}

# ------------------------------------------------------------------------------ MPS

# Processes of our MPS daemon: nvidia-cuda-mps-* whose environment names our pipe directory.
mps_pids() {
    local p
    for p in /proc/[0-9]*; do
        case $(cat "$p/comm" 2>/dev/null) in
        nvidia-cuda-mps*)
            if tr '\0' '\n' 2>/dev/null <"$p/environ" | grep -qx "CUDA_MPS_PIPE_DIRECTORY=$MPS_PIPE"; then
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

mps_start() {
    local d
    MPS_CTL=$(command -v nvidia-cuda-mps-control || true)
    if [ -z "$MPS_CTL" ]; then
        for d in "$(dirname "$NATIVE_LIB_DIR")/bin" /usr/local/nvidia/bin /usr/bin /usr/local/cuda/bin; do
            [ -x "$d/nvidia-cuda-mps-control" ] && MPS_CTL=$d/nvidia-cuda-mps-control && break
        done
    fi
    if [ -z "$MPS_CTL" ]; then
        phase_record mps-session failed "nvidia-cuda-mps-control not found"
        return 1
    fi
    mkdir -p "$MPS_PIPE" "$MPS_LOG"
    log "starting MPS: $MPS_CTL -d (pipe $MPS_PIPE)"
    if ! mps_env timeout 20 "$MPS_CTL" -d >>"$LOGS/mps-control.out" 2>&1; then
        phase_record mps-session failed "nvidia-cuda-mps-control -d failed (see mps-control.out)"
        return 1
    fi
    MPS_STARTED=1
    sleep 0.5
    if ! echo get_server_list | mps_env timeout 10 "$MPS_CTL" >>"$LOGS/mps-control.out" 2>&1; then
        phase_record mps-session failed "the MPS control daemon does not answer (see mps-control.out)"
        mps_stop
        return 1
    fi
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

# ------------------------------------------------------------------------------ report, exit

make_report() {
    local gpu_info=""
    [ "$REPORT_DONE" = 1 ] && return 0
    REPORT_DONE=1
    [ "$DEVICE" = emulated ] || gpu_info=$(timeout 20 nvidia-smi \
        --query-gpu=name,driver_version,memory.total,pci.bus_id,compute_mode \
        --format=csv,noheader -i 0 2>/dev/null || true)
    log "writing the report"
    GPU_INFO=$gpu_info FAULTS_DEVICE=$DEVICE SECS=$SECS BASE_SECS=$BASE_SECS \
        FAULT_EVERY_MS=$FAULT_EVERY_MS KILL_EVERY_S=$KILL_EVERY_S \
        BACKEND_KILL_EVERY_S=$BACKEND_KILL_EVERY_S KERNEL_US=$KERNEL_US GRID=$GRID BLOCK=$BLOCK \
        RUN_SECONDS=$(($(date +%s) - START_TS)) \
        timeout 60 python3 "$FAULTS_DIR/report.py" report "$LOGS" "$OUT" || FAILED=1
}

# shellcheck disable=SC2317 # called by the EXIT trap
on_exit() {
    stop_loops
    sched_stop
    mps_stop
    trim_log "$LOGS/scheduler.log"
    make_report
    rm -rf "$WORK"
}
trap on_exit EXIT
trap 'log "interrupted"; exit 130' INT TERM

# ------------------------------------------------------------------------------ set-up

log "faults: dist=$DIST out=$OUT commit=$VGPU_COMMIT device=$DEVICE seconds=$SECS base=$BASE_SECS budget=${BUDGET}s"
{
    echo "== date"; date -u
    echo "== nvidia-smi"; timeout 20 nvidia-smi 2>&1
    echo "== gcc"; gcc --version 2>&1 | head -1
    echo "== dist"; ls -lR "$DIST/bin" "$DIST/lib" 2>&1
    echo "== ptx"; ls -l "$PTX_DIR" 2>&1
    echo "== mps"; command -v nvidia-cuda-mps-control 2>&1
    echo "== bash"; echo "$BASH_VERSION"
} >"$LOGS/environment.log" 2>&1

if [ ! -f "$SPIN_MODULE" ] || [ ! -f "$FAULT_MODULE" ]; then
    phase_record setup failed "vgpu_timed_spin.ptx / vgpu_fault.ptx not found (tests/ptx; set FAULTS_PTX_DIR)"
    exit 1
fi
# The run tool may drop modes and symbolic links on the way: put them back.
for f in "$DIST"/bin/*; do
    [ -f "$f" ] && [ ! -x "$f" ] && chmod +x "$f"
done
[ -e "$DIST/lib/libcuda.so.1" ] && [ ! -e "$DIST/lib/libcuda.so" ] && ln -sf libcuda.so.1 "$DIST/lib/libcuda.so"

for p in worker faulter; do
    log "compiling $p"
    if ! compile_c "$BIN/$p" "$LOGS/compile-$p.log" "$FAULTS_DIR/$p.c" -I"$FAULTS_DIR"; then
        cat "$LOGS/compile-$p.log"
        phase_record setup failed "gcc $p.c: see compile-$p.log"
        exit 1
    fi
done

# ------------------------------------------------------------------------------ the run

if [ "$(left_s)" -gt $((BASE_SECS + 30)) ] && sched_start; then
    A=vgpu=$SCHED_STATE/slices/a.sock
    B=vgpu=$SCHED_STATE/slices/b.sock
    C=vgpu=$SCHED_STATE/slices/c.sock
    run_phase vgpu-base base "$BASE_SECS" "$A" "$B" "$C"
    run_phase vgpu-fault fault "$SECS" "$A" "$B" "$C"
    # The faulting tenant shares slice a with survivor a (each connection has its own worker).
    run_phase vgpu-fault-same-slice fault "$SECS" "$A" "$B" "$A"
    run_phase vgpu-kill kill "$SECS" "$A" "$B" "$C"
    run_phase vgpu-backend-kill backend-kill "$SECS" "$A" "$B" "$C"
    sched_stop
fi

if [ "$DEVICE" != emulated ]; then
    if phase_selected mps-base || phase_selected mps-fault || phase_selected mps-kill; then
        if [ "$(left_s)" -gt $((BASE_SECS + 30)) ] && mps_start; then
            run_phase mps-base base "$BASE_SECS" mps mps mps
            run_phase mps-fault fault "$SECS" mps mps mps
            run_phase mps-kill kill "$SECS" mps mps mps
            mps_stop
        fi
    fi
    run_phase native-base base "$BASE_SECS" native native native
    run_phase native-fault fault "$SECS" native native native
    run_phase native-kill kill "$SECS" native native native
fi

log "phases done after $(($(date +%s) - START_TS)) s"
stop_loops
sched_stop
mps_stop
make_report
[ "$FAILED" = 0 ]
