//! Pinned host memory for swapping, and the swap reserve that pins it ahead of need.
//!
//! A swap-out copies a context's extents into pinned host memory: slabs of up to
//! [`SLAB_CHUNKS`] chunk-sized slots, kept in a [`PinnedPool`] and reused by the next swap.
//! Pinning is far slower than copying (`cuMemHostAlloc` measured 1.4 to 2.2 GB/s on the H100
//! host, copies 55 GB/s), so the first reclaim of 20 GiB took 15 s, nearly all of it pinning.
//!
//! The **swap reserve** removes that cost from the reclaim: a background thread
//! ([`SwapReserve`]) keeps each registered pool at least as large as the memory its heap holds
//! (mapped or swapped), pinning one slab at a time while the slice runs, and gives back slabs
//! that stay idle when the heap shrinks. It costs host memory equal to what the slice may have
//! to swap, which is why the scheduler turns it on only for slices that can be reclaimed (a
//! memory guarantee below the limit).
//!
//! Every slab is pinned portable under the device's primary context, which lives as long as the
//! executor: any context may copy through it, and freeing it never depends on which context is
//! still alive. A slab is anonymous memory registered with `cuMemHostRegister` (faster to pin),
//! or `cuMemHostAlloc` memory where registering fails.

use std::collections::HashSet;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cudarc::driver::sys as cu;
use tracing::{info, warn};
use vgpu_spec::Status;

use super::CHUNK;
use crate::gpu::GpuResult;

/// Chunks per pinned host slab (64 MiB).
pub const SLAB_CHUNKS: usize = 32;
/// Bytes per full slab.
const SLAB_BYTES: u64 = SLAB_CHUNKS as u64 * CHUNK;
/// How often the reserve thread looks when there is nothing to do.
const IDLE_TICK: Duration = Duration::from_millis(20);
/// Pause after the host refused to pin more.
const FAILED_BACKOFF: Duration = Duration::from_secs(1);

fn check(result: cu::CUresult) -> GpuResult<()> {
    Status(result as u32).into_result()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The primary context slabs are pinned under.
#[derive(Clone, Copy, Debug)]
pub struct PinContext(pub cu::CUcontext);

impl PinContext {
    /// The context handle.
    pub fn raw(self) -> cu::CUcontext {
        self.0
    }
}

// SAFETY: a CUDA context handle may be used from any thread; it is only passed to the driver.
unsafe impl Send for PinContext {}
// SAFETY: as above.
unsafe impl Sync for PinContext {}

/// `MADV_POPULATE_WRITE` (Linux 5.14): faults a range in writable, without writing it.
const MADV_POPULATE_WRITE: libc::c_int = 23;

/// How a slab was pinned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pinned {
    /// Anonymous memory (transparent huge pages asked for), populated, then registered with
    /// `cuMemHostRegister`: 3.7 GB/s on the H100 host against 2.2 for `cuMemHostAlloc`.
    Registered,
    /// `cuMemHostAlloc`, where registering failed.
    HostAlloc,
}

/// One pinned allocation.
struct Slab {
    ptr: *mut u8,
    chunks: usize,
    pinned: Pinned,
}

