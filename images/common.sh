# shellcheck shell=bash
# Shared by the images/ scripts; sourced, not run.
#
# VGPU_CACHE is the cache root (default ~/.cache/vgpu, or $XDG_CACHE_HOME/vgpu). Everything the
# scripts download or build lives under it, never in the repository.

VGPU_CACHE="${VGPU_CACHE:-${XDG_CACHE_HOME:-${HOME}/.cache}/vgpu}"

# The name of the running script, for messages.
IMAGES_SCRIPT="$(basename "${BASH_SOURCE[1]:-$0}")"

log() {
    printf '[%s %s] %s\n' "${IMAGES_SCRIPT}" "$(date +%H:%M:%S)" "$*" >&2
}

die() {
    printf '[%s] error: %s\n' "${IMAGES_SCRIPT}" "$*" >&2
    exit 1
}

# True if every named Debian package is installed.
packages_installed() {
    local pkg status
    for pkg in "$@"; do
        status="$(dpkg-query -W -f='${Status}' "${pkg}" 2>/dev/null || true)"
        [[ "${status}" == "install ok installed" ]] || return 1
    done
}

# Installs the named Debian packages that are missing, from the system's own apt sources.
need_packages() {
    local missing=() pkg
    for pkg in "$@"; do
        packages_installed "${pkg}" || missing+=("${pkg}")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    if [[ "$(id -u)" -ne 0 ]]; then
        die "missing Debian packages: ${missing[*]} (install them as root, or run this script as root)"
    fi
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# A private apt configuration: its own source list, package lists and package cache under
# $VGPU_CACHE/apt/NAME, so the system's apt sources and state are left as they are. Call
# `private_apt NAME LINE...` (LINEs are sources.list lines); it sets the array PRIVATE_APT to the
# options that select it, and downloads the package lists (once a day at most).
private_apt() {
    local name="$1"
    shift
    local dir="${VGPU_CACHE}/apt/${name}"
    mkdir -p "${dir}/lists/partial" "${dir}/cache/archives/partial"
    local list="${dir}/sources.list"
    local wanted
    wanted="$(printf '%s\n' "$@")"
    PRIVATE_APT=(
        -o "Dir::Etc::sourcelist=${list}"
        -o "Dir::Etc::sourceparts=-"
        -o "Dir::State::Lists=${dir}/lists"
        -o "Dir::Cache=${dir}/cache"
        -o "APT::Sandbox::User=root"
    )
    local stamp="${dir}/updated"
    if [[ ! -f "${list}" || "$(cat "${list}")" != "${wanted}" ]]; then
        printf '%s\n' "${wanted}" >"${list}"
        rm -f "${stamp}"
    fi
    if [[ ! -f "${stamp}" ]] || [[ -n "$(find "${stamp}" -mmin +1440)" ]]; then
        log "apt-get update (private source list ${list})"
        apt-get "${PRIVATE_APT[@]}" update -qq || die "apt-get update with ${list} failed"
        touch "${stamp}"
    fi
}
