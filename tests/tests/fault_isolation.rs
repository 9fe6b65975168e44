//! Fault isolation end to end on the emulated device: a tenant whose kernel faults gets the
//! sticky error exactly as with native CUDA, and only its own worker process ends (on a real
//! GPU the fault costs the whole process its CUDA state), while other guests of the same slice
//! and the other slice keep running; a guest whose worker is killed gets
//! `CUDA_ERROR_DEVICE_UNAVAILABLE` while its neighbours never notice; and a slice whose whole
//! backend is killed gets `CUDA_ERROR_DEVICE_UNAVAILABLE` (never a hang), is restarted by the
//! scheduler and works again, while the other slice never notices.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use vgpu_tests::{
    build_c_program, client_command, poll_until, BackendProcess, Client, SchedulerProcess,
};

/// Each synthetic kernel of the steady tenants, microseconds.
const KERNEL_US: u64 = 200;
/// Bound on anything a test waits for.
const WAIT: Duration = Duration::from_secs(60);

fn ptx(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("ptx").join(name)
}

/// A steady tenant (`spin_worker`) on `socket`, set up and running.
fn start_worker(socket: &Path) -> Client {
    let mut cmd = client_command(&build_c_program("spin_worker"), socket);
    cmd.arg(ptx("vgpu_timed_spin.ptx"))
        .arg(KERNEL_US.to_string());
    let mut worker = Client::spawn(cmd);
    worker.wait_for_line("READY", WAIT);
    worker
}

/// Kernels the worker has completed so far.
fn kernels_done(worker: &mut Client) -> u64 {
    worker.send_line("report");
    let line = worker.wait_for_line("COUNT", WAIT);
    line["COUNT ".len()..]
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("Bad line {line:?}: {e}"))
}

/// Waits until the worker completes kernels beyond those it had done before this call:
/// it is still running, with no error.
fn assert_still_progressing(worker: &mut Client, what: &str) {
    let before = kernels_done(worker);
    poll_until(WAIT, what, || (kernels_done(worker) > before).then_some(()));
}

/// Stops the worker and checks it saw no error at all.
fn stop_worker(mut worker: Client) -> u64 {
    worker.send_line("stop");
    let out = worker.wait(WAIT);
    out.assert_passed();
    let line = out
        .stdout
        .lines()
        .find(|l| l.starts_with("KERNELS"))
        .unwrap_or_else(|| panic!("No KERNELS line\n{}", out.transcript()));
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields.get(3), Some(&"0"), "errors: {line}");
    fields[1]
        .parse()
        .unwrap_or_else(|e| panic!("Bad line {line:?}: {e}"))
}

#[test]
fn a_faulting_kernel_ends_only_its_own_session_and_its_neighbours_keep_running() {
    let sched = SchedulerProcess::spawn(&two_slices());
    let victim_socket = sched.wait_for_slice("victim");
    let other_socket = sched.wait_for_slice("other");
    let mut bystander = start_worker(&other_socket);
    // Another guest process on the faulting tenant's own slice.
    let mut neighbour = start_worker(&victim_socket);
    let (pid, restarts_before) = slice_backend(&sched, "victim");
    let pid = pid.unwrap_or_else(|| panic!("Slice victim has no backend pid\n{}", sched.log()));

    for (kind, rc) in [(0, 700), (1, 719)] {
        let mut cmd = client_command(&build_c_program("fault_client"), &victim_socket);
        cmd.arg(ptx("vgpu_fault.ptx"))
            .arg(ptx("vgpu_timed_spin.ptx"))
            .arg(kind.to_string());
        let mut faulter = Client::spawn(cmd);
        faulter.wait_for_line("READY", WAIT);
        assert_still_progressing(&mut neighbour, "the neighbour to run before the fault");
        faulter.send_line("go");
        let out = faulter.wait(WAIT);
        println!("{}", out.transcript());
        // The faulting guest sees the sticky error exactly as native CUDA reports it: at the
        // next synchronize, then from every call in that context.
        out.assert_passed();
        assert!(
            out.stdout.contains(&format!("FAULTED kind={kind} rc={rc}")),
            "kind {kind} surfaced {rc} at the next synchronize\n{}",
            out.transcript()
        );
        // The fault cost only its own worker process its CUDA state (as on a real GPU): a new
        // guest process of the same tenant works at once, on a fresh worker.
        let mut again = start_worker(&victim_socket);
        assert_still_progressing(&mut again, "a new guest of the faulting tenant");
        stop_worker(again);
        assert_still_progressing(
            &mut neighbour,
            "the neighbour on the same slice after the fault",
        );
    }

    // The neighbour on the same slice and the other slice ran throughout with no error, and
    // no backend was restarted.
    assert_still_progressing(&mut bystander, "the other slice to run after the faults");
    stop_worker(neighbour);
    stop_worker(bystander);
    assert_eq!(
        slice_backend(&sched, "victim"),
        (Some(pid), restarts_before),
        "{}",
        sched.log()
    );
    assert_eq!(slice_backend(&sched, "other").1, 0, "{}", sched.log());
}

