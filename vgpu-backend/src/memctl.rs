//! Reclaim of a slice's device memory (decision 7), on the backend's side.
//!
//! The scheduler asks for a slice's memory by setting `evict` in its grant on the board. The
//! backend's memory thread then freezes the slice (every connection's request processing waits
//! in [`MemoryControl::wait_while_frozen`]), drains each connection's work and swaps its
//! contexts' chunks out to host memory ([`crate::elastic`]). When `evict` is cleared it swaps
//! them back in, at the same device addresses, and unfreezes; a slice that cannot get its
//! memory back (the device is full) stays frozen and tries again: its guests only wait.
//!
//! The thread also publishes the slice's resident and swapped bytes: on the board when this
//! process serves every connection, in the slice's shared counters when it is one worker of
//! several (the main process sums them onto the board). And it follows the memory limit the
//! scheduler sets on the board when an attached slice is resized (`vgpuctl resize --memory`):
//! allocations are checked against the new limit from then on. Every context's heap reserves
//! address space for the whole device, so a larger limit needs no new reservation; a smaller one
//! than the slice holds leaves what it holds in place and refuses allocations until it fits.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::device::VgpuDevice;
use crate::gpu::MemoryUsage;
use crate::slice::SliceMemory;
use crate::throttle::Throttle;

/// How often the thread looks at the board.
const TICK: Duration = Duration::from_millis(1);
/// How often resident and swapped bytes are published.
const PUBLISH_EVERY: Duration = Duration::from_millis(50);
/// Pause between attempts to get memory back.
const RETRY: Duration = Duration::from_millis(20);

const RESIDENT: u8 = 0;
const FROZEN: u8 = 1;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The slice's memory state, shared by its connections.
#[derive(Debug, Default)]
pub struct MemoryControl {
    devices: Mutex<Vec<Weak<VgpuDevice>>>,
    state: AtomicU8,
    stopping: AtomicBool,
    reclaims: AtomicU64,
    swapped_out: AtomicBool,
}

/// What one reclaim or restore moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Moved {
    /// Bytes copied.
    pub bytes: u64,
    /// How long it took, freeze to done.
    pub elapsed: Duration,
}

impl MemoryControl {
    /// Adds a connection's device.
    pub fn register(&self, device: &Arc<VgpuDevice>) {
        let mut devices = lock(&self.devices);
        devices.retain(|d| d.strong_count() > 0);
        devices.push(Arc::downgrade(device));
    }

    fn devices(&self) -> Vec<Arc<VgpuDevice>> {
        lock(&self.devices)
            .iter()
            .filter_map(Weak::upgrade)
            .collect()
    }

    /// True while the slice's memory is being reclaimed or is swapped out.
    pub fn frozen(&self) -> bool {
        self.state.load(Ordering::Acquire) == FROZEN
    }

    /// Whether the slice's memory is swapped out now.
    pub fn swapped_out(&self) -> bool {
        self.swapped_out.load(Ordering::Acquire)
    }

    /// Reclaims completed so far.
    pub fn reclaims(&self) -> u64 {
        self.reclaims.load(Ordering::Relaxed)
    }

    /// Blocks request processing while the slice is frozen (or until the backend stops).
    pub fn wait_while_frozen(&self) {
        while self.frozen() && !self.stopping.load(Ordering::Acquire) {
            std::thread::sleep(TICK);
        }
    }

    /// The backend is stopping: nothing waits any more.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
    }

    /// Freezes the slice and swaps every connection's memory out.
    pub fn evict(&self) -> Result<Moved, vgpu_spec::Status> {
        let start = Instant::now();
        self.state.store(FROZEN, Ordering::Release);
        let mut bytes = 0u64;
        for device in self.devices() {
            bytes = bytes.saturating_add(device.swap_out()?);
        }
        self.swapped_out.store(true, Ordering::Release);
        self.reclaims.fetch_add(1, Ordering::Relaxed);
        Ok(Moved {
            bytes,
            elapsed: start.elapsed(),
        })
    }

    /// Swaps every connection's memory back in and unfreezes. On failure (the device is full)
    /// the slice stays frozen; calling again resumes where it stopped.
    pub fn restore(&self) -> Result<Moved, vgpu_spec::Status> {
        let start = Instant::now();
        let mut bytes = 0u64;
        for device in self.devices() {
            bytes = bytes.saturating_add(device.swap_in()?);
        }
        self.swapped_out.store(false, Ordering::Release);
        self.state.store(RESIDENT, Ordering::Release);
        Ok(Moved {
            bytes,
            elapsed: start.elapsed(),
        })
    }

    /// Every connection's device memory.
    pub fn usage(&self) -> MemoryUsage {
        self.devices()
            .iter()
            .fold(MemoryUsage::default(), |acc, d| acc + d.memory_usage())
    }
}

/// Asks the scheduler for memory when the GPU is full: `POST /v1/slices/NAME/claim`. The
/// scheduler reclaims memory from other slices above their guarantee (if this slice is within
/// its own) and answers once they have given it back.
#[derive(Debug, Clone)]
pub struct Claimer {
    socket: std::path::PathBuf,
    slice: String,
}

/// How long a claim may take (the scheduler waits for the victims' swap-out).
const CLAIM_TIMEOUT: Duration = Duration::from_secs(35);

