//! The VM carrier end to end: a Debian guest under QEMU TCG with our device
//! attached to a live `vgpu-backend --device emulated`, `vgpu-guestd` driving
//! it from guest userspace, and the unchanged guest `libcuda.so.1` talking to
//! `vgpu-guestd`.
//!
//! These need `images/build-qemu.sh` and `images/build-guest.sh` to have run
//! (CI does, and sets `VGPU_VM_TESTS=1`); without them they are skipped with
//! a message. See `vgpu_tests::vm`.

use std::time::Duration;

use vgpu_tests::vm::{vm_images_or_skip, GuestFiles, Vm, VmImages, VmOutcome};
use vgpu_tests::{mem_info, poll_until, BackendProcess};

const GIB: u64 = 1 << 30;
/// How long a guest may take to reach a step (TCG is slow, CI slower).
const STEP_TIMEOUT: Duration = Duration::from_secs(300);
/// How long the host waits for the backend to free a killed client's memory.
const FREE_TIMEOUT: Duration = Duration::from_secs(60);

/// The environment every in-guest client runs with: the emulated device does
/// not run kernels, and TCG needs longer than the clients' default watchdog.
const CLIENT_ENV: &str = "export VGPU_EXPECT_EXECUTION=0 VGPU_TEST_WATCHDOG_S=400\n";

/// Prints the boot and run times (shown with `--nocapture`), and the whole
/// console with `VGPU_VM_CONSOLE=1`.
fn print_timings(outcome: &VmOutcome) {
    println!(
        "{}: boot {:?}, whole run {:?}",
        outcome.test, outcome.boot_time, outcome.elapsed
    );
    if std::env::var("VGPU_VM_CONSOLE").is_ok_and(|v| v == "1") {
        println!(
            "--- {} console ---\n{}--- end ---",
            outcome.test, outcome.console
        );
    }
}

/// The `VGPU-TEST-WAIT <token>` line of `host_wait <token>`.
fn is_wait_line(line: &str, token: &str) -> bool {
    line.trim_end() == format!("VGPU-TEST-WAIT {token}")
}

/// Boots `files` to run `test` against `backend`.
fn boot(images: &VmImages, files: &GuestFiles, backend: &BackendProcess, test: &str) -> Vm {
    Vm::boot(images, files.build(images), backend.socket(), test)
}

/// The slice is all free, as a host-side session sees it.
fn wait_until_slice_is_free(backend: &BackendProcess, what: &str) -> u64 {
    poll_until(FREE_TIMEOUT, what, || {
        let (free, total) = mem_info(backend);
        (free == total).then_some(free)
    })
}

/// Lines labelled `label: ` by `run_labelled`, without the label.
fn labelled<'a>(outcome: &'a VmOutcome, label: &str) -> Vec<&'a str> {
    let prefix = format!("{label}: ");
    outcome
        .lines
        .iter()
        .filter_map(|l| l.strip_prefix(&prefix))
        .collect()
}

/// Asserts that the client labelled `label` ran the full set of checks and
/// none failed, and returns how many passed.
fn assert_client_passed(outcome: &VmOutcome, label: &str) -> usize {
    let lines = labelled(outcome, label);
    let failures: Vec<&&str> = lines.iter().filter(|l| l.starts_with("FAIL")).collect();
    let passes = lines.iter().filter(|l| l.starts_with("PASS")).count();
    assert!(
        failures.is_empty(),
        "{label} failed checks in the guest: {failures:#?}\n{}",
        outcome.console
    );
    assert!(
        passes >= 120,
        "{label} ran {passes} checks in the guest, expected the full set (120 or more)\n{}",
        outcome.console
    );
    passes
}

