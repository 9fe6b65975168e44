//! [`ElasticHeap`]: the sub-allocator over one reserved device range, and the bookkeeping of
//! which [`CHUNK`]s back it, which are resident and which are swapped out.
//!
//! Placement is first-fit over the free spans in address order, so small allocations pack
//! into the chunks already mapped. Every allocation starts on a 512-byte boundary (what
//! `cuMemAlloc` guarantees is 256; 512 also suits texture alignment); allocations of
//! [`CHUNK`] or more start on a chunk boundary so they need no more chunks than their size.
//! A chunk is mapped when the first allocation overlapping it arrives and unmapped when the
//! last one goes. Chunks left mapped because an unmap failed are kept (mapped, no users) and
//! reused or unmapped again later; they count as resident.
//!
//! Swapping is all or nothing per heap: [`ElasticHeap::swap_out`] saves every resident chunk,
//! [`ElasticHeap::swap_in`] restores every saved one. While a heap is swapped out,
//! [`ElasticHeap::free`] discards the saved copies of chunks it empties, and
//! [`ElasticHeap::alloc`] swaps the heap in first (a context that allocates is running, and a
//! running context needs its memory): allocating in a swapped-out heap therefore fails with
//! `OUT_OF_MEMORY` when the memory cannot be brought back, and the heap stays swapped out.

use std::collections::BTreeMap;

use tracing::warn;
use vgpu_spec::Status;

use super::{ChunkMemory, CHUNK};
use crate::gpu::GpuResult;

/// Alignment of every allocation's start.
pub const ALLOC_ALIGN: u64 = 512;

/// Device address space to reserve for a slice memory limit of `limit` bytes: the limit plus
/// an eighth and 32 MiB, rounded up to [`CHUNK`]s. The slack absorbs alignment padding (a
/// large allocation after small ones starts on the next chunk), so a guest can allocate up
/// to its limit (which the slice accounting enforces per allocation) without running out of
/// addresses first. Address space costs nothing until chunks are mapped.
pub fn reservation_for_limit(limit: u64) -> u64 {
    let slack = (limit / 8).saturating_add(16 * CHUNK);
    let total = limit.saturating_add(slack);
    total
        .checked_next_multiple_of(CHUNK)
        .unwrap_or(u64::MAX - (u64::MAX % CHUNK))
}

/// One guest allocation.
#[derive(Clone, Copy, Debug)]
struct Allocation {
    /// Bytes asked for.
    size: u64,
    /// Bytes taken from the range (size rounded up to [`ALLOC_ALIGN`]).
    span: u64,
}

/// Where a chunk's contents are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ChunkState {
    /// Mapped on the device.
    Resident,
    /// Saved in host memory by the [`ChunkMemory`], not mapped.
    Saved,
}

#[derive(Clone, Copy, Debug)]
struct Chunk {
    /// Allocations overlapping the chunk.
    users: u32,
    state: ChunkState,
}

/// A sub-allocator over one reserved device range backed by [`CHUNK`]s of a [`ChunkMemory`].
/// Dropping it unmaps every chunk, discards every saved copy and releases the reservation.
pub struct ElasticHeap<M: ChunkMemory> {
    mem: M,
    base: u64,
    capacity: u64,
    /// Live allocations by start address.
    allocs: BTreeMap<u64, Allocation>,
    /// Free spans by start address: never adjacent (coalesced), never empty.
    free: BTreeMap<u64, u64>,
    /// Chunks in use (or left mapped), by device address.
    chunks: BTreeMap<u64, Chunk>,
    resident_chunks: u64,
    saved_chunks: u64,
    allocated: u64,
    swapped: bool,
}

/// The chunk addresses `[start, start + len)` overlaps (`len > 0`).
fn chunks_of(start: u64, len: u64) -> impl Iterator<Item = u64> {
    let first = start - start % CHUNK;
    let end = start + len; // callers pass ranges inside the reservation
    (first..end).step_by(CHUNK as usize)
}

impl<M: ChunkMemory> ElasticHeap<M> {
    /// Reserves `capacity` bytes (rounded up to [`CHUNK`], at least one chunk) of device
    /// address space from `mem`. Nothing is mapped yet.
    pub fn new(mut mem: M, capacity: u64) -> GpuResult<Self> {
        let capacity = capacity
            .max(1)
            .checked_next_multiple_of(CHUNK)
            .ok_or(Status::OUT_OF_MEMORY)?;
        let base = mem.reserve(capacity)?;
        if !base.is_multiple_of(CHUNK) || base.checked_add(capacity).is_none() {
            mem.release_reservation(base, capacity);
            return Err(Status::INVALID_VALUE);
        }
        Ok(ElasticHeap {
            mem,
            base,
            capacity,
            allocs: BTreeMap::new(),
            free: BTreeMap::from([(base, capacity)]),
            chunks: BTreeMap::new(),
            resident_chunks: 0,
            saved_chunks: 0,
            allocated: 0,
            swapped: false,
        })
    }

