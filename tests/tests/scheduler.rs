//! The scheduler end to end on the emulated device: a real `vgpu-scheduler` starts one real
//! `vgpu-backend` per slice, the backends share one emulated GPU (a lock file standing for the
//! physical GPU) and one grant board, and real clients keep them saturated with timed
//! synthetic kernels. GPU time must follow the slices' guarantees.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use vgpu_tests::{build_c_program, client_command, Client, SchedulerProcess};

/// How long each client keeps its slice saturated.
const RUN_SECONDS: f64 = 3.0;
/// Each synthetic kernel's duration.
const KERNEL_US: u64 = 1000;

/// The tests measure how GPU time is shared, and the emulated GPU spins on a CPU core: two of
/// them at once would measure the machine's cores, not the scheduler. One at a time.
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn spin_ptx() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("ptx/vgpu_timed_spin.ptx")
}

/// Starts one saturating client per socket together and returns each one's share of the
/// wall time spent in its kernels.
fn saturate(sockets: &[PathBuf]) -> Vec<f64> {
    let program = build_c_program("timed_spin_client");
    let mut clients: Vec<Client> = sockets
        .iter()
        .map(|socket| {
            let mut cmd = client_command(&program, socket);
            cmd.arg(spin_ptx())
                .arg(RUN_SECONDS.to_string())
                .arg(KERNEL_US.to_string());
            Client::spawn(cmd)
        })
        .collect();
    for c in &mut clients {
        c.wait_for_line("READY", Duration::from_secs(60));
    }
    for c in &mut clients {
        c.send_line("go");
    }
    clients
        .iter_mut()
        .map(|c| {
            let line = c.wait_for_line("KERNELS", Duration::from_secs(120));
            let out = c.wait(Duration::from_secs(60));
            out.assert_passed();
            let f: Vec<&str> = line.split_whitespace().collect();
            let kernels: f64 = f[1].parse().expect("kernel count");
            let kernel_ns: f64 = f[3].parse().expect("kernel ns");
            let elapsed_ns: f64 = f[5].parse().expect("elapsed ns");
            kernels * kernel_ns / elapsed_ns
        })
        .collect()
}

/// Parses "LATENCY_US p50 A p99 B max C n N" into (p50, p99, max) microseconds.
fn latency(line: &str) -> (f64, f64, f64) {
    let f: Vec<&str> = line.split_whitespace().collect();
    (
        f[2].parse().expect("p50"),
        f[4].parse().expect("p99"),
        f[6].parse().expect("max"),
    )
}

fn two_best_effort_slices(a: (&str, u32), b: (&str, u32)) -> String {
    let slice = |(name, pct): (&str, u32)| {
        format!(
            "[[slice]]\nname = \"{name}\"\ntenant = \"t-{name}\"\nclass = \"best-effort\"\n\
             compute_guarantee_pct = {pct}\nmemory_limit = \"1GiB\"\nattach = true\n\n"
        )
    };
    format!(
        "device = \"emulated\"\n\n[[gpu]]\nindex = 0\nmemory = \"8GiB\"\n\n{}{}",
        slice(a),
        slice(b)
    )
}

#[test]
fn two_saturating_best_effort_slices_get_their_guaranteed_shares() {
    let _serial = one_at_a_time();
    let sched = SchedulerProcess::spawn(&two_best_effort_slices(("big", 70), ("small", 30)));
    let sockets = [sched.wait_for_slice("big"), sched.wait_for_slice("small")];
    let shares = saturate(&sockets);
    let (big, small) = (shares[0], shares[1]);
    eprintln!("shares: big {big:.3} small {small:.3}");
    // Together they keep the one emulated GPU busy, less the per-kernel cost of a debug build
    // on a loaded machine (0.78 to 0.87 measured on a 2-core machine with a fuzzer running;
    // a scheduler that left the GPU idle between grants would fall far below)...
    assert!(
        big + small > 0.65,
        "the GPU sat idle: big {big:.3} + small {small:.3}\n{}",
        sched.log()
    );
    // ...and split it by their guarantees, within 5 points.
    let total = big + small;
    assert!(
        (big / total - 0.70).abs() <= 0.05,
        "big got {:.1}% of GPU time, guaranteed 70%\n{}",
        100.0 * big / total,
        sched.log()
    );
    assert!(
        (small / total - 0.30).abs() <= 0.05,
        "small got {:.1}% of GPU time, guaranteed 30%",
        100.0 * small / total
    );
}

