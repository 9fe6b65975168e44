//! [`ElasticHeap`]: the sub-allocator over one reserved device range, and the bookkeeping of
//! which extents back it, which are resident and which are swapped out.
//!
//! Placement is first-fit over the free spans in address order, so small allocations pack
//! into the chunks already mapped. Every allocation starts on a 512-byte boundary (what
//! `cuMemAlloc` guarantees is 256; 512 also suits texture alignment).
//!
//! An allocation of [`CHUNK`] or more starts on a chunk boundary and takes its size rounded up
//! to whole chunks: that span is its own extent, one physical allocation mapped when it is
//! allocated and unmapped (in one call) when it is freed; its tail is never shared. Smaller
//! allocations share single-chunk extents: such a chunk is mapped when the first allocation
//! overlapping it arrives and unmapped when the last one goes (an allocation may straddle two
//! of them). Extents left mapped because an unmap failed are kept (mapped, no users): reused
//! by an allocation needing exactly that extent, unmapped again before an allocation needs
//! their addresses otherwise, or when the heap is dropped; they count as resident.
//!
//! Resident and swapped bytes are counted in whole chunks.
//!
//! Swapping is all or nothing per heap: [`ElasticHeap::swap_out`] saves every resident
//! extent, [`ElasticHeap::swap_in`] restores every saved one. While a heap is swapped out,
//! [`ElasticHeap::free`] discards the saved copies of extents it empties, and
//! [`ElasticHeap::alloc`] swaps the heap in first (a context that allocates is running, and a
//! running context needs its memory): allocating in a swapped-out heap therefore fails with
//! `OUT_OF_MEMORY` when the memory cannot be brought back, and the heap stays swapped out.

use std::collections::BTreeMap;

use tracing::warn;
use vgpu_spec::Status;

use super::{ChunkMemory, Extent, CHUNK};
use crate::gpu::GpuResult;

/// Alignment of every allocation's start.
pub const ALLOC_ALIGN: u64 = 512;

/// Device address space to reserve for a slice memory limit of `limit` bytes: the limit plus
/// an eighth and 32 MiB, rounded up to [`CHUNK`]s. The slack absorbs alignment padding (a
/// large allocation after small ones starts on the next chunk and ends on a chunk), so a
/// guest can allocate up to its limit (which the slice accounting enforces per allocation)
/// without running out of addresses first. Address space costs nothing until it is mapped.
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
    /// Bytes taken from the range: size rounded up to [`ALLOC_ALIGN`], or to [`CHUNK`] for a
    /// large allocation.
    span: u64,
}

/// True for allocations that get an extent of their own.
fn is_large(size: u64) -> bool {
    size >= CHUNK
}

/// The extents backing an allocation at `at` of `size` bytes taking `span`: its own, or the
/// single chunks it overlaps.
fn extents_of(at: u64, size: u64, span: u64) -> Vec<Extent> {
    if is_large(size) {
        return vec![(at, span)];
    }
    chunks_of(at, span).map(|va| (va, CHUNK)).collect()
}

/// The chunk addresses `[start, start + len)` overlaps (`len > 0`).
fn chunks_of(start: u64, len: u64) -> impl Iterator<Item = u64> {
    let first = start - start % CHUNK;
    let end = start + len; // callers pass ranges inside the reservation
    (first..end).step_by(CHUNK as usize)
}

/// Where an extent's contents are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Mapped on the device.
    Resident,
    /// Saved in host memory by the [`ChunkMemory`], not mapped.
    Saved,
}

#[derive(Clone, Copy, Debug)]
struct ExtentInfo {
    /// Bytes (a multiple of [`CHUNK`]).
    len: u64,
    /// Allocations overlapping the extent.
    users: u32,
    state: State,
}

