//! Counters: how many copy bytes went to the device by physical address
//! and how many were bounced, shown on SIGUSR1 and at exit and written to
//! a stats file (`zero_copy_bytes=N bounced_bytes=M ...`, one line) that
//! tests read.

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// The relay's counters.
#[derive(Debug, Default)]
pub struct Stats {
    zero_copy_bytes: AtomicU64,
    bounced_bytes: AtomicU64,
    requests: AtomicU64,
    clients: AtomicU64,
    clients_now: AtomicU64,
    sessions_closed: AtomicU64,
    /// Bumped on every change, so writers can skip unchanged states.
    version: AtomicU64,
}

/// A copy of the counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Copy bytes passed by physical address.
    pub zero_copy_bytes: u64,
    /// Copy bytes bounced through DMA memory.
    pub bounced_bytes: u64,
    /// Client requests handled.
    pub requests: u64,
    /// Clients that have connected.
    pub clients: u64,
    /// Clients connected now.
    pub clients_now: u64,
    /// Sessions closed because their client went away.
    pub sessions_closed: u64,
}

impl Snapshot {
    /// The stats line (`key=value` pairs separated by spaces).
    pub fn line(&self) -> String {
        format!(
            "zero_copy_bytes={} bounced_bytes={} requests={} clients={} clients_now={} \
             sessions_closed_on_disconnect={}",
            self.zero_copy_bytes,
            self.bounced_bytes,
            self.requests,
            self.clients,
            self.clients_now,
            self.sessions_closed
        )
    }
}

impl Stats {
    fn bump(&self, counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
        self.version.fetch_add(1, Ordering::Release);
    }

    /// Records bytes of a copy: passed directly and bounced.
    pub fn copied(&self, direct: u64, bounced: u64) {
        self.zero_copy_bytes.fetch_add(direct, Ordering::Relaxed);
        self.bump(&self.bounced_bytes, bounced);
    }

    /// Records a client request.
    pub fn request(&self) {
        self.bump(&self.requests, 1);
    }

    /// Records a client connecting.
    pub fn client_connected(&self) {
        self.clients.fetch_add(1, Ordering::Relaxed);
        self.bump(&self.clients_now, 1);
    }

    /// Records a client leaving, and the sessions closed for it.
    pub fn client_gone(&self, sessions_closed: u64) {
        self.clients_now.fetch_sub(1, Ordering::Relaxed);
        self.bump(&self.sessions_closed, sessions_closed);
    }

    /// Changes so far (compare to see whether anything moved).
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// The counters now.
    pub fn snapshot(&self) -> Snapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Snapshot {
            zero_copy_bytes: get(&self.zero_copy_bytes),
            bounced_bytes: get(&self.bounced_bytes),
            requests: get(&self.requests),
            clients: get(&self.clients),
            clients_now: get(&self.clients_now),
            sessions_closed: get(&self.sessions_closed),
        }
    }

    /// Writes the stats line to `path` atomically (temporary file, rename).
    pub fn write_file(&self, path: &Path) -> io::Result<()> {
        let tmp = path.with_extension("stats.tmp");
        std::fs::write(&tmp, format!("{}\n", self.snapshot().line()))?;
        std::fs::rename(&tmp, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_add_up_and_every_change_bumps_the_version() {
        let s = Stats::default();
        let v0 = s.version();
        s.copied(4096, 0);
        s.copied(10, 20);
        s.request();
        s.client_connected();
        s.client_connected();
        s.client_gone(3);
        assert!(s.version() >= v0 + 6);
        let snap = s.snapshot();
        assert_eq!(snap.zero_copy_bytes, 4106);
        assert_eq!(snap.bounced_bytes, 20);
        assert_eq!((snap.clients, snap.clients_now), (2, 1));
        assert_eq!(snap.sessions_closed, 3);
        assert!(snap
            .line()
            .starts_with("zero_copy_bytes=4106 bounced_bytes=20 requests=1 "));
    }

    #[test]
    fn stats_file_holds_one_line() {
        let s = Stats::default();
        s.copied(1, 2);
        let path = std::env::temp_dir().join(format!("vgpu-guestd-{}.stats", std::process::id()));
        s.write_file(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 1);
        assert!(text.contains("zero_copy_bytes=1 bounced_bytes=2"));
        std::fs::remove_file(&path).unwrap();
    }
}
