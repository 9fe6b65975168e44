//! Sends the sessions' usage to the scheduler's ledger: a thread that, every
//! interval (1 s), turns each session's [`crate::metering::Figures`] into a
//! [`UsageReport`] and hands them to a [`Reporter`], which numbers, queues
//! and POSTs them until the scheduler has them durable.
//!
//! - One report per session that used something in the interval (GPU time,
//!   copies, kernels, or memory resident); every report of one interval has
//!   the same start and end. A session that closed during the interval
//!   reports its final figures with it. No session-0 reports: every figure
//!   the backend measures belongs to a session.
//! - A flush that fails is logged; its reports stay queued and go with the
//!   next flush.
//! - [`UsageReporting::stop`] (the backend is stopping, after its sessions
//!   were closed) reports the last, partial interval and flushes once more.

use std::path::PathBuf;
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use vgpu_board::monotonic_ns;
use vgpu_ledger::{Reporter, UsageReport};

use crate::metering::MeterRegistry;

/// The default reporting interval.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);

/// Where and as whom a backend reports its usage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeteringConfig {
    /// The scheduler's API socket (`$STATE_DIR/api.sock`).
    pub scheduler_socket: PathBuf,
    /// The tenant the slice belongs to.
    pub tenant: String,
    /// How often reports are sent.
    pub interval: Duration,
}

/// Unix time now, in nanoseconds.
pub fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Builds one interval's reports.
struct Interval {
    registry: Arc<MeterRegistry>,
    tenant: String,
    slice: String,
    start_unix_ns: u64,
}

impl Interval {
    /// The reports of the interval ending now; the next one starts here.
    fn close(&mut self) -> Vec<UsageReport> {
        let now = monotonic_ns();
        let end_unix_ns = unix_ns().max(self.start_unix_ns);
        let start_unix_ns = std::mem::replace(&mut self.start_unix_ns, end_unix_ns);
        self.registry
            .collect(now)
            .into_iter()
            .map(|(session, f)| UsageReport {
                // Filled in by Reporter::push.
                backend: String::new(),
                seq: 0,
                tenant: self.tenant.clone(),
                slice: self.slice.clone(),
                session,
                start_unix_ns,
                end_unix_ns,
                gpu_ns: f.gpu_ns,
                mem_resident_byte_ns: f.mem_resident_byte_ns,
                mem_swapped_byte_ns: f.mem_swapped_byte_ns,
                htod_bytes: f.htod_bytes,
                dtoh_bytes: f.dtoh_bytes,
                kernels: f.kernels,
            })
            .collect()
    }
}

/// Remembers whether the scheduler was reachable, so a scheduler that is
/// down is logged once, not every second.
#[derive(Default)]
struct FlushLog {
    failing: bool,
}

impl FlushLog {
    fn flush(&mut self, reporter: &Reporter) {
        match reporter.flush() {
            Ok(acked) => {
                if self.failing {
                    tracing::info!(acked, "Usage reports reach the scheduler again");
                }
                self.failing = false;
            }
            Err(e) => {
                if self.failing {
                    tracing::debug!(error = %e, pending = reporter.pending(), "Usage reports not sent yet");
                } else {
                    tracing::warn!(error = %e, pending = reporter.pending(), "Cannot send usage reports; they stay queued");
                }
                self.failing = true;
            }
        }
    }
}

/// The reporting thread of one backend.
pub struct UsageReporting {
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
    reporter: Arc<Reporter>,
}