/// Pins `bytes` of fresh anonymous memory under the current context; `None` when the host
/// cannot map or register it.
fn register(bytes: usize) -> Option<*mut u8> {
    // SAFETY: a fresh private anonymous mapping; no address is asked for.
    let p = unsafe {
        libc::mmap(
            ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return None;
    }
    // SAFETY: advice on our own mapping; failure (no THP) only costs speed.
    unsafe { libc::madvise(p, bytes, libc::MADV_HUGEPAGE) };
    // Fault the pages in (as huge pages where the kernel can) before registering.
    // SAFETY: advice on our own mapping.
    if unsafe { libc::madvise(p, bytes, MADV_POPULATE_WRITE) } != 0 {
        // SAFETY: `bytes` of our own writable mapping (kernels before 5.14 lack the advice).
        unsafe { ptr::write_bytes(p.cast::<u8>(), 0, bytes) };
    }
    // SAFETY: p is `bytes` of our mapping; PORTABLE makes it pinned for every context.
    let registered =
        check(unsafe { cu::cuMemHostRegister_v2(p, bytes, cu::CU_MEMHOSTREGISTER_PORTABLE) });
    if registered.is_err() {
        // SAFETY: our mapping, not registered, not used.
        unsafe { libc::munmap(p, bytes) };
        return None;
    }
    Some(p.cast())
}

/// Pins a slab of `chunks` slots under `ctx` (pushed for the call, popped after).
fn pin_slab(ctx: PinContext, chunks: usize) -> GpuResult<Slab> {
    let bytes = chunks * CHUNK as usize;
    // SAFETY: ctx is the executor's retained primary context.
    check(unsafe { cu::cuCtxPushCurrent_v2(ctx.0) })?;
    let slab = match register(bytes) {
        Some(ptr) => Ok(Slab {
            ptr,
            chunks,
            pinned: Pinned::Registered,
        }),
        None => {
            let mut p: *mut std::ffi::c_void = ptr::null_mut();
            // SAFETY: p is a valid out-pointer; PORTABLE makes the memory pinned for every
            // context.
            check(unsafe { cu::cuMemHostAlloc(&mut p, bytes, cu::CU_MEMHOSTALLOC_PORTABLE) }).map(
                |()| Slab {
                    ptr: p.cast(),
                    chunks,
                    pinned: Pinned::HostAlloc,
                },
            )
        }
    };
    let mut popped: cu::CUcontext = ptr::null_mut();
    // SAFETY: pops the context pushed above.
    if let Err(status) = check(unsafe { cu::cuCtxPopCurrent_v2(&mut popped) }) {
        warn!(%status, "Popping the pinning context failed");
    }
    slab.map_err(|status| {
        warn!(%status, bytes, "Pinning host memory for swapping failed");
        Status::OUT_OF_MEMORY
    })
}

fn free_slab(slab: &Slab) {
    let bytes = slab.chunks * CHUNK as usize;
    let freed = match slab.pinned {
        // SAFETY: the slab came from cuMemHostAlloc (portable, so no context need be current)
        // and no slot of it is in use.
        Pinned::HostAlloc => check(unsafe { cu::cuMemFreeHost(slab.ptr.cast()) }),
        Pinned::Registered => {
            // SAFETY: registered by `register` (portable), no slot of it in use.
            let r = check(unsafe { cu::cuMemHostUnregister(slab.ptr.cast()) });
            // SAFETY: our mapping of `bytes`, no longer registered or used.
            unsafe { libc::munmap(slab.ptr.cast(), bytes) };
            r
        }
    };
    if let Err(status) = freed {
        warn!(%status, "Freeing pinned swap memory failed");
    }
}

/// Pinned host chunk-sized slots, handed out and taken back; freed when idle slabs are
/// trimmed or the pool is dropped.
pub struct PinnedPool {
    ctx: PinContext,
    slabs: Vec<Slab>,
    /// The first slot of every slab.
    starts: HashSet<*mut u8>,
    /// Free slots, each inside a slab.
    free: Vec<*mut u8>,
}

impl PinnedPool {
    fn new(ctx: PinContext) -> PinnedPool {
        PinnedPool {
            ctx,
            slabs: Vec::new(),
            starts: HashSet::new(),
            free: Vec::new(),
        }
    }

    fn add(&mut self, slab: Slab) {
        let base = slab.ptr;
        self.free
            .extend((0..slab.chunks).map(|i| base.wrapping_add(i * CHUNK as usize)));
        self.starts.insert(base);
        self.slabs.push(slab);
    }

    /// `n` slots in ascending address order, the lowest free ones (so that they are
    /// contiguous where possible), pinning new slabs as needed (`OUT_OF_MEMORY` when the host
    /// cannot).
    pub fn take(&mut self, n: usize) -> GpuResult<Vec<*mut u8>> {
        while self.free.len() < n {
            let chunks = (n - self.free.len()).min(SLAB_CHUNKS);
            let slab = pin_slab(self.ctx, chunks)?;
            self.add(slab);
        }
        // Highest first, so that the last n are the lowest, taken in ascending order.
        if !self.free.is_sorted_by(|a, b| a >= b) {
            self.free.sort_unstable_by(|a, b| b.cmp(a));
        }
        let mut taken = self.free.split_off(self.free.len() - n);
        taken.reverse();
        Ok(taken)
    }

    /// Gives slots back.
    pub fn put(&mut self, slots: impl IntoIterator<Item = *mut u8>) {
        self.free.extend(slots);
    }

    /// True when `p` is the first slot of a slab: no copy may run into it from below (the
    /// memory below, if pinned at all, is another allocation).
    pub fn starts_slab(&self, p: *mut u8) -> bool {
        self.starts.contains(&p)
    }

    /// Bytes pinned (in use or free).
    pub fn bytes(&self) -> u64 {
        self.slabs.iter().map(|s| s.chunks as u64 * CHUNK).sum()
    }

    /// Frees slabs none of whose slots is in use, while more than `keep` bytes are pinned.
    pub fn trim_to(&mut self, keep: u64) {
        let mut total = self.bytes();
        let mut kept = Vec::new();
        for slab in std::mem::take(&mut self.slabs) {
            let end = slab.ptr.wrapping_add(slab.chunks * CHUNK as usize);
            let inside = |p: &*mut u8| *p >= slab.ptr && *p < end;
            let size = slab.chunks as u64 * CHUNK;
            if total >= keep + size && self.free.iter().filter(|p| inside(p)).count() == slab.chunks
            {
                self.free.retain(|p| !inside(p));
                self.starts.remove(&slab.ptr);
                free_slab(&slab);
                total -= size;
            } else {
                kept.push(slab);
            }
        }
        self.slabs = kept;
    }
}

impl Drop for PinnedPool {
    fn drop(&mut self) {
        for slab in self.slabs.drain(..) {
            free_slab(&slab);
        }
    }
}

/// A context's pool, shared with the reserve thread, and how much its heap holds.
pub struct SharedPool {
    pool: Mutex<PinnedPool>,
    /// Bytes of the heap's extents, mapped or swapped out: what a swap-out may need.
    held: AtomicU64,
}

// SAFETY: the raw slot pointers are only handed out under the mutex; the memory they point to
// is owned by the pool.
unsafe impl Send for SharedPool {}
// SAFETY: as above.
unsafe impl Sync for SharedPool {}

impl SharedPool {
    /// An empty pool pinning under `ctx`.
    pub fn new(ctx: PinContext) -> Arc<SharedPool> {
        Arc::new(SharedPool {
            pool: Mutex::new(PinnedPool::new(ctx)),
            held: AtomicU64::new(0),
        })
    }

    /// The pool, locked.
    pub fn lock(&self) -> MutexGuard<'_, PinnedPool> {
        lock(&self.pool)
    }

    /// The heap holds `bytes` more (an extent was mapped).
    pub fn hold(&self, bytes: u64) {
        self.held.fetch_add(bytes, Ordering::AcqRel);
    }

    /// The heap holds `bytes` fewer (an extent was freed).
    pub fn let_go(&self, bytes: u64) {
        let _ = self
            .held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |h| {
                Some(h.saturating_sub(bytes))
            });
    }

    /// Bytes the heap holds.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Acquire)
    }
}

