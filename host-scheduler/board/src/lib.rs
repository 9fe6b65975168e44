//! The grant board: the shared-memory contract between the vGPU scheduler and the backends it
//! supervises.
//!
//! One file (`$STATE_DIR/board`) is mapped `MAP_SHARED` by the scheduler and by every backend.
//! It holds one row per physical GPU and one row per slot (an attached slice). The scheduler
//! writes each slot's *grant* every policy tick; a backend reads its grant before it dispatches
//! each piece of GPU work and publishes what it consumed (busy time, launches, bytes copied).
//! Every field is an atomic, so no lock is ever held across processes, and a backend that dies
//! mid-update leaves nothing half-written that matters: counters only grow, and the scheduler
//! clears a dead backend's flags.
//!
//! The latency-critical fast path needs no scheduler round trip: a latency-critical backend sets
//! its bit in its GPU's `lc_busy_mask` when it has work, and a best-effort backend whose grant
//! says `yield_to_lc` holds while any such bit is set.
//!
//! If the scheduler stops ticking for [`STALE_SCHEDULER`], waiting backends fail open (dispatch
//! anyway): a dead scheduler must not hang every guest. It restarts its backends when it comes
//! back, so the board is fresh again.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

mod layout;

use layout::{GpuRow, Layout, SlotRow, MAGIC, VERSION};
pub use layout::{MAX_GPUS, MAX_SLOTS, MAX_WORKERS};

/// How long the scheduler may go without a tick before waiting backends stop waiting.
pub const STALE_SCHEDULER: Duration = Duration::from_secs(2);

/// How long [`Slot::wait_to_dispatch`] spins before it starts sleeping between checks.
const SPIN: Duration = Duration::from_micros(20);

/// How long it sleeps between checks after that.
const NAP: Duration = Duration::from_micros(20);

/// Errors from opening or using a board.
#[derive(Debug, thiserror::Error)]
pub enum BoardError {
    /// The board file could not be created, opened or sized.
    #[error("Cannot open the grant board {}: {source}", path.display())]
    Open {
        /// The board file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The file is smaller than a board.
    #[error("The grant board {} is {size} bytes, smaller than a board", path.display())]
    TooSmall {
        /// The board file.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// The file is not a board, or one of another version.
    #[error("{} is not a version {VERSION} grant board", path.display())]
    NotABoard {
        /// The board file.
        path: PathBuf,
    },
    /// Mapping the file failed.
    #[error("Cannot map the grant board: {0}")]
    Map(#[source] io::Error),
    /// A slot index beyond the board.
    #[error("Board slot {0} does not exist (the board has {MAX_SLOTS})")]
    NoSuchSlot(usize),
    /// A GPU index beyond the board.
    #[error("GPU {0} is beyond the board's {MAX_GPUS} GPUs")]
    NoSuchGpu(u32),
    /// A worker index beyond a slot's masks.
    #[error("Worker {0} does not exist (a slot has {MAX_WORKERS})")]
    NoSuchWorker(usize),
}

/// A slice's priority class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Class {
    /// Dispatches at once; best-effort work yields to it.
    LatencyCritical = 1,
    /// Shares what latency-critical work leaves, by guarantee and weight.
    BestEffort = 2,
}

impl Class {
    fn from_raw(raw: u32) -> Option<Class> {
        match raw {
            1 => Some(Class::LatencyCritical),
            2 => Some(Class::BestEffort),
            _ => None,
        }
    }
}

/// What a slot may do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Grant {
    /// It may dispatch GPU work.
    pub run: bool,
    /// Even so, it holds while a latency-critical slot on its GPU is busy.
    pub yield_to_lc: bool,
    /// Its device memory is reclaimed: the backend drains its work, swaps its memory out to
    /// host memory and stays frozen until this is cleared (then swaps it back in).
    pub evict: bool,
}

const GRANT_RUN: u32 = 1;
const GRANT_YIELD: u32 = 2;
const GRANT_EVICT: u32 = 4;

impl Grant {
    fn encode(self) -> u32 {
        (if self.run { GRANT_RUN } else { 0 })
            | (if self.yield_to_lc { GRANT_YIELD } else { 0 })
            | (if self.evict { GRANT_EVICT } else { 0 })
    }

    fn decode(raw: u32) -> Grant {
        Grant {
            run: raw & GRANT_RUN != 0,
            yield_to_lc: raw & GRANT_YIELD != 0,
            evict: raw & GRANT_EVICT != 0,
        }
    }