impl UsageReporting {
    /// Starts reporting the sessions of `registry` for slice `slice`.
    /// The backend id is `<slice>-<pid>-<start unix ns>`.
    pub fn start(
        config: &MeteringConfig,
        slice: &str,
        registry: Arc<MeterRegistry>,
    ) -> std::io::Result<UsageReporting> {
        let start_unix_ns = unix_ns();
        let backend = format!("{slice}-{}-{start_unix_ns}", std::process::id());
        let reporter = Arc::new(Reporter::new(&config.scheduler_socket, backend));
        tracing::info!(
            backend = reporter.backend(),
            tenant = %config.tenant,
            scheduler = %config.scheduler_socket.display(),
            interval_ms = config.interval.as_millis(),
            "Reporting usage to the scheduler"
        );
        let mut interval = Interval {
            registry,
            tenant: config.tenant.clone(),
            slice: slice.to_owned(),
            start_unix_ns,
        };
        let (stop, stopped) = mpsc::channel::<()>();
        let period = config.interval.max(Duration::from_millis(1));
        let thread_reporter = Arc::clone(&reporter);
        let thread = std::thread::Builder::new()
            .name("vgpu-usage".into())
            .spawn(move || {
                let reporter = thread_reporter;
                let mut log = FlushLog::default();
                let mut next = std::time::Instant::now() + period;
                loop {
                    let wait = next.saturating_duration_since(std::time::Instant::now());
                    let last = match stopped.recv_timeout(wait) {
                        Err(RecvTimeoutError::Timeout) => false,
                        Ok(()) | Err(RecvTimeoutError::Disconnected) => true,
                    };
                    next += period;
                    for report in interval.close() {
                        reporter.push(report);
                    }
                    log.flush(&reporter);
                    if last {
                        let pending = reporter.pending();
                        if pending > 0 {
                            tracing::warn!(
                                pending,
                                "Stopping with usage reports the scheduler does not have"
                            );
                        }
                        return;
                    }
                }
            })?;
        Ok(UsageReporting {
            stop: Some(stop),
            thread: Some(thread),
            reporter,
        })
    }

    /// The reporter (its queue), for tests and diagnostics.
    pub fn reporter(&self) -> &Reporter {
        &self.reporter
    }

    /// Reports the last interval, flushes, and stops the thread.
    pub fn stop(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("The usage reporting thread panicked");
            }
        }
    }
}

impl Drop for UsageReporting {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_interval_gives_every_active_session_a_report_with_the_same_bounds() {
        let registry = Arc::new(MeterRegistry::new(true));
        let a = registry.open_session();
        let b = registry.open_session();
        let idle = registry.open_session();
        a.add_kernels(2);
        a.add_gpu_ns(2_000);
        b.allocated(4096);
        b.add_copied(4096, 0);
        let mut interval = Interval {
            registry: Arc::clone(&registry),
            tenant: "acme".into(),
            slice: "lc".into(),
            start_unix_ns: unix_ns(),
        };
        let reports = interval.close();
        assert_eq!(reports.len(), 2, "{reports:?}");
        let ra = reports.iter().find(|r| r.session == a.id()).unwrap();
        let rb = reports.iter().find(|r| r.session == b.id()).unwrap();
        assert!(reports.iter().all(|r| r.session != idle.id()));
        assert_eq!((ra.kernels, ra.gpu_ns), (2, 2_000));
        assert_eq!((rb.htod_bytes, rb.kernels), (4096, 0));
        assert_eq!(ra.start_unix_ns, rb.start_unix_ns);
        assert_eq!(ra.end_unix_ns, rb.end_unix_ns);
        assert!(ra.end_unix_ns >= ra.start_unix_ns);
        assert_eq!((ra.tenant.as_str(), ra.slice.as_str()), ("acme", "lc"));
        // The next interval starts where this one ended; b's memory is
        // still resident, so it reports again.
        let next = interval.close();
        assert_eq!(next.len(), 1);
        assert_eq!(next[0].session, b.id());
        assert_eq!(next[0].start_unix_ns, ra.end_unix_ns);
    }

    #[test]
    fn stopping_without_a_scheduler_keeps_the_reports_queued() {
        let dir = tempfile::tempdir().unwrap();
        let registry = Arc::new(MeterRegistry::new(true));
        let m = registry.open_session();
        let config = MeteringConfig {
            scheduler_socket: dir.path().join("api.sock"),
            tenant: "t".into(),
            interval: Duration::from_secs(3600),
        };
        let reporting = UsageReporting::start(&config, "s", Arc::clone(&registry)).unwrap();
        m.add_kernels(5);
        m.close();
        let reporter = Arc::clone(&reporting.reporter);
        reporting.stop();
        assert_eq!(reporter.pending_seqs(), vec![1]);
        assert!(registry.is_empty());
    }
}
