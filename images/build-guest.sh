#!/usr/bin/env bash
# Builds what the VM tests boot: a Debian bookworm kernel (bzImage) and an initramfs (newc cpio,
# gzip) with busybox, the uio/vfio modules, /init (images/guest/init), and the guest programs
# given on the command line with every shared library they need. No root mounts, no loop
# devices: the initramfs is a cpio archive of a staging directory.
#
# Usage:
#   images/build-guest.sh [--refresh]
#       Prepares the cache: downloads the kernel and busybox-static packages and extracts the
#       bzImage, the modules and busybox. Prints the bzImage's path. Reuses a prepared cache;
#       --refresh (or VGPU_GUEST_REFRESH=1) looks up the newest kernel again.
#   images/build-guest.sh --initramfs OUT [--offline] [--bin FILE]... [--lib FILE[:NAME]]...
#                         [--file SRC:DEST]... [--test FILE]...
#       Writes the initramfs OUT (preparing the cache first; with --offline a missing cache is an
#       error, exit status 3, instead of a download):
#         --bin FILE        /usr/bin/<name of FILE>
#         --lib FILE[:NAME] /usr/lib/vgpu/NAME (default: FILE's name), plus the unversioned
#                           symlink for lib*.so.N names (libcuda.so.1 -> libcuda.so); /init puts
#                           /usr/lib/vgpu on LD_LIBRARY_PATH
#         --file SRC:DEST   any file, at the absolute path DEST
#         --test FILE       /tests/<name of FILE>: a test script, NAME.sh for vgpu.test=NAME
#       The shared libraries of every --bin and --lib (from ldd, with the dynamic loader) are
#       packed too; a library ldd cannot find is an error unless a --lib provides its name.
#
# Cache: $VGPU_CACHE/guest (VGPU_CACHE defaults to ~/.cache/vgpu): bzImage, modules/, busybox.
# VGPU_GUEST_FLAVOUR picks the kernel flavour: cloud-amd64 (default, smaller and quicker to
# boot) or amd64. Debian's 6.1 kernels lack CONFIG_VFIO_NOIOMMU; the vfio modules are packed
# anyway (loaded as optional), uio_pci_generic is what the guest driver gets there.
set -euo pipefail

IMAGES_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=images/common.sh
source "${IMAGES_DIR}/common.sh"

# Bump when the prepared cache's layout or contents change.
GUEST_RECIPE_REVISION=2
FLAVOUR="${VGPU_GUEST_FLAVOUR:-cloud-amd64}"
GUEST_CACHE="${VGPU_CACHE}/guest"
STAMP="${GUEST_CACHE}/stamp"
RECIPE="revision=${GUEST_RECIPE_REVISION} flavour=${FLAVOUR}"
# Modules the guest loads, with their dependencies: required ones first, then optional ones.
REQUIRED_MODULES=(uio uio_pci_generic)
OPTIONAL_MODULES=(vfio vfio_iommu_type1 vfio-pci)
# Loaded only when the control channel is the virtio console (cloud-hypervisor).
HVC_MODULES=(virtio_pci virtio_console)

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
}

refresh="${VGPU_GUEST_REFRESH:-0}"
offline=0
initramfs=""
bins=()
libs=()
files=()
tests=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --refresh) refresh=1 ;;
        --offline) offline=1 ;;
        --initramfs) initramfs="${2:?--initramfs needs a path}"; shift ;;
        --bin) bins+=("${2:?--bin needs a file}"); shift ;;
        --lib) libs+=("${2:?--lib needs a file}"); shift ;;
        --file) files+=("${2:?--file needs SRC:DEST}"); shift ;;
        --test) tests+=("${2:?--test needs a file}"); shift ;;
        -h | --help) usage ;;
        *) echo "unknown argument: $1" >&2; usage ;;
    esac
    shift
done

