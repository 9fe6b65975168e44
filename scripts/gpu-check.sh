#!/usr/bin/env bash
# The GPU-machine check: differential tests (native libcuda vs a vgpu slice) and the
# benchmarks. scripts/stage-dist.sh copies this file to dist/gpu-check.sh; run it there,
# from the repository root:
#
#   OUT=/some/dir bash dist/gpu-check.sh
#
# Steps: nvidia-smi -L; compile the C programs against the real driver; PTX for
# saxpy_reduce with nvcc; start dist/bin/vgpu-backend on cuda:0 (RUST_LOG=info); run
# tests/c/driver_api_client and tests/c/link_client (if present) and
# tests/gpu/saxpy_reduce natively and through the slice and compare their stdout
# (identical -> PASS); tests/gpu/cudart_check.sh (nvcc programs with static cudart, native
# vs slice, when a source tree is beside dist/); then bench/run.sh. Logs, the backend's log and the benchmark
# result go to $OUT. Each program runs under `timeout` (PROG_TIMEOUT, default 120 s) and
# the whole run stops starting work once GPU_CHECK_BUDGET (default 540 s) is spent.
# Exit status: non-zero when any check failed, timed out or could not run.
#
# Environment (optional): OUT, GPU_CHECK_BUDGET, SKIP_BENCH=1, NVCC, VGPU_COMMIT, and
# those of bench/common.sh (NATIVE_LIB_DIR, CUDA_INC, PROG_TIMEOUT, VGPU_DEVICE, ...).
set -u
exec 2>&1 # one stream, in order

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [ -e "$SCRIPT_DIR/bench/common.sh" ]; then
    # shellcheck source=bench/common.sh
    . "$SCRIPT_DIR/bench/common.sh"
else
    # Run from the source tree (scripts/): use the tree's bench/.
    # shellcheck source=bench/common.sh
    . "$SCRIPT_DIR/../bench/common.sh"
fi

DIST=$(find_dist "$SCRIPT_DIR")
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOGS=$OUT/logs
mkdir -p "$LOGS"
WORK=$(mktemp -d /tmp/vgpu-check.XXXXXX)
BIN=$WORK/bin
mkdir -p "$BIN"
SOCK=$WORK/vgpu.sock
GPU_CHECK_BUDGET=${GPU_CHECK_BUDGET:-540}
export GPU_CHECK_DEADLINE=${GPU_CHECK_DEADLINE:-$(($(date +%s) + GPU_CHECK_BUDGET))}
if [ -z "${VGPU_COMMIT:-}" ]; then
    VGPU_COMMIT=$(cat "$DIST/COMMIT" 2>/dev/null || echo unknown)
fi
export VGPU_COMMIT

# Results: parallel arrays, one row per check. Statuses: PASS, FAIL, TIMEOUT, SKIP (did
# not run: counts as failure), WARN (reported, not a failure), INFO.
R_NAME=()
R_STATUS=()
R_DETAIL=()
record() {
    R_NAME+=("$1")
    R_STATUS+=("$2")
    R_DETAIL+=("$3")
    log "$2 $1${3:+: $3}"
}

summary() {
    local i failed=0 line
    for i in "${!R_NAME[@]}"; do
        case ${R_STATUS[$i]} in FAIL | TIMEOUT | SKIP) failed=$((failed + 1)) ;; esac
    done
    {
        printf '\nvgpu gpu-check summary (commit %s, %s)\n' "$VGPU_COMMIT" "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
        printf '%-40s %-8s %s\n' CHECK STATUS DETAIL
        printf '%-40s %-8s %s\n' ----- ------ ------
        for i in "${!R_NAME[@]}"; do
            printf '%-40s %-8s %s\n' "${R_NAME[$i]}" "${R_STATUS[$i]}" "${R_DETAIL[$i]}"
        done
        if [ "$failed" -eq 0 ]; then
            printf 'RESULT: PASS\n'
        else
            printf 'RESULT: FAIL (%d checks failed or did not run)\n' "$failed"
        fi
    } | tee "$OUT/summary.txt"
    for i in "${!R_NAME[@]}"; do
        line=$(printf '%s\t%s\t%s' "${R_NAME[$i]}" "${R_STATUS[$i]}" "${R_DETAIL[$i]}")
        echo "$line"
    done >"$OUT/summary.tsv"
    [ "$failed" -eq 0 ]
}

# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() {
    stop_backend
    rm -rf "$WORK"
}
trap cleanup EXIT
# shellcheck disable=SC2317 # called by the INT/TERM trap
interrupted() {
    record "gpu-check" FAIL "interrupted by a signal"
    summary
    exit 130
}
trap interrupted INT TERM

