//! Ledger crash safety end to end: the real `vgpu-scheduler` binary is SIGKILLed at
//! pseudo-random points while a backend-like thread streams usage reports to it through the
//! real `Reporter`, and restarted on the same state directory each time. In the end the ledger
//! holds every report exactly once: nothing lost, nothing counted twice.
#![allow(clippy::unwrap_used)]
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vgpu_ledger::stress::synthetic_report;
use vgpu_ledger::{Ledger, Reporter, Totals};

/// Reports streamed.
const COUNT: u64 = 600;
/// Times the scheduler is killed.
const KILLS: usize = 8;
const BACKEND: &str = "crash-1-1";

/// splitmix64 with a fixed seed, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// Polls `f` every 5 ms until it returns `Some`, for at most 60 s.
fn wait_until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn healthy(sock: &Path) -> bool {
    let Ok(mut s) = UnixStream::connect(sock) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let sent = s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut text = String::new();
    sent.is_ok() && s.read_to_string(&mut text).is_ok() && text.starts_with("HTTP/1.1 200")
}

fn start(state: &Path, config: &Path) -> Child {
    let child = Command::new(env!("CARGO_BIN_EXE_vgpu-scheduler"))
        .arg("--config")
        .arg(config)
        .arg("--state-dir")
        .arg(state)
        .args([
            "--backend",
            "/bin/false",
            "--device",
            "emulated",
            "--log",
            "error",
        ])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let sock = state.join("api.sock");
    wait_until("the scheduler to answer", || healthy(&sock).then_some(()));
    child
}

#[test]
fn scheduler_killed_at_random_points_loses_and_doubles_no_report() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let config = dir.path().join("vgpu.toml");
    std::fs::write(&config, "slice = []\n").unwrap();
    let socket: PathBuf = state.join("api.sock");
    let mut scheduler = start(&state, &config);

    // The backend: pushes one report per interval and flushes; on an error it keeps going and
    // flushes again with the next report, as a backend would.
    let pushed = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let backend = {
        let (pushed, errors, done) = (Arc::clone(&pushed), Arc::clone(&errors), Arc::clone(&done));
        let reporter = Reporter::new(&socket, BACKEND).with_timeout(Duration::from_secs(5));
        std::thread::spawn(move || {
            for seq in 1..=COUNT {
                assert_eq!(reporter.push(synthetic_report(BACKEND, seq)), seq);
                pushed.store(seq, Ordering::SeqCst);
                if reporter.flush().is_err() {
                    errors.fetch_add(1, Ordering::SeqCst);
                    // The scheduler is down: the next interval comes a little later.
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
            // The last reports: flush until the scheduler has them all.
            let start = Instant::now();
            while reporter.pending() > 0 {
                assert!(
                    start.elapsed() < Duration::from_secs(60),
                    "reports left queued"
                );
                if reporter.flush().is_err() {
                    errors.fetch_add(1, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
            assert_eq!(reporter.dropped(), 0);
            done.store(true, Ordering::SeqCst);
        })
    };

    // Kill points: pseudo-random report counts, in order, spread over the stream.
    let mut rng = Rng(0x5eed_0000_1e06);
    let mut points: Vec<u64> = (0..KILLS).map(|_| 1 + rng.next() % (COUNT - 50)).collect();
    points.sort_unstable();
    for point in points {
        wait_until("the backend to reach the kill point", || {
            (pushed.load(Ordering::SeqCst) >= point || done.load(Ordering::SeqCst)).then_some(())
        });
        // SAFETY: kill(2) on the scheduler this test started and has not reaped.
        unsafe { libc::kill(i32::try_from(scheduler.id()).unwrap(), libc::SIGKILL) };
        let status = scheduler.wait().unwrap();
        assert!(!status.success(), "the scheduler was killed: {status}");
        scheduler = start(&state, &config);
    }
    backend.join().unwrap();
    assert!(
        errors.load(Ordering::SeqCst) > 0,
        "the kills were never noticed by the backend"
    );

    // Stop the scheduler, then read the ledger: every report once, totals exact.
    // SAFETY: as above.
    unsafe { libc::kill(i32::try_from(scheduler.id()).unwrap(), libc::SIGTERM) };
    assert!(scheduler.wait().unwrap().success());
    let ledger = Ledger::open(&state).unwrap();
    let (records, _) = ledger.export_since(0, usize::MAX).unwrap();
    let seqs: Vec<u64> = records.iter().map(|r| r.report.seq).collect();
    assert_eq!(
        seqs,
        (1..=COUNT).collect::<Vec<_>>(),
        "each report exactly once, in order"
    );
    for r in &records {
        assert_eq!(r.report, synthetic_report(BACKEND, r.report.seq));
    }
    let mut expected = Totals::default();
    for seq in 1..=COUNT {
        expected.add(&synthetic_report(BACKEND, seq));
    }
    assert_eq!(ledger.totals(None, 0, u64::MAX).unwrap(), expected);
    assert_eq!(ledger.last_seq(BACKEND).unwrap(), Some(COUNT));
}
