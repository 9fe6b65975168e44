//! Per-session usage counters: what the backend bills each guest session for
//! (decision 8 of the design). [`crate::reporting`] sends them to the
//! scheduler's ledger once a second.
//!
//! One [`SessionMeter`] per session, shared (`Arc`) between the session, the
//! executor contexts that time its GPU work, and the [`MeterRegistry`] the
//! reporter reads. What it counts, and where:
//! - **GPU busy time.** `cuda`: the context's in-flight tracker
//!   ([`crate::gpu::inflight`]) times every dispatched batch with CUDA events
//!   and charges the union of the batches of that context (overlapping
//!   batches on several streams counted once) to the session owning the
//!   context; a context's still unaccounted batches are waited for (bounded)
//!   when it is destroyed. Busy time of a session is the sum over its
//!   contexts: contexts on one GPU are time-sliced, they do not run at
//!   once. The tracker runs when a grant board governs dispatch (always
//!   under the scheduler). `emulated`: a timed kernel spins on the worker
//!   thread before its launch returns; its duration is charged to the
//!   thread ([`charge_thread_gpu_ns`]) and the session takes what its
//!   launch added ([`thread_gpu_ns`]). The duration billed is the kernel's
//!   (`ns`, what it takes on a real GPU), not the spin's wall time: a spin
//!   preempted by the host overshoots (measured +2.5% for 1 ms kernels on a
//!   loaded two-core machine). The slot's busy time, which the scheduler
//!   shares out, still counts the wall time the emulated GPU was held.
//! - **Memory.** Device bytes the session has allocated, integrated over
//!   time exactly (the integral advances at every change and whenever the
//!   reporter reads it), in byte-nanoseconds. The part of it swapped out
//!   to host memory by a reclaim ([`crate::memctl`]) is integrated apart, as
//!   swapped byte-nanoseconds: a reclaimed tenant is billed for what it
//!   held, but not as GPU-resident memory.
//! - **Copies and kernels.** Bytes copied host to device and device to host,
//!   kernels launched: relaxed atomic adds next to the slot's counters.
//!
//! The launch path pays one relaxed atomic add and two thread-local reads.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use vgpu_board::monotonic_ns;

thread_local! {
    /// GPU time spent synchronously on this thread (emulated timed kernels).
    static THREAD_GPU_NS: Cell<u64> = const { Cell::new(0) };
}

/// Charges `ns` of GPU time spent synchronously on the calling thread; the
/// session whose request is running takes it (see [`thread_gpu_ns`]).
pub fn charge_thread_gpu_ns(ns: u64) {
    THREAD_GPU_NS.with(|c| c.set(c.get().wrapping_add(ns)));
}

/// GPU time charged to the calling thread so far (wrapping): the difference
/// across a call is what the call spent.
pub fn thread_gpu_ns() -> u64 {
    THREAD_GPU_NS.with(Cell::get)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Allocated bytes, the part of them swapped out, and their integrals over time.
#[derive(Debug)]
struct MemoryClock {
    bytes: u64,
    /// Of `bytes`, those swapped out to host memory.
    swapped: u64,
    /// When the integrals were last brought up to date (CLOCK_MONOTONIC ns).
    since_ns: u64,
    /// Resident byte-ns since the last [`SessionMeter::take`].
    integral: u128,
    /// Swapped byte-ns since the last [`SessionMeter::take`].
    swapped_integral: u128,
}

impl MemoryClock {
    fn advance(&mut self, now_ns: u64) {
        let dt = u128::from(now_ns.saturating_sub(self.since_ns));
        let swapped = self.swapped.min(self.bytes);
        self.integral = self
            .integral
            .saturating_add(u128::from(self.bytes - swapped) * dt);
        self.swapped_integral = self
            .swapped_integral
            .saturating_add(u128::from(swapped) * dt);
        self.since_ns = self.since_ns.max(now_ns);
    }
}

/// What a session used since the last [`SessionMeter::take`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Figures {
    /// GPU busy time, ns.
    pub gpu_ns: u64,
    /// Resident device memory integral, byte-ns.
    pub mem_resident_byte_ns: u128,
    /// Swapped-out memory integral, byte-ns.
    pub mem_swapped_byte_ns: u128,
    /// Bytes copied host to device.
    pub htod_bytes: u64,
    /// Bytes copied device to host.
    pub dtoh_bytes: u64,
    /// Kernels launched.
    pub kernels: u64,
}

