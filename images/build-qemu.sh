#!/usr/bin/env bash
# Builds the qemu-system-x86_64 the VM tests boot, from Debian trixie's QEMU 10.0 source package,
# with the generic vhost-user device made user-creatable. Debian's own QEMU 10.0 refuses
# `-device vhost-user-device-pci` ("not user creatable"), and QEMU asserts on a virtio id it has
# no name for (ours is 64).
#
# Usage: images/build-qemu.sh          # prints the binary's path on stdout when done
#
# The binary is cached at $VGPU_CACHE/qemu-10.0.13/qemu-system-x86_64 (VGPU_CACHE defaults to
# ~/.cache/vgpu). A cached binary is reused when its stamp matches this recipe; a changed recipe
# rebuilds. Installs what it needs from Debian when run as root (build: meson 1.7 from
# bookworm-backports, ninja-build, libglib2.0-dev, libpixman-1-dev, zlib1g-dev, flex, bison; run
# time: seabios and qemu-system-data, whose /usr/share/qemu the binary is given with `-L`).
# About 3 to 4 minutes on 2 cores.
set -euo pipefail

IMAGES_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=images/common.sh
source "${IMAGES_DIR}/common.sh"

QEMU_DEBIAN_VERSION="1:10.0.13+ds-0+deb13u1"
QEMU_UPSTREAM_VERSION="10.0.13"
# Bump when the patches below change (configure flags and versions are in the stamp already).
PATCH_REVISION=1
CONFIGURE_FLAGS=(
    --target-list=x86_64-softmmu
    --without-default-features
    --enable-tcg
    --enable-vhost-user
    --enable-pixman
    --disable-docs
    --disable-download
    --disable-install-blobs
    --disable-slirp
    --disable-fdt
    # Debian's meson lives in /usr/bin/python3's site packages; another python3 first on PATH
    # (pyenv, say) would not find it, and --disable-download forbids fetching one.
    --python=/usr/bin/python3
)
BUILD_PACKAGES=(
    dpkg-dev gcc libc6-dev pkg-config python3 python3-venv ninja-build libglib2.0-dev
    libpixman-1-dev zlib1g-dev flex bison
)
RUNTIME_PACKAGES=(seabios qemu-system-data)

OUT_DIR="${VGPU_CACHE}/qemu-${QEMU_UPSTREAM_VERSION}"
BINARY="${OUT_DIR}/qemu-system-x86_64"
STAMP="${OUT_DIR}/stamp"
RECIPE="qemu=${QEMU_DEBIAN_VERSION} patches=${PATCH_REVISION} configure=${CONFIGURE_FLAGS[*]}"

# Runtime packages are needed whether or not the binary is cached.
need_packages "${RUNTIME_PACKAGES[@]}"

if [[ -x "${BINARY}" && -f "${STAMP}" && "$(cat "${STAMP}")" == "${RECIPE}" ]] &&
    "${BINARY}" -L /usr/share/qemu -device help 2>/dev/null | grep -q '"vhost-user-device-pci"'; then
    log "cached: ${BINARY}"
    echo "${BINARY}"
    exit 0
fi

start=${SECONDS}
log "building QEMU ${QEMU_DEBIAN_VERSION} into ${OUT_DIR}"
need_packages "${BUILD_PACKAGES[@]}"

# meson >= 1.5 (QEMU 10 needs it); bookworm has 1.0, bookworm-backports 1.7.
meson_ok() {
    /usr/bin/python3 - <<'EOF' 2>/dev/null
import sys
import mesonbuild.coredata as c
major, minor = (int(x) for x in c.version.split(".")[:2])
sys.exit(0 if (major, minor) >= (1, 5) else 1)
EOF
}
APT_BOOKWORM=(
    "deb http://deb.debian.org/debian bookworm main"
    "deb http://deb.debian.org/debian bookworm-backports main"
)
if ! meson_ok; then
    [[ "$(id -u)" -eq 0 ]] || die "meson >= 1.5 is needed: install meson from bookworm-backports as root"
    private_apt bookworm-backports "${APT_BOOKWORM[@]}"
    log "installing meson from bookworm-backports"
    DEBIAN_FRONTEND=noninteractive apt-get "${PRIVATE_APT[@]}" install -y -qq \
        --no-install-recommends -t bookworm-backports meson >/dev/null
    meson_ok || die "meson from bookworm-backports is still older than 1.5"
