//! Elastic device memory (decision 7): every context's guest allocations live in one reserved
//! device address range as large as the slice's limit, backed by 2 MiB physical chunks mapped
//! as allocations need them. Device pointers never change for the life of an allocation, so a
//! context's chunks can be copied out to host memory and unmapped (swap-out, when the scheduler
//! reclaims the slice's memory) and later mapped back at the same addresses and restored
//! (swap-in) without its guest ever noticing.
//!
//! [`ChunkMemory`] is what an executor provides (the CUDA virtual memory API on a real GPU,
//! host memory on the emulated device); [`ElasticHeap`] is the sub-allocator and the chunk
//! bookkeeping on top of it, shared by both.

use crate::gpu::GpuResult;

pub mod cuda;
pub mod heap;
pub mod host;

pub use cuda::CudaChunks;
pub use heap::{reservation_for_limit, ElasticHeap};
pub use host::HostChunks;

/// The physical chunk size: the granularity of mapping, accounting and swapping.
pub const CHUNK: u64 = 2 << 20;

/// An executor's device address space and physical memory, in [`CHUNK`]s.
pub trait ChunkMemory: Send {
    /// Reserves `size` bytes (a multiple of [`CHUNK`]) of device address space, aligned to
    /// [`CHUNK`]; returns its base. Nothing is backed yet.
    fn reserve(&mut self, size: u64) -> GpuResult<u64>;
    /// Gives a reservation back (every chunk in it already unmapped).
    fn release_reservation(&mut self, base: u64, size: u64);
    /// Backs `[va, va + CHUNK)` with a new zeroed physical chunk the device can read and write.
    /// `OUT_OF_MEMORY` when the device has no physical memory left.
    fn map(&mut self, va: u64) -> GpuResult<()>;
    /// Waits for whatever [`ChunkMemory::map`] queued on the device (zeroing new chunks), so
    /// that the chunks mapped since are ready for any stream. Called once per allocation.
    fn settle(&mut self) -> GpuResult<()> {
        Ok(())
    }
    /// Unmaps and frees the physical chunk at `va`; its contents are lost.
    fn unmap(&mut self, va: u64) -> GpuResult<()>;
    /// Copies the chunks at `vas` to host memory kept by the implementation, then unmaps and
    /// frees them. The copies overlap (issued together, waited for together).
    fn save(&mut self, vas: &[u64]) -> GpuResult<()>;
    /// Maps the chunks at `vas` again, at the same addresses, and copies their saved contents
    /// back (overlapping), dropping the host copies. `OUT_OF_MEMORY` (and nothing changed for
    /// the chunks not restored) when the device cannot back them.
    fn restore(&mut self, vas: &[u64]) -> GpuResult<()>;
    /// Drops the saved copy of a swapped-out chunk whose last allocation was freed.
    fn discard(&mut self, va: u64);
}