cache_ready() {
    [[ -f "${STAMP}" && "$(cat "${STAMP}")" == "${RECIPE}" && -f "${GUEST_CACHE}/bzImage" &&
        -x "${GUEST_CACHE}/busybox" && -f "${GUEST_CACHE}/modules/load-order" ]]
}

# Extracts data.tar of a .deb into a directory (dpkg-deb, no root needed).
extract_deb() {
    mkdir -p "$2"
    dpkg-deb -x "$1" "$2"
}

# Adds MODULE and, first, its dependencies to the load order (module names compare with '-'
# and '_' alike, as the kernel does).
declare -A MODULE_FILES=()
declare -A MODULE_ADDED=()
LOAD_ORDER=()
add_module() {
    local need="$1" name="$2"
    local key="${name//-/_}"
    [[ -n "${MODULE_ADDED[${key}]:-}" ]] && return 0
    local file="${MODULE_FILES[${key}]:-}"
    if [[ -z "${file}" ]]; then
        [[ "${need}" == required ]] && die "the kernel package has no module ${name}"
        log "the kernel package has no module ${name}; skipped"
        return 0
    fi
    local plain="${file%.xz}"
    plain="${plain%.zst}"
    local deps dep
    deps="$(tr '\0' '\n' <"${plain}" | sed -n 's/^depends=//p' | head -n 1)"
    for dep in ${deps//,/ }; do
        add_module "${need}" "${dep}"
    done
    MODULE_ADDED[${key}]=1
    cp "${plain}" "${GUEST_CACHE}/modules.new/${key}.ko"
    LOAD_ORDER+=("${need} ${key}")
}

prepare_cache() {
    if [[ "${refresh}" != 1 ]] && cache_ready; then
        log "cached: ${GUEST_CACHE} ($(cat "${GUEST_CACHE}/kernel-version"))"
        return 0
    fi
    [[ "${offline}" == 1 ]] && {
        echo "The guest kernel is not prepared in ${GUEST_CACHE}: run images/build-guest.sh" >&2
        exit 3
    }
    local start=${SECONDS}
    private_apt bookworm-guest \
        "deb http://deb.debian.org/debian bookworm main" \
        "deb http://deb.debian.org/debian bookworm-updates main" \
        "deb http://deb.debian.org/debian-security bookworm-security main"
    local meta="linux-image-${FLAVOUR}"
    local kpkg
    kpkg="$(apt-cache "${PRIVATE_APT[@]}" depends "${meta}" |
        sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*\)$/\1/p' | head -n 1)"
    [[ -n "${kpkg}" ]] || die "cannot resolve ${meta} to a kernel package"
    local kver="${kpkg#linux-image-}"
    log "kernel package ${kpkg}"

    local debs="${GUEST_CACHE}/debs"
    mkdir -p "${debs}"
    local pkg
    for pkg in "${kpkg}" busybox-static; do
        if ! compgen -G "${debs}/${pkg}_*.deb" >/dev/null; then
            log "apt-get download ${pkg}"
            (cd "${debs}" && apt-get "${PRIVATE_APT[@]}" download -qq "${pkg}") ||
                die "cannot download ${pkg}"
        fi
    done
    local kdeb bdeb
    kdeb="$(compgen -G "${debs}/${kpkg}_*.deb" | sort | tail -n 1)"
    bdeb="$(compgen -G "${debs}/busybox-static_*.deb" | sort | tail -n 1)"

    local tmp="${GUEST_CACHE}/extract"
    rm -rf "${tmp}" "${GUEST_CACHE}/modules.new"
    mkdir -p "${tmp}" "${GUEST_CACHE}/modules.new"
    log "extracting ${kdeb##*/}"
    extract_deb "${kdeb}" "${tmp}/kernel"
    extract_deb "${bdeb}" "${tmp}/busybox"

    local moddir="${tmp}/kernel/lib/modules/${kver}"
    [[ -d "${moddir}" ]] || moddir="${tmp}/kernel/usr/lib/modules/${kver}"
    [[ -d "${moddir}" ]] || die "no modules directory for ${kver} in ${kdeb}"
    local ko base
    while IFS= read -r -d '' ko; do
        case "${ko}" in
            *.ko.xz) xz -d -f "${ko}"; ko="${ko%.xz}" ;;
            *.ko.zst) die "zstd-compressed modules are not handled (${ko})" ;;
        esac
        base="${ko##*/}"
        base="${base%.ko}"
        MODULE_FILES[${base//-/_}]="${ko}"
    done < <(find "${moddir}" \( -name 'uio*.ko*' -o -name 'vfio*.ko*' -o -name 'irqbypass.ko*' \
        -o -name 'mdev.ko*' -o -name 'virtio*.ko*' \) -print0)
    local m
    for m in "${REQUIRED_MODULES[@]}"; do add_module required "${m}"; done
    for m in "${OPTIONAL_MODULES[@]}"; do add_module optional "${m}"; done
    for m in "${HVC_MODULES[@]}"; do add_module hvc "${m}"; done
    printf '%s\n' "${LOAD_ORDER[@]}" >"${GUEST_CACHE}/modules.new/load-order"

    local vmlinuz="${tmp}/kernel/boot/vmlinuz-${kver}"
    [[ -f "${vmlinuz}" ]] || die "no /boot/vmlinuz-${kver} in ${kdeb}"
    [[ -x "${tmp}/busybox/bin/busybox" ]] || die "no /bin/busybox in ${bdeb}"
    rm -rf "${GUEST_CACHE}/modules"
    mv "${GUEST_CACHE}/modules.new" "${GUEST_CACHE}/modules"
    install -m 0644 "${vmlinuz}" "${GUEST_CACHE}/bzImage"
    install -m 0755 "${tmp}/busybox/bin/busybox" "${GUEST_CACHE}/busybox"
    echo "${kver}" >"${GUEST_CACHE}/kernel-version"
    rm -rf "${tmp}"
    printf '%s' "${RECIPE}" >"${STAMP}"
    log "prepared ${GUEST_CACHE} (kernel ${kver}; modules: ${LOAD_ORDER[*]}) in $((SECONDS - start)) s"
}

# Copies an ELF file into the staging tree, without debug information when strip is there.
copy_elf() {
    local src="$1" dest="$2"
    mkdir -p "$(dirname "${dest}")"
    cp -L "${src}" "${dest}"
    chmod u+w "${dest}"
    if command -v strip >/dev/null 2>&1; then
        strip --strip-debug "${dest}" 2>/dev/null || true
    fi
}

build_initramfs() {
    local out="$1"
    local start=${SECONDS}
    command -v cpio >/dev/null 2>&1 ||
        die "cpio is missing: run images/build-guest.sh without --offline (as root) first"
    local stage
    stage="$(mktemp -d "${TMPDIR:-/tmp}/vgpu-initramfs.XXXXXX")"
    # shellcheck disable=SC2064
    trap "rm -rf '${stage}'" EXIT
    mkdir -p "${stage}"/{bin,sbin,usr/bin,usr/sbin,usr/lib/vgpu,lib/modules,lib/vgpu,tests,etc,root,proc,sys,dev,run,tmp}
    install -m 0755 "${GUEST_CACHE}/busybox" "${stage}/bin/busybox"
    install -m 0755 "${IMAGES_DIR}/guest/init" "${stage}/init"
    install -m 0644 "${IMAGES_DIR}/guest/test-lib.sh" "${stage}/lib/vgpu/test-lib.sh"
    cp "${GUEST_CACHE}"/modules/* "${stage}/lib/modules/"
    printf 'root:x:0:0:root:/root:/bin/sh\n' >"${stage}/etc/passwd"
    printf 'root:x:0:\n' >"${stage}/etc/group"

    # Files whose shared libraries must be packed, and sonames provided by --lib.
    local elves=() provided=() item src name dest
    for src in "${bins[@]}"; do
        [[ -f "${src}" ]] || die "--bin ${src}: no such file"
        copy_elf "${src}" "${stage}/usr/bin/${src##*/}"
        chmod 0755 "${stage}/usr/bin/${src##*/}"
        elves+=("${src}")
    done
    for item in "${libs[@]}"; do
        src="${item%%:*}"
        name="${item#*:}"
        [[ "${item}" == *:* ]] || name="${src##*/}"
        [[ -f "${src}" ]] || die "--lib ${src}: no such file"
        copy_elf "${src}" "${stage}/usr/lib/vgpu/${name}"
        provided+=("${name}")
        if [[ "${name}" =~ ^(lib.*\.so)\.[0-9.]+$ ]]; then
            ln -sf "${name}" "${stage}/usr/lib/vgpu/${BASH_REMATCH[1]}"
            provided+=("${BASH_REMATCH[1]}")
        fi
        elves+=("${src}")
    done
    for item in "${files[@]}"; do
        src="${item%%:*}"
        dest="${item#*:}"
        [[ "${item}" == *:/* && -f "${src}" ]] || die "--file ${item}: want an existing SRC and an absolute DEST"
        mkdir -p "$(dirname "${stage}${dest}")"
        cp -L "${src}" "${stage}${dest}"
    done
    for src in "${tests[@]}"; do
        [[ -f "${src}" ]] || die "--test ${src}: no such file"
        install -m 0755 "${src}" "${stage}/tests/${src##*/}"
    done

    # Shared libraries, from ldd: "name => /path (addr)", "/lib64/ld-linux-x86-64.so.2 (addr)".
    declare -A seen=()
    local line lib soname p
    for src in "${elves[@]}"; do
        while IFS= read -r line; do
            lib=""
            if [[ "${line}" =~ ^[[:space:]]*([^[:space:]]+)[[:space:]]+=\>[[:space:]]+not\ found ]]; then
                soname="${BASH_REMATCH[1]}"
                for p in "${provided[@]}"; do
                    [[ "${p}" == "${soname}" ]] && continue 2
                done
                die "${src} needs ${soname}, which ldd cannot find and no --lib provides"
            elif [[ "${line}" =~ ^[[:space:]]*([^[:space:]]+)[[:space:]]+=\>[[:space:]]+(/[^[:space:]]+) ]]; then
                soname="${BASH_REMATCH[1]}"
                lib="${BASH_REMATCH[2]}"
                for p in "${provided[@]}"; do
                    [[ "${p}" == "${soname}" ]] && continue 2
                done
            elif [[ "${line}" =~ ^[[:space:]]*(/[^[:space:]]+)[[:space:]]+\( ]]; then
                lib="${BASH_REMATCH[1]}"
            fi
            [[ -n "${lib}" && -z "${seen[${lib}]:-}" ]] || continue
            seen[${lib}]=1
            copy_elf "${lib}" "${stage}${lib}"
        done < <(ldd "${src}" 2>&1 || true)
    done

    mkdir -p "$(dirname "${out}")"
    (cd "${stage}" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) |
        gzip -1 >"${out}.tmp"
    mv -f "${out}.tmp" "${out}"
    rm -rf "${stage}"
    trap - EXIT
    log "wrote ${out} ($(du -k "${out}" | cut -f1) KiB, ${#elves[@]} programs and libraries, $((SECONDS - start)) s)"
}

# Tools: dpkg-deb and xz to unpack, cpio to pack. Checked here, not when packing: the tests pack
# several initramfs at once (with --offline), and must not race for apt's lock.
if [[ "${offline}" != 1 ]]; then
    need_packages dpkg-dev xz-utils cpio
fi
prepare_cache
if [[ -n "${initramfs}" ]]; then
    build_initramfs "${initramfs}"
    echo "${initramfs}"
else
    [[ ${#bins[@]} -eq 0 && ${#libs[@]} -eq 0 && ${#files[@]} -eq 0 && ${#tests[@]} -eq 0 ]] ||
        die "--bin, --lib, --file and --test need --initramfs"
    echo "${GUEST_CACHE}/bzImage"
fi
