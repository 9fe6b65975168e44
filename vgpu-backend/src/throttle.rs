//! The backend side of the grant board (the mechanism; the policy lives in
//! the scheduler).
//!
//! One [`Throttle`] per backend, shared by every connection and by the
//! executor:
//! - **Gate.** Before each piece of GPU work (launch, copy, memset) a
//!   connection calls [`Throttle::gate`]: two or three atomic loads when the
//!   slot may dispatch; otherwise the connection's worker blocks in the
//!   board's `wait_to_dispatch` (the guest sees ring back-pressure).
//! - **Busy.** The slot is marked busy when work is gated in, and cleared
//!   once no queue batch is being processed and no dispatched work is in
//!   flight. A latency-critical slot's busy flag is what best-effort slots
//!   on its GPU yield to, so it is cleared as soon as that is true.
//! - **In flight.** Executors count dispatched work that has not completed
//!   ([`Throttle::inflight_begin`] / [`Throttle::inflight_end`]) and
//!   register [`InflightSource`]s the monitor polls for completions.
//! - **Monitor.** A thread ([`Throttle::spawn_monitor`]) heartbeats, polls
//!   in-flight work, clears busy, and measures the preemption latency: from
//!   the moment the backend sees its grant withdrawn while work is in
//!   flight to the moment that work has drained. The last and largest
//!   values go to the board ([`vgpu_board::Slot::record_preemption`]) and
//!   to the `debug` log.
//!
//! Without a board every call is a no-op apart from the local usage
//! counters, and executors skip their in-flight tracking altogether.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use vgpu_board::{monotonic_ns, Board, BoardError, Class, Slot};

/// The default bound on queued GPU work (`--max-inflight-us`).
pub const DEFAULT_MAX_INFLIGHT: Duration = Duration::from_micros(500);

/// How often the monitor stores a heartbeat.
const HEARTBEAT_EVERY_NS: u64 = 10_000_000;
/// The monitor's period while the slot is busy (`VGPU_MONITOR_BUSY_US` overrides it, for
/// measuring the monitor's own cost).
const BUSY_PERIOD: Duration = Duration::from_micros(20);

fn busy_period() -> Duration {
    std::env::var("VGPU_MONITOR_BUSY_US")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(BUSY_PERIOD, Duration::from_micros)
}
/// The monitor's period while it is idle.
const IDLE_PERIOD: Duration = Duration::from_millis(1);
/// A held connection re-checks whether the backend is stopping this often.
const WAIT_SLICE: Duration = Duration::from_millis(100);

/// Dispatched GPU work an executor can check for completion (a CUDA
/// context's in-flight markers). Polled by the monitor thread.
pub trait InflightSource: Send + Sync {
    /// Accounts every piece of in-flight work that has completed. Must not
    /// block for long: skip the poll if the source is busy.
    fn poll(&self);
}

/// What the backend has consumed, counted locally (also without a board).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// GPU time, nanoseconds.
    pub busy_ns: u64,
    /// Kernels launched.
    pub launches: u64,
    /// Bytes copied host to device.
    pub htod_bytes: u64,
    /// Bytes copied device to host.
    pub dtoh_bytes: u64,
}

struct BoardSlot {
    board: Board,
    index: usize,
    /// This process's bit in the slot's busy and waiting masks.
    worker: usize,
    class: Option<Class>,
}

/// The backend's view of its board slot, shared by every connection.
pub struct Throttle {
    board: Option<BoardSlot>,
    max_inflight_ns: u64,
    /// Queue batches being processed right now.
    active: AtomicU64,
    /// Dispatched units of work not yet completed.
    inflight: AtomicU64,
    /// Our copy of the board's busy flag; changed only under `busy_lock`.
    busy: AtomicBool,
    busy_lock: Mutex<()>,
    /// When a withdrawal was seen with work in flight (0: none pending).
    withdrawn_at: AtomicU64,
    stopping: AtomicBool,
    sources: Mutex<Vec<Weak<dyn InflightSource>>>,
    busy_ns: AtomicU64,
    launches: AtomicU64,
    htod: AtomicU64,
    dtoh: AtomicU64,
    preempt_last_ns: AtomicU64,
    preempt_max_ns: AtomicU64,
}

impl std::fmt::Debug for Throttle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Throttle")
            .field("slot", &self.board.as_ref().map(|b| b.index))
            .field("max_inflight_ns", &self.max_inflight_ns)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Asks for sleeps as short as requested on this thread (the default timer
/// slack is 50 µs).
fn shorten_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes one integer argument and affects only
    // the calling thread.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1u64, 0u64, 0u64, 0u64) };
}