/// The swap reserve thread of one executor; stopped when dropped.
pub struct SwapReserve {
    pools: Arc<Mutex<Vec<Weak<SharedPool>>>>,
    done: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl SwapReserve {
    /// Starts the thread, with `ctx` current on it (it pins, and frees what it trims or what
    /// outlives a context, under that context).
    pub fn start(ctx: PinContext) -> std::io::Result<SwapReserve> {
        let pools: Arc<Mutex<Vec<Weak<SharedPool>>>> = Arc::default();
        let done = Arc::new(AtomicBool::new(false));
        let (watched, finished) = (pools.clone(), done.clone());
        let thread = std::thread::Builder::new()
            .name("vgpu-swap-reserve".into())
            .spawn(move || {
                let raw = ctx.raw(); // moves the whole (Send) wrapper in
                                     // SAFETY: the executor's retained primary context, alive until this thread is
                                     // joined (the executor stops it first).
                if let Err(status) = check(unsafe { cu::cuCtxSetCurrent(raw) }) {
                    warn!(%status, "The swap reserve cannot use the device; it stays empty");
                    return;
                }
                let mut filling: Option<(Instant, u64)> = None;
                while !finished.load(Ordering::Acquire) {
                    let live: Vec<Arc<SharedPool>> = {
                        let mut pools = lock(&watched);
                        pools.retain(|p| p.strong_count() > 0);
                        pools.iter().filter_map(Weak::upgrade).collect()
                    };
                    let steps: Vec<Step> = live.iter().map(|p| fill_once(p)).collect();
                    let pinned = steps.contains(&Step::Pinned);
                    match (pinned, filling) {
                        (true, None) => filling = Some((Instant::now(), 0)),
                        (true, Some((t, n))) => filling = Some((t, n + 1)),
                        (false, Some((t, n))) => {
                            let bytes: u64 = live.iter().map(|p| p.lock().bytes()).sum();
                            info!(
                                slabs = n + 1,
                                pinned = bytes,
                                seconds = t.elapsed().as_secs_f64(),
                                "Swap reserve ready: a reclaim copies without pinning"
                            );
                            filling = None;
                        }
                        (false, None) => {}
                    }
                    drop(live);
                    if steps.contains(&Step::Failed) {
                        std::thread::sleep(FAILED_BACKOFF);
                    } else if !pinned {
                        std::thread::sleep(IDLE_TICK);
                    }
                }
            })?;
        Ok(SwapReserve {
            pools,
            done,
            thread: Some(thread),
        })
    }

    /// Bytes pinned in every pool it keeps.
    pub fn pinned_bytes(&self) -> u64 {
        lock(&self.pools)
            .iter()
            .filter_map(Weak::upgrade)
            .map(|p| p.lock().bytes())
            .sum()
    }

    /// Keeps `pool` as large as its heap's memory from now on.
    pub fn watch(&self, pool: &Arc<SharedPool>) {
        lock(&self.pools).push(Arc::downgrade(pool));
    }
}

/// What one step of the reserve did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    Pinned,
    Failed,
    Idle,
}

