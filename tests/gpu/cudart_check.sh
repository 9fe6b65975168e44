#!/usr/bin/env bash
# nvcc programs with the default static cudart, natively and through a vgpu slice: the
# outputs must be identical. Run on the GPU machine from the repository root (dist/ staged):
#   OUT=/some/dir bash tests/gpu/cudart_check.sh
# Programs: virtio-spec/tests/fixtures/vectorAdd.cu built three ways (default fatbin:
# sm_75 cubin + PTX, zstd-compressed; -Xfatbin -compress-all; sm_90 cubin + compute_80 PTX).
set -u
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
DIST=${DIST:-$ROOT/dist}
OUT=${OUT:-$PWD/cudart-check-out}
NATIVE_LIB_DIR=${NATIVE_LIB_DIR:-/usr/local/nvidia/lib64}
mkdir -p "$OUT"
W=$(mktemp -d /tmp/vgpu-cudart.XXXXXX)
backend_pid=
cleanup() {
    [ -n "$backend_pid" ] && kill "$backend_pid" 2>/dev/null
    wait 2>/dev/null
    rm -rf "$W"
}
trap cleanup EXIT
SRC=$ROOT/virtio-spec/tests/fixtures/vectorAdd.cu
nvcc -o "$W/vectorAdd" "$SRC" &&
    nvcc -Xfatbin -compress-all -o "$W/vectorAdd_c" "$SRC" &&
    nvcc -gencode arch=compute_90,code=sm_90 -gencode arch=compute_80,code=compute_80 \
        -o "$W/vectorAdd_m" "$SRC" || { echo "FAIL nvcc"; exit 1; }
LD_LIBRARY_PATH=$NATIVE_LIB_DIR "$DIST/bin/vgpu-backend" --socket "$W/vgpu.sock" \
    --device cuda:0 --memory-limit 8589934592 >"$OUT/cudart-backend.log" 2>&1 &
backend_pid=$!
for _ in $(seq 200); do [ -S "$W/vgpu.sock" ] && break; sleep 0.05; done
fail=0
for p in vectorAdd vectorAdd_c vectorAdd_m; do
    native=$(LD_LIBRARY_PATH=$NATIVE_LIB_DIR timeout 60 "$W/$p" 2>&1)
    slice=$(VGPU_SOCKET=$W/vgpu.sock LD_LIBRARY_PATH=$DIST/lib VGPU_LOG=warn timeout 60 "$W/$p" 2>"$OUT/cudart-$p.err")
    if [ "$native" = "$slice" ]; then
        echo "PASS $p: $slice"
    else
        echo "FAIL $p: native [$native] slice [$slice] (stderr: $(head -c 600 "$OUT/cudart-$p.err"))"
        fail=1
    fi
done
exit $fail