impl Figures {
    /// True when nothing was used.
    pub fn is_empty(&self) -> bool {
        *self == Figures::default()
    }
}

/// One session's usage counters.
#[derive(Debug)]
pub struct SessionMeter {
    id: u64,
    gpu_ns: AtomicU64,
    kernels: AtomicU64,
    htod: AtomicU64,
    dtoh: AtomicU64,
    memory: Mutex<MemoryClock>,
    closed: AtomicBool,
}

impl SessionMeter {
    /// A meter for the session the ledger will know as `id`.
    pub fn new(id: u64) -> Arc<SessionMeter> {
        Arc::new(SessionMeter {
            id,
            gpu_ns: AtomicU64::new(0),
            kernels: AtomicU64::new(0),
            htod: AtomicU64::new(0),
            dtoh: AtomicU64::new(0),
            memory: Mutex::new(MemoryClock {
                bytes: 0,
                swapped: 0,
                since_ns: monotonic_ns(),
                integral: 0,
                swapped_integral: 0,
            }),
            closed: AtomicBool::new(false),
        })
    }

    /// The session id reports carry (unique per backend process).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Adds GPU busy time.
    #[inline]
    pub fn add_gpu_ns(&self, ns: u64) {
        if ns != 0 {
            self.gpu_ns.fetch_add(ns, Ordering::Relaxed);
        }
    }

    /// Adds kernels launched.
    #[inline]
    pub fn add_kernels(&self, n: u64) {
        self.kernels.fetch_add(n, Ordering::Relaxed);
    }

    /// Adds bytes copied in each direction.
    #[inline]
    pub fn add_copied(&self, htod: u64, dtoh: u64) {
        if htod != 0 {
            self.htod.fetch_add(htod, Ordering::Relaxed);
        }
        if dtoh != 0 {
            self.dtoh.fetch_add(dtoh, Ordering::Relaxed);
        }
    }

    /// `bytes` more device memory is resident.
    pub fn allocated(&self, bytes: u64) {
        let mut m = lock(&self.memory);
        m.advance(monotonic_ns());
        m.bytes = m.bytes.saturating_add(bytes);
    }

    /// `bytes` of device memory were freed.
    pub fn freed(&self, bytes: u64) {
        let mut m = lock(&self.memory);
        m.advance(monotonic_ns());
        m.bytes = m.bytes.saturating_sub(bytes);
    }

    /// The session's memory was swapped out or back in: of what it holds on the device and
    /// in host memory (`usage`, extents rounded up), the same share of its allocated bytes is
    /// billed as swapped from now on.
    pub fn swapped(&self, usage: crate::gpu::MemoryUsage) {
        let mut m = lock(&self.memory);
        m.advance(monotonic_ns());
        let held = u128::from(usage.resident) + u128::from(usage.swapped);
        m.swapped = (u128::from(m.bytes) * u128::from(usage.swapped))
            .checked_div(held)
            .map_or(0, |share| u64::try_from(share).unwrap_or(m.bytes));
    }

    /// Device bytes allocated now (resident or swapped out).
    pub fn resident_bytes(&self) -> u64 {
        lock(&self.memory).bytes
    }

    /// Of the bytes allocated, those swapped out now.
    pub fn swapped_bytes(&self) -> u64 {
        let m = lock(&self.memory);
        m.swapped.min(m.bytes)
    }

    /// The session closed: its memory is gone, and the reporter forgets the
    /// meter once it has reported what is left.
    pub fn close(&self) {
        {
            let mut m = lock(&self.memory);
            m.advance(monotonic_ns());
            m.bytes = 0;
            m.swapped = 0;
        }
        self.closed.store(true, Ordering::Release);
    }

