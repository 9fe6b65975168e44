//! The backends' side of metering: [`Reporter`] numbers usage reports, queues them, and sends
//! them to the scheduler until the scheduler says they are in the ledger.
//!
//! Protocol (the scheduler's REST API on its Unix socket `$STATE_DIR/api.sock`):
//! - `POST /v1/usage/reports` with a JSON array of [`UsageReport`]s, in sequence order. A 200
//!   answer `{"acked":[seq, ...]}` lists the reports now durable in the ledger (stored now, or
//!   found there already). Only those leave the queue.
//! - `GET /v1/usage/last-seq?backend=ID` answers `{"backend":ID,"last_seq":N|null}`: the highest
//!   sequence number the ledger holds for the backend. The reporter asks on first contact and
//!   after every error, and drops the queued reports at or below it (they arrived, but the
//!   answer was lost).
//!
//! So a report is counted once even when the scheduler is killed mid-request: whatever is not
//! acknowledged is sent again, and the ledger ignores replays.

pub mod http;
#[cfg(test)]
mod tests;

use std::collections::{HashSet, VecDeque};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::report::UsageReport;

/// How many reports are queued at most; beyond it the oldest are dropped.
pub const DEFAULT_QUEUE_CAP: usize = 10_000;

/// How many reports one POST carries at most.
pub const MAX_BATCH: usize = 500;

/// Read and write timeout of each request.
pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(2);

/// A flush starts no new request after this long; what is left waits for the next flush.
pub const FLUSH_BUDGET: Duration = Duration::from_secs(5);

/// The reports endpoint.
pub const REPORTS_PATH: &str = "/v1/usage/reports";

/// The last-seq endpoint.
pub const LAST_SEQ_PATH: &str = "/v1/usage/last-seq";

