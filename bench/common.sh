# shellcheck shell=bash
# Helpers shared by bench/run.sh and scripts/gpu-check.sh (sourced, not run).
#
# Inputs (environment, all optional):
#   NATIVE_LIB_DIR   where the real libcuda.so.1 lives      (default /usr/local/nvidia/lib64)
#   CUDA_INC         CUDA headers                           (default /usr/local/cuda/include)
#   PROG_TIMEOUT     seconds one program may run            (default 120)
#   GPU_CHECK_DEADLINE  epoch seconds by which everything must be done (default: none)
#   VGPU_DEVICE      the backend's --device                 (default cuda:0)
#   BACKEND_LOG      RUST_LOG for the backend               (default info)
#   CLIENT_LOG       RUST_LOG for programs run through the slice (default warn)

NATIVE_LIB_DIR=${NATIVE_LIB_DIR:-/usr/local/nvidia/lib64}
CUDA_INC=${CUDA_INC:-/usr/local/cuda/include}
PROG_TIMEOUT=${PROG_TIMEOUT:-120}
VGPU_DEVICE=${VGPU_DEVICE:-cuda:0}
BACKEND_LOG=${BACKEND_LOG:-info}
CLIENT_LOG=${CLIENT_LOG:-warn}
BACKEND_PID=""

log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

# The dist/ directory (holding bin/vgpu-backend and lib/libcuda.so.1) for a script in $1's
# folder: that folder's parent when the script runs from dist/, else <repo>/dist.
find_dist() {
    local dir=$1
    if [ -n "${VGPU_DIST:-}" ]; then
        (cd "$VGPU_DIST" && pwd)
    elif [ -e "$dir/bin/vgpu-backend" ]; then
        (cd "$dir" && pwd)
    elif [ -e "$dir/../bin/vgpu-backend" ]; then
        (cd "$dir/.." && pwd)
    elif [ -e "$dir/../dist/bin/vgpu-backend" ]; then
        (cd "$dir/../dist" && pwd)
    else
        (cd "$dir/.." && pwd)
    fi
}

# Seconds a program may run now: PROG_TIMEOUT, cut down so that `reserve` seconds stay
# before GPU_CHECK_DEADLINE. Prints 0 when there is no time left.
budget_timeout() {
    local reserve=${1:-15} t=$PROG_TIMEOUT left
    if [ -n "${GPU_CHECK_DEADLINE:-}" ]; then
        left=$((GPU_CHECK_DEADLINE - $(date +%s) - reserve))
        [ "$left" -lt "$t" ] && t=$left
    fi
    [ "$t" -lt 0 ] && t=0
    echo "$t"
}

# Seconds until GPU_CHECK_DEADLINE (a large number when there is none).
time_left() {
    if [ -n "${GPU_CHECK_DEADLINE:-}" ]; then
        echo $((GPU_CHECK_DEADLINE - $(date +%s)))
    else
        echo 999999
    fi
}

# Linker arguments for the real driver: libcuda.so if present, else libcuda.so.1 by path,
# else the toolkit stub. All carry SONAME libcuda.so.1, so LD_LIBRARY_PATH picks the
# library at run time. Sets the array LINK_ARGS.
set_link_args() {
    local stubs
    stubs="$(dirname "$CUDA_INC")/lib64/stubs"
    if [ -e "$NATIVE_LIB_DIR/libcuda.so" ]; then
        LINK_ARGS=(-L"$NATIVE_LIB_DIR" -lcuda)
    elif [ -e "$NATIVE_LIB_DIR/libcuda.so.1" ]; then
        LINK_ARGS=("$NATIVE_LIB_DIR/libcuda.so.1")
    elif [ -e "$stubs/libcuda.so" ]; then
        LINK_ARGS=(-L"$stubs" -lcuda)
    else
        LINK_ARGS=(-lcuda)
    fi
    # Lazy binding: an entry point our library lacks fails only when it is called.
    # shellcheck disable=SC2054 # -Wl,-z,lazy is one gcc argument
    LINK_ARGS+=(-Wl,-z,lazy -ldl -lm)
}

# compile_c OUTPUT LOGFILE SOURCE [extra gcc args...]: gcc against the CUDA headers.
compile_c() {
    local out=$1 logfile=$2 src=$3
    shift 3
    [ -n "${LINK_ARGS+x}" ] || set_link_args
    gcc -std=gnu11 -O2 -Wall -Wextra -I"$CUDA_INC" "$@" "$src" -o "$out" "${LINK_ARGS[@]}" \
        >"$logfile" 2>&1
}

# The libcuda.so.1 the loader picks for binary $1 under LD_LIBRARY_PATH=$2 (real path).
resolved_libcuda() {
    local path
    path=$(LD_LIBRARY_PATH=$2 ldd "$1" 2>/dev/null | awk '$1 ~ /^libcuda\.so/ { print $3; exit }')
    if [ -n "$path" ] && [ -e "$path" ]; then readlink -f "$path"; else echo "not-found"; fi
}

