//! Metering end to end on the emulated device: a real `vgpu-scheduler` starts a real
//! `vgpu-backend` for a slice, real clients run timed synthetic kernels on it, the backend
//! reports every session's usage to the scheduler once a second, and the ledger must hold
//! exactly what ran: the kernel count exactly, the GPU time within 2% of the kernels'
//! durations, each session on its own.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use vgpu_tests::{
    artifacts, build_c_program, client_command, poll_until, Client, SchedulerProcess, TempDir,
    BACKEND_START_TIMEOUT,
};

/// The tenant the slice bills to.
const TENANT: &str = "acme";
/// How long reports may take to reach the ledger after the clients finished (reports go
/// once a second).
const REPORT_TIMEOUT: Duration = Duration::from_secs(30);
/// timed_spin_client counts the kernels completed inside its time window, then drains one
/// more batch of this many (see tests/c/timed_spin_client.c).
const CLIENT_TAIL_BATCH: u64 = 4;

/// The emulated GPU spins on a CPU core, and the other end-to-end tests measure shares of
/// it: one at a time.
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn spin_ptx() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("ptx/vgpu_timed_spin.ptx")
}

fn one_slice_config() -> String {
    format!(
        "device = \"emulated\"\n\n[[gpu]]\nindex = 0\nmemory = \"8GiB\"\n\n\
         [[slice]]\nname = \"metered\"\ntenant = \"{TENANT}\"\nclass = \"best-effort\"\n\
         compute_guarantee_pct = 100\nmemory_limit = \"1GiB\"\nattach = true\n"
    )
}

/// What one client ran: kernels launched (all completed) and each one's duration.
#[derive(Debug, Clone, Copy)]
struct Ran {
    kernels: u64,
    kernel_ns: u64,
}

/// Runs one timed_spin_client per `(socket, kernel_us)` together for `seconds`.
fn run_clients(clients: &[(&Path, u64)], seconds: f64) -> Vec<Ran> {
    let program = build_c_program("timed_spin_client");
    let mut running: Vec<Client> = clients
        .iter()
        .map(|(socket, kernel_us)| {
            let mut cmd = client_command(&program, socket);
            cmd.arg(spin_ptx())
                .arg(seconds.to_string())
                .arg(kernel_us.to_string());
            Client::spawn(cmd)
        })
        .collect();
    for c in &mut running {
        c.wait_for_line("READY", Duration::from_secs(60));
    }
    for c in &mut running {
        c.send_line("go");
    }
    running
        .iter_mut()
        .map(|c| {
            let line = c.wait_for_line("KERNELS", Duration::from_secs(120));
            c.wait(Duration::from_secs(60)).assert_passed();
            let f: Vec<&str> = line.split_whitespace().collect();
            let counted: u64 = f[1].parse().expect("kernel count");
            assert!(counted > 0, "no kernel ran: {line}");
            Ran {
                kernels: counted + CLIENT_TAIL_BATCH,
                kernel_ns: f[3].parse().expect("kernel ns"),
            }
        })
        .collect()
}

/// A backend of our own (not the scheduler's) that reports to `sched` as `tenant`, with
/// a reporting interval of an hour: only its final report on SIGTERM can reach the ledger.
struct QuietBackend {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
    _dir: TempDir,
}

impl QuietBackend {
    fn spawn(sched: &SchedulerProcess, tenant: &str) -> QuietBackend {
        let dir = TempDir::new("quiet-backend");
        let socket = dir.path().join("vgpu.sock");
        let log = dir.path().join("backend.log");
        let out = fs::File::create(&log).expect("the backend's log file");
        let child = Command::new(&artifacts().backend)
            .arg("--socket")
            .arg(&socket)
            .args(["--device", "emulated", "--slice", "quiet"])
            .arg("--scheduler-socket")
            .arg(sched.api_socket())
            .args(["--tenant", tenant, "--usage-interval-ms", "3600000"])
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("a second log handle"))
            .stderr(out)
            .env("NO_COLOR", "1")
            .spawn()
            .expect("vgpu-backend starts");
        poll_until(BACKEND_START_TIMEOUT, "the backend's socket", || {
            std::os::unix::net::UnixStream::connect(&socket).ok()
        });
        QuietBackend {
            child,
            socket,
            log,
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then waits for a clean exit.
    fn terminate(&mut self) {
        let pid = i32::try_from(self.child.id()).expect("a pid fits an i32");
        // SAFETY: signals our own child, which has not been reaped.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let status = poll_until(Duration::from_secs(10), "the backend to exit", || {
            self.child.try_wait().expect("waitpid on the backend")
        });
        assert!(status.success(), "{status:?}\n{}", self.log());
    }
}

impl Drop for QuietBackend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One session's sums over the ledger's records.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Billed {
    records: u64,
    gpu_ns: u64,
    kernels: u64,
}

/// The tenant's records summed per session, from `GET /v1/usage?format=csv`.
fn billed(sched: &SchedulerProcess) -> BTreeMap<u64, Billed> {
    billed_to(sched, TENANT, "metered")
}