/// A process's start time (clock ticks after boot), from `/proc/PID/stat`.
fn start_time(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which ends with the last ')'): state is field 3,
    // starttime field 22.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(19))
        .and_then(|t| t.parse().ok())
        .unwrap_or(u64::MAX)
}

/// The worker serving the only connected guest: with one guest connected, the backend has two
/// workers, and the one serving is the older (the warm one was started when it took the
/// connection).
fn serving_worker(pid: u64) -> Option<i32> {
    let workers = vgpu_tests::children_of(pid as u32);
    if workers.len() != 2 {
        return None;
    }
    workers.into_iter().min_by_key(|w| start_time(*w))
}

#[test]
fn a_killed_worker_gives_only_its_guest_device_unavailable() {
    let sched = SchedulerProcess::spawn(&two_slices());
    let victim_socket = sched.wait_for_slice("victim");
    let (pid, restarts_before) = slice_backend(&sched, "victim");
    let pid = pid.unwrap_or_else(|| panic!("Slice victim has no backend pid\n{}", sched.log()));

    let mut cmd = client_command(&build_c_program("backend_loss_client"), &victim_socket);
    cmd.arg("5000");
    let mut victim = Client::spawn(cmd);
    victim.wait_for_line("READY", WAIT);
    let serving = poll_until(WAIT, "the victim's worker and a warm one", || {
        serving_worker(pid)
    });
    let mut neighbour = start_worker(&victim_socket);
    // SAFETY: kill(2) on the worker process serving the victim guest.
    assert_eq!(unsafe { libc::kill(serving, libc::SIGKILL) }, 0);
    vgpu_tests::wait_until_exited(&[serving], WAIT);

    victim.send_line("go");
    let out = victim.wait(WAIT);
    println!("{}", out.transcript());
    out.assert_passed();
    let lost = out
        .stdout
        .lines()
        .filter(|l| l.starts_with("PASS") && l.contains("after the backend died"))
        .count();
    assert_eq!(lost, 5, "every call returned 46\n{}", out.transcript());

    // Its neighbour on the same slice never noticed, and the slice's backend did not restart.
    assert_still_progressing(&mut neighbour, "the neighbour on the same slice");
    stop_worker(neighbour);
    let mut reconnected = start_worker(&victim_socket);
    assert_still_progressing(&mut reconnected, "a new guest of the same tenant");
    stop_worker(reconnected);
    assert_eq!(
        slice_backend(&sched, "victim"),
        (Some(pid), restarts_before),
        "{}",
        sched.log()
    );
}

fn two_slices() -> String {
    let slice = |name: &str| {
        format!(
            "[[slice]]\nname = \"{name}\"\ntenant = \"t-{name}\"\nclass = \"best-effort\"\n\
             compute_guarantee_pct = 50\nmemory_limit = \"1GiB\"\nattach = true\n\n"
        )
    };
    format!(
        "device = \"emulated\"\n\n[[gpu]]\nindex = 0\nmemory = \"8GiB\"\n\n{}{}",
        slice("victim"),
        slice("other")
    )
}

