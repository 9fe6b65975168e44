//! The slice's memory accounting, shared by every connection of a backend.
//!
//! When each frontend connection is served by its own worker process (see [`crate::workers`]),
//! the counters live in a shared memory mapping (a memfd the backend's main process creates and
//! its workers inherit), so the limit holds across all of them. Each worker's bytes are counted
//! in its own row, under a lock word that names its holder, so when a worker dies (even in the
//! middle of an update) the main process can take the lock back and recount exactly what the
//! living workers hold: nothing a dead worker reserved stays lost.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::shm::{Atomics, SharedMap};

/// Worker processes whose bytes one slice counts (a row each).
pub const MAX_WORKERS: usize = vgpu_board::MAX_WORKERS;

/// The lock holder id of the backend's main process (workers are `w + 1`).
const MAIN_HOLDER: u64 = MAX_WORKERS as u64 + 1;

/// The counters, in the shared mapping (all-zero is a valid, empty state).
#[repr(C, align(64))]
struct Counters {
    limit: AtomicU64,
    /// 0: free; otherwise the holder's id.
    lock: AtomicU64,
    /// The sum of `used`, kept under the lock so that reading it needs none.
    total: AtomicU64,
    used: [AtomicU64; MAX_WORKERS],
    /// Workers started so far (numbers their sessions apart).
    started: AtomicU64,
    /// Per worker: device memory on the GPU (chunks mapped), bytes.
    resident: [AtomicU64; MAX_WORKERS],
    /// Per worker: device memory swapped out to host memory, bytes.
    swapped: [AtomicU64; MAX_WORKERS],
}

const _: () = assert!(std::mem::size_of::<Counters>() == 1600);

impl Counters {
    fn zeroed() -> Counters {
        Counters {
            limit: AtomicU64::new(0),
            lock: AtomicU64::new(0),
            total: AtomicU64::new(0),
            used: std::array::from_fn(|_| AtomicU64::new(0)),
            started: AtomicU64::new(0),
            resident: std::array::from_fn(|_| AtomicU64::new(0)),
            swapped: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

/// Where the counters live.
enum Region {
    /// In this process only (every connection served by threads of one process).
    Heap(Box<Counters>),
    /// In a shared mapping.
    Mapped(SharedMap<Counters>),
}

// SAFETY: `Counters` is a `#[repr(C)]` struct of atomics only.
unsafe impl Atomics for Counters {}

/// Memory limit and bytes allocated by all sessions of the slice.
pub struct SliceMemory {
    region: Region,
    /// This process's row.
    worker: usize,
}

impl std::fmt::Debug for SliceMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SliceMemory")
            .field("limit", &self.limit())
            .field("used", &self.used())
            .field("worker", &self.worker)
            .finish()
    }
}

/// Holds the counters' lock; releases it when dropped.
struct Held<'a>(&'a Counters);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.lock.store(0, Ordering::Release);
    }
}

impl SliceMemory {
    /// A slice with `limit` bytes and nothing allocated, counted in this process only.
    pub fn new(limit: u64) -> Self {
        let counters = Box::new(Counters::zeroed());
        counters.limit.store(limit, Ordering::Release);
        SliceMemory {
            region: Region::Heap(counters),
            worker: 0,
        }
    }