impl Claimer {
    /// Claims through the scheduler's API socket, for `slice`.
    pub fn new(socket: impl Into<std::path::PathBuf>, slice: impl Into<String>) -> Claimer {
        Claimer {
            socket: socket.into(),
            slice: slice.into(),
        }
    }

    /// Asks for `bytes`; true when the scheduler made room.
    pub fn claim(&self, bytes: u64) -> bool {
        let body = format!("{{\"bytes\":{bytes}}}");
        let target = format!("/v1/slices/{}/claim", self.slice);
        let start = Instant::now();
        match vgpu_ledger::reporter::http::request(
            &self.socket,
            "POST",
            &target,
            Some(body.as_bytes()),
            CLAIM_TIMEOUT,
            || {},
        ) {
            Ok(r) if r.status == 200 => {
                tracing::info!(
                    bytes,
                    ms = start.elapsed().as_secs_f64() * 1e3,
                    "The scheduler reclaimed memory from other slices for this one"
                );
                true
            }
            Ok(r) => {
                tracing::info!(bytes, status = r.status, answer = %String::from_utf8_lossy(&r.body), "The scheduler made no room");
                false
            }
            Err(e) => {
                tracing::warn!(bytes, error = %e, "Cannot ask the scheduler for memory");
                false
            }
        }
    }
}

/// Where the memory thread publishes resident and swapped bytes.
pub enum Publish {
    /// Straight on the board (one process serves the slice).
    Board,
    /// In this worker's row of the slice's shared counters.
    Worker(Arc<SliceMemory>),
}

/// The memory thread; stopped when dropped.
pub struct MemoryWatcher {
    done: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for MemoryWatcher {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The slice's memory limit, as the board may change it.
pub struct LimitFollower {
    /// The slice's accounting, whose limit changes.
    pub slice: Arc<SliceMemory>,
    /// The device's memory: a limit above it is clamped to it.
    pub device_total: u64,
}

impl LimitFollower {
    /// Applies the limit the scheduler set, if any and new; true when the limit changed.
    fn follow(&self, throttle: &Throttle) -> bool {
        let Some(wanted) = throttle.memory_limit() else {
            return false;
        };
        let limit = wanted.min(self.device_total);
        let old = self.slice.limit();
        if limit == old {
            return false;
        }
        self.slice.set_limit(limit);
        let used = self.slice.used();
        if used > limit {
            tracing::warn!(old, limit, used, "The slice's memory limit is now below what it holds: allocations fail until it frees memory");
        } else {
            tracing::info!(old, limit, used, "The slice's memory limit changed");
        }
        true
    }
}

/// Starts the memory thread: follows the board's `evict` and memory limit (when there is a
/// board) and publishes the slice's memory.
pub fn spawn_watcher(
    control: Arc<MemoryControl>,
    throttle: Arc<Throttle>,
    publish: Publish,
    limit: LimitFollower,
) -> std::io::Result<MemoryWatcher> {
    let done = Arc::new(AtomicBool::new(false));
    let finished = done.clone();
    let thread = std::thread::Builder::new()
        .name("vgpu-memory".into())
        .spawn(move || {
            let mut last_publish = Instant::now() - PUBLISH_EVERY;
            while !finished.load(Ordering::Acquire) {
                let changed = step(&control, &throttle) | limit.follow(&throttle);
                if changed || last_publish.elapsed() >= PUBLISH_EVERY {
                    let usage = control.usage();
                    match &publish {
                        Publish::Board => throttle.publish_memory(usage.resident, usage.swapped),
                        Publish::Worker(slice) => {
                            slice.set_residency_here(usage.resident, usage.swapped)
                        }
                    }
                    last_publish = Instant::now();
                }
                std::thread::sleep(TICK);
            }
        })?;
    Ok(MemoryWatcher {
        done,
        thread: Some(thread),
    })
}

/// Follows the board's `evict` once; true when the memory state changed.
fn step(control: &MemoryControl, throttle: &Throttle) -> bool {
    let evict = throttle.evict_requested();
    if evict && !control.swapped_out() {
        match control.evict() {
            Ok(moved) => {
                throttle.count_reclaim();
                tracing::info!(
                    bytes = moved.bytes,
                    ms = moved.elapsed.as_secs_f64() * 1e3,
                    "Device memory reclaimed: swapped out to host memory; the slice is frozen"
                );
                true
            }
            Err(status) => {
                tracing::error!(%status, "Cannot swap the slice's memory out; it stays frozen");
                std::thread::sleep(RETRY);
                false
            }
        }
    } else if !evict && control.swapped_out() {
        match control.restore() {
            Ok(moved) => {
                tracing::info!(
                    bytes = moved.bytes,
                    ms = moved.elapsed.as_secs_f64() * 1e3,
                    "Device memory restored at the same addresses; the slice runs again"
                );
                true
            }
            Err(status) => {
                tracing::debug!(%status, "The slice's memory cannot come back yet; it stays frozen");
                std::thread::sleep(RETRY);
                false
            }
        }
    } else if !evict && control.frozen() && !control.swapped_out() {
        // A failed swap-out left the slice frozen with its memory in place.
        control.state.store(RESIDENT, Ordering::Release);
        true
    } else {
        false
    }
}