/// `tenant`'s records (all of slice `slice`) summed per session.
fn billed_to(
    sched: &SchedulerProcess,
    tenant_name: &str,
    slice_name: &str,
) -> BTreeMap<u64, Billed> {
    let (status, body) = sched
        .request(
            "GET",
            &format!("/v1/usage?tenant={tenant_name}&format=csv"),
            None,
        )
        .expect("the scheduler answers");
    assert_eq!(status, 200, "{body}");
    let mut lines = body.lines();
    let header: Vec<&str> = lines.next().expect("a CSV header").split(',').collect();
    let col = |name: &str| {
        header
            .iter()
            .position(|h| *h == name)
            .unwrap_or_else(|| panic!("no column {name} in {header:?}"))
    };
    let (tenant, slice, session, gpu_ns, kernels) = (
        col("tenant"),
        col("slice"),
        col("session"),
        col("gpu_ns"),
        col("kernels"),
    );
    let mut out: BTreeMap<u64, Billed> = BTreeMap::new();
    for line in lines.filter(|l| !l.is_empty()) {
        let f: Vec<&str> = line.split(',').collect();
        assert_eq!((f[tenant], f[slice]), (tenant_name, slice_name), "{line}");
        let b = out.entry(f[session].parse().expect("session")).or_default();
        b.records += 1;
        b.gpu_ns += f[gpu_ns].parse::<u64>().expect("gpu_ns");
        b.kernels += f[kernels].parse::<u64>().expect("kernels");
    }
    out
}

/// Polls the ledger until the kernels billed reach `kernels` in total.
fn wait_for_kernels(sched: &SchedulerProcess, kernels: u64) -> BTreeMap<u64, Billed> {
    poll_until(
        REPORT_TIMEOUT,
        &format!("{kernels} kernels in the ledger"),
        || {
            let b = billed(sched);
            (b.values().map(|s| s.kernels).sum::<u64>() >= kernels).then_some(b)
        },
    )
}

fn assert_gpu_time(billed: Billed, ran: Ran, sched: &SchedulerProcess) {
    let expected = ran.kernels * ran.kernel_ns;
    let error = (billed.gpu_ns as f64 - expected as f64) / expected as f64;
    assert!(
        error.abs() <= 0.02,
        "{} kernels of {} ns were billed {} ns of GPU time ({:+.2}%)\n{}",
        ran.kernels,
        ran.kernel_ns,
        billed.gpu_ns,
        100.0 * error,
        sched.log()
    );
}

#[test]
fn timed_kernels_are_billed_exactly_and_their_gpu_time_within_two_percent() {
    let _serial = one_at_a_time();
    let sched = SchedulerProcess::spawn(&one_slice_config());
    let socket = sched.wait_for_slice("metered");
    let ran = run_clients(&[(&socket, 1000)], 1.5)[0];
    let billed = wait_for_kernels(&sched, ran.kernels);
    eprintln!("ran {ran:?}; billed {billed:?}");
    assert_eq!(billed.len(), 1, "one client is one session: {billed:?}");
    let (_, session) = billed.into_iter().next().expect("one session");
    assert_eq!(session.kernels, ran.kernels, "kernels billed");
    assert_gpu_time(session, ran, &sched);
    // Reports go once a second: a 1.5 s run spans more than one.
    assert!(session.records >= 2, "{session:?}");
}

#[test]
fn two_clients_on_one_slice_are_billed_as_separate_sessions() {
    let _serial = one_at_a_time();
    let sched = SchedulerProcess::spawn(&one_slice_config());
    let socket = sched.wait_for_slice("metered");
    // Different kernel durations tell the sessions apart.
    let ran = run_clients(&[(&socket, 2000), (&socket, 5000)], 1.0);
    let billed = wait_for_kernels(&sched, ran.iter().map(|r| r.kernels).sum());
    eprintln!("ran {ran:?}; billed {billed:?}");
    assert_eq!(billed.len(), 2, "two clients are two sessions: {billed:?}");
    for r in ran {
        // The session whose mean kernel time is nearest this client's kernels.
        let (_, session) = billed
            .iter()
            .filter(|(_, b)| b.kernels > 0)
            .min_by_key(|(_, b)| (b.gpu_ns / b.kernels).abs_diff(r.kernel_ns))
            .unwrap_or_else(|| panic!("no session ran kernels: {billed:?}"));
        assert_eq!(session.kernels, r.kernels, "kernels billed for {r:?}");
        assert_gpu_time(*session, r, &sched);
    }
}

#[test]
fn a_backend_stopped_with_sigterm_sends_its_last_report() {
    let _serial = one_at_a_time();
    let sched = SchedulerProcess::spawn(&one_slice_config());
    let mut backend = QuietBackend::spawn(&sched, "quiet-tenant");
    let ran = run_clients(&[(&backend.socket, 1000)], 0.5)[0];
    // The interval is an hour: nothing was reported yet.
    assert!(billed_to(&sched, "quiet-tenant", "quiet").is_empty());
    backend.terminate();
    let billed = billed_to(&sched, "quiet-tenant", "quiet");
    eprintln!("ran {ran:?}; billed {billed:?}");
    let total: u64 = billed.values().map(|b| b.kernels).sum();
    assert_eq!(total, ran.kernels, "{billed:?}\n{}", backend.log());
    let (_, session) = billed.into_iter().next().expect("one session");
    assert_eq!(session.records, 1);
    assert_gpu_time(session, ran, &sched);
}