    /// The grant a slot of `class` starts with: it runs, and best-effort yields.
    pub fn initial(class: Class) -> Grant {
        Grant {
            run: true,
            yield_to_lc: class == Class::BestEffort,
            evict: false,
        }
    }
}

/// A copy of one slot's fields at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SlotSnapshot {
    /// Bumped by every assignment; 0 means the slot is free.
    pub generation: u64,
    /// The GPU the slot's slice runs on.
    pub gpu: u32,
    /// Its class (`None` while free).
    pub class: Option<Class>,
    /// Its current grant.
    pub grant: Grant,
    /// The backend's process id (0 before it started).
    pub pid: u32,
    /// The backend has GPU work queued, waiting or in flight.
    pub busy: bool,
    /// The backend is blocked in [`Slot::wait_to_dispatch`].
    pub waiting: bool,
    /// GPU time consumed, nanoseconds, since assignment.
    pub busy_ns: u64,
    /// Time spent held back by the board, nanoseconds.
    pub throttled_ns: u64,
    /// Kernels launched.
    pub launches: u64,
    /// Bytes copied host to device.
    pub htod_bytes: u64,
    /// Bytes copied device to host.
    pub dtoh_bytes: u64,
    /// The backend's last heartbeat (CLOCK_MONOTONIC ns).
    pub heartbeat_ns: u64,
    /// The last measured preemption latency: grant withdrawn to in-flight work drained (ns).
    pub preempt_last_ns: u64,
    /// The largest one measured.
    pub preempt_max_ns: u64,
    /// Device memory on the GPU, bytes.
    pub mem_resident: u64,
    /// Device memory swapped out to host memory, bytes.
    pub mem_swapped: u64,
    /// Times the slice's memory was reclaimed.
    pub reclaims: u64,
    /// The memory limit the scheduler set, bytes (0: the backend's own).
    pub mem_limit: u64,
}

/// Nanoseconds of CLOCK_MONOTONIC: the board's clock, the same in every process on the host.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// A mapped board.
pub struct Board {
    map: NonNull<Layout>,
    _file: File,
}

// SAFETY: the mapping is only reached through shared references to atomics, which are Sync;
// the pointer stays valid until drop.
unsafe impl Send for Board {}
// SAFETY: as above: every access is an atomic operation.
unsafe impl Sync for Board {}

impl std::fmt::Debug for Board {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Board").finish_non_exhaustive()
    }
}

impl Drop for Board {
    fn drop(&mut self) {
        // SAFETY: `map` is the start of a mapping of exactly `size_of::<Layout>()` bytes made in
        // `map_file`, and no reference into it outlives `self`.
        unsafe {
            libc::munmap(self.map.as_ptr().cast(), std::mem::size_of::<Layout>());
        }
    }
}

impl Board {
    /// Creates a fresh board at `path` (a new file: a board left by an earlier run is
    /// replaced, and processes that still map it keep the old one).
    pub fn create(path: &Path) -> Result<Board, BoardError> {
        let open_err = |source| BoardError::Open {
            path: path.to_path_buf(),
            source,
        };
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(open_err(e)),
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(open_err)?;
        file.set_len(layout::BOARD_BYTES).map_err(open_err)?;
        let board = Board::map_file(file)?;
        let header = &board.layout().header;
        header.version.store(VERSION, Ordering::Relaxed);
        header.slots.store(MAX_SLOTS as u32, Ordering::Relaxed);
        header.gpus.store(MAX_GPUS as u32, Ordering::Relaxed);
        header.tick_ns.store(monotonic_ns(), Ordering::Relaxed);
        header.magic.store(MAGIC, Ordering::Release);
        Ok(board)
    }