    /// Start of the reserved range.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Size of the reserved range (a multiple of [`CHUNK`]).
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The chunk memory (for an executor's host view of its device memory).
    pub fn memory(&self) -> &M {
        &self.mem
    }

    /// The chunk memory, mutably (tests adjust budgets through it).
    pub fn memory_mut(&mut self) -> &mut M {
        &mut self.mem
    }

    /// Allocates `size` bytes; returns the device address. Swaps the heap in first if it is
    /// swapped out. `INVALID_VALUE` for size 0; `OUT_OF_MEMORY` when no free span fits or a
    /// chunk cannot be mapped, with nothing changed.
    pub fn alloc(&mut self, size: u64) -> GpuResult<u64> {
        if size == 0 {
            return Err(Status::INVALID_VALUE);
        }
        if self.swapped {
            self.swap_in()?;
        }
        let span = size
            .checked_next_multiple_of(ALLOC_ALIGN)
            .ok_or(Status::OUT_OF_MEMORY)?;
        let align = if size >= CHUNK { CHUNK } else { ALLOC_ALIGN };
        let (free_start, free_len, at) = self
            .free
            .iter()
            .find_map(|(&start, &len)| {
                let at = start.checked_next_multiple_of(align)?;
                let end = at.checked_add(span)?;
                (end <= start + len).then_some((start, len, at))
            })
            .ok_or(Status::OUT_OF_MEMORY)?;
        self.map_new_chunks(at, span)?;
        self.free.remove(&free_start);
        if at > free_start {
            self.free.insert(free_start, at - free_start);
        }
        let tail = free_start + free_len - (at + span);
        if tail > 0 {
            self.free.insert(at + span, tail);
        }
        for va in chunks_of(at, span) {
            if let Some(chunk) = self.chunks.get_mut(&va) {
                chunk.users += 1;
            }
        }
        self.allocs.insert(at, Allocation { size, span });
        self.allocated += size;
        Ok(at)
    }

    /// Maps every chunk of `[at, at + span)` not mapped yet, with no users; on failure
    /// unmaps the ones it mapped and returns the failure.
    fn map_new_chunks(&mut self, at: u64, span: u64) -> GpuResult<()> {
        let new_chunks: Vec<u64> = chunks_of(at, span)
            .filter(|va| !self.chunks.contains_key(va))
            .collect();
        for (n, &va) in new_chunks.iter().enumerate() {
            if let Err(status) = self.mem.map(va) {
                self.undo_maps(&new_chunks[..n]);
                return Err(status);
            }
            self.chunks.insert(
                va,
                Chunk {
                    users: 0,
                    state: ChunkState::Resident,
                },
            );
            self.resident_chunks += 1;
        }
        // What mapping queued (zeroing) must be done before the memory is used.
        if !new_chunks.is_empty() {
            if let Err(status) = self.mem.settle() {
                self.undo_maps(&new_chunks);
                return Err(status);
            }
        }
        Ok(())
    }

    /// Unmaps chunks just mapped for an allocation that failed.
    fn undo_maps(&mut self, vas: &[u64]) {
        for &undo in vas {
            if let Err(error) = self.mem.unmap(undo) {
                warn!(%error, va = undo, "Unmapping a chunk after a failed allocation failed");
                continue; // keep it, mapped with no users
            }
            self.chunks.remove(&undo);
            self.resident_chunks -= 1;
        }
    }

    /// Frees the allocation starting at `addr`; returns its size. Chunks it leaves empty are
    /// unmapped (or, when swapped out, their saved copies dropped). `INVALID_VALUE` when no
    /// allocation starts at `addr`.
    pub fn free(&mut self, addr: u64) -> GpuResult<u64> {
        let alloc = self.allocs.remove(&addr).ok_or(Status::INVALID_VALUE)?;
        self.allocated -= alloc.size;
        self.give_back_span(addr, alloc.span);
        for va in chunks_of(addr, alloc.span) {
            let Some(chunk) = self.chunks.get_mut(&va) else {
                continue;
            };
            chunk.users = chunk.users.saturating_sub(1);
            if chunk.users > 0 {
                continue;
            }
            match chunk.state {
                ChunkState::Resident => match self.mem.unmap(va) {
                    Ok(()) => {
                        self.chunks.remove(&va);
                        self.resident_chunks -= 1;
                    }
                    // Kept mapped with no users: reused by a later allocation, or
                    // unmapped when the heap is dropped.
                    Err(error) => warn!(%error, va, "Unmapping a freed chunk failed"),
                },
                ChunkState::Saved => {
                    self.mem.discard(va);
                    self.chunks.remove(&va);
                    self.saved_chunks -= 1;
                }
            }
        }
        Ok(alloc.size)
    }

    /// Returns `[addr, addr + span)` to the free spans, merging with its neighbours.
    fn give_back_span(&mut self, addr: u64, span: u64) {
        let (mut start, mut len) = (addr, span);
        if let Some((&prev, &prev_len)) = self.free.range(..addr).next_back() {
            if prev + prev_len == addr {
                self.free.remove(&prev);
                start = prev;
                len += prev_len;
            }
        }
        if let Some(next_len) = self.free.remove(&(addr + span)) {
            len += next_len;
        }
        self.free.insert(start, len);
    }

    /// The allocation containing `[addr, addr + len)`: (its start, its size).
    pub fn find(&self, addr: u64, len: u64) -> Option<(u64, u64)> {
        let (&start, alloc) = self.allocs.range(..=addr).next_back()?;
        let end = (addr - start).checked_add(len)?;
        (end <= alloc.size).then_some((start, alloc.size))
    }

    /// Number of live allocations.
    pub fn allocation_count(&self) -> usize {
        self.allocs.len()
    }

    /// Bytes of live allocations, as asked for.
    pub fn allocated_bytes(&self) -> u64 {
        self.allocated
    }

    /// Bytes of chunks mapped on the device.
    pub fn resident_bytes(&self) -> u64 {
        self.resident_chunks * CHUNK
    }

    /// Bytes of chunks saved in host memory.
    pub fn swapped_bytes(&self) -> u64 {
        self.saved_chunks * CHUNK
    }

    /// True between a successful [`ElasticHeap::swap_out`] and the next successful
    /// [`ElasticHeap::swap_in`].
    pub fn is_swapped(&self) -> bool {
        self.swapped
    }

    /// Copies every resident chunk to host memory and unmaps it; returns the bytes moved.
    /// On failure nothing is unmapped and the heap stays resident. Swapping out a swapped-out
    /// heap moves nothing.
    pub fn swap_out(&mut self) -> GpuResult<u64> {
        let vas = self.chunk_addresses(ChunkState::Resident);
        if !vas.is_empty() {
            self.mem.save(&vas)?;
        }
        self.set_state(&vas, ChunkState::Saved);
        self.swapped = true;
        Ok(vas.len() as u64 * CHUNK)
    }

    /// Maps every saved chunk back at its address and restores it; returns the bytes moved.
    /// On failure (`OUT_OF_MEMORY` when the device cannot back them) the heap stays swapped
    /// out with every saved copy intact, and a later call may succeed. Swapping in a
    /// resident heap moves nothing.
    pub fn swap_in(&mut self) -> GpuResult<u64> {
        let vas = self.chunk_addresses(ChunkState::Saved);
        if !vas.is_empty() {
            self.mem.restore(&vas)?;
        }
        self.set_state(&vas, ChunkState::Resident);
        self.swapped = false;
        Ok(vas.len() as u64 * CHUNK)
    }

    fn chunk_addresses(&self, state: ChunkState) -> Vec<u64> {
        self.chunks
            .iter()
            .filter(|(_, c)| c.state == state)
            .map(|(&va, _)| va)
            .collect()
    }

    fn set_state(&mut self, vas: &[u64], state: ChunkState) {
        for va in vas {
            if let Some(chunk) = self.chunks.get_mut(va) {
                chunk.state = state;
            }
        }
        let moved = vas.len() as u64;
        match state {
            ChunkState::Resident => {
                self.saved_chunks -= moved;
                self.resident_chunks += moved;
            }
            ChunkState::Saved => {
                self.resident_chunks -= moved;
                self.saved_chunks += moved;
            }
        }
    }
}

impl<M: ChunkMemory> Drop for ElasticHeap<M> {
    fn drop(&mut self) {
        for (&va, chunk) in &self.chunks {
            match chunk.state {
                ChunkState::Resident => {
                    if let Err(error) = self.mem.unmap(va) {
                        warn!(%error, va, "Unmapping a chunk of a dropped heap failed");
                    }
                }
                ChunkState::Saved => self.mem.discard(va),
            }
        }
        self.chunks.clear();
        self.mem.release_reservation(self.base, self.capacity);
    }
}

#[cfg(test)]
#[path = "heap_tests.rs"]
mod tests;