    /// True once [`SessionMeter::close`] ran. Read it before
    /// [`SessionMeter::take`]: a meter closed then has nothing left after.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// What was used since the last call (memory integrated up to `now_ns`,
    /// CLOCK_MONOTONIC); the counters restart from zero.
    pub fn take(&self, now_ns: u64) -> Figures {
        let (mem_resident_byte_ns, mem_swapped_byte_ns) = {
            let mut m = lock(&self.memory);
            m.advance(now_ns);
            (
                std::mem::take(&mut m.integral),
                std::mem::take(&mut m.swapped_integral),
            )
        };
        Figures {
            gpu_ns: self.gpu_ns.swap(0, Ordering::Relaxed),
            mem_resident_byte_ns,
            mem_swapped_byte_ns,
            htod_bytes: self.htod.swap(0, Ordering::Relaxed),
            dtoh_bytes: self.dtoh.swap(0, Ordering::Relaxed),
            kernels: self.kernels.swap(0, Ordering::Relaxed),
        }
    }
}

/// Every session's meter, for the reporter. Without a reporter nothing is
/// registered (closed meters would pile up).
#[derive(Debug, Default)]
pub struct MeterRegistry {
    enabled: bool,
    next_id: AtomicU64,
    meters: Mutex<Vec<Arc<SessionMeter>>>,
}

impl MeterRegistry {
    /// A registry that keeps the meters it hands out (`enabled`: a reporter
    /// reads them) or only numbers them.
    pub fn new(enabled: bool) -> MeterRegistry {
        MeterRegistry {
            enabled,
            next_id: AtomicU64::new(1),
            meters: Mutex::new(Vec::new()),
        }
    }

    /// Numbers sessions from `first` on (a worker process starts where no other worker of its
    /// slice numbers, so every session of the slice has its own id in the ledger).
    pub fn numbered_from(self, first: u64) -> MeterRegistry {
        self.next_id.store(first, Ordering::Relaxed);
        self
    }

    /// True when a reporter reads the meters.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// A meter for a new session, with an id unique in this process.
    pub fn open_session(&self) -> Arc<SessionMeter> {
        let meter = SessionMeter::new(self.next_id.fetch_add(1, Ordering::Relaxed));
        if self.enabled {
            lock(&self.meters).push(Arc::clone(&meter));
        }
        meter
    }

    /// Takes every meter's figures up to `now_ns` (CLOCK_MONOTONIC) and
    /// forgets the meters of closed sessions, whose final figures are among
    /// those returned. Only sessions that used something are listed.
    pub fn collect(&self, now_ns: u64) -> Vec<(u64, Figures)> {
        let mut out = Vec::new();
        lock(&self.meters).retain(|meter| {
            let closed = meter.is_closed();
            let figures = meter.take(now_ns);
            if !figures.is_empty() {
                out.push((meter.id(), figures));
            }
            !closed
        });
        out
    }

    /// Number of meters held.
    pub fn len(&self) -> usize {
        lock(&self.meters).len()
    }