impl Throttle {
    fn with_board(board: Option<BoardSlot>, max_inflight: Duration) -> Throttle {
        Throttle {
            board,
            max_inflight_ns: nanos(max_inflight).max(1),
            active: AtomicU64::new(0),
            inflight: AtomicU64::new(0),
            busy: AtomicBool::new(false),
            busy_lock: Mutex::new(()),
            withdrawn_at: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            sources: Mutex::new(Vec::new()),
            busy_ns: AtomicU64::new(0),
            launches: AtomicU64::new(0),
            htod: AtomicU64::new(0),
            dtoh: AtomicU64::new(0),
            preempt_last_ns: AtomicU64::new(0),
            preempt_max_ns: AtomicU64::new(0),
        }
    }

    /// No board: nothing is ever held back.
    pub fn disabled() -> Arc<Throttle> {
        Arc::new(Self::with_board(None, DEFAULT_MAX_INFLIGHT))
    }

    /// Opens the board a scheduler created and takes slot `index`: records
    /// our pid, a first heartbeat, and "not busy".
    pub fn open(path: &Path, index: usize, max_inflight: Duration) -> Result<Throttle, BoardError> {
        Self::open_as(path, index, None, max_inflight)
    }

    /// Opens slot `index` as worker process `worker` of its backend (the backend's main
    /// process has recorded its own pid there).
    pub fn open_worker(
        path: &Path,
        index: usize,
        worker: usize,
        max_inflight: Duration,
    ) -> Result<Throttle, BoardError> {
        Self::open_as(path, index, Some(worker), max_inflight)
    }

    fn open_as(
        path: &Path,
        index: usize,
        worker: Option<usize>,
        max_inflight: Duration,
    ) -> Result<Throttle, BoardError> {
        let board = Board::open(path)?;
        let snapshot = {
            let slot = board.worker_slot(index, worker.unwrap_or(0))?;
            if worker.is_none() {
                slot.set_pid(std::process::id());
            }
            slot.heartbeat();
            slot.set_busy(false);
            slot.snapshot()
        };
        if snapshot.generation == 0 {
            tracing::warn!(slot = index, "Board slot is not assigned to a slice");
        }
        tracing::info!(
            board = %path.display(),
            slot = index,
            class = ?snapshot.class,
            gpu = snapshot.gpu,
            max_inflight_us = max_inflight.as_micros(),
            "Dispatch is governed by the grant board"
        );
        Ok(Self::with_board(
            Some(BoardSlot {
                board,
                index,
                worker: worker.unwrap_or(0),
                class: snapshot.class,
            }),
            max_inflight,
        ))
    }

    /// True when a board governs dispatch (executors track in-flight work
    /// only then).
    pub fn enabled(&self) -> bool {
        self.board.is_some()
    }

    /// The bound on queued GPU work, nanoseconds.
    pub fn max_inflight_ns(&self) -> u64 {
        self.max_inflight_ns
    }

    /// True for a latency-critical slot.
    pub fn latency_critical(&self) -> bool {
        self.board
            .as_ref()
            .is_some_and(|b| b.class == Some(Class::LatencyCritical))
    }

