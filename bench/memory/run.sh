#!/usr/bin/env bash
# Elastic memory on the GPU machine (issue 6). Run from the repository root, dist/ staged:
#
#   OUT=/some/dir bash bench/memory/run.sh
#
# 1. vmm_native (real driver): pinned copy bandwidth (the swap ceiling), cuMemCreate+Map+
#    SetAccess / Unmap+Release per 2 MiB against cuMemAlloc/cuMemFree, and the allocation
#    pattern of PyTorch's caching allocator with cuMemAlloc.
# 2. The same pattern through a slice: elastic memory (default) and VGPU_ELASTIC=0 (plain
#    cuMemAlloc in the backend), same run.
# 3. scenario.py: reclaim/restore cycles of a best-effort slice's BE_GIB (default 20) and a
#    latency-critical slice's claim that takes it (through vgpu-scheduler).
# 4. torch_reclaim.py (skip with TORCH_RECLAIM=0): tests/gpu/apps/torch_train.py natively,
#    through a best-effort slice undisturbed, and through it reclaimed and restored at 25%,
#    50% and 75% of its steps; its loss curve must be identical to the undisturbed run's.
#    TRAIN_STEPS, BALLAST_GIB, HOLD_S, TORCH_RECLAIM_TIMEOUT (540 s) and PYTHON (python3,
#    with torch) pass through.
# Writes $OUT/memory-<gpu>-<date>.json with the device, date, commit and every baseline.
set -u
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck source=bench/common.sh
. "$ROOT/bench/common.sh"
DIST=$(find_dist "$ROOT/bench")
OUT=${OUT:-$PWD/memory-out}
mkdir -p "$OUT"
W=$(mktemp -d /tmp/vgpu-memory.XXXXXX)
trap 'stop_backend; rm -rf "$W"' EXIT
COMMIT=${VGPU_COMMIT:-$(cat "$DIST/COMMIT" 2>/dev/null || echo unknown)}
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
GPU_BYTES=$(($(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1) * 1024 * 1024))

compile_c "$W/vmm_native" "$OUT/compile-vmm.log" "$ROOT/bench/memory/vmm_native.c" || { log "vmm_native does not compile"; cat "$OUT/compile-vmm.log"; exit 1; }
compile_c "$W/memory_client" "$OUT/compile-client.log" "$ROOT/tests/c/memory_client.c" -I"$ROOT/tests/c" || { log "memory_client does not compile"; cat "$OUT/compile-client.log"; exit 1; }

log "native: copy, map, pattern"
run_native "$W/native.jsonl" "$OUT/native.err" "$W/vmm_native" all || log "native run failed ($?)"

pattern_through() { # LABEL [VAR=VALUE for the backend]
    local label=$1 setting=${2:-} sock=$W/$1.sock
    [ -n "$setting" ] && export "${setting?}"
    if VGPU_BACKEND_ARGS="--memory-limit 70G" start_backend "$DIST" "$sock" "$OUT/backend-$label.log"; then
        run_vgpu "$DIST" "$sock" "$W/$label.jsonl" "$OUT/$label.err" "$W/vmm_native" pattern ||
            log "$label pattern failed ($?)"
        stop_backend
    fi
    [ -n "$setting" ] && unset "${setting%%=*}"
    return 0
}
log "pattern through a slice: elastic memory"
pattern_through elastic
log "pattern through a slice: VGPU_ELASTIC=0"
pattern_through plain "VGPU_ELASTIC=0"

log "scenario: reclaim, restore, claim"
GPU_MEMORY=$GPU_BYTES NATIVE_LIB_DIR=$NATIVE_LIB_DIR timeout 400 python3 "$ROOT/bench/memory/scenario.py" "$DIST" "$W/memory_client" "$OUT" >"$W/scenario.json" 2>"$OUT/scenario.err"
log "scenario exit $?"
tail -5 "$OUT/scenario.err" >&2

if [ "${TORCH_RECLAIM:-1}" != 0 ]; then
    log "torch: training reclaimed and restored mid-run against undisturbed and native"
    TORCH_PY=${PYTHON:-python3}
    GPU_MEMORY=$GPU_BYTES NATIVE_LIB_DIR=$NATIVE_LIB_DIR PYTHON=$TORCH_PY \
        timeout -k 15 "${TORCH_RECLAIM_TIMEOUT:-540}" "$TORCH_PY" "$ROOT/bench/memory/torch_reclaim.py" \
        "$DIST" "$OUT" >"$W/torch_reclaim.json" 2>"$OUT/torch_reclaim.err"
    log "torch_reclaim exit $?"
    tail -3 "$OUT/torch_reclaim.err" >&2
else
    log "torch_reclaim skipped (TORCH_RECLAIM=0)"
fi

python3 - "$W" "$OUT" "$GPU" "$COMMIT" <<'PY'
import datetime, json, os, sys
w, out, gpu, commit = sys.argv[1:5]
def lines(p):
    try:
        return [json.loads(l) for l in open(p) if l.startswith("{")]
    except OSError:
        return []
def load(p):
    try:
        return json.load(open(p))
    except (OSError, ValueError):
        return None
now = datetime.datetime.now(datetime.timezone.utc)
doc = {"benchmark": "memory", "device": gpu, "date": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
       "commit": commit, "native": lines(f"{w}/native.jsonl"),
       "slice_pattern_elastic": lines(f"{w}/elastic.jsonl"),
       "slice_pattern_plain": lines(f"{w}/plain.jsonl"),
       "scenario": load(f"{w}/scenario.json"),
       "torch_reclaim": load(f"{w}/torch_reclaim.json")}
tag = "h100" if "H100" in gpu else ("h200" if "H200" in gpu else "gpu")
path = os.path.join(out, f"memory-{tag}-{now.strftime('%Y-%m-%d')}.json")
json.dump(doc, open(path, "w"), indent=2)
print(json.dumps({k: doc[k] for k in ("native", "slice_pattern_elastic", "slice_pattern_plain")}, indent=1))
s = doc["scenario"] or {}
print("swap_out", s.get("swap_out")); print("swap_in", s.get("swap_in")); print("claim", {k: v for k, v in (s.get("claim") or {}).items() if k != "alloc_ms"})
print("restored_after_claim", s.get("restored_after_claim"))
t = doc["torch_reclaim"]
if t:
    cyc = ", ".join(f"step {c.get('step_at_reclaim')}: {(c.get('swapped') or 0) / 2**30:.1f} GiB out "
                    f"{c.get('reclaim_ms') or 0:.0f} ms, in {c.get('restore_ms') or 0:.0f} ms, "
                    f"{'stalled' if c.get('stalled') else 'NOT stalled'}" for c in t.get("cycles", []))
    med = {k: r.get("step_ms_median") for k, r in t.get("runs", {}).items()}
    print(f"torch_reclaim goal_met={t.get('goal_met')} identical_to_undisturbed={t.get('identical_to_undisturbed')} "
          f"max_rel_diff vs undisturbed {t.get('max_rel_diff_vs_undisturbed')} vs native {t.get('max_rel_diff_vs_native')} "
          f"step_ms {med} cycles [{cyc}] failures {len(t.get('failures', []))}")
else:
    print("torch_reclaim: no result (skipped, or see torch_reclaim.err)")
print("wrote", path)
PY