    /// True when no meter is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_integral_is_bytes_times_time_across_changes() {
        let m = SessionMeter::new(1);
        let t0 = lock(&m.memory).since_ns;
        {
            let mut c = lock(&m.memory);
            c.advance(t0);
            c.bytes = 100;
        }
        {
            let mut c = lock(&m.memory);
            c.advance(t0 + 10);
            c.bytes = 300;
        }
        let f = m.take(t0 + 20);
        assert_eq!(f.mem_resident_byte_ns, 100 * 10 + 300 * 10);
        // The next interval starts where the last ended.
        assert_eq!(m.take(t0 + 25).mem_resident_byte_ns, 300 * 5);
    }

    #[test]
    fn memory_integral_does_not_overflow_for_large_slices() {
        let m = SessionMeter::new(1);
        let t0 = lock(&m.memory).since_ns;
        lock(&m.memory).bytes = 80 << 30;
        let f = m.take(t0 + 3_600_000_000_000);
        assert_eq!(f.mem_resident_byte_ns, (80u128 << 30) * 3_600_000_000_000);
    }

    #[test]
    fn swapped_memory_is_integrated_apart_from_resident_memory() {
        use crate::gpu::MemoryUsage;
        let m = SessionMeter::new(1);
        m.allocated(3 << 20);
        let t0 = lock(&m.memory).since_ns;
        m.take(t0);
        // Extents round up: 4 MiB held for 3 MiB allocated, all of it swapped out.
        m.swapped(MemoryUsage {
            resident: 0,
            swapped: 4 << 20,
        });
        assert_eq!(m.swapped_bytes(), 3 << 20);
        let t1 = lock(&m.memory).since_ns;
        let f = m.take(t1 + 1000);
        assert_eq!(f.mem_swapped_byte_ns, (3u128 << 20) * 1000);
        assert_eq!(f.mem_resident_byte_ns, (3u128 << 20) * u128::from(t1 - t0));
        // Half of it back in, then all of it.
        m.swapped(MemoryUsage {
            resident: 2 << 20,
            swapped: 2 << 20,
        });
        let t2 = lock(&m.memory).since_ns;
        let f = m.take(t2 + 10);
        assert_eq!(
            f.mem_swapped_byte_ns,
            (3u128 << 20) * u128::from(t2 - t1 - 1000) + (3u128 << 19) * 10
        );
        assert_eq!(f.mem_resident_byte_ns, (3u128 << 19) * 10);
        m.swapped(MemoryUsage {
            resident: 4 << 20,
            swapped: 0,
        });
        assert_eq!(m.swapped_bytes(), 0);
        m.swapped(MemoryUsage {
            resident: 0,
            swapped: 4 << 20,
        });
        m.close();
        assert_eq!(m.swapped_bytes(), 0);
    }

    #[test]
    fn take_returns_counters_since_the_last_take() {
        let m = SessionMeter::new(7);
        m.add_gpu_ns(5);
        m.add_kernels(2);
        m.add_copied(10, 20);
        let now = monotonic_ns();
        let f = m.take(now);
        assert_eq!(
            (f.gpu_ns, f.kernels, f.htod_bytes, f.dtoh_bytes),
            (5, 2, 10, 20)
        );
        assert!(m.take(now).is_empty());
    }

    #[test]
    fn allocations_and_frees_change_resident_bytes() {
        let m = SessionMeter::new(1);
        m.allocated(1 << 20);
        m.allocated(1 << 10);
        m.freed(1 << 20);
        assert_eq!(m.resident_bytes(), 1 << 10);
        m.close();
        assert_eq!(m.resident_bytes(), 0);
        assert!(m.is_closed());
    }

    #[test]
    fn closed_sessions_report_their_final_figures_once_then_are_forgotten() {
        let r = MeterRegistry::new(true);
        let a = r.open_session();
        let b = r.open_session();
        assert_ne!(a.id(), b.id());
        a.add_kernels(3);
        a.close();
        let now = monotonic_ns();
        let got = r.collect(now);
        assert_eq!(got.len(), 1, "b used nothing: {got:?}");
        assert_eq!((got[0].0, got[0].1.kernels), (a.id(), 3));
        assert_eq!(r.len(), 1);
        b.add_gpu_ns(9);
        let got = r.collect(now);
        assert_eq!((got[0].0, got[0].1.gpu_ns), (b.id(), 9));
    }

    #[test]
    fn a_disabled_registry_keeps_nothing() {
        let r = MeterRegistry::new(false);
        let a = r.open_session();
        a.add_kernels(1);
        assert!(r.is_empty());
        assert!(r.collect(monotonic_ns()).is_empty());
    }

    #[test]
    fn thread_charges_are_per_thread() {
        let before = thread_gpu_ns();
        charge_thread_gpu_ns(42);
        std::thread::spawn(|| charge_thread_gpu_ns(1000))
            .join()
            .unwrap();
        assert_eq!(thread_gpu_ns().wrapping_sub(before), 42);
    }
}

#[cfg(test)]
#[path = "metering_tests.rs"]
mod session_tests;