/// One step of the reserve for `pool`: pins one slab when it is smaller than what its heap
/// holds, or gives back idle slabs when it is larger by more than two slabs.
fn fill_once(pool: &SharedPool) -> Step {
    let held = pool.held();
    let (have, ctx) = {
        let p = pool.lock();
        (p.bytes(), p.ctx)
    };
    if have < held {
        // Pinned outside the lock: a swap-out in progress is never held up by it.
        let chunks = ((held - have).div_ceil(CHUNK) as usize).min(SLAB_CHUNKS);
        match pin_slab(ctx, chunks) {
            Ok(slab) => {
                pool.lock().add(slab);
                Step::Pinned
            }
            Err(_) => Step::Failed, // logged; tried again after a pause
        }
    } else {
        if have > held + 2 * SLAB_BYTES {
            pool.lock().trim_to(held + SLAB_BYTES);
        }
        Step::Idle
    }
}

impl Drop for SwapReserve {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(i: usize) -> *mut u8 {
        (0x1000_0000usize + i * CHUNK as usize) as *mut u8
    }

    #[test]
    fn the_pinned_pool_hands_out_its_lowest_free_slots_in_ascending_order() {
        // Slots returned in any order come back sorted, so an extent's copies merge again.
        let mut pool = PinnedPool::new(PinContext(ptr::null_mut()));
        pool.put([slot(5), slot(1), slot(4), slot(0), slot(2), slot(3)]);
        assert_eq!(
            pool.take(4).unwrap(),
            vec![slot(0), slot(1), slot(2), slot(3)]
        );
        pool.put([slot(1), slot(0)]);
        assert_eq!(pool.take(3).unwrap(), vec![slot(0), slot(1), slot(4)]);
        assert_eq!(pool.take(1).unwrap(), vec![slot(5)]);
        pool.free.clear(); // no slab behind these fake slots
    }

    #[test]
    fn held_bytes_follow_mapped_and_freed_extents_and_never_go_negative() {
        let pool = SharedPool::new(PinContext(ptr::null_mut()));
        pool.hold(3 * CHUNK);
        pool.let_go(CHUNK);
        assert_eq!(pool.held(), 2 * CHUNK);
        pool.let_go(u64::MAX);
        assert_eq!(pool.held(), 0);
    }
}
