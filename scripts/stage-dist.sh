#!/usr/bin/env bash
# Builds the workspace in release mode and fills dist/ (git-ignored) with what the GPU
# machine needs; dist/ then travels there (the device tool's `carry: ["dist"]`), where
# `bash dist/gpu-check.sh` runs the checks.
#
#   dist/bin/vgpu-backend
#   dist/lib/libcuda.so.1        (target/release/libcuda.so) and the symlink libcuda.so
#   dist/gpu-check.sh            (scripts/gpu-check.sh)
#   dist/bench/                  (benchmark sources, run.sh, common.sh; not results/)
#   dist/tests/gpu/, dist/tests/c/   (C test programs)
#   dist/COMMIT                  (git commit, "-dirty" when the tree has changes)
#
# Debug info is compressed (or stripped when dist/ would otherwise exceed DIST_MAX_MIB,
# default 56: the device tool carries at most 64 MiB). SKIP_BUILD=1 skips cargo.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
DIST=$ROOT/dist
DIST_MAX_MIB=${DIST_MAX_MIB:-56}

if [ "${SKIP_BUILD:-0}" != 1 ]; then
    echo "stage-dist: cargo build --release --workspace" >&2
    cargo build --release --workspace
fi

for f in target/release/vgpu-backend target/release/libcuda.so; do
    [ -f "$f" ] || { echo "stage-dist: $f was not built" >&2; exit 1; }
done

rm -rf "$DIST"
mkdir -p "$DIST/bin" "$DIST/lib" "$DIST/tests"
cp target/release/vgpu-backend "$DIST/bin/vgpu-backend"
cp target/release/vgpu-scheduler "$DIST/bin/vgpu-scheduler"
cp target/release/vgpuctl "$DIST/bin/vgpuctl"
cp target/release/libcuda.so "$DIST/lib/libcuda.so.1"
ln -s libcuda.so.1 "$DIST/lib/libcuda.so"
chmod 755 "$DIST/bin/vgpu-backend" "$DIST/bin/vgpu-scheduler" "$DIST/bin/vgpuctl" "$DIST/lib/libcuda.so.1"

# Smaller binaries, same code: compress the debug sections; strip them if still too big.
if command -v objcopy >/dev/null; then
    for f in "$DIST/bin/vgpu-backend" "$DIST/bin/vgpu-scheduler" "$DIST/bin/vgpuctl" "$DIST/lib/libcuda.so.1"; do
        objcopy --compress-debug-sections=zlib "$f" ||
            echo "stage-dist: warning: could not compress the debug sections of $f" >&2
    done
fi

mkdir -p "$DIST/bench"
for f in bench/*; do
    case $(basename "$f") in results) continue ;; esac
    cp -r "$f" "$DIST/bench/"
done
cp -r tests/gpu "$DIST/tests/gpu"
if [ -d tests/c ]; then
    cp -r tests/c "$DIST/tests/c"
else
    echo "stage-dist: warning: tests/c is missing (no driver_api_client)" >&2
fi
cp scripts/gpu-check.sh "$DIST/gpu-check.sh"

commit=$(git rev-parse HEAD 2>/dev/null || echo unknown)
if [ "$commit" != unknown ] && [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
    commit="$commit-dirty"
fi
echo "$commit" >"$DIST/COMMIT"

# Counted as if the libcuda.so symlink travelled as a second copy of the library.
dist_mib() {
    echo $((($(du -sb "$DIST" | cut -f1) + $(stat -c %s "$DIST/lib/libcuda.so.1")) / 1048576))
}
size_mib=$(dist_mib)
if [ "$size_mib" -gt "$DIST_MAX_MIB" ]; then
    echo "stage-dist: dist is $size_mib MiB, stripping debug info" >&2
    strip --strip-debug "$DIST/bin/vgpu-backend" "$DIST/bin/vgpu-scheduler" "$DIST/bin/vgpuctl" "$DIST/lib/libcuda.so.1" || true
    size_mib=$(dist_mib)
    if [ "$size_mib" -gt "$DIST_MAX_MIB" ]; then
        echo "stage-dist: dist is still $size_mib MiB (over $DIST_MAX_MIB)" >&2
        exit 1
    fi
fi

# GLIBC versions the binaries need (the GPU machine's glibc must be at least this).
need_glibc=$(objdump -T "$DIST/bin/vgpu-backend" "$DIST/lib/libcuda.so.1" 2>/dev/null |
    grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -1 || true)
echo "stage-dist: dist/ ready ($size_mib MiB, commit $commit${need_glibc:+, needs $need_glibc})" >&2
ls -l "$DIST/bin" "$DIST/lib" >&2