/// The unsigned integer field `key` of a flat JSON object.
fn json_u64(body: &str, key: &str) -> Option<u64> {
    let at = body.find(&format!("\"{key}\":"))? + key.len() + 3;
    let digits: String = body[at..]
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// (backend pid, restarts) of a slice, from the scheduler's API.
fn slice_backend(sched: &SchedulerProcess, name: &str) -> (Option<u64>, u64) {
    let (status, body) = sched
        .request("GET", &format!("/v1/slices/{name}"), None)
        .unwrap_or_else(|| panic!("The scheduler's API does not answer\n{}", sched.log()));
    assert_eq!(status, 200, "GET /v1/slices/{name}: {body}");
    let restarts = json_u64(&body, "restarts").unwrap_or_else(|| panic!("No restarts in {body}"));
    (json_u64(&body, "backend_pid").filter(|&p| p != 0), restarts)
}

#[test]
fn a_killed_backend_gives_its_guest_device_unavailable_and_is_restarted_while_the_other_slice_runs()
{
    let sched = SchedulerProcess::spawn(&two_slices());
    let victim_socket = sched.wait_for_slice("victim");
    let other_socket = sched.wait_for_slice("other");
    let mut bystander = start_worker(&other_socket);

    let mut cmd = client_command(&build_c_program("backend_loss_client"), &victim_socket);
    cmd.arg("5000");
    let mut victim = Client::spawn(cmd);
    victim.wait_for_line("READY", WAIT);

    let (pid, restarts_before) = slice_backend(&sched, "victim");
    let pid = pid.unwrap_or_else(|| panic!("Slice victim has no backend pid\n{}", sched.log()));
    let workers = vgpu_tests::children_of(pid as u32);
    let pid = i32::try_from(pid).unwrap();
    // SAFETY: kill(2) on the victim slice's backend, a live process the scheduler started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    // Its worker processes die with it.
    vgpu_tests::wait_until_exited(&workers, WAIT);

    // The guest gets DEVICE_UNAVAILABLE from every call, in bounded time.
    victim.send_line("go");
    let out = victim.wait(WAIT);
    println!("{}", out.transcript());
    out.assert_passed();
    let lost = out
        .stdout
        .lines()
        .filter(|l| l.starts_with("PASS") && l.contains("after the backend died"))
        .count();
    assert_eq!(lost, 5, "every call returned 46\n{}", out.transcript());

    // The scheduler restarts the backend; a new guest process works again.
    let new_pid = poll_until(WAIT, "the victim's backend to be restarted", || {
        let (now, restarts) = slice_backend(&sched, "victim");
        now.filter(|&p| p != pid as u64 && restarts > restarts_before)
    });
    poll_until(WAIT, "the restarted backend to accept connections", || {
        UnixStream::connect(&victim_socket).ok()
    });
    eprintln!("victim backend {pid} was restarted as {new_pid}");
    let mut reconnected = start_worker(&victim_socket);
    assert_still_progressing(&mut reconnected, "a new guest of the restarted backend");
    stop_worker(reconnected);

    // The other slice's tenant ran throughout with no error, and its backend never restarted.
    assert_still_progressing(&mut bystander, "the other slice to keep running");
    stop_worker(bystander);
    assert_eq!(slice_backend(&sched, "other").1, 0, "{}", sched.log());
}

/// Sticky and asynchronous errors belong to their context: another context's calls never
/// return them, and `cuCtxDestroy` of the poisoned context is still sent to the backend,
/// succeeds and frees the context's memory.
#[test]
fn a_sticky_error_stays_with_its_context_and_destroying_it_frees_it() {
    let backend = BackendProcess::spawn_with_args(
        "emulated",
        1 << 30,
        // The backend would stop 200 ms after the fault (as it must on a real GPU); this test
        // checks the guest library's per-context bookkeeping, which needs longer.
        &["--fault-restart-ms", "30000"],
    );
    let mut cmd = backend.client(&build_c_program("sticky_cross_context"));
    cmd.arg(ptx("vgpu_fault.ptx"))
        .arg(ptx("vgpu_timed_spin.ptx"));
    let out = Client::spawn(cmd).wait(WAIT);
    println!("{}", out.transcript());
    out.assert_passed();
}