status_of_rc() {
    case $1 in
    0) echo PASS ;;
    124 | 137) echo TIMEOUT ;;
    125) echo SKIP ;;
    *) echo FAIL ;;
    esac
}

log "gpu-check: dist=$DIST out=$OUT commit=$VGPU_COMMIT budget=${GPU_CHECK_BUDGET}s"

# --- 0. environment -----------------------------------------------------------------
{
    echo "== date"; date -u
    echo "== uname"; uname -a
    echo "== nvidia-smi -L"; nvidia-smi -L 2>&1
    echo "== nvidia-smi"; nvidia-smi 2>&1
    echo "== gcc"; gcc --version 2>&1 | head -1
    echo "== native libcuda"; ls -l "$NATIVE_LIB_DIR"/libcuda.so* 2>&1
    echo "== dist"; ls -lR "$DIST/bin" "$DIST/lib" 2>&1
    echo "== COMMIT"; echo "$VGPU_COMMIT"
} >"$LOGS/environment.log" 2>&1
if GPUS=$(nvidia-smi -L 2>&1); then
    echo "$GPUS"
    record "nvidia-smi" INFO "$(echo "$GPUS" | head -1)"
else
    record "nvidia-smi" WARN "nvidia-smi -L failed: $(echo "$GPUS" | head -1)"
fi
# The run tool may drop modes and symbolic links on the way: put them back.
[ -f "$DIST/bin/vgpu-backend" ] && [ ! -x "$DIST/bin/vgpu-backend" ] && chmod +x "$DIST/bin/vgpu-backend"
[ -e "$DIST/lib/libcuda.so.1" ] && [ ! -e "$DIST/lib/libcuda.so" ] && ln -sf libcuda.so.1 "$DIST/lib/libcuda.so"
if [ ! -x "$DIST/bin/vgpu-backend" ] || [ ! -e "$DIST/lib/libcuda.so.1" ]; then
    record "dist" FAIL "missing $DIST/bin/vgpu-backend or $DIST/lib/libcuda.so.1 (run scripts/stage-dist.sh; carry dist/)"
    summary
    exit 1
fi
if [ ! -e "$NATIVE_LIB_DIR/libcuda.so.1" ]; then
    record "native libcuda" FAIL "no $NATIVE_LIB_DIR/libcuda.so.1 (set NATIVE_LIB_DIR)"
fi

# --- 1. compile -----------------------------------------------------------------------
set_link_args
compile() { # name source [extra gcc args]
    local name=$1 src=$2
    shift 2
    if compile_c "$BIN/$name" "$LOGS/compile-$name.log" "$src" "$@"; then
        record "compile $name" PASS ""
        return 0
    fi
    record "compile $name" FAIL "see logs/compile-$name.log: $(grep -m1 -i error "$LOGS/compile-$name.log")"
    return 1
}

# compile_client NAME: tests/c/NAME.c, written against tests/c/include/cuda.h (classic
# names: CUDA 13's cuda.h maps cuCtxCreate to the 4-argument cuCtxCreate_v4); the real
# header is the fallback. Returns non-zero if it is missing or does not compile.
compile_client() {
    local name=$1 src=$DIST/tests/c/$1.c
    if [ ! -e "$src" ]; then
        record "$name" WARN "tests/c/$name.c not in dist: not run"
        return 1
    fi
    if [ -d "$DIST/tests/c/include" ] &&
        CUDA_INC=$DIST/tests/c/include compile_c "$BIN/$name" \
            "$LOGS/compile-$name.log" "$src" -I"$DIST/tests/c"; then
        record "compile $name" PASS "with tests/c/include"
    elif compile_c "$BIN/$name" "$LOGS/compile-$name-cuda-h.log" "$src" -I"$DIST/tests/c"; then
        record "compile $name" PASS "with $CUDA_INC"
    else
        record "compile $name" FAIL "see logs/compile-$name*.log"
        return 1
    fi
}
HAVE_CLIENT=0
compile_client driver_api_client && HAVE_CLIENT=1
HAVE_LINK_CLIENT=0
compile_client link_client && HAVE_LINK_CLIENT=1
compile saxpy_reduce "$DIST/tests/gpu/saxpy_reduce.c" -I"$DIST/bench" -I"$DIST/tests/gpu"
for b in roundtrip launch bandwidth; do
    compile "$b" "$DIST/bench/$b.c" -I"$DIST/bench"
done

# PTX for saxpy_reduce, generated here by nvcc; the embedded copy if nvcc is unavailable.
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
PTX=$WORK/saxpy_reduce.ptx
if "$NVCC" -ptx -arch=sm_90 "$DIST/tests/gpu/saxpy_reduce_kernels.cu" -o "$PTX" \
    >"$LOGS/nvcc-ptx.log" 2>&1; then
    cp "$PTX" "$LOGS/saxpy_reduce.ptx"
    record "nvcc -ptx saxpy_reduce" PASS "$("$NVCC" --version 2>/dev/null | tail -1)"
