# shellcheck shell=sh
# Helpers for the in-guest test scripts (packed as /lib/vgpu/test-lib.sh; `. /lib/vgpu/test-lib.sh`).
#
# The host test reads the serial console (ttyS0) line by line, and may write lines to the guest
# on the control channel: $VGPU_TEST_CONTROL (from vgpu.control=, set by /init), the second serial
# port /dev/ttyS1 under QEMU, the virtio console /dev/hvc0 under cloud-hypervisor.

# Tells the host that the test reached NAME: a `VGPU-TEST-STEP NAME` line.
step() {
    echo "VGPU-TEST-STEP $*"
}

# Prints a failure and ends the test script with status 1.
die() {
    echo "FAIL $*"
    exit 1
}

# Waits until the host writes the line TOKEN on the control channel, for at most SECONDS
# (default 300); ends the test with a failure on a timeout. It prints `VGPU-TEST-WAIT TOKEN` once
# the channel is open, which is when the host may write (a closed port drops what arrives).
host_wait() {
    token="$1"
    limit="${2:-300}"
    if [ -z "${control_open:-}" ]; then
        control="${VGPU_TEST_CONTROL:-/dev/ttyS1}"
        [ -c "$control" ] || die "no control channel ${control}"
        exec 9<"$control" || die "cannot open ${control}"
        stty -F "$control" raw -echo 2>/dev/null
        control_open=1
    fi
    echo "VGPU-TEST-WAIT ${token}"
    start="$(cut -d. -f1 /proc/uptime)"
    while :; do
        now="$(cut -d. -f1 /proc/uptime)"
        left=$((start + limit - now))
        [ "$left" -gt 0 ] || die "the host did not send ${token} within ${limit} s"
        # shellcheck disable=SC3045 # busybox ash has read -t
        if read -r -t "$left" line <&9; then
            line="$(echo "$line" | tr -d '\r')"
            [ "$line" = "$token" ] && return 0
        fi
    done
}

# Polls the command COMMAND... every 0.1 s until it succeeds, for at most SECONDS.
# Usage: wait_until SECONDS DESCRIPTION COMMAND...
wait_until() {
    limit="$1"
    what="$2"
    shift 2
    tries=$((limit * 10))
    while [ "$tries" -gt 0 ]; do
        "$@" && return 0
        sleep 0.1
        tries=$((tries - 1))
    done
    die "timed out after ${limit} s waiting for ${what}"
}

# Starts vgpu-guestd in the background on /run/vgpu/vgpu0.sock (stats in /run/vgpu/vgpu0.stats,
# log in /tmp/guestd.log) with the extra ARGS given, and waits up to $GUESTD_READY_S seconds
# (default 120) for its `vgpu-guestd: ready` line. Sets GUESTD_PID. Prints `VGPU-TEST-STEP
# guestd-ready`.
start_guestd() {
    mkdir -p /run/vgpu
    GUESTD_LOG=/tmp/guestd.log
    GUESTD_STATS=/run/vgpu/vgpu0.stats
    vgpu-guestd --socket /run/vgpu/vgpu0.sock --stats-file "$GUESTD_STATS" "$@" \
        >"$GUESTD_LOG" 2>&1 &
    GUESTD_PID=$!
    tries=$((${GUESTD_READY_S:-120} * 10))
    while ! grep -q 'vgpu-guestd: ready' "$GUESTD_LOG"; do
        if ! kill -0 "$GUESTD_PID" 2>/dev/null; then
            guestd_log
            die "vgpu-guestd exited before it was ready"
        fi
        tries=$((tries - 1))
        if [ "$tries" -le 0 ]; then
            guestd_log
            die "vgpu-guestd was not ready within ${GUESTD_READY_S:-120} s"
        fi
        sleep 0.1
    done
    step guestd-ready
}

# Prints vgpu-guestd's log so far, each line prefixed with `guestd: `.
guestd_log() {
    sed 's/^/guestd: /' "${GUESTD_LOG:-/tmp/guestd.log}" 2>/dev/null
}

# Fails unless vgpu-guestd still runs.
guestd_alive() {
    kill -0 "$GUESTD_PID" 2>/dev/null || {
        guestd_log
        die "vgpu-guestd died"
    }
}

# Runs PROGRAM ARGS... to completion with its stdout and stderr prefixed with `LABEL: ` and
# `LABEL-stderr: `. Returns its exit status.
run_labelled() {
    label="$1"
    shift
    "$@" >"/tmp/${label}.out" 2>"/tmp/${label}.err"
    rc=$?
    sed "s/^/${label}: /" "/tmp/${label}.out"
    sed "s/^/${label}-stderr: /" "/tmp/${label}.err"
    return "$rc"
}