/// A sub-allocator over one reserved device range backed by extents of a [`ChunkMemory`].
/// Dropping it unmaps every extent, discards every saved copy and releases the reservation.
pub struct ElasticHeap<M: ChunkMemory> {
    mem: M,
    base: u64,
    capacity: u64,
    /// Live allocations by start address.
    allocs: BTreeMap<u64, Allocation>,
    /// Free spans by start address: never adjacent (coalesced), never empty.
    free: BTreeMap<u64, u64>,
    /// Extents in use (or left mapped), by device address; never overlapping.
    extents: BTreeMap<u64, ExtentInfo>,
    resident_chunks: u64,
    saved_chunks: u64,
    allocated: u64,
    swapped: bool,
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
            extents: BTreeMap::new(),
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
    /// swapped out. `INVALID_VALUE` for size 0; `OUT_OF_MEMORY` when no free span fits or an
    /// extent cannot be mapped, with nothing changed.
    pub fn alloc(&mut self, size: u64) -> GpuResult<u64> {
        if size == 0 {
            return Err(Status::INVALID_VALUE);
        }
        if self.swapped {
            self.swap_in()?;
        }
        let unit = if is_large(size) { CHUNK } else { ALLOC_ALIGN };
        let span = size
            .checked_next_multiple_of(unit)
            .ok_or(Status::OUT_OF_MEMORY)?;
        let (free_start, free_len, at) = self
            .free
            .iter()
            .find_map(|(&start, &len)| {
                let at = start.checked_next_multiple_of(unit)?;
                let end = at.checked_add(span)?;
                (end <= start + len).then_some((start, len, at))
            })
            .ok_or(Status::OUT_OF_MEMORY)?;
        let needed = extents_of(at, size, span);
        self.back(&needed)?;
        self.free.remove(&free_start);
        if at > free_start {
            self.free.insert(free_start, at - free_start);
        }
        let tail = free_start + free_len - (at + span);
        if tail > 0 {
            self.free.insert(at + span, tail);
        }
        for (va, _) in &needed {
            if let Some(extent) = self.extents.get_mut(va) {
                extent.users += 1;
            }
        }
        self.allocs.insert(at, Allocation { size, span });
        self.allocated += size;
        Ok(at)
    }

    /// Makes sure every extent of `needed` is mapped: reuses those mapped already (exactly),
    /// maps the others with no users. On failure unmaps the ones it mapped and returns the
    /// failure.
    fn back(&mut self, needed: &[Extent]) -> GpuResult<()> {
        let mut new = Vec::new();
        for &(va, len) in needed {
            if self.extents.get(&va).is_some_and(|e| e.len == len) {
                continue;
            }
            let mapped = self
                .clear_leftovers(va, len)
                .and_then(|()| self.mem.map(va, len));
            if let Err(status) = mapped {
                self.undo_maps(&new);
                return Err(status);
            }
            self.extents.insert(
                va,
                ExtentInfo {
                    len,
                    users: 0,
                    state: State::Resident,
                },
            );
            self.resident_chunks += len / CHUNK;
            new.push((va, len));
        }
        // What mapping queued (zeroing) must be done before the memory is used.
        if !new.is_empty() {
            if let Err(status) = self.mem.settle() {
                self.undo_maps(&new);
                return Err(status);
            }
        }
        Ok(())
    }

    /// Unmaps the extents overlapping `[va, va + len)`, all of them left mapped with no users
    /// by a failed unmap (the range is free), so that the range can be mapped anew.
    fn clear_leftovers(&mut self, va: u64, len: u64) -> GpuResult<()> {
        let overlapping: Vec<(u64, ExtentInfo)> = self
            .extents
            .range(..va + len)
            .rev()
            .take_while(|(&start, e)| start + e.len > va)
            .map(|(&start, &e)| (start, e))
            .collect();
        for (start, extent) in overlapping {
            if extent.users > 0 || extent.state != State::Resident {
                warn!(start, "An extent in use overlaps free device addresses");
                return Err(Status::UNKNOWN);
            }
            self.mem.unmap(start, extent.len)?;
            self.extents.remove(&start);
            self.resident_chunks -= extent.len / CHUNK;
        }
        Ok(())
    }

    /// Unmaps extents just mapped for an allocation that failed.
    fn undo_maps(&mut self, extents: &[Extent]) {
        for &(va, len) in extents {
            if let Err(error) = self.mem.unmap(va, len) {
                warn!(%error, va, len, "Unmapping an extent after a failed allocation failed");
                continue; // keep it, mapped with no users
            }
            self.extents.remove(&va);
            self.resident_chunks -= len / CHUNK;
        }
    }