else
    record "nvcc -ptx saxpy_reduce" WARN "nvcc failed (logs/nvcc-ptx.log); using the embedded PTX"
    PTX=-
fi

# --- 2. differential tests ------------------------------------------------------------
# Which libcuda.so.1 each mode loads, before anything runs (guards against a "vgpu" run
# that silently used the real driver).
if [ -x "$BIN/saxpy_reduce" ]; then
    native_lib=$(resolved_libcuda "$BIN/saxpy_reduce" "$NATIVE_LIB_DIR")
    vgpu_lib=$(resolved_libcuda "$BIN/saxpy_reduce" "$DIST/lib")
    if [ "$(dirname "$vgpu_lib")" = "$(cd "$DIST/lib" && pwd -P)" ] && [ "$native_lib" != "$vgpu_lib" ]; then
        record "loader picks our libcuda" PASS "vgpu: $vgpu_lib; native: $native_lib"
    else
        record "loader picks our libcuda" FAIL "vgpu: $vgpu_lib; native: $native_lib"
    fi
fi

BACKEND_LOGFILE=$LOGS/backend-tests.log
if start_backend "$DIST" "$SOCK" "$BACKEND_LOGFILE"; then
    record "backend start" PASS "pid $BACKEND_PID, --device $VGPU_DEVICE"
else
    record "backend start" FAIL "see logs/backend-tests.log: $(tail -1 "$BACKEND_LOGFILE" 2>/dev/null)"
fi

# kept_lines REGEX FILE: FILE less the lines matching REGEX (all of it when REGEX is "").
kept_lines() {
    if [ -n "$1" ]; then grep -Ev "$1" "$2"; else cat "$2"; fi
    return 0
}

# Why a run failed: its first FAIL line on stdout, else the last line of its stderr.
why_failed() { # out err
    local line
    line=$(grep -m1 '^FAIL' "$1")
    [ -n "$line" ] || line=$(tail -1 "$2")
    echo "$line"
}

# differential NAME IGNORE_RE NATIVE_ENV PROGRAM [ARGS...]: run natively and through the
# slice and compare stdout, less the lines matching IGNORE_RE (extended regex; "" keeps
# all). NATIVE_ENV: "VAR=VALUE ..." added to the native run only ("" for none).
differential() {
    local name=$1 ignore=$2 n_rc v_rc n_st v_st lib
    local -a native_env=()
    read -r -a native_env <<<"$3"
    shift 3
    log "$name: native"
    run_native "$LOGS/$name.native.out" "$LOGS/$name.native.err" env "${native_env[@]}" "$@"
    n_rc=$?
    log "$name: vgpu"
    run_vgpu "$DIST" "$SOCK" "$LOGS/$name.vgpu.out" "$LOGS/$name.vgpu.err" "$@"
    v_rc=$?
    n_st=$(status_of_rc "$n_rc")
    v_st=$(status_of_rc "$v_rc")
    record "$name native" "$n_st" "exit $n_rc$([ "$n_rc" -eq 0 ] || echo "; $(why_failed "$LOGS/$name.native.out" "$LOGS/$name.native.err")")"
    record "$name vgpu" "$v_st" "exit $v_rc$([ "$v_rc" -eq 0 ] || echo "; $(why_failed "$LOGS/$name.vgpu.out" "$LOGS/$name.vgpu.err")")"
    # A program that reports the libcuda it loaded must have loaded ours.
    lib=$(sed -n 's/^libcuda: //p' "$LOGS/$name.vgpu.err" | head -1)
    if [ -n "$lib" ] && [ "$(dirname "$lib")" != "$(cd "$DIST/lib" && pwd -P)" ]; then
        record "$name identical output" FAIL "the vgpu run loaded $lib"
        return
    fi
    # Compared whenever both runs printed something (a failed check still prints).
    if [ ! -s "$LOGS/$name.native.out" ] || [ ! -s "$LOGS/$name.vgpu.out" ]; then
        record "$name identical output" SKIP "no output to compare"
    elif diff -u <(kept_lines "$ignore" "$LOGS/$name.native.out") \
        <(kept_lines "$ignore" "$LOGS/$name.vgpu.out") >"$LOGS/$name.diff"; then
        if [ "$n_rc" -eq 0 ] && [ "$v_rc" -eq 0 ]; then
            record "$name identical output" PASS "$(kept_lines "$ignore" "$LOGS/$name.native.out" | wc -l) lines compared${ignore:+ (ignoring /$ignore/)}"
        else
            record "$name identical output" FAIL "identical, but a run failed"
        fi
        rm -f "$LOGS/$name.diff"
    else
        record "$name identical output" FAIL "logs/$name.diff: $(grep -m1 '^+[^+]' "$LOGS/$name.diff")"
    fi
}

