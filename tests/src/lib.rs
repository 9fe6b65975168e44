//! Shared helpers for the end-to-end tests.
//!
//! The tests run the real pieces as separate processes: the `vgpu-backend`
//! binary, and client programs (C programs built here with `cc` against our
//! `cuda.h`, and a Rust program on cudarc) whose `libcuda.so.1` is the guest
//! library built by the workspace. Everything is found next to the test
//! executable in `target/<profile>/`; `scripts/test.sh` builds it first.
//!
//! Nothing here sleeps for a fixed time: every wait polls a condition under
//! a deadline, and every child process is killed when its owner is dropped.

pub mod artifacts;
pub mod backend;
pub mod client;
pub mod raw;
pub mod scheduler;
pub mod tempdir;
pub mod vm;

use std::thread;
use std::time::{Duration, Instant};

pub use artifacts::{artifacts, build_c_program, c_dir, profile_dir, Artifacts};
pub use backend::BackendProcess;
pub use client::{
    client_command, describe_status, mem_info, parse_mem_info, run_client, Client, ClientOutput,
};
pub use scheduler::SchedulerProcess;
pub use tempdir::{unique_suffix, TempDir};

/// How long a backend may take to accept connections after it starts.
pub const BACKEND_START_TIMEOUT: Duration = Duration::from_secs(30);
/// The interval at which conditions are polled.
pub const POLL_INTERVAL: Duration = Duration::from_millis(10);
/// The default limit for a client program to run to completion.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);

/// Polls `f` every [`POLL_INTERVAL`] until it returns `Some`, or panics
/// after `timeout` with `what`.
pub fn poll_until<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = f() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "Timed out after {timeout:?} waiting for {what}"
        );
        thread::sleep(POLL_INTERVAL);
    }
}

/// The children of process `pid` (a backend's worker processes), from `/proc`.
pub fn children_of(pid: u32) -> Vec<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// True once `pid` has exited (gone, or a zombie not yet reaped).
pub fn has_exited(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

/// Waits until every process in `pids` has exited.
pub fn wait_until_exited(pids: &[i32], timeout: Duration) {
    poll_until(timeout, "the processes to exit", || {
        pids.iter().all(|&p| has_exited(p)).then_some(())
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_info_line_is_parsed() {
        assert_eq!(
            parse_mem_info("PASS x\nMEMINFO free=10 total=20\nRESULT: PASS\n"),
            Some((10, 20))
        );
        assert_eq!(parse_mem_info("MEMINFO free=10\n"), None);
        assert_eq!(parse_mem_info("nothing\n"), None);
    }

    #[test]
    fn poll_until_returns_the_first_value() {
        let mut n = 0;
        let v = poll_until(Duration::from_secs(5), "n to reach 3", || {
            n += 1;
            (n >= 3).then_some(n)
        });
        assert_eq!(v, 3);
    }

    #[test]
    #[should_panic(expected = "Timed out")]
    fn poll_until_panics_at_the_deadline() {
        poll_until(Duration::from_millis(30), "never", || None::<()>);
    }

    #[test]
    fn temp_dir_is_removed_on_drop() {
        let dir = TempDir::new("selftest");
        let path = dir.path().to_path_buf();
        assert!(path.is_dir());
        drop(dir);
        assert!(!path.exists());
    }
}