    /// Frees the allocation starting at `addr`; returns its size. Extents it leaves empty are
    /// unmapped (or, when swapped out, their saved copies dropped). `INVALID_VALUE` when no
    /// allocation starts at `addr`.
    pub fn free(&mut self, addr: u64) -> GpuResult<u64> {
        let alloc = self.allocs.remove(&addr).ok_or(Status::INVALID_VALUE)?;
        self.allocated -= alloc.size;
        self.give_back_span(addr, alloc.span);
        for (va, _) in extents_of(addr, alloc.size, alloc.span) {
            let Some(extent) = self.extents.get_mut(&va) else {
                continue;
            };
            extent.users = extent.users.saturating_sub(1);
            if extent.users > 0 {
                continue;
            }
            match extent.state {
                State::Resident => match self.mem.unmap(va, extent.len) {
                    Ok(()) => {
                        self.resident_chunks -= extent.len / CHUNK;
                        self.extents.remove(&va);
                    }
                    // Kept mapped with no users: reused or unmapped again later.
                    Err(error) => warn!(%error, va, "Unmapping a freed extent failed"),
                },
                State::Saved => {
                    self.saved_chunks -= extent.len / CHUNK;
                    self.mem.discard(va);
                    self.extents.remove(&va);
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

    /// Bytes of extents mapped on the device (whole chunks).
    pub fn resident_bytes(&self) -> u64 {
        self.resident_chunks * CHUNK
    }

    /// Bytes of extents saved in host memory (whole chunks).
    pub fn swapped_bytes(&self) -> u64 {
        self.saved_chunks * CHUNK
    }

    /// True between a successful [`ElasticHeap::swap_out`] and the next successful
    /// [`ElasticHeap::swap_in`].
    pub fn is_swapped(&self) -> bool {
        self.swapped
    }

    /// Copies every resident extent to host memory and unmaps it; returns the bytes moved.
    /// On failure nothing is unmapped and the heap stays resident. Swapping out a swapped-out
    /// heap moves nothing.
    pub fn swap_out(&mut self) -> GpuResult<u64> {
        let extents = self.extents_in(State::Resident);
        if !extents.is_empty() {
            self.mem.save(&extents)?;
        }
        let moved = self.set_state(&extents, State::Saved);
        self.swapped = true;
        Ok(moved)
    }

    /// Maps every saved extent back at its address and restores it; returns the bytes moved.
    /// On failure (`OUT_OF_MEMORY` when the device cannot back them) the heap stays swapped
    /// out with every saved copy intact, and a later call may succeed. Swapping in a
    /// resident heap moves nothing.
    pub fn swap_in(&mut self) -> GpuResult<u64> {
        let extents = self.extents_in(State::Saved);
        if !extents.is_empty() {
            self.mem.restore(&extents)?;
        }
        let moved = self.set_state(&extents, State::Resident);
        self.swapped = false;
        Ok(moved)
    }

    fn extents_in(&self, state: State) -> Vec<Extent> {
        self.extents
            .iter()
            .filter(|(_, e)| e.state == state)
            .map(|(&va, e)| (va, e.len))
            .collect()
    }

    /// Marks `extents` as in `state`; returns their bytes.
    fn set_state(&mut self, extents: &[Extent], state: State) -> u64 {
        for (va, _) in extents {
            if let Some(extent) = self.extents.get_mut(va) {
                extent.state = state;
            }
        }
        let moved: u64 = extents.iter().map(|&(_, len)| len / CHUNK).sum();
        match state {
            State::Resident => {
                self.saved_chunks -= moved;
                self.resident_chunks += moved;
            }
            State::Saved => {
                self.resident_chunks -= moved;
                self.saved_chunks += moved;
            }
        }
        moved * CHUNK
    }
}

impl<M: ChunkMemory> Drop for ElasticHeap<M> {
    fn drop(&mut self) {
        for (&va, extent) in &self.extents {
            match extent.state {
                State::Resident => {
                    if let Err(error) = self.mem.unmap(va, extent.len) {
                        warn!(%error, va, "Unmapping an extent of a dropped heap failed");
                    }
                }
                State::Saved => self.mem.discard(va),
            }
        }
        self.extents.clear();
        self.mem.release_reservation(self.base, self.capacity);
    }
}

#[cfg(test)]
#[path = "heap_tests.rs"]
mod tests;