    /// Opens the board a scheduler created.
    pub fn open(path: &Path) -> Result<Board, BoardError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| BoardError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        let size = file
            .metadata()
            .map_err(|source| BoardError::Open {
                path: path.to_path_buf(),
                source,
            })?
            .len();
        if size < layout::BOARD_BYTES {
            return Err(BoardError::TooSmall {
                path: path.to_path_buf(),
                size,
            });
        }
        let board = Board::map_file(file)?;
        let header = &board.layout().header;
        if header.magic.load(Ordering::Acquire) != MAGIC
            || header.version.load(Ordering::Relaxed) != VERSION
        {
            return Err(BoardError::NotABoard {
                path: path.to_path_buf(),
            });
        }
        Ok(board)
    }

    fn map_file(file: File) -> Result<Board, BoardError> {
        // SAFETY: a fresh shared read-write mapping of a file we hold open and that is at least
        // `size_of::<Layout>()` bytes long (checked or set by the callers); the kernel picks the
        // address. The result is checked for MAP_FAILED below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                std::mem::size_of::<Layout>(),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(BoardError::Map(io::Error::last_os_error()));
        }
        let map = NonNull::new(ptr.cast::<Layout>())
            .ok_or_else(|| BoardError::Map(io::Error::other("mmap returned null")))?;
        Ok(Board { map, _file: file })
    }

    fn layout(&self) -> &Layout {
        // SAFETY: `map` points at a live, page-aligned mapping of `size_of::<Layout>()` bytes.
        // `Layout` consists only of atomics and padding, for which every bit pattern is valid,
        // and all access goes through atomic operations, so sharing it with other processes
        // that write concurrently is sound.
        unsafe { self.map.as_ref() }
    }

    /// One slot, as its worker 0 (a backend serving every connection from one process).
    pub fn slot(&self, index: usize) -> Result<Slot<'_>, BoardError> {
        self.worker_slot(index, 0)
    }

    /// One slot, as one of its backend's worker processes: busy and waiting are per worker.
    pub fn worker_slot(&self, index: usize, worker: usize) -> Result<Slot<'_>, BoardError> {
        let row = self
            .layout()
            .slots
            .get(index)
            .ok_or(BoardError::NoSuchSlot(index))?;
        if worker >= MAX_WORKERS {
            return Err(BoardError::NoSuchWorker(worker));
        }
        Ok(Slot {
            board: self,
            row,
            bit: 1u64 << index,
            worker: 1u64 << worker,
        })
    }

    fn gpu_row(&self, gpu: u32) -> Option<&GpuRow> {
        self.layout().gpus.get(usize::try_from(gpu).ok()?)
    }

    /// Bit i set: slot i is latency-critical, on `gpu`, and busy.
    pub fn lc_busy_mask(&self, gpu: u32) -> u64 {
        self.gpu_row(gpu)
            .map_or(0, |row| row.lc_busy_mask.load(Ordering::Acquire))
    }

    /// The scheduler's heartbeat: called every policy tick.
    pub fn tick(&self) {
        self.layout()
            .header
            .tick_ns
            .store(monotonic_ns(), Ordering::Release);
    }

    /// Whether the scheduler has not ticked for [`STALE_SCHEDULER`].
    pub fn scheduler_stale(&self) -> bool {
        let tick = self.layout().header.tick_ns.load(Ordering::Acquire);
        monotonic_ns().saturating_sub(tick) > STALE_SCHEDULER.as_nanos() as u64
    }
}

/// One slot of a board.
#[derive(Clone, Copy)]
pub struct Slot<'a> {
    board: &'a Board,
    row: &'a SlotRow,
    /// The slot's bit in its GPU's latency-critical mask.
    bit: u64,
    /// This worker's bit in the slot's busy and waiting masks.
    worker: u64,
}

impl std::fmt::Debug for Slot<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot").field("bit", &self.bit).finish()
    }
}

fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

fn flag(word: &AtomicU64) -> bool {
    word.load(Ordering::Acquire) != 0
}

