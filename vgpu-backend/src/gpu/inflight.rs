//! In-flight work of one CUDA context, when a grant board governs dispatch.
//!
//! Work is grouped per stream into *batches*: a timing event is recorded on
//! the stream before the batch's first unit (launch, copy, memset) and
//! another after its last, when it reaches its size or the queue batch
//! ends. That gives three things:
//! - **A bound on queued work.** Before dispatching, if the estimated GPU
//!   time of the outstanding units (recent measured time per unit times
//!   units) would exceed `--max-inflight-us` (or, before anything was
//!   measured, 8 units are outstanding), the worker waits for the oldest
//!   batch. So when the grant is withdrawn, the GPU is done with this
//!   context within about one short batch.
//! - **Busy time.** The elapsed time of each completed batch is added to
//!   the slot, as the union of intervals: batches on several streams that
//!   overlap are not counted twice. Times are measured from an anchor
//!   event (the first batch after the context was last idle), and batches
//!   are accounted in the order they were opened.
//!   The same time is also counted on the meter of the session owning the
//!   context (if any), and a context being destroyed first waits (bounded)
//!   for its outstanding batches, so the last ones are billed too.
//! - **Completion.** Each outstanding batch is one unit in flight for the
//!   throttle; the monitor thread polls for completions between queue
//!   batches, so the busy flag drops when the GPU is done.

use std::collections::VecDeque;
use std::ptr;
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};

use cudarc::driver::sys as cu;
use vgpu_spec::Status;

use super::cuda::{check, make_current};
use crate::metering::SessionMeter;
use crate::throttle::{InflightSource, Throttle};

/// Units per batch at most.
const MAX_BATCH_UNITS: u32 = 32;
/// Units per batch before any batch has been timed.
const UNMEASURED_BATCH_UNITS: u32 = 4;
/// Outstanding units allowed before any batch has been timed.
const UNMEASURED_MAX_UNITS: u64 = 8;
/// Weight of a newest measurement above the per-unit cost estimate.
const EMA_WEIGHT_UP: f64 = 0.2;
/// Weight of one below it: a slow outlier (a first launch loading its
/// module lazily) must not serialize the batches after it for long.
const EMA_WEIGHT_DOWN: f64 = 0.5;
/// Spare events kept for reuse.
const POOL_MAX: usize = 256;

/// The union of busy intervals, fed in (roughly) start order: an interval
/// counts only where it extends past everything counted before it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BusyUnion {
    last_end: f64,
}

impl Default for BusyUnion {
    fn default() -> Self {
        BusyUnion {
            last_end: f64::NEG_INFINITY,
        }
    }
}

impl BusyUnion {
    /// Adds `[start, end]`; returns the length newly covered.
    pub(crate) fn add(&mut self, start: f64, end: f64) -> f64 {
        let from = start.max(self.last_end);
        self.last_end = self.last_end.max(end);
        (end - from).max(0.0)
    }
}

struct Open {
    stream: cu::CUstream,
    start: cu::CUevent,
    units: u32,
    seq: u64,
}

struct Closed {
    start: cu::CUevent,
    end: cu::CUevent,
    units: u32,
    seq: u64,
}

/// The in-flight batches of one context.
pub(super) struct Tracker {
    ctx: cu::CUcontext,
    id: u64,
    alive: bool,
    /// The slot is latency-critical: its queue is not bounded.
    latency_critical: bool,
    throttle: Arc<Throttle>,
    /// The owning session's usage meter.
    meter: Option<Arc<SessionMeter>>,
    open: Vec<Open>,
    /// Sorted by `seq` (the order batches were opened).
    closed: VecDeque<Closed>,
    pool: Vec<cu::CUevent>,
    anchor: Option<cu::CUevent>,
    union: BusyUnion,
    /// Measured GPU time per unit (0: nothing measured yet).
    ns_per_unit: f64,
    outstanding_units: u64,
    next_seq: u64,
}