    fn slot(&self) -> Option<Slot<'_>> {
        let b = self.board.as_ref()?;
        b.board.worker_slot(b.index, b.worker).ok()
    }

    /// Whether [`Throttle::gate`] would hold the next piece of work now. Callers close their
    /// open in-flight batches first, so the time spent held is not timed as GPU work.
    #[inline]
    pub fn would_hold(&self) -> bool {
        self.slot().is_some_and(|slot| !slot.may_dispatch())
    }

    /// Called before each piece of GPU work is dispatched: marks the slot
    /// busy and blocks while the board withholds the grant.
    #[inline]
    pub fn gate(&self) {
        let Some(slot) = self.slot() else {
            return;
        };
        if !self.busy.load(Ordering::SeqCst) {
            self.mark_busy(&slot);
        }
        if !slot.may_dispatch() {
            self.hold(&slot);
        }
        if self.withdrawn_at.load(Ordering::Relaxed) != 0 {
            self.abandon_measurement();
        }
    }

    /// New work goes out before the old drained (the grant came back): the
    /// drain can no longer be timed.
    #[cold]
    fn abandon_measurement(&self) {
        self.withdrawn_at.store(0, Ordering::Release);
    }

    #[cold]
    fn mark_busy(&self, slot: &Slot<'_>) {
        let _guard = lock(&self.busy_lock);
        slot.set_busy(true);
        self.busy.store(true, Ordering::SeqCst);
    }

    #[cold]
    fn hold(&self, slot: &Slot<'_>) {
        self.note_withdrawal();
        let mut waited = Duration::ZERO;
        while !self.stopping.load(Ordering::Acquire) {
            waited += slot.wait_to_dispatch(Some(WAIT_SLICE));
            if slot.may_dispatch() || waited < WAIT_SLICE {
                // Granted, or the board gave up waiting (stale scheduler).
                break;
            }
        }
        tracing::trace!(waited_us = waited.as_micros(), "Held back by the board");
    }

    /// Starts the preemption-latency clock if work is in flight.
    fn note_withdrawal(&self) {
        if self.inflight.load(Ordering::SeqCst) > 0 {
            let _ = self.withdrawn_at.compare_exchange(
                0,
                monotonic_ns().max(1),
                Ordering::AcqRel,
                Ordering::Acquire,
            );
        }
    }

    /// A queue batch starts being processed; the guard ends it.
    pub fn batch(&self) -> BatchGuard<'_> {
        self.active.fetch_add(1, Ordering::SeqCst);
        BatchGuard { throttle: self }
    }

    /// `n` units of dispatched work are now in flight.
    pub fn inflight_begin(&self, n: u64) {
        self.inflight.fetch_add(n, Ordering::SeqCst);
    }

    /// `n` units of in-flight work completed.
    pub fn inflight_end(&self, n: u64) {
        let before = self
            .inflight
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| {
                Some(v.saturating_sub(n))
            })
            .unwrap_or(0);
        if before <= n {
            self.drained();
            self.maybe_idle();
        }
    }

    /// Units of work in flight now.
    pub fn inflight(&self) -> u64 {
        self.inflight.load(Ordering::SeqCst)
    }

    /// Registers a source of in-flight work for the monitor to poll.
    pub fn register(&self, source: Weak<dyn InflightSource>) {
        lock(&self.sources).push(source);
    }

    /// Adds GPU time consumed.
    pub fn add_busy_ns(&self, ns: u64) {
        self.busy_ns.fetch_add(ns, Ordering::Relaxed);
        if let Some(slot) = self.slot() {
            slot.add_busy_ns(ns);
        }
    }

    /// Adds kernels launched.
    pub fn add_launches(&self, n: u64) {
        self.launches.fetch_add(n, Ordering::Relaxed);
        if let Some(slot) = self.slot() {
            slot.add_launches(n);
        }
    }

    /// Adds bytes copied in each direction.
    pub fn add_copied(&self, htod: u64, dtoh: u64) {
        self.htod.fetch_add(htod, Ordering::Relaxed);
        self.dtoh.fetch_add(dtoh, Ordering::Relaxed);
        if let Some(slot) = self.slot() {
            slot.add_copied(htod, dtoh);
        }
    }

    /// What the backend consumed so far.
    pub fn usage(&self) -> Usage {
        Usage {
            busy_ns: self.busy_ns.load(Ordering::Relaxed),
            launches: self.launches.load(Ordering::Relaxed),
            htod_bytes: self.htod.load(Ordering::Relaxed),
            dtoh_bytes: self.dtoh.load(Ordering::Relaxed),
        }
    }

    /// The last and the largest preemption latency measured (ns).
    pub fn preemption_ns(&self) -> (u64, u64) {
        (
            self.preempt_last_ns.load(Ordering::Relaxed),
            self.preempt_max_ns.load(Ordering::Relaxed),
        )
    }

    /// Ends a pending preemption measurement if nothing is in flight.
    fn drained(&self) {
        if self.inflight.load(Ordering::SeqCst) != 0 {
            return;
        }
        let since = self.withdrawn_at.swap(0, Ordering::AcqRel);
        if since == 0 {
            return;
        }
        let ns = monotonic_ns().saturating_sub(since);
        self.preempt_last_ns.store(ns, Ordering::Relaxed);
        let max = self.preempt_max_ns.fetch_max(ns, Ordering::Relaxed).max(ns);
        if let Some(slot) = self.slot() {
            slot.record_preemption(ns);
        }
        tracing::debug!(
            latency_us = ns as f64 / 1e3,
            max_us = max as f64 / 1e3,
            "Preempted: in-flight work drained after the grant was withdrawn"
        );
    }

    /// Clears the busy flag if no batch is being processed and nothing is
    /// in flight. Safe against a concurrent [`Throttle::gate`]: the flag is
    /// dropped before the counters are checked, and a gate that still saw
    /// it set has already raised `active`.
    fn maybe_idle(&self) {
        if !self.busy.load(Ordering::SeqCst)
            || self.active.load(Ordering::SeqCst) != 0
            || self.inflight.load(Ordering::SeqCst) != 0
        {
            return;
        }
        let Some(slot) = self.slot() else {
            return;
        };
        let _guard = lock(&self.busy_lock);
        self.busy.store(false, Ordering::SeqCst);
        if self.active.load(Ordering::SeqCst) == 0 && self.inflight.load(Ordering::SeqCst) == 0 {
            slot.set_busy(false);
        } else {
            self.busy.store(true, Ordering::SeqCst);
        }
    }

    /// Polls every registered in-flight source.
    pub fn poll_sources(&self) {
        let live: Vec<Arc<dyn InflightSource>> = {
            let mut sources = lock(&self.sources);
            sources.retain(|s| s.strong_count() > 0);
            sources.iter().filter_map(Weak::upgrade).collect()
        };
        for source in live {
            source.poll();
        }
    }

    /// One round of the monitor's work; returns true while busy.
    fn monitor_step(&self, last_heartbeat: &mut u64) -> bool {
        let Some(slot) = self.slot() else {
            return false;
        };
        let now = monotonic_ns();
        if now.saturating_sub(*last_heartbeat) >= HEARTBEAT_EVERY_NS {
            slot.heartbeat();
            *last_heartbeat = now;
        }
        if self.inflight.load(Ordering::SeqCst) > 0 {
            if !slot.may_dispatch() {
                self.note_withdrawal();
            }
            // While a batch is processed its worker accounts completions
            // itself; polling then would only contend for the driver.
            if self.active.load(Ordering::SeqCst) == 0
                || self.withdrawn_at.load(Ordering::Acquire) != 0
            {
                self.poll_sources();
            }
        }
        self.drained();
        self.maybe_idle();
        self.busy.load(Ordering::SeqCst)
    }

    /// Starts the monitor thread (only with a board). It stops when the
    /// returned handle is dropped.
    pub fn spawn_monitor(self: &Arc<Self>) -> std::io::Result<Option<Monitor>> {
        if !self.enabled() {
            return Ok(None);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let throttle = Arc::clone(self);
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("vgpu-board".into())
            .spawn(move || {
                shorten_timer_slack();
                let busy_period = busy_period();
                let mut heartbeat = 0;
                while !flag.load(Ordering::Acquire) {
                    let busy = throttle.monitor_step(&mut heartbeat);
                    std::thread::sleep(if busy { busy_period } else { IDLE_PERIOD });
                }
            })?;
        Ok(Some(Monitor {
            throttle: Arc::clone(self),
            stop,
            thread: Some(thread),
        }))
    }

    /// Whether the scheduler asks this slice to give its device memory back.
    pub fn evict_requested(&self) -> bool {
        self.slot().is_some_and(|slot| slot.evict_requested())
    }

    /// Publishes the slice's device memory on the board (a backend serving every connection
    /// from one process; worker processes publish through their main process).
    pub fn publish_memory(&self, resident: u64, swapped: u64) {
        if let Some(slot) = self.slot() {
            slot.set_memory(resident, swapped);
        }
    }

    /// The memory limit the scheduler set on the board, if any.
    pub fn memory_limit(&self) -> Option<u64> {
        self.slot().and_then(|slot| slot.memory_limit())
    }

    /// Counts one reclaim on the board.
    pub fn count_reclaim(&self) {
        if let Some(slot) = self.slot() {
            slot.add_reclaim();
        }
    }

    /// The backend is stopping: held connections stop waiting.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
    }
}

/// Ends a queue batch when dropped.
pub struct BatchGuard<'a> {
    throttle: &'a Throttle,
}

impl Drop for BatchGuard<'_> {
    fn drop(&mut self) {
        self.throttle.active.fetch_sub(1, Ordering::SeqCst);
        self.throttle.maybe_idle();
    }
}

/// The monitor thread; stops (and clears the slot's busy flag) on drop.
pub struct Monitor {
    throttle: Arc<Throttle>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("The board monitor thread panicked");
            }
        }
        if let Some(slot) = self.throttle.slot() {
            slot.set_busy(false);
        }
    }
}

#[cfg(test)]
#[path = "throttle_tests.rs"]
mod tests;