    /// A slice with `limit` bytes whose counters live in a new shared memory file, for the
    /// backend's main process; workers open the returned descriptor with
    /// [`SliceMemory::open_shared`].
    pub fn create_shared(limit: u64) -> io::Result<(SliceMemory, OwnedFd)> {
        // SAFETY: memfd_create takes a NUL-terminated name and flags; it returns a new fd or -1.
        let raw = unsafe { libc::memfd_create(c"vgpu-slice-memory".as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let len = mapping_len();
        // SAFETY: ftruncate on our own descriptor.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let slice = Self::map(&fd, 0)?;
        slice.counters().limit.store(limit, Ordering::Release);
        Ok((slice, fd))
    }

    /// Opens the shared counters `fd` names, as worker `worker`.
    pub fn open_shared(fd: &impl AsRawFd, worker: usize) -> io::Result<SliceMemory> {
        if worker >= MAX_WORKERS {
            return Err(io::Error::other(format!(
                "Worker {worker} does not exist (a slice counts {MAX_WORKERS})"
            )));
        }
        let mut stat = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: fstat writes a `stat` through a valid pointer.
        if unsafe { libc::fstat(fd.as_raw_fd(), stat.as_mut_ptr()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fstat succeeded, so the struct is initialised.
        let size = unsafe { stat.assume_init() }.st_size;
        if u64::try_from(size).unwrap_or(0) < mapping_len() as u64 {
            return Err(io::Error::other(format!(
                "The slice memory file is {size} bytes, too small"
            )));
        }
        Self::map(fd, worker)
    }

    fn map(fd: &impl AsRawFd, worker: usize) -> io::Result<SliceMemory> {
        Ok(SliceMemory {
            region: Region::Mapped(SharedMap::map(fd)?),
            worker,
        })
    }

    fn counters(&self) -> &Counters {
        match &self.region {
            Region::Heap(c) => c,
            Region::Mapped(m) => m.get(),
        }
    }

    fn lock_as(&self, holder: u64) -> Held<'_> {
        let c = self.counters();
        let mut spins = 0u32;
        while c
            .lock
            .compare_exchange_weak(0, holder, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        Held(c)
    }

    fn lock(&self) -> Held<'_> {
        self.lock_as(self.worker as u64 + 1)
    }

    /// A number no other worker of this slice's backend gets (0, 1, 2, ...).
    pub fn take_start_number(&self) -> u64 {
        self.counters().started.fetch_add(1, Ordering::AcqRel)
    }

    /// Publishes this process's device memory: bytes on the GPU and bytes swapped out.
    pub fn set_residency_here(&self, resident: u64, swapped: u64) {
        let c = self.counters();
        c.resident[self.worker].store(resident, Ordering::Release);
        c.swapped[self.worker].store(swapped, Ordering::Release);
    }

    /// Every worker's device memory: (bytes on the GPU, bytes swapped out).
    pub fn residency(&self) -> (u64, u64) {
        let c = self.counters();
        let sum = |rows: &[AtomicU64; MAX_WORKERS]| {
            rows.iter()
                .map(|r| r.load(Ordering::Acquire))
                .fold(0u64, u64::saturating_add)
        };
        (sum(&c.resident), sum(&c.swapped))
    }

    /// The memory limit in bytes.
    pub fn limit(&self) -> u64 {
        self.counters().limit.load(Ordering::Acquire)
    }

    /// Sets the limit (a worker sets the one it clamped to its device; a resize sets a new one).
    /// Bytes already allocated stay allocated.
    pub fn set_limit(&self, limit: u64) {
        self.counters().limit.store(limit, Ordering::Release);
    }

    /// Bytes allocated by all sessions (of every worker).
    pub fn used(&self) -> u64 {
        self.counters().total.load(Ordering::Acquire)
    }

    /// Bytes allocated by this process's sessions.
    pub fn used_here(&self) -> u64 {
        self.counters().used[self.worker].load(Ordering::Acquire)
    }

    /// Bytes still available under the limit.
    pub fn free(&self) -> u64 {
        self.limit().saturating_sub(self.used())
    }

    /// Reserves `size` bytes if `used + size <= limit`; false otherwise.
    pub fn try_reserve(&self, size: u64) -> bool {
        let held = self.lock();
        let c = held.0;
        let total = c.total.load(Ordering::Acquire);
        match total.checked_add(size).filter(|t| *t <= self.limit()) {
            Some(new_total) => {
                c.used[self.worker].fetch_add(size, Ordering::AcqRel);
                c.total.store(new_total, Ordering::Release);
                true
            }
            None => false,
        }
    }

    /// Returns `size` reserved bytes.
    pub fn release(&self, size: u64) {
        let held = self.lock();
        let c = held.0;
        let mine = c.used[self.worker].load(Ordering::Acquire);
        if mine < size {
            tracing::error!(mine, size, "Slice accounting released more than it held");
        }
        c.used[self.worker].store(mine.saturating_sub(size), Ordering::Release);
        let total = c.total.load(Ordering::Acquire);
        c.total
            .store(total.saturating_sub(size.min(mine)), Ordering::Release);
    }

    /// Forgets everything worker `worker` held (it died: the driver freed its memory), taking
    /// the lock back if it died holding it. Called by the backend's main process only.
    pub fn forget_worker(&self, worker: usize) {
        if worker >= MAX_WORKERS {
            return;
        }
        let c = self.counters();
        // A dead worker can never release the lock: take it over.
        let _ = c.lock.compare_exchange(
            worker as u64 + 1,
            MAIN_HOLDER,
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
        let held = if c.lock.load(Ordering::Acquire) == MAIN_HOLDER {
            Held(c)
        } else {
            self.lock_as(MAIN_HOLDER)
        };
        let c = held.0;
        c.used[worker].store(0, Ordering::Release);
        c.resident[worker].store(0, Ordering::Release);
        c.swapped[worker].store(0, Ordering::Release);
        let sum = c
            .used
            .iter()
            .map(|u| u.load(Ordering::Acquire))
            .fold(0u64, u64::saturating_add);
        c.total.store(sum, Ordering::Release);
    }
}

/// The shared mapping's length: the counters rounded up to a page.
fn mapping_len() -> usize {
    SharedMap::<Counters>::LEN
}

#[cfg(test)]
#[path = "slice_tests.rs"]
mod tests;