// SAFETY: the raw pointers are driver handles of one context, which may be
// used from any thread with that context current; every user holds the
// tracker's mutex and makes the context current first.
unsafe impl Send for Tracker {}

/// A tracker shared between its context's worker and the monitor thread.
pub(super) struct SharedTracker(Mutex<Tracker>);

impl SharedTracker {
    /// A tracker for context `ctx` (process-unique id `id`), registered
    /// with the throttle's monitor; GPU time also goes to `meter`.
    pub(super) fn register(
        ctx: cu::CUcontext,
        id: u64,
        throttle: &Arc<Throttle>,
        meter: Option<Arc<SessionMeter>>,
    ) -> Arc<Self> {
        let shared = Arc::new(SharedTracker(Mutex::new(Tracker {
            ctx,
            id,
            alive: true,
            latency_critical: throttle.latency_critical(),
            throttle: Arc::clone(throttle),
            meter,
            open: Vec::new(),
            closed: VecDeque::new(),
            pool: Vec::new(),
            anchor: None,
            union: BusyUnion::default(),
            ns_per_unit: 0.0,
            outstanding_units: 0,
            next_seq: 0,
        })));
        let weak = Arc::downgrade(&shared);
        throttle.register(weak);
        shared
    }

    /// The tracker, for the context's own (current) thread.
    pub(super) fn lock(&self) -> MutexGuard<'_, Tracker> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl InflightSource for SharedTracker {
    fn poll(&self) {
        let mut tracker = match self.0.try_lock() {
            Ok(t) => t,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            // The worker is dispatching or waiting: it polls itself.
            Err(TryLockError::WouldBlock) => return,
        };
        if tracker.alive
            && !tracker.closed.is_empty()
            && make_current(tracker.id, tracker.ctx).is_ok()
        {
            tracker.poll_completed();
        }
    }
}

impl Tracker {
    fn event(&mut self) -> Option<cu::CUevent> {
        if let Some(e) = self.pool.pop() {
            return Some(e);
        }
        let mut e: cu::CUevent = ptr::null_mut();
        // SAFETY: e is a valid out-pointer; flags 0 is a timing event.
        match check(unsafe { cu::cuEventCreate(&mut e, 0) }) {
            Ok(()) => Some(e),
            Err(status) => {
                tracing::debug!(%status, "Cannot create an in-flight marker");
                None
            }
        }
    }

    fn recycle(&mut self, e: cu::CUevent) {
        if self.pool.len() < POOL_MAX {
            self.pool.push(e);
        } else {
            // SAFETY: e is an event of this context that nothing uses any
            // more (its batch is accounted or abandoned).
            let _ = unsafe { cu::cuEventDestroy_v2(e) };
        }
    }

    fn record(&mut self, stream: cu::CUstream) -> Option<cu::CUevent> {
        let e = self.event()?;
        // SAFETY: e is a live event of this context and stream a live
        // stream of it (or the NULL stream); the context is current.
        match check(unsafe { cu::cuEventRecord(e, stream) }) {
            Ok(()) => Some(e),
            Err(status) => {
                tracing::debug!(%status, "Cannot record an in-flight marker");
                self.recycle(e);
                None
            }
        }
    }

    fn elapsed_ms(a: cu::CUevent, b: cu::CUevent) -> Option<f64> {
        let mut ms = 0f32;
        // SAFETY: ms is a valid out-pointer; both events are live timing
        // events of this context.
        check(unsafe { cu::cuEventElapsedTime_v2(&mut ms, a, b) }).ok()?;
        Some(f64::from(ms))
    }

    fn max_ns(&self) -> f64 {
        self.throttle.max_inflight_ns() as f64
    }

    fn batch_units(&self) -> u32 {
        if self.ns_per_unit <= 0.0 {
            return UNMEASURED_BATCH_UNITS;
        }
        let units = (self.max_ns() / 2.0 / self.ns_per_unit) as u64;
        units.clamp(1, u64::from(MAX_BATCH_UNITS)) as u32
    }

