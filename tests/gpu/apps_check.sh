#!/usr/bin/env bash
# Issue 3 acceptance: unmodified CUDA applications, natively and through a vgpu slice.
# Run on the GPU machine from the repository root, dist/ staged (scripts/stage-dist.sh):
#
#   OUT=/some/dir bash tests/gpu/apps_check.sh          # APPS='regex' picks a subset
#
# Builds every tests/gpu/apps/*.cu (and the vectorAdd fixture) with plain nvcc (static
# cudart; cuBLAS ones with -lcublas -lcublasLt), starts dist/bin/vgpu-backend on cuda:0,
# then runs each program and tests/gpu/apps/torch_*.py natively and through the slice.
# PASS when both runs exit 0, the slice run loaded our libcuda, and the outputs agree:
# identical stdout, except torch_train (compare_loss.py: every step's loss to 1e-5) and
# torch_compile (compare_loss.py --lines: same lines, numbers to 1e-5; its compiled backward
# sums with float atomics, so even two native runs differ in the last digits).
# Writes per-run stdout/stderr, build logs, backend.log and apps.json to $OUT, prints a
# table. Exit status non-zero when any app failed, timed out or was skipped.
#
# Environment (optional): OUT, DIST, APPS, NVCC, PYTHON (python3), NATIVE_LIB_DIR
# (/usr/local/nvidia/lib64), SLICE_LOG (VGPU_LOG of the slice runs, warn), APPS_TIMEOUT (120 s a run), APPS_SLOW_TIMEOUT (300 s, torch
# training and compile), APPS_BUDGET (540 s for everything), APPS_MEMORY_LIMIT (bytes,
# 32 GiB), VGPU_DEVICE (cuda:0), VGPU_COMMIT.
set -u
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
APPDIR=$ROOT/tests/gpu/apps
# From a source tree: <repo>/dist; from a staged dist/tests/gpu: that dist/.
[ -e "$ROOT/bin/vgpu-backend" ] && DEFAULT_DIST=$ROOT || DEFAULT_DIST=$ROOT/dist
DIST=$(cd "${DIST:-$DEFAULT_DIST}" && pwd) || { echo "no dist/ (run scripts/stage-dist.sh)"; exit 1; }
OUT=${OUT:-$PWD/apps-check-out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
APPS=${APPS:-.}
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
PYTHON=${PYTHON:-python3}
NATIVE_LIB_DIR=${NATIVE_LIB_DIR:-/usr/local/nvidia/lib64}
APPS_TIMEOUT=${APPS_TIMEOUT:-120}
APPS_SLOW_TIMEOUT=${APPS_SLOW_TIMEOUT:-300}
DEADLINE=$(($(date +%s) + ${APPS_BUDGET:-540}))
MEM_LIMIT=${APPS_MEMORY_LIMIT:-34359738368}
VGPU_DEVICE=${VGPU_DEVICE:-cuda:0}
COMMIT=${VGPU_COMMIT:-$(cat "$DIST/COMMIT" 2>/dev/null || echo unknown)}
BASE_LD=${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
W=$(mktemp -d /tmp/vgpu-apps.XXXXXX)
SOCK=$W/vgpu.sock
backend_pid=
declare -A BUILD_PID=()

log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

stop_backend() {
    [ -n "$backend_pid" ] || return 0
    kill -TERM "$backend_pid" 2>/dev/null
    for _ in $(seq 100); do kill -0 "$backend_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$backend_pid" 2>/dev/null
    wait "$backend_pid" 2>/dev/null
    backend_pid=
}
# shellcheck disable=SC2317 # run by the trap
cleanup() {
    local p
    for p in "${BUILD_PID[@]}"; do kill "$p" 2>/dev/null; done
    stop_backend
    rm -rf "$W"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

# Starts the backend and polls (at most 30 s) until it listens.
start_backend() {
    rm -f "$SOCK"
    LD_LIBRARY_PATH=$NATIVE_LIB_DIR RUST_LOG=${BACKEND_LOG:-info} "$DIST/bin/vgpu-backend" \
        --socket "$SOCK" --device "$VGPU_DEVICE" --memory-limit "$MEM_LIMIT" \
        >>"$OUT/backend.log" 2>&1 &
    backend_pid=$!
    for _ in $(seq 300); do
        [ -S "$SOCK" ] && return 0
        kill -0 "$backend_pid" 2>/dev/null || break
        sleep 0.1
    done
    log "backend did not come up (see $OUT/backend.log)"
    stop_backend
    return 1
}

# The run tool may drop modes and symbolic links on the way: put them back.
[ -f "$DIST/bin/vgpu-backend" ] && chmod +x "$DIST/bin/vgpu-backend"
[ -e "$DIST/lib/libcuda.so.1" ] && [ ! -e "$DIST/lib/libcuda.so" ] && ln -sf libcuda.so.1 "$DIST/lib/libcuda.so"
OURS=$(readlink -f "$DIST/lib/libcuda.so.1")

# --- the list of apps: name, kind (cu | py), source ------------------------------------
NAMES=() KINDS=() SRCS=()
add_app() { echo "$1" | grep -Eq -- "$APPS" && { NAMES+=("$1"); KINDS+=("$2"); SRCS+=("$3"); }; }
[ -f "$ROOT/virtio-spec/tests/fixtures/vectorAdd.cu" ] &&
    add_app vectorAdd cu "$ROOT/virtio-spec/tests/fixtures/vectorAdd.cu"
for f in "$APPDIR"/*.cu; do add_app "$(basename "$f" .cu)" cu "$f"; done
for f in "$APPDIR"/torch_*.py; do add_app "$(basename "$f" .py)" py "$f"; done
[ "${#NAMES[@]}" -gt 0 ] || { echo "no app matches APPS=$APPS"; exit 1; }

{
    echo "commit $COMMIT"; date -u; nvidia-smi -L 2>&1; "$NVCC" --version 2>&1 | tail -2
    timeout 60 "$PYTHON" -c 'import torch; print("torch", torch.__version__, torch.version.cuda)' 2>&1 | tail -1
    ls -l "$DIST/lib" "$NATIVE_LIB_DIR"/libcuda.so* 2>&1
} >"$OUT/apps-env.txt"

# --- build every nvcc program, in parallel ------------------------------------------------
mkdir -p "$W/bin"
CUDA_LIB=$(dirname "$(dirname "$(readlink -f "$NVCC")")")/lib64
for i in "${!NAMES[@]}"; do
    [ "${KINDS[$i]}" = cu ] || continue
    n=${NAMES[$i]}
    extra=()
    # The rpath finds cuBLAS whatever LD_LIBRARY_PATH a run sets.
    case $n in cublas*) extra=(-lcublas -lcublasLt -Xlinker -rpath -Xlinker "$CUDA_LIB") ;; esac
    timeout 400 "$NVCC" -o "$W/bin/$n" "${SRCS[$i]}" "${extra[@]}" >"$OUT/build-$n.log" 2>&1 &
    BUILD_PID[$n]=$!
done
log "building ${#BUILD_PID[@]} nvcc programs with $NVCC"
declare -A BUILD_RC=()
for n in "${!BUILD_PID[@]}"; do
    wait "${BUILD_PID[$n]}"
    BUILD_RC[$n]=$?
done
BUILD_PID=()

if ! start_backend; then
    log "FAIL: the backend did not start"
fi

# --- run ----------------------------------------------------------------------------------
R_NAME=() R_STATUS=() R_NATIVE=() R_SLICE=() R_NS=() R_SS=() R_DETAIL=()
record() { # name status native slice native_s slice_s detail
    R_NAME+=("$1") R_STATUS+=("$2") R_NATIVE+=("$3") R_SLICE+=("$4") R_NS+=("$5") R_SS+=("$6") R_DETAIL+=("$7")
    log "$2 $1${7:+: $7}"
}

# run_mode MODE NAME TIMEOUT CMD...: one run; sets RC and SECS. Fresh compiler caches each
# time, so the slice run compiles (and loads) its own Triton kernels.
run_mode() {
    local mode=$1 name=$2 t=$3 start left cache=$W/cache/$2.$1
    shift 3
    left=$((DEADLINE - $(date +%s) - 10))
    [ "$left" -lt "$t" ] && t=$left
    if [ "$t" -lt 10 ]; then RC=125 SECS=0; echo "skipped: out of time" >"$OUT/$name.$mode.err"; : >"$OUT/$name.$mode.out"; return; fi
    mkdir -p "$cache/triton" "$cache/inductor"
    local -a envs=(TRITON_CACHE_DIR="$cache/triton" TORCHINDUCTOR_CACHE_DIR="$cache/inductor"
        PYTHONPATH="$APPDIR${PYTHONPATH:+:$PYTHONPATH}" PYTHONDONTWRITEBYTECODE=1)
    # The caller's LD_LIBRARY_PATH stays, after the driver's folder (which libcuda a run
    # really loaded is checked afterwards).
    if [ "$mode" = native ]; then
        envs+=(LD_LIBRARY_PATH="$NATIVE_LIB_DIR$BASE_LD")
    else
        envs+=(LD_LIBRARY_PATH="$DIST/lib$BASE_LD" VGPU_SOCKET="$SOCK" VGPU_LOG="${SLICE_LOG:-warn}" TRITON_LIBCUDA_PATH="$DIST/lib")
    fi
    start=$(date +%s%N)
    env "${envs[@]}" timeout -k 10 "$t" "$@" >"$OUT/$name.$mode.out" 2>"$OUT/$name.$mode.err" </dev/null
    RC=$?
    SECS=$(awk -v a="$start" -v b="$(date +%s%N)" 'BEGIN { printf "%.2f", (b - a) / 1e9 }')
}

describe() { # rc secs
    case $1 in
    0) echo "ok ${2}s" ;;
    124 | 137) echo "TIMEOUT ${2}s" ;;
    125) echo "skipped" ;;
    *) echo "exit $1" ;;
    esac
}

# The libcuda a run reported on stderr ("libcuda: PATH"), resolved.
loaded_lib() {
    local p
    p=$(sed -n 's/^libcuda: //p' "$1" | head -1)
    [ -n "$p" ] && [ -e "$p" ] && readlink -f "$p" || echo "${p:-unknown}"
}

first_error() { # errfile outfile
    { grep -m1 -E '^FAIL|Error|error' "$2"; grep -m1 -E 'FAIL|Error|error' "$1"; tail -1 "$1"; } 2>/dev/null |
        head -1 | cut -c1-200
}

for i in "${!NAMES[@]}"; do
    name=${NAMES[$i]} kind=${KINDS[$i]} src=${SRCS[$i]}
    if [ "$kind" = cu ]; then
        if [ "${BUILD_RC[$name]}" -ne 0 ]; then
            record "$name" FAIL - - 0 0 "build failed (rc ${BUILD_RC[$name]}): $(grep -m1 -i error "$OUT/build-$name.log" | cut -c1-160)"
            continue
        fi
        cmd=("$W/bin/$name") t=$APPS_TIMEOUT
    else
        cmd=("$PYTHON" "$src") t=$APPS_TIMEOUT
        case $name in torch_train | torch_compile) t=$APPS_SLOW_TIMEOUT ;; esac
    fi
    note=
    if [ -z "$backend_pid" ] || ! kill -0 "$backend_pid" 2>/dev/null; then
        backend_pid=
        note="backend restarted; "
        start_backend || note="backend down; "
    fi
    log "$name: native"
    run_mode native "$name" "$t" "${cmd[@]}"
    n_rc=$RC n_s=$SECS
    log "$name: slice"
    run_mode slice "$name" "$t" "${cmd[@]}"
    s_rc=$RC s_s=$SECS
    n_desc=$(describe "$n_rc" "$n_s") s_desc=$(describe "$s_rc" "$s_s")
    s_lib=$(loaded_lib "$OUT/$name.slice.err") n_lib=$(loaded_lib "$OUT/$name.native.err")
    [ "$s_lib" = unknown ] && note="${note}libcuda not reported; "
    if [ "$n_rc" -eq 125 ] || [ "$s_rc" -eq 125 ]; then
        record "$name" SKIP "$n_desc" "$s_desc" "$n_s" "$s_s" "${note}out of time (APPS_BUDGET)"
    elif [ "$n_rc" -ne 0 ]; then
        st=FAIL; case $n_rc in 124 | 137) st=TIMEOUT ;; esac
        record "$name" "$st" "$n_desc" "$s_desc" "$n_s" "$s_s" "${note}native run $([ "$st" = TIMEOUT ] && echo "timed out (limit ${t} s)" || echo failed): $(first_error "$OUT/$name.native.err" "$OUT/$name.native.out")"
    elif [ "$s_rc" -ne 0 ]; then
        st=FAIL; case $s_rc in 124 | 137) st=TIMEOUT ;; esac
        record "$name" "$st" "$n_desc" "$s_desc" "$n_s" "$s_s" "${note}slice run $([ "$st" = TIMEOUT ] && echo "timed out (limit ${t} s)" || echo failed): $(first_error "$OUT/$name.slice.err" "$OUT/$name.slice.out")"
    elif [ "$s_lib" != "$OURS" ] && [ "$s_lib" != unknown ]; then
        record "$name" FAIL "$n_desc" "$s_desc" "$n_s" "$s_s" "${note}the slice run loaded $s_lib, not $OURS"
    elif [ "$n_lib" = "$OURS" ]; then
        record "$name" FAIL "$n_desc" "$s_desc" "$n_s" "$s_s" "${note}the native run loaded our library"
    elif [ "$name" = torch_train ] || [ "$name" = torch_compile ]; then
        mode=; [ "$name" = torch_compile ] && mode=--lines
        cmp=$("$PYTHON" "$APPDIR/compare_loss.py" $mode "$OUT/$name.native.out" "$OUT/$name.slice.out" 2>&1)
        c_rc=$?
        echo "$cmp" >"$OUT/$name.compare.txt"
        record "$name" "$([ "$c_rc" -eq 0 ] && echo PASS || echo FAIL)" "$n_desc" "$s_desc" "$n_s" "$s_s" "${note}$cmp"
    elif diff -u "$OUT/$name.native.out" "$OUT/$name.slice.out" >"$OUT/$name.diff"; then
        rm -f "$OUT/$name.diff"
        record "$name" PASS "$n_desc" "$s_desc" "$n_s" "$s_s" "${note}$(wc -l <"$OUT/$name.native.out") lines identical"
    else
        record "$name" FAIL "$n_desc" "$s_desc" "$n_s" "$s_s" "${note}output differs ($name.diff): $(grep -m1 '^+[^+]' "$OUT/$name.diff" | cut -c1-160)"
    fi
done
stop_backend

# --- report -------------------------------------------------------------------------------
passed=0 failed=0
for st in "${R_STATUS[@]}"; do
    if [ "$st" = PASS ]; then passed=$((passed + 1)); else failed=$((failed + 1)); fi
done
{
    printf '\nvgpu apps check (commit %s, %s)\n' "$COMMIT" "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    printf '%-18s | %-16s | %-16s | %-7s | %s\n' name native slice result detail
    printf '%s\n' "-------------------+------------------+------------------+---------+-------"
    for i in "${!R_NAME[@]}"; do
        printf '%-18s | %-16s | %-16s | %-7s | %s\n' "${R_NAME[$i]}" "${R_NATIVE[$i]}" "${R_SLICE[$i]}" \
            "${R_STATUS[$i]}" "${R_DETAIL[$i]}"
    done
    printf 'apps: %d of %d passed%s\n' "$passed" "${#R_NAME[@]}" "$([ "$failed" -eq 0 ] && echo ', RESULT: PASS' || echo ", RESULT: FAIL ($failed)")"
} | tee "$OUT/apps-summary.txt"

for i in "${!R_NAME[@]}"; do
    printf '%s\t%s\t%s\t%s\t%s\n' "${R_NAME[$i]}" "${R_STATUS[$i]}" "${R_NS[$i]}" "${R_SS[$i]}" "${R_DETAIL[$i]}"
done >"$W/results.tsv"
"$PYTHON" - "$W/results.tsv" "$OUT/apps.json" "$COMMIT" <<'PYEOF'
import json, sys
rows = []
for line in open(sys.argv[1], encoding="utf-8", errors="replace"):
    name, status, ns, ss, detail = (line.rstrip("\n").split("\t", 4) + [""] * 5)[:5]
    rows.append({"name": name, "status": status, "native_s": float(ns or 0),
                 "slice_s": float(ss or 0), "detail": detail})
doc = {"commit": sys.argv[3], "passed": sum(r["status"] == "PASS" for r in rows),
       "total": len(rows), "apps": rows}
json.dump(doc, open(sys.argv[2], "w"), indent=1)
PYEOF
[ "$failed" -eq 0 ]