impl Slot<'_> {
    /// Gives the slot to a slice on `gpu` of `class`: bumps the generation, sets the class's
    /// initial grant and clears every counter.
    pub fn assign(&self, gpu: u32, class: Class) {
        let r = self.row;
        self.drop_lc_bit();
        for c in [
            &r.busy_ns,
            &r.throttled_ns,
            &r.launches,
            &r.htod_bytes,
            &r.dtoh_bytes,
            &r.heartbeat_ns,
            &r.preempt_last_ns,
            &r.preempt_max_ns,
            &r.busy,
            &r.waiting,
            &r.mem_resident,
            &r.mem_swapped,
            &r.reclaims,
            &r.mem_limit,
        ] {
            c.store(0, Ordering::Relaxed);
        }
        r.pid.store(0, Ordering::Relaxed);
        r.gpu.store(gpu, Ordering::Relaxed);
        r.class.store(class as u32, Ordering::Relaxed);
        r.grant
            .store(Grant::initial(class).encode(), Ordering::Relaxed);
        r.generation.fetch_add(1, Ordering::Release);
        // Generation 0 means free: skip it on wrap-around.
        if r.generation.load(Ordering::Acquire) == 0 {
            r.generation.store(1, Ordering::Release);
        }
    }

    /// Frees the slot.
    pub fn release(&self) {
        self.clear_busy();
        self.row.class.store(0, Ordering::Relaxed);
        self.row.pid.store(0, Ordering::Relaxed);
        self.row.generation.store(0, Ordering::Release);
    }

    /// Sets the grant.
    pub fn set_grant(&self, grant: Grant) {
        self.row.grant.store(grant.encode(), Ordering::Release);
    }

    /// Drops the busy flags and latency-critical bit of a backend that died (all its workers).
    pub fn clear_busy(&self) {
        self.row.busy.store(0, Ordering::Release);
        self.row.waiting.store(0, Ordering::Release);
        self.drop_lc_bit();
    }

    /// Drops the busy and waiting flags of one worker process that died; the slot stays busy
    /// while another worker is.
    pub fn clear_worker(&self) {
        self.row.waiting.fetch_and(!self.worker, Ordering::AcqRel);
        self.set_busy(false);
    }

    fn drop_lc_bit(&self) {
        if let Some(gpu) = self.board.gpu_row(self.row.gpu.load(Ordering::Relaxed)) {
            gpu.lc_busy_mask.fetch_and(!self.bit, Ordering::AcqRel);
        }
    }

    fn class(&self) -> Option<Class> {
        Class::from_raw(self.row.class.load(Ordering::Relaxed))
    }

    /// Records the backend's process id.
    pub fn set_pid(&self, pid: u32) {
        self.row.pid.store(pid, Ordering::Relaxed);
    }

    /// Says whether this worker has GPU work queued, waiting or in flight; the slot is busy
    /// while any of its workers is. A latency-critical slot also keeps its bit in its GPU's
    /// mask, which best-effort slots yield to, set exactly while the slot is busy.
    pub fn set_busy(&self, busy: bool) {
        let before = if busy {
            self.row.busy.fetch_or(self.worker, Ordering::AcqRel)
        } else {
            self.row.busy.fetch_and(!self.worker, Ordering::AcqRel)
        };
        let after = if busy {
            before | self.worker
        } else {
            before & !self.worker
        };
        if (before == 0) == (after == 0) || self.class() != Some(Class::LatencyCritical) {
            return;
        }
        let Some(gpu) = self.board.gpu_row(self.row.gpu.load(Ordering::Relaxed)) else {
            return;
        };
        if after != 0 {
            gpu.lc_busy_mask.fetch_or(self.bit, Ordering::AcqRel);
            return;
        }
        gpu.lc_busy_mask.fetch_and(!self.bit, Ordering::AcqRel);
        // Another worker may have become busy between our update and the clear: its set of the
        // GPU bit may have been undone by ours, so look again.
        if self.row.busy.load(Ordering::Acquire) != 0 {
            gpu.lc_busy_mask.fetch_or(self.bit, Ordering::AcqRel);
        }
    }

    /// Adds GPU time consumed.
    pub fn add_busy_ns(&self, ns: u64) {
        add(&self.row.busy_ns, ns);
    }

    /// Adds time spent held back.
    pub fn add_throttled_ns(&self, ns: u64) {
        add(&self.row.throttled_ns, ns);
    }

    /// Adds kernels launched.
    pub fn add_launches(&self, n: u64) {
        add(&self.row.launches, n);
    }

    /// Adds bytes copied in each direction.
    pub fn add_copied(&self, htod: u64, dtoh: u64) {
        add(&self.row.htod_bytes, htod);
        add(&self.row.dtoh_bytes, dtoh);
    }

    /// Records one measured preemption latency (grant withdrawn to in-flight work drained).
    pub fn record_preemption(&self, ns: u64) {
        self.row.preempt_last_ns.store(ns, Ordering::Relaxed);
        self.row.preempt_max_ns.fetch_max(ns, Ordering::Relaxed);
    }

    /// Publishes the slice's device memory: bytes on the GPU and bytes swapped out.
    pub fn set_memory(&self, resident: u64, swapped: u64) {
        self.row.mem_resident.store(resident, Ordering::Relaxed);
        self.row.mem_swapped.store(swapped, Ordering::Relaxed);
    }

    /// Sets the slice's memory limit (the scheduler, when an attached slice is resized); the
    /// backend applies it to allocations from then on.
    pub fn set_memory_limit(&self, bytes: u64) {
        self.row.mem_limit.store(bytes, Ordering::Release);
    }

    /// The memory limit the scheduler set, if it set one since the slot was assigned.
    pub fn memory_limit(&self) -> Option<u64> {
        Some(self.row.mem_limit.load(Ordering::Acquire)).filter(|b| *b != 0)
    }

    /// Counts one reclaim (the slice's memory was swapped out).
    pub fn add_reclaim(&self) {
        add(&self.row.reclaims, 1);
    }

    /// Whether the scheduler asks this slot to give its device memory back.
    #[inline]
    pub fn evict_requested(&self) -> bool {
        Grant::decode(self.row.grant.load(Ordering::Acquire)).evict
    }

    /// Stores the backend's heartbeat (now).
    pub fn heartbeat(&self) {
        self.row
            .heartbeat_ns
            .store(monotonic_ns(), Ordering::Relaxed);
    }

    /// Whether the slot may dispatch GPU work now.
    #[inline]
    pub fn may_dispatch(&self) -> bool {
        let grant = Grant::decode(self.row.grant.load(Ordering::Acquire));
        if !grant.run {
            return false;
        }
        if !grant.yield_to_lc {
            return true;
        }
        self.board
            .lc_busy_mask(self.row.gpu.load(Ordering::Relaxed))
            & !self.bit
            == 0
    }

    /// Blocks until the slot may dispatch, the scheduler has gone stale, or `timeout` passed.
    /// Marks the slot busy (it has work) and waiting meanwhile. Returns the time waited, which
    /// is also added to the slot's throttled time.
    pub fn wait_to_dispatch(&self, timeout: Option<Duration>) -> Duration {
        if self.may_dispatch() {
            return Duration::ZERO;
        }
        let start = Instant::now();
        self.set_busy(true);
        self.row.waiting.fetch_or(self.worker, Ordering::AcqRel);
        shorten_timer_slack();
        loop {
            if self.may_dispatch() {
                break;
            }
            let waited = start.elapsed();
            if timeout.is_some_and(|t| waited >= t) {
                break;
            }
            if waited < SPIN {
                std::hint::spin_loop();
                continue;
            }
            if self.board.scheduler_stale() {
                break;
            }
            std::thread::sleep(NAP);
        }
        self.row.waiting.fetch_and(!self.worker, Ordering::AcqRel);
        let waited = start.elapsed();
        self.add_throttled_ns(u64::try_from(waited.as_nanos()).unwrap_or(u64::MAX));
        waited
    }

    /// A copy of the slot's fields.
    pub fn snapshot(&self) -> SlotSnapshot {
        let r = self.row;
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        SlotSnapshot {
            generation: r.generation.load(Ordering::Acquire),
            gpu: r.gpu.load(Ordering::Relaxed),
            class: self.class(),
            grant: Grant::decode(r.grant.load(Ordering::Acquire)),
            pid: r.pid.load(Ordering::Relaxed),
            busy: flag(&r.busy),
            waiting: flag(&r.waiting),
            busy_ns: load(&r.busy_ns),
            throttled_ns: load(&r.throttled_ns),
            launches: load(&r.launches),
            htod_bytes: load(&r.htod_bytes),
            dtoh_bytes: load(&r.dtoh_bytes),
            heartbeat_ns: load(&r.heartbeat_ns),
            preempt_last_ns: load(&r.preempt_last_ns),
            preempt_max_ns: load(&r.preempt_max_ns),
            mem_resident: load(&r.mem_resident),
            mem_swapped: load(&r.mem_swapped),
            reclaims: load(&r.reclaims),
            mem_limit: load(&r.mem_limit),
        }
    }
}

/// Makes this thread's sleeps as short as asked (the default slack is 50 µs), so a held
/// backend notices its grant within tens of microseconds. Done once per thread.
fn shorten_timer_slack() {
    thread_local! {
        static DONE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    DONE.with(|done| {
        if !done.get() {
            // SAFETY: PR_SET_TIMERSLACK takes one integer argument and affects only this thread.
            unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1u64, 0u64, 0u64, 0u64) };
            done.set(true);
        }
    });
}

#[cfg(test)]
mod tests;