fi

# The source package, from a private apt source list for trixie (the system's is left alone).
private_apt trixie-src \
    "deb-src http://deb.debian.org/debian trixie main" \
    "deb-src http://deb.debian.org/debian trixie-updates main" \
    "deb-src http://deb.debian.org/debian-security trixie-security main"
DOWNLOADS="${VGPU_CACHE}/downloads/qemu-${QEMU_UPSTREAM_VERSION}"
mkdir -p "${DOWNLOADS}"
DSC="${DOWNLOADS}/qemu_${QEMU_DEBIAN_VERSION#*:}.dsc"
if [[ ! -f "${DSC}" ]]; then
    log "apt-get source qemu=${QEMU_DEBIAN_VERSION} (about 40 MB)"
    (cd "${DOWNLOADS}" && apt-get "${PRIVATE_APT[@]}" source --download-only -qq \
        "qemu=${QEMU_DEBIAN_VERSION}") || die "cannot download the QEMU source package"
fi

WORK="${OUT_DIR}/work"
rm -rf "${WORK}"
mkdir -p "${WORK}"
SRC="${WORK}/src"
log "unpacking the source package (with Debian's patches)"
dpkg-source --no-check -x "${DSC}" "${SRC}" >/dev/null

log "patching: vhost-user-device(-pci) user-creatable, virtio_id_to_name() without assert"
for f in hw/virtio/vhost-user-device.c hw/virtio/vhost-user-device-pci.c; do
    [[ "$(grep -c 'dc->user_creatable = false;' "${SRC}/${f}")" -eq 1 ]] ||
        die "${f}: expected exactly one 'dc->user_creatable = false;' line"
    sed -i '/dc->user_creatable = false;/d' "${SRC}/${f}"
done
VIRTIO_C="${SRC}/hw/virtio/virtio.c" /usr/bin/python3 - <<'EOF' || die "cannot patch virtio_id_to_name()"
import os, sys
path = os.environ["VIRTIO_C"]
text = open(path).read()
old = """    assert(device_id < G_N_ELEMENTS(virtio_device_names));
    const char *name = virtio_device_names[device_id];
    assert(name != NULL);
    return name;
"""
new = """    /* vgpu: a generic vhost-user device may carry an id QEMU has no name for. */
    if (device_id >= G_N_ELEMENTS(virtio_device_names) ||
        virtio_device_names[device_id] == NULL) {
        return "virtio-unknown";
    }
    return virtio_device_names[device_id];
"""
if text.count(old) != 1:
    sys.exit("virtio_id_to_name() does not look as expected")
open(path, "w").write(text.replace(old, new))
EOF

log "configure ${CONFIGURE_FLAGS[*]}"
mkdir -p "${SRC}/build"
(cd "${SRC}/build" && ../configure "${CONFIGURE_FLAGS[@]}" >"${WORK}/configure.log" 2>&1) || {
    tail -n 40 "${WORK}/configure.log" >&2
    die "configure failed (log: ${WORK}/configure.log)"
}

log "ninja qemu-system-x86_64 ($(nproc) jobs; a few minutes)"
(cd "${SRC}/build" && ninja -j "$(nproc)" qemu-system-x86_64 >"${WORK}/ninja.log" 2>&1) || {
    tail -n 40 "${WORK}/ninja.log" >&2
    die "ninja failed (log: ${WORK}/ninja.log)"
}

install -m 0755 "${SRC}/build/qemu-system-x86_64" "${BINARY}.tmp"
mv -f "${BINARY}.tmp" "${BINARY}"
"${BINARY}" -L /usr/share/qemu -device help | grep -q '"vhost-user-device-pci"' ||
    die "the built QEMU does not offer vhost-user-device-pci"
printf '%s' "${RECIPE}" >"${STAMP}"
rm -rf "${WORK}"
log "built ${BINARY} in $((SECONDS - start)) s"
echo "${BINARY}"