    fn over_budget(&self) -> bool {
        // Latency-critical work never yields the GPU, so nothing is gained by keeping its
        // queue short, and waiting here would add to its latency.
        if self.outstanding_units == 0 || self.latency_critical {
            return false;
        }
        if self.ns_per_unit > 0.0 {
            (self.outstanding_units + 1) as f64 * self.ns_per_unit > self.max_ns()
        } else {
            self.outstanding_units >= UNMEASURED_MAX_UNITS
        }
    }

    /// Before one unit of work goes to `stream` (context current): keeps
    /// queued work within the bound and marks the unit's batch. Tracking
    /// failures never fail the guest's work.
    pub(super) fn before_work(&mut self, stream: cu::CUstream) {
        if !self.alive {
            return;
        }
        // Completions are normally picked up by the monitor thread; look
        // here only before waiting.
        if self.over_budget() {
            self.poll_completed();
        }
        while self.over_budget() && self.wait_oldest() {}
        let batch_units = self.batch_units();
        if let Some(i) = self.open.iter().position(|o| o.stream == stream) {
            if self.open[i].units < batch_units {
                self.open[i].units += 1;
                self.outstanding_units += 1;
                return;
            }
            self.close(i);
        }
        let Some(start) = self.record(stream) else {
            return;
        };
        if self.anchor.is_none() && self.open.is_empty() && self.closed.is_empty() {
            self.anchor = Some(start);
            self.union = BusyUnion::default();
        }
        self.open.push(Open {
            stream,
            start,
            units: 1,
            seq: self.next_seq,
        });
        self.next_seq += 1;
        self.outstanding_units += 1;
        self.throttle.inflight_begin(1);
    }

    /// The queue batch ended: closes every open batch and accounts what
    /// has completed.
    pub(super) fn end_batch(&mut self) {
        if !self.alive {
            return;
        }
        self.close_all();
        self.poll_completed();
    }

    /// A stream is about to be destroyed: closes its open batch.
    pub(super) fn forget_stream(&mut self, stream: cu::CUstream) {
        if let Some(i) = self.open.iter().position(|o| o.stream == stream) {
            self.close(i);
        }
    }

    fn close(&mut self, i: usize) {
        let o = self.open.swap_remove(i);
        match self.record(o.stream) {
            Some(end) => {
                let at = self.closed.partition_point(|c| c.seq < o.seq);
                self.closed.insert(
                    at,
                    Closed {
                        start: o.start,
                        end,
                        units: o.units,
                        seq: o.seq,
                    },
                );
            }
            None => self.finish(o.start, None, o.units),
        }
    }

    fn close_all(&mut self) {
        while !self.open.is_empty() {
            self.close(self.open.len() - 1);
        }
    }

    /// Waits for the oldest batch; false if nothing is outstanding.
    fn wait_oldest(&mut self) -> bool {
        self.close_all();
        let Some(c) = self.closed.pop_front() else {
            return false;
        };
        // SAFETY: a live, recorded event of this context.
        let ok = check(unsafe { cu::cuEventSynchronize(c.end) }).is_ok();
        if ok {
            self.account(&c);
        }
        self.finish(c.start, Some(c.end), c.units);
        self.release_anchor_if_idle();
        true
    }

    /// Accounts completed batches, oldest first.
    pub(super) fn poll_completed(&mut self) {
        while let Some(front) = self.closed.front() {
            // SAFETY: a live, recorded event of this context.
            let result = check(unsafe { cu::cuEventQuery(front.end) });
            if result == Err(Status::NOT_READY) {
                break;
            }
            let Some(c) = self.closed.pop_front() else {
                break;
            };
            // An error is sticky for the context: give the batch up.
            if result.is_ok() {
                self.account(&c);
            }
            self.finish(c.start, Some(c.end), c.units);
        }
        self.release_anchor_if_idle();
    }