#[test]
fn a_slice_alone_borrows_the_whole_gpu() {
    let _serial = one_at_a_time();
    let sched = SchedulerProcess::spawn(&two_best_effort_slices(("busy", 30), ("idle", 70)));
    let socket = sched.wait_for_slice("busy");
    sched.wait_for_slice("idle");
    let share = saturate(&[socket])[0];
    assert!(
        // More than twice its 30 % guarantee: it borrowed the idle slice's share (0.72 to
        // 0.94 measured, depending on the machine's load).
        share > 0.60,
        "a 30% slice alone on the GPU got only {:.1}% of it",
        100.0 * share
    );
}

#[test]
fn latency_critical_kernels_wait_for_at_most_one_best_effort_kernel() {
    let _serial = one_at_a_time();
    let config = "device = \"emulated\"\n\n[[gpu]]\nindex = 0\nmemory = \"8GiB\"\n\n\
        [[slice]]\nname = \"lc\"\ntenant = \"t-lc\"\nclass = \"latency-critical\"\n\
        compute_guarantee_pct = 20\nmemory_limit = \"1GiB\"\nattach = true\n\n\
        [[slice]]\nname = \"be\"\ntenant = \"t-be\"\nclass = \"best-effort\"\n\
        compute_guarantee_pct = 80\nmemory_limit = \"1GiB\"\nattach = true\n";
    let sched = SchedulerProcess::spawn(config);
    let lc_socket = sched.wait_for_slice("lc");
    let be_socket = sched.wait_for_slice("be");
    let program = build_c_program("timed_spin_client");
    // Best-effort: 2 ms kernels back to back. Latency-critical: a 200 us kernel every 5 ms.
    let mut be = {
        let mut cmd = client_command(&program, &be_socket);
        cmd.arg(spin_ptx()).arg("3").arg("2000");
        Client::spawn(cmd)
    };
    let mut lc = {
        let mut cmd = client_command(&program, &lc_socket);
        cmd.arg(spin_ptx()).arg("3").arg("200").arg("5000");
        Client::spawn(cmd)
    };
    be.wait_for_line("READY", Duration::from_secs(60));
    lc.wait_for_line("READY", Duration::from_secs(60));
    be.send_line("go");
    lc.send_line("go");
    let be_line = be.wait_for_line("KERNELS", Duration::from_secs(120));
    let lc_line = lc.wait_for_line("LATENCY_US", Duration::from_secs(120));
    be.wait(Duration::from_secs(60)).assert_passed();
    lc.wait(Duration::from_secs(60)).assert_passed();
    let (p50, p99, max) = latency(&lc_line);
    let f: Vec<&str> = be_line.split_whitespace().collect();
    let be_share = f[1].parse::<f64>().expect("kernel count")
        * f[3].parse::<f64>().expect("kernel ns")
        / f[5].parse::<f64>().expect("elapsed ns");
    eprintln!("lc latency p50 {p50:.0} us p99 {p99:.0} us max {max:.0} us; be share {be_share:.3}");
    // A latency-critical kernel runs as soon as the best-effort kernel on the GPU ends: 200 us
    // of its own plus one 2 ms best-effort kernel, plus a debug build's scheduling noise on a
    // small loaded machine (measured here: p99 2.7 to 5.4 ms while other builds ran). Without
    // the grant board the best-effort backend's queue (8 kernels, 16 ms) competes freely for
    // the GPU, and the p99 measured on the same machine was 15 ms.
    assert!(
        p99 < 200.0 + 3.0 * 2000.0,
        "latency-critical p99 {p99:.0} us: it waited for more than one best-effort kernel\n{}",
        sched.log()
    );
    // Best-effort keeps what latency-critical work leaves (4% of the GPU here).
    assert!(
        be_share > 0.70,
        "best-effort got only {:.1}% of the GPU next to a 4% latency-critical tenant",
        100.0 * be_share
    );
}
