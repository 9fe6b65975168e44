//! Elastic device memory (decision 7): every context's guest allocations live in one reserved
//! device address range as large as the slice's limit, backed by physical *extents* (whole
//! [`CHUNK`]s, one physical allocation each) mapped as allocations need them. An allocation
//! of [`CHUNK`] or more gets an extent of its own; smaller ones share single-chunk extents.
//! Device pointers never change for the life of an allocation, so a context's extents can be
//! copied out to host memory and unmapped (swap-out, when the scheduler reclaims the slice's
//! memory) and later mapped back at the same addresses and restored (swap-in) without its
//! guest ever noticing.
//!
//! [`ChunkMemory`] is what an executor provides (the CUDA virtual memory API on a real GPU,
//! host memory on the emulated device); [`ElasticHeap`] is the sub-allocator and the extent
//! bookkeeping on top of it, shared by both.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::gpu::GpuResult;

pub mod cuda;
pub mod heap;
pub mod host;
pub mod pinned;

pub use cuda::CudaChunks;
pub use heap::{reservation_for_limit, ElasticHeap};
pub use host::HostChunks;

/// Guest sessions this process has opened.
static SESSIONS_OPENED: AtomicU64 = AtomicU64::new(0);

/// Counts a guest session opened by this process (see [`zero_new_extents`]).
pub fn session_opened() {
    SESSIONS_OPENED.fetch_add(1, Ordering::Relaxed);
}

/// Whether new extents must be zeroed before use. A worker process that has served exactly one
/// guest session is that guest process's alone, as a native CUDA process is its program's:
/// physical memory it frees can only come back to the same guest, and what it gets from other
/// processes the driver hands over as it does natively. Zeroing is then a cost native
/// `cuMemAlloc` does not pay (about 20 µs an allocation on the H100). From a second session on
/// (a VM's processes share its connection's worker; `--isolation thread` serves every
/// connection from one process), and without any (tests driving a heap directly), every new
/// extent is zeroed, so that no guest process sees another's freed data.
pub fn zero_new_extents() -> bool {
    zeroes_after(SESSIONS_OPENED.load(Ordering::Relaxed))
}

/// The rule of [`zero_new_extents`], after `sessions` sessions.
fn zeroes_after(sessions: u64) -> bool {
    sessions != 1
}

/// The physical chunk size: the granularity of mapping, accounting and swapping. Extents are
/// whole chunks, aligned to a chunk.
pub const CHUNK: u64 = 2 << 20;

/// An extent: `(device address, length)`, both multiples of [`CHUNK`], length > 0.
pub type Extent = (u64, u64);

/// An executor's device address space and physical memory, in extents of whole [`CHUNK`]s.
///
/// Each extent is one physical allocation: it is mapped, unmapped, saved and restored as a
/// whole, never in parts, and never overlaps another extent (mapped or saved).
pub trait ChunkMemory: Send {
    /// Reserves `size` bytes (a multiple of [`CHUNK`]) of device address space, aligned to
    /// [`CHUNK`]; returns its base. Nothing is backed yet.
    fn reserve(&mut self, size: u64) -> GpuResult<u64>;
    /// Gives a reservation back (every extent in it already unmapped).
    fn release_reservation(&mut self, base: u64, size: u64);
    /// Backs `[va, va + len)` with one new physical extent the device can read and write,
    /// zeroed when [`zero_new_extents`] says so (always, on the emulated device). `OUT_OF_MEMORY` (and nothing mapped) when the device has no physical memory
    /// left for all of it.
    fn map(&mut self, va: u64, len: u64) -> GpuResult<()>;
    /// Waits for whatever [`ChunkMemory::map`] queued on the device (zeroing new extents), so
    /// that the extents mapped since are ready for any stream. Called once per allocation.
    fn settle(&mut self) -> GpuResult<()> {
        Ok(())
    }
    /// Unmaps and frees the whole extent `[va, va + len)` (exactly as mapped); its contents
    /// are lost.
    fn unmap(&mut self, va: u64, len: u64) -> GpuResult<()>;
    /// Copies the `extents` to host memory kept by the implementation, then unmaps and frees
    /// them. The copies overlap (issued together). On failure every extent stays mapped.
    fn save(&mut self, extents: &[Extent]) -> GpuResult<()>;
    /// Maps the saved `extents` again, at the same addresses, and copies their saved contents
    /// back (overlapping), dropping the host copies. On failure (`OUT_OF_MEMORY` when the
    /// device cannot back them) none is mapped and every saved copy is kept.
    fn restore(&mut self, extents: &[Extent]) -> GpuResult<()>;
    /// Drops the saved copy of the swapped-out extent starting at `va` (its last allocation
    /// was freed).
    fn discard(&mut self, va: u64);
}

#[cfg(test)]
mod tests {
    use super::zeroes_after;

    #[test]
    fn new_extents_are_zeroed_unless_the_process_served_exactly_one_session() {
        assert!(
            zeroes_after(0),
            "a heap driven without sessions (tests) zeroes"
        );
        assert!(!zeroes_after(1), "one guest process owns the worker");
        assert!(
            zeroes_after(2),
            "a second guest process could see the first's data"
        );
        assert!(zeroes_after(7));
    }
}