    fn account(&mut self, c: &Closed) {
        let Some(duration) = Self::elapsed_ms(c.start, c.end) else {
            return;
        };
        let counted = match self.anchor {
            Some(anchor) => {
                let start = if anchor == c.start {
                    Some(0.0)
                } else {
                    Self::elapsed_ms(anchor, c.start)
                };
                match (start, Self::elapsed_ms(anchor, c.end)) {
                    (Some(s), Some(e)) => self.union.add(s, e),
                    _ => duration,
                }
            }
            None => duration,
        };
        let per_unit = duration.max(0.0) * 1e6 / f64::from(c.units.max(1));
        self.ns_per_unit = if self.ns_per_unit <= 0.0 {
            per_unit
        } else {
            let w = if per_unit < self.ns_per_unit {
                EMA_WEIGHT_DOWN
            } else {
                EMA_WEIGHT_UP
            };
            self.ns_per_unit * (1.0 - w) + per_unit * w
        };
        let ns = (counted * 1e6) as u64;
        self.throttle.add_busy_ns(ns);
        if let Some(meter) = &self.meter {
            meter.add_gpu_ns(ns);
        }
    }

    /// Releases a batch's markers and its in-flight unit.
    fn finish(&mut self, start: cu::CUevent, end: Option<cu::CUevent>, units: u32) {
        if self.anchor != Some(start) {
            self.recycle(start);
        }
        if let Some(end) = end {
            self.recycle(end);
        }
        self.outstanding_units = self.outstanding_units.saturating_sub(u64::from(units));
        self.throttle.inflight_end(1);
    }

    fn release_anchor_if_idle(&mut self) {
        if self.open.is_empty() && self.closed.is_empty() {
            if let Some(anchor) = self.anchor.take() {
                self.recycle(anchor);
            }
        }
    }

    /// The context is about to be destroyed (context current): closes the
    /// open batches and accounts every outstanding one that completes within
    /// `budget`, oldest first. A batch that fails (a sticky error) or is
    /// still running after the budget is not accounted.
    pub(super) fn drain(&mut self, budget: std::time::Duration) {
        if !self.alive {
            return;
        }
        self.close_all();
        let deadline = std::time::Instant::now() + budget;
        loop {
            self.poll_completed();
            if self.closed.is_empty() {
                return;
            }
            if std::time::Instant::now() >= deadline {
                tracing::debug!(
                    batches = self.closed.len(),
                    "Context destroyed with work still running; its GPU time is not billed"
                );
                return;
            }
            std::thread::sleep(std::time::Duration::from_micros(50));
        }
    }

    /// The context is being destroyed (which frees every event): drops all
    /// markers and their in-flight units.
    pub(super) fn shutdown(&mut self) {
        if !self.alive {
            return;
        }
        self.alive = false;
        let batches = (self.open.len() + self.closed.len()) as u64;
        self.open.clear();
        self.closed.clear();
        self.pool.clear();
        self.anchor = None;
        self.outstanding_units = 0;
        if batches > 0 {
            self.throttle.inflight_end(batches);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::BusyUnion;

    #[test]
    fn overlapping_intervals_are_counted_once() {
        let mut u = BusyUnion::default();
        assert_eq!(u.add(0.0, 10.0), 10.0);
        // Overlaps the first by 5.
        assert_eq!(u.add(5.0, 12.0), 2.0);
        // Entirely inside what was counted.
        assert_eq!(u.add(6.0, 9.0), 0.0);
        // After a gap.
        assert_eq!(u.add(20.0, 25.0), 5.0);
    }

    #[test]
    fn disjoint_intervals_add_up() {
        let mut u = BusyUnion::default();
        let total: f64 = [(0.0, 1.0), (2.0, 3.5), (4.0, 4.25)]
            .iter()
            .map(|&(s, e)| u.add(s, e))
            .sum();
        assert_eq!(total, 2.75);
    }
}