if [ "$HAVE_CLIENT" -eq 1 ]; then
    # INFO lines carry timings and memory sizes that differ by nature. The native driver
    # keeps ~2 MiB of lazily made internal allocations, hence the slack there only.
    differential driver_api_client '^INFO ' "VGPU_MEM_SLACK_BYTES=4194304" "$BIN/driver_api_client"
fi
if [ "$HAVE_LINK_CLIENT" -eq 1 ]; then
    # The JIT linker (cuLinkCreate/AddData/Complete, as cuDNN's runtime-compiled engines
    # use it) and cooperative launches. INFO lines carry sizes, times and log text.
    differential link_client '^INFO ' "" "$BIN/link_client"
fi
if [ -x "$BIN/saxpy_reduce" ]; then
    differential saxpy_reduce "" "" "$BIN/saxpy_reduce" "$PTX"
fi

if [ -n "$BACKEND_PID" ]; then
    if backend_alive; then
        record "backend alive after tests" PASS ""
    else
        record "backend alive after tests" FAIL "it exited; see logs/backend-tests.log"
    fi
    stop_backend
    case ${BACKEND_STATUS:-} in
    0 | 143 | "") ;;
    *) record "backend exit on SIGTERM" WARN "status $BACKEND_STATUS" ;;
    esac
    trim_log "$BACKEND_LOGFILE"
fi

# --- 2b. nvcc programs with the static CUDA runtime (run from a source tree) ---------------
CUDART_CHECK=$SCRIPT_DIR/../tests/gpu/cudart_check.sh
if [ ! -f "$CUDART_CHECK" ]; then
    record "cudart programs" WARN "tests/gpu/cudart_check.sh not found next to $SCRIPT_DIR: not run"
elif [ "$(time_left)" -lt 60 ]; then
    record "cudart programs" SKIP "out of time"
else
    DIST=$DIST OUT=$LOGS NATIVE_LIB_DIR=$NATIVE_LIB_DIR timeout 150 bash "$CUDART_CHECK" \
        >"$LOGS/cudart-check.log" 2>&1
    c_rc=$?
    c_pass=$(grep -c '^PASS' "$LOGS/cudart-check.log")
    if [ "$c_rc" -eq 0 ] && [ "$c_pass" -gt 0 ]; then
        record "cudart programs" PASS "$c_pass nvcc programs, output identical to native"
    else
        record "cudart programs" FAIL "logs/cudart-check.log: $(grep -m1 -v '^PASS' "$LOGS/cudart-check.log")"
    fi
fi

# --- 3. benchmarks --------------------------------------------------------------------
if [ "${SKIP_BENCH:-0}" = 1 ]; then
    record "benchmarks" WARN "skipped (SKIP_BENCH=1)"
elif [ "$(time_left)" -lt 45 ]; then
    record "benchmarks" SKIP "out of time"
else
    log "benchmarks (bench/run.sh)"
    mkdir -p "$WORK/bench-bin"
    for b in roundtrip launch bandwidth; do
        [ -x "$BIN/$b" ] && cp "$BIN/$b" "$WORK/bench-bin/"
    done
    BENCH_BIN=$WORK/bench-bin OUT=$OUT VGPU_DIST=$DIST bash "$DIST/bench/run.sh" 2>&1 |
        tee "$LOGS/bench.log"
    bench_rc=${PIPESTATUS[0]}
    result=$(sed -n 's/^result: //p' "$LOGS/bench.log" | tail -1)
    if [ "$bench_rc" -eq 0 ]; then
        record "benchmarks" PASS "$(basename "${result:-none}")"
    else
        record "benchmarks" FAIL "bench/run.sh exit $bench_rc; see logs/bench.log"
    fi
    # One row per goal: INFO when met, WARN when missed or not measured.
    if [ -n "$result" ] && [ -e "$result" ]; then
        while IFS=$'\t' read -r g_name g_status g_detail; do
            record "goal $g_name" "$g_status" "$g_detail"
        done < <(python3 - "$result" <<'PYEOF'
import json, sys
doc = json.load(open(sys.argv[1]))
for name, m in doc["metrics"].items():
    if m["goal"] is None:
        continue
    f = lambda v: "-" if v is None else f"{v:.3f}"
    verdict = {True: "met", False: "MISSED", None: "no data"}[m["met"]]
    print(f"{name}\t{'INFO' if m['met'] else 'WARN'}\t{verdict}: {m['goal']['text']}; "
          f"native {f(m['native'])}, vgpu {f(m['vgpu'])} {m['unit']}, ratio {f(m['ratio'])}")
PYEOF
        )
    fi
fi

if summary; then exit 0; else exit 1; fi