const DEVICE_VISIBLE: &str = r#". /lib/vgpu/test-lib.sh
dev=""
for d in /sys/bus/pci/devices/*; do
    if [ "$(cat "$d/vendor")" = 0x1af4 ] && [ "$(cat "$d/device")" = 0x1080 ]; then
        dev="$d"
    fi
done
[ -n "$dev" ] || die "no 1af4:1080 PCI function (virtio type 64)"
bdf="$(basename "$dev")"
echo "DEVICE $bdf $(cat "$dev/vendor") $(cat "$dev/device") class=$(cat "$dev/class")"
if [ -e "$dev/driver" ]; then
    die "a kernel driver took the device: $(basename "$(readlink "$dev/driver")")"
fi
grep -q '^uio_pci_generic ' /proc/modules || die "uio_pci_generic is not loaded"
echo uio_pci_generic >"$dev/driver_override" || die "cannot set driver_override"
echo "$bdf" >/sys/bus/pci/drivers_probe
wait_until 30 "the device to bind" test -e "$dev/driver"
driver="$(basename "$(readlink "$dev/driver")")"
[ "$driver" = uio_pci_generic ] || die "bound to $driver, not uio_pci_generic"
uio="$(ls "$dev/uio" 2>/dev/null | head -n 1)"
[ -n "$uio" ] && [ -c "/dev/$uio" ] || die "no uio device node for $bdf"
echo "BOUND $driver /dev/$uio"
echo "HUGEPAGES $(cat /proc/sys/vm/nr_hugepages)"
"#;

/// Needs no guest driver: the device is on the guest's PCI bus with the
/// right ids, Linux leaves it alone, and uio_pci_generic takes it.
#[test]
fn guest_sees_the_device_and_binds_it_to_uio_pci_generic() {
    let Some(images) = vm_images_or_skip("guest_sees_the_device_and_binds_it_to_uio_pci_generic")
    else {
        return;
    };
    let backend = BackendProcess::spawn_emulated(GIB);
    let files = GuestFiles::new().test("device_visible", DEVICE_VISIBLE);
    let vm = boot(&images, &files, &backend, "device_visible");
    let outcome = vm.wait_for_result();
    print_timings(&outcome);
    outcome.assert_passed();
    let device = outcome.lines_starting_with("DEVICE ");
    assert_eq!(device.len(), 1, "{}", outcome.console);
    assert!(
        device[0].contains(" 0x1af4 0x1080 "),
        "vendor 0x1af4, device 0x1040 + 64: {}",
        device[0]
    );
    let bound = outcome.lines_starting_with("BOUND ");
    assert_eq!(bound.len(), 1, "{}", outcome.console);
    assert!(bound[0].starts_with("BOUND uio_pci_generic /dev/uio"));
    // QEMU spoke vhost-user to the live backend for the device.
    assert!(
        backend.log().contains("Frontend connected"),
        "QEMU connected to the backend\n{}",
        backend.log()
    );
}

const CLIENT_THEN_KILL: &str = r#". /lib/vgpu/test-lib.sh
start_guestd
run_labelled client driver_api_client || die "driver_api_client exited with status $rc"
step client-passed
guestd_alive
mem_hog 67108864 1048576 >/tmp/hog.out 2>&1 &
hog=$!
wait_until 300 "mem_hog to allocate" grep -q '^ALLOCATED' /tmp/hog.out
sed 's/^/hog: /' /tmp/hog.out
host_wait kill
kill -9 "$hog"
wait "$hog" 2>/dev/null
step hog-killed
host_wait freed
guestd_alive
run_labelled meminfo mem_info || die "mem_info exited with status $rc"
guestd_log
"#;

/// Acceptance 1: vgpu-guestd binds the device and the driver-API client
/// passes through it; a client killed mid-run has its session freed on the
/// host.
#[test]
fn client_passes_through_guestd_and_a_killed_client_is_freed_on_the_host() {
    let test = "client_passes_through_guestd_and_a_killed_client_is_freed_on_the_host";
    let Some(images) = vm_images_or_skip(test) else {
        return;
    };
    let backend = BackendProcess::spawn_emulated(GIB);
    let files = GuestFiles::new()
        .guestd()
        .libcuda()
        .c_program("driver_api_client")
        .c_program("mem_hog")
        .c_program("mem_info")
        .test(
            "client_then_kill",
            &format!("{CLIENT_ENV}{CLIENT_THEN_KILL}"),
        );
    let mut vm = boot(&images, &files, &backend, "client_then_kill");
    vm.wait_for_step("guestd-ready", STEP_TIMEOUT);
    vm.wait_for_step("client-passed", STEP_TIMEOUT);

    // The hog holds 64 MiB in its session on the host backend.
    vm.wait_for_line("host_wait kill", STEP_TIMEOUT, |l| is_wait_line(l, "kill"));
    let (free, total) = mem_info(&backend);
    assert_eq!(total, GIB);
    assert!(
        free <= GIB - (64 << 20),
        "a host session sees the guest hog's 64 MiB as used (free {free})"
    );
    vm.release("kill", STEP_TIMEOUT);

    // SIGKILL in the guest: vgpu-guestd must close its session on the host,
    // while the VM, and so QEMU's connection to the backend, stays up.
    vm.wait_for_step("hog-killed", STEP_TIMEOUT);
    let freed = wait_until_slice_is_free(&backend, "the killed guest client's memory to be freed");
    assert_eq!(freed, GIB);
    vm.release("freed", STEP_TIMEOUT);

    let outcome = vm.wait_for_result();
    print_timings(&outcome);
    outcome.assert_passed();
    assert_client_passed(&outcome, "client");
    assert_eq!(
        labelled(&outcome, "meminfo")
            .into_iter()
            .find(|l| l.starts_with("MEMINFO")),
        Some(format!("MEMINFO free={GIB} total={GIB}").as_str()),
        "the guest sees the whole slice free again\n{}",
        outcome.console
    );
}

const TWO_CLIENTS: &str = r#". /lib/vgpu/test-lib.sh
start_guestd
mkfifo /tmp/in1 /tmp/in2
run_labelled c1 driver_api_client --shared --pause </tmp/in1 &
p1=$!
run_labelled c2 driver_api_client --shared --pause </tmp/in2 &
p2=$!
exec 3>/tmp/in1 4>/tmp/in2
both_paused() {
    grep -q '^PAUSED' /tmp/c1.out && grep -q '^PAUSED' /tmp/c2.out
}
wait_until 300 "both clients to pause" both_paused
host_wait go
echo go >&3
echo go >&4
exec 3>&- 4>&-
wait "$p1"
r1=$?
wait "$p2"
r2=$?
[ "$r1" = 0 ] || die "client 1 exited with status $r1"
[ "$r2" = 0 ] || die "client 2 exited with status $r2"
guestd_alive
"#;

/// Acceptance 2: two processes in one guest use the device at once, each in
/// its own session, and both pass.
#[test]
fn two_guest_processes_use_the_device_at_once() {
    let Some(images) = vm_images_or_skip("two_guest_processes_use_the_device_at_once") else {
        return;
    };
    let backend = BackendProcess::spawn_emulated(GIB);
    let files = GuestFiles::new()
        .guestd()
        .libcuda()
        .c_program("driver_api_client")
        .test("two_clients", &format!("{CLIENT_ENV}{TWO_CLIENTS}"));
    let mut vm = boot(&images, &files, &backend, "two_clients");

    // Both guest clients hold 8 MiB each in their own sessions on the host.
    vm.wait_for_line("host_wait go", STEP_TIMEOUT, |l| is_wait_line(l, "go"));
    let (free, total) = mem_info(&backend);
    assert_eq!(total, GIB);
    assert!(
        free <= GIB - (16 << 20),
        "a host session sees both guest clients' allocations (free {free})"
    );
    vm.release("go", STEP_TIMEOUT);

    let outcome = vm.wait_for_result();
    print_timings(&outcome);
    outcome.assert_passed();
    let a = assert_client_passed(&outcome, "c1");
    let b = assert_client_passed(&outcome, "c2");
    assert_eq!(a, b, "both clients ran every check");
    wait_until_slice_is_free(&backend, "both guest clients' memory to be freed");
}

const ZERO_COPY: &str = r#". /lib/vgpu/test-lib.sh
start_guestd
run_labelled huge env VGPU_HUGEPAGES=1 driver_api_client || die "driver_api_client (huge pages) exited with status $rc"
wait_until 60 "the first client to leave" grep -q ' clients=1 clients_now=0 ' "$GUESTD_STATS"
echo "STATS-HUGE $(cat "$GUESTD_STATS")"
run_labelled plain env VGPU_HUGEPAGES=0 driver_api_client || die "driver_api_client (normal pages) exited with status $rc"
wait_until 60 "the second client to leave" grep -q ' clients=2 clients_now=0 ' "$GUESTD_STATS"
echo "STATS-PLAIN $(cat "$GUESTD_STATS")"
guestd_alive
"#;

/// `key=value` from a guestd stats line.
fn stat(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in the stats line {line:?}"))
}

/// Acceptance 4 (functional, not performance): a client whose memory is on
/// huge pages has every copy passed to the device by physical address, with
/// no byte bounced by vgpu-guestd; one on normal pages is bounced.
#[test]
fn guestd_bounces_nothing_for_hugepage_clients() {
    let Some(images) = vm_images_or_skip("guestd_bounces_nothing_for_hugepage_clients") else {
        return;
    };
    let backend = BackendProcess::spawn_emulated(GIB);
    let files = GuestFiles::new()
        .guestd()
        .libcuda()
        .c_program("driver_api_client")
        .test("zero_copy", &format!("{CLIENT_ENV}{ZERO_COPY}"));
    let vm = boot(&images, &files, &backend, "zero_copy");
    let outcome = vm.wait_for_result();
    print_timings(&outcome);
    outcome.assert_passed();
    assert_client_passed(&outcome, "huge");
    assert_client_passed(&outcome, "plain");
    let huge = outcome.lines_starting_with("STATS-HUGE ");
    let plain = outcome.lines_starting_with("STATS-PLAIN ");
    assert_eq!((huge.len(), plain.len()), (1, 1), "{}", outcome.console);
    let (huge, plain) = (huge[0], plain[0]);
    println!("{huge}\n{plain}");
    assert_eq!(
        stat(huge, "bounced_bytes"),
        0,
        "a hugepage client's copies are never bounced: {huge}"
    );
    assert!(
        stat(huge, "zero_copy_bytes") > 0,
        "a hugepage client's copies went by physical address: {huge}"
    );
    assert!(
        stat(plain, "bounced_bytes") > 0,
        "a normal-page client's copies are bounced (the counter works): {plain}"
    );
}

const GUESTD_KILLED: &str = r#". /lib/vgpu/test-lib.sh
start_guestd
mem_hog 67108864 1048576 >/tmp/hog.out 2>&1 &
hog=$!
wait_until 300 "mem_hog to allocate" grep -q '^ALLOCATED' /tmp/hog.out
host_wait kill-guestd
kill -9 "$GUESTD_PID"
kill -9 "$hog"
wait 2>/dev/null
start_guestd
host_wait freed
run_labelled meminfo mem_info || die "mem_info exited with status $rc"
guestd_alive
"#;

/// A guestd killed with SIGKILL cannot close its clients' sessions; the
/// next guestd resets the device, QEMU stops the rings, and the backend
/// frees what the dead guestd's clients held, while the VM stays up.
#[test]
fn sessions_of_a_killed_guestd_are_freed_when_the_device_is_reset() {
    let test = "sessions_of_a_killed_guestd_are_freed_when_the_device_is_reset";
    let Some(images) = vm_images_or_skip(test) else {
        return;
    };
    let backend = BackendProcess::spawn_emulated(GIB);
    let files = GuestFiles::new()
        .guestd()
        .libcuda()
        .c_program("mem_hog")
        .c_program("mem_info")
        .test("guestd_killed", &format!("{CLIENT_ENV}{GUESTD_KILLED}"));
    let mut vm = boot(&images, &files, &backend, "guestd_killed");
    vm.wait_for_line("host_wait kill-guestd", STEP_TIMEOUT, |l| {
        is_wait_line(l, "kill-guestd")
    });
    let (free, _) = mem_info(&backend);
    assert!(
        free <= GIB - (64 << 20),
        "the guest hog's 64 MiB is in use on the host (free {free})"
    );
    vm.release("kill-guestd", STEP_TIMEOUT);
    vm.wait_for_line("host_wait freed", STEP_TIMEOUT, |l| {
        is_wait_line(l, "freed")
    });
    let freed = wait_until_slice_is_free(&backend, "the dead guestd's sessions to be freed");
    assert_eq!(freed, GIB);
    vm.release("freed", STEP_TIMEOUT);
    let outcome = vm.wait_for_result();
    print_timings(&outcome);
    outcome.assert_passed();
    assert!(
        backend.log().contains("Submission queue stopped"),
        "the backend freed the sessions because the ring stopped\n{}",
        backend.log()
    );
}