/// Errors of [`Reporter::flush`]. Reports that were not acknowledged stay queued.
#[derive(Debug, thiserror::Error)]
pub enum ReporterError {
    /// Nothing listens on the scheduler's socket.
    #[error("Cannot reach the scheduler at {}: {source}", socket.display())]
    Connect {
        /// The socket.
        socket: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The connection failed or timed out after it was made.
    #[error("Talking to the scheduler at {} failed: {source}", socket.display())]
    Io {
        /// The socket.
        socket: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The answer is not HTTP, or not what the API promises.
    #[error("The scheduler's answer is malformed: {0}")]
    Malformed(String),
    /// An error status that retrying may cure (the scheduler or its ledger failed).
    #[error("The scheduler answered {target} with HTTP {status}: {body}")]
    Status {
        /// The request target.
        target: String,
        /// The status code.
        status: u16,
        /// The body as text.
        body: String,
    },
    /// The scheduler refused a report for good (invalid, or a different report with its
    /// sequence number is recorded); it was dropped from the queue.
    #[error("The scheduler refused report {seq} of backend {backend} (HTTP {status}): {body}; it was dropped")]
    Rejected {
        /// The reporting backend.
        backend: String,
        /// The report's sequence number.
        seq: u64,
        /// 400 or 409.
        status: u16,
        /// The scheduler's answer.
        body: String,
    },
}

/// The queue shared by [`Reporter::push`] and [`Reporter::flush`].
#[derive(Debug)]
struct Queue {
    next_seq: u64,
    reports: VecDeque<UsageReport>,
    dropped: u64,
}

/// What a flush knows about the scheduler. Held for the whole flush: one flush at a time.
#[derive(Debug, Default)]
struct Link {
    /// The last-seq check ran since the last error.
    synced: bool,
    /// A request carrying reports ever reached the scheduler's socket.
    posted: bool,
}

/// A backend's usage reporter. `Send + Sync`: a metering thread pushes while another flushes
/// (push never waits for a flush's I/O).
#[derive(Debug)]
pub struct Reporter {
    socket: PathBuf,
    backend: String,
    cap: usize,
    timeout: Duration,
    queue: Mutex<Queue>,
    link: Mutex<Link>,
}

#[derive(Deserialize)]
struct AckBody {
    acked: Vec<u64>,
}

#[derive(Deserialize)]
struct LastSeqBody {
    last_seq: Option<u64>,
}

impl Reporter {
    /// A reporter for the backend instance `backend_id` (unique per process start, e.g.
    /// `"<slice>-<pid>-<start unix ns>"`), sending to the scheduler's API socket.
    pub fn new(
        scheduler_api_socket: impl Into<PathBuf>,
        backend_id: impl Into<String>,
    ) -> Reporter {
        Reporter {
            socket: scheduler_api_socket.into(),
            backend: backend_id.into(),
            cap: DEFAULT_QUEUE_CAP,
            timeout: DEFAULT_IO_TIMEOUT,
            queue: Mutex::new(Queue {
                next_seq: 1,
                reports: VecDeque::new(),
                dropped: 0,
            }),
            link: Mutex::new(Link::default()),
        }
    }

    /// Keeps at most `cap` reports queued (at least 1; default [`DEFAULT_QUEUE_CAP`]).
    pub fn with_queue_cap(mut self, cap: usize) -> Reporter {
        self.cap = cap.max(1);
        self
    }

    /// The read/write timeout of each request (default [`DEFAULT_IO_TIMEOUT`]).
    pub fn with_timeout(mut self, timeout: Duration) -> Reporter {
        self.timeout = timeout;
        self
    }

    /// The backend id the reports carry.
    pub fn backend(&self) -> &str {
        &self.backend
    }

    /// The scheduler socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Queues a report: sets its `backend` to this reporter's id and its `seq` to the next
    /// number (1, 2, ...), which it returns. When the queue is full the oldest report is
    /// dropped, with a warning.
    pub fn push(&self, mut report: UsageReport) -> u64 {
        let mut q = self.queue();
        let seq = q.next_seq;
        q.next_seq += 1;
        report.backend.clone_from(&self.backend);
        report.seq = seq;
        if q.reports.len() >= self.cap {
            if let Some(old) = q.reports.pop_front() {
                q.dropped += 1;
                if q.dropped == 1 || q.dropped.is_multiple_of(1_000) {
                    tracing::warn!(
                        backend = %self.backend,
                        seq = old.seq,
                        dropped = q.dropped,
                        cap = self.cap,
                        "usage report queue full; dropped the oldest report"
                    );
                }
            }
        }
        q.reports.push_back(report);
        seq
    }

    /// Reports queued and not yet acknowledged.
    pub fn pending(&self) -> usize {
        self.queue().reports.len()
    }

    /// The sequence numbers queued, oldest first.
    pub fn pending_seqs(&self) -> Vec<u64> {
        self.queue().reports.iter().map(|r| r.seq).collect()
    }

    /// Reports dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.queue().dropped
    }

    /// Sends every queued report, oldest first, in batches of up to [`MAX_BATCH`], and removes
    /// the acknowledged ones. Returns how many were acknowledged. Each request times out after
    /// the I/O timeout, and no new request starts after [`FLUSH_BUDGET`], so the caller is not
    /// held long. On error the unacknowledged reports stay queued for the next flush, which
    /// first asks the scheduler what it holds.
    pub fn flush(&self) -> Result<usize, ReporterError> {
        let mut link = self.link.lock().unwrap_or_else(PoisonError::into_inner);
        let result = self.flush_linked(&mut link);
        if result.is_err() {
            link.synced = false;
        }
        result
    }

    fn flush_linked(&self, link: &mut Link) -> Result<usize, ReporterError> {
        let deadline = Instant::now() + FLUSH_BUDGET;
        if !link.synced {
            self.sync(link)?;
        }
        let mut acked = 0;
        let mut rejected = None;
        loop {
            let batch: Vec<UsageReport> = self
                .queue()
                .reports
                .iter()
                .take(MAX_BATCH)
                .cloned()
                .collect();
            if batch.is_empty() {
                break;
            }
            match self.post(&batch, link)? {
                Posted::Acked(n) => acked += n,
                Posted::Refused { status, body } => {
                    // The batch is refused as a whole; find out which report is at fault.
                    for report in &batch {
                        match self.post(std::slice::from_ref(report), link)? {
                            Posted::Acked(n) => acked += n,
                            Posted::Refused { status, body } => {
                                self.drop_seq(report.seq);
                                tracing::error!(backend = %self.backend, seq = report.seq, status, %body,
                                    "the scheduler refused a usage report for good; dropped it");
                                rejected.get_or_insert(ReporterError::Rejected {
                                    backend: self.backend.clone(),
                                    seq: report.seq,
                                    status,
                                    body,
                                });
                            }
                        }
                    }
                    tracing::debug!(status, %body, "batch refused; resent report by report");
                }
            }
            if Instant::now() >= deadline {
                break;
            }
        }
        match rejected {
            Some(e) => Err(e),
            None => Ok(acked),
        }
    }

    /// Asks the scheduler for the last sequence number it holds for this backend. Queued
    /// reports at or below it arrived already and are dropped. Before any report of this
    /// reporter reached the scheduler, a last-seq means another process used this backend id:
    /// the queued reports are renumbered after it instead, so they are not mistaken for
    /// replays.
    fn sync(&self, link: &mut Link) -> Result<(), ReporterError> {
        let target = format!(
            "{LAST_SEQ_PATH}?backend={}",
            http::encode_query_value(&self.backend)
        );
        let response = http::request(&self.socket, "GET", &target, None, self.timeout, || {})?;
        if response.status != 200 {
            return Err(status_error(target, &response));
        }
        let last = serde_json::from_slice::<LastSeqBody>(&response.body)
            .map_err(|e| ReporterError::Malformed(format!("{target}: {e}")))?
            .last_seq
            .unwrap_or(0);
        let mut q = self.queue();
        if link.posted {
            let before = q.reports.len();
            q.reports.retain(|r| r.seq > last);
            let gone = before - q.reports.len();
            if gone > 0 {
                tracing::info!(backend = %self.backend, last_seq = last, gone,
                    "the scheduler already holds reports whose answer was lost");
            }
        } else if last > 0 {
            tracing::warn!(backend = %self.backend, last_seq = last,
                "the ledger holds reports of another process with this backend id; renumbering after them");
            for r in &mut q.reports {
                r.seq += last;
            }
            q.next_seq += last;
        }
        link.synced = true;
        Ok(())
    }

    /// POSTs `batch`; acknowledged reports leave the queue.
    fn post(&self, batch: &[UsageReport], link: &mut Link) -> Result<Posted, ReporterError> {
        let body = serde_json::to_vec(batch)
            .map_err(|e| ReporterError::Malformed(format!("cannot encode the reports: {e}")))?;
        let response = http::request(
            &self.socket,
            "POST",
            REPORTS_PATH,
            Some(&body),
            self.timeout,
            || link.posted = true,
        )?;
        match response.status {
            200 => {
                let ack: AckBody = serde_json::from_slice(&response.body)
                    .map_err(|e| ReporterError::Malformed(format!("{REPORTS_PATH}: {e}")))?;
                let sent: HashSet<u64> = batch.iter().map(|r| r.seq).collect();
                let acked: HashSet<u64> =
                    ack.acked.into_iter().filter(|s| sent.contains(s)).collect();
                let mut q = self.queue();
                let before = q.reports.len();
                q.reports.retain(|r| !acked.contains(&r.seq));
                let n = before - q.reports.len();
                if acked.len() < batch.len() {
                    // Not what the API promises: stop here, the rest waits for the next flush.
                    return Err(ReporterError::Malformed(format!(
                        "the scheduler acknowledged {} of the {} reports sent",
                        acked.len(),
                        batch.len()
                    )));
                }
                Ok(Posted::Acked(n))
            }
            400 | 409 => Ok(Posted::Refused {
                status: response.status,
                body: String::from_utf8_lossy(&response.body).trim().to_owned(),
            }),
            _ => Err(status_error(REPORTS_PATH.to_owned(), &response)),
        }
    }

    fn drop_seq(&self, seq: u64) {
        self.queue().reports.retain(|r| r.seq != seq);
    }

    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

enum Posted {
    Acked(usize),
    Refused { status: u16, body: String },
}

fn status_error(target: String, response: &http::Response) -> ReporterError {
    ReporterError::Status {
        target,
        status: response.status,
        body: String::from_utf8_lossy(&response.body).trim().to_owned(),
    }
}