# start_backend DIST SOCKET LOGFILE: starts vgpu-backend with the real driver, waits (by
# polling, at most 30 s) until it listens. Sets BACKEND_PID. Returns non-zero on failure.
start_backend() {
    local dist=$1 sock=$2 logfile=$3 i
    rm -f "$sock"
    # VGPU_BACKEND_ARGS: extra backend options (e.g. "--poll-us 0"), split on spaces.
    local -a extra
    read -r -a extra <<<"${VGPU_BACKEND_ARGS:-}"
    log "starting vgpu-backend --socket $sock --device $VGPU_DEVICE ${extra[*]} (log: $logfile)"
    env RUST_LOG="$BACKEND_LOG" LD_LIBRARY_PATH="$NATIVE_LIB_DIR" \
        "$dist/bin/vgpu-backend" --socket "$sock" --device "$VGPU_DEVICE" "${extra[@]}" >>"$logfile" 2>&1 &
    BACKEND_PID=$!
    for i in $(seq 1 600); do
        if [ -S "$sock" ]; then
            log "backend pid $BACKEND_PID listening after $((i * 50)) ms"
            return 0
        fi
        if ! kill -0 "$BACKEND_PID" 2>/dev/null; then
            wait "$BACKEND_PID"
            log "backend exited early with status $? (see $logfile)"
            BACKEND_PID=""
            return 1
        fi
        sleep 0.05
    done
    log "backend did not create $sock within 30 s"
    stop_backend
    return 1
}

backend_alive() { [ -n "$BACKEND_PID" ] && kill -0 "$BACKEND_PID" 2>/dev/null; }

# Stops the backend (SIGTERM, then SIGKILL after 10 s). Sets BACKEND_STATUS to its exit
# status ("" when none was running).
stop_backend() {
    local i
    BACKEND_STATUS=""
    [ -n "$BACKEND_PID" ] || return 0
    if kill -0 "$BACKEND_PID" 2>/dev/null; then
        kill -TERM "$BACKEND_PID" 2>/dev/null
        for i in $(seq 1 200); do
            kill -0 "$BACKEND_PID" 2>/dev/null || break
            sleep 0.05
        done
        if kill -0 "$BACKEND_PID" 2>/dev/null; then
            log "backend ignored SIGTERM for 10 s, killing it"
            kill -KILL "$BACKEND_PID" 2>/dev/null
        fi
    fi
    wait "$BACKEND_PID" 2>/dev/null
    BACKEND_STATUS=$?
    log "backend pid $BACKEND_PID stopped (status $BACKEND_STATUS)"
    BACKEND_PID=""
}

# run_native OUTFILE ERRFILE PROGRAM [ARGS...]  /  run_vgpu DIST SOCKET OUTFILE ERRFILE PROGRAM [ARGS...]
# Run one program under `timeout` with the real driver or with ours. Return the program's
# status; 124/137 on timeout; 125 when no time is left to start it.
run_native() {
    local out=$1 err=$2 t
    shift 2
    t=$(budget_timeout 15)
    if [ "$t" -lt 5 ]; then echo "skipped: out of time" >"$err"; : >"$out"; return 125; fi
    env LD_LIBRARY_PATH="$NATIVE_LIB_DIR" VGPU_EXPECT_EXECUTION=1 \
        timeout -k 5 "$t" "$@" >"$out" 2>"$err"
}

run_vgpu() {
    local dist=$1 sock=$2 out=$3 err=$4 t
    shift 4
    t=$(budget_timeout 15)
    if [ "$t" -lt 5 ]; then echo "skipped: out of time" >"$err"; : >"$out"; return 125; fi
    env LD_LIBRARY_PATH="$dist/lib" VGPU_SOCKET="$sock" VGPU_EXPECT_EXECUTION=1 \
        RUST_LOG="$CLIENT_LOG" timeout -k 5 "$t" "$@" >"$out" 2>"$err"
}

# trim_log FILE: keeps a log that travels back small enough (first 2000 and last 5000
# lines once it passes LOG_MAX_MIB, default 8).
trim_log() {
    local f=$1 max=$((${LOG_MAX_MIB:-8} * 1048576)) lines
    [ -f "$f" ] || return 0
    [ "$(stat -c %s "$f")" -gt "$max" ] || return 0
    lines=$(wc -l <"$f")
    {
        head -n 2000 "$f"
        echo "... [trimmed $((lines - 7000)) of $lines lines] ..."
        tail -n 5000 "$f"
    } >"$f.trimmed" && mv "$f.trimmed" "$f"
    log "trimmed $f ($lines lines)"
}
