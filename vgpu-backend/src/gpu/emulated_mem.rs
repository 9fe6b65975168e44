//! Device memory of one emulated context.
//!
//! Guest allocations (`mem_alloc`) live in an [`ElasticHeap`] over [`HostChunks`], created at
//! the first allocation in a device address window of the device's heap size (windows of
//! destroyed contexts are reused), so they can be swapped out and in like on a real GPU.
//! Module globals, and guest allocations when elastic memory is off (`VGPU_ELASTIC=0`), are
//! separate zeroed host [`Block`]s at never-reused addresses. Every allocation is charged
//! against the device's total by its size, as before elastic memory.
//!
//! Work that touches guest memory while the context is swapped out swaps it in first.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::collections::BTreeMap;
use std::ptr::NonNull;
use std::sync::Arc;

use vgpu_spec::Status;

use super::{Shared, ALLOC_ALIGN};
use crate::elastic::{self, ElasticHeap, HostChunks, CHUNK};
use crate::gpu::{GpuResult, MemoryUsage, RawHandle};

/// Zeroed host memory standing in for device memory.
struct Block {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
}

// SAFETY: Block exclusively owns its allocation, like a Box<[u8]>.
unsafe impl Send for Block {}

impl Block {
    /// Allocates `len` zeroed bytes, or None if the host has no memory
    /// (never aborts the process). Large blocks are mapped lazily by the
    /// allocator, so untouched memory costs nothing.
    fn zeroed(len: u64) -> Option<Block> {
        let len = usize::try_from(len).ok()?;
        let layout = Layout::from_size_align(len.max(1), ALLOC_ALIGN as usize).ok()?;
        // SAFETY: the layout has a non-zero size.
        let ptr = NonNull::new(unsafe { alloc_zeroed(layout) })?;
        Some(Block { ptr, len, layout })
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        // SAFETY: ptr was returned by alloc_zeroed with exactly this layout
        // and is freed only here.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

/// Who owns an allocation: the guest (mem_alloc) or a module (its globals).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Owner {
    Guest,
    Module(RawHandle),
}

struct Alloc {
    block: Block,
    owner: Owner,
}

/// The device memory of one emulated context.
pub(super) struct ContextMemory {
    shared: Arc<Shared>,
    blocks: BTreeMap<u64, Alloc>,
    heap: Option<ElasticHeap<HostChunks>>,
    /// The heap's device address window (base, length), given back on drop.
    window: Option<(u64, u64)>,
    elastic: bool,
}

impl Drop for ContextMemory {
    fn drop(&mut self) {
        for alloc in self.blocks.values() {
            self.shared.release(alloc.block.len as u64);
        }
        if let Some(heap) = self.heap.take() {
            self.shared.release(heap.allocated_bytes());
        }
        if let Some((base, len)) = self.window.take() {
            self.shared.return_window(base, len);
        }
    }
}

impl ContextMemory {
    pub(super) fn new(shared: Arc<Shared>) -> ContextMemory {
        ContextMemory {
            shared,
            blocks: BTreeMap::new(),
            heap: None,
            window: None,
            elastic: elastic::cuda::enabled_by_env(),
        }
    }

    /// Allocates, charges and maps a zeroed block.
    pub(super) fn allocate_block(&mut self, size: u64, owner: Owner) -> GpuResult<u64> {
        self.shared.charge(size)?;
        let Some(block) = Block::zeroed(size) else {
            self.shared.release(size);
            return Err(Status::OUT_OF_MEMORY);
        };
        let address = match self.shared.reserve_address(size) {
            Ok(address) => address,
            Err(status) => {
                self.shared.release(size);
                return Err(status);
            }
        };
        self.blocks.insert(address, Alloc { block, owner });
        Ok(address)
    }

    /// The heap, created at first use.
    fn heap(&mut self) -> GpuResult<&mut ElasticHeap<HostChunks>> {
        if self.heap.is_none() {
            let len = elastic::reservation_for_limit(self.shared.heap_capacity());
            let base = self.shared.take_window(len)?;
            let chunks = HostChunks::new(base, len).with_card(self.shared.card.get().cloned());
            match ElasticHeap::new(chunks, len) {
                Ok(heap) => {
                    self.heap = Some(heap);
                    self.window = Some((base, len));
                }
                Err(status) => {
                    self.shared.return_window(base, len);
                    return Err(status);
                }
            }
        }
        self.heap.as_mut().ok_or(Status::OUT_OF_MEMORY)
    }

    /// A guest allocation (`mem_alloc`).
    pub(super) fn alloc_guest(&mut self, size: u64) -> GpuResult<u64> {
        if size == 0 {
            return Err(Status::INVALID_VALUE);
        }
        if !self.elastic {
            return self.allocate_block(size, Owner::Guest);
        }
        self.shared.charge(size)?;
        let result = self.heap().and_then(|heap| heap.alloc(size));
        if result.is_err() {
            self.shared.release(size);
        }
        result
    }

    /// Frees a guest allocation; `INVALID_VALUE` for anything else.
    pub(super) fn free_guest(&mut self, dptr: u64) -> GpuResult<()> {
        if let Some(Ok(size)) = self.heap.as_mut().map(|heap| heap.free(dptr)) {
            self.shared.release(size);
            return Ok(());
        }
        match self.blocks.get(&dptr) {
            Some(alloc) if alloc.owner == Owner::Guest => {
                self.shared.release(alloc.block.len as u64);
                self.blocks.remove(&dptr);
                Ok(())
            }
            _ => Err(Status::INVALID_VALUE),
        }
    }

    /// Frees every block `owner` holds (a module's globals).
    pub(super) fn free_owned_by(&mut self, owner: Owner) {
        let shared = &self.shared;
        self.blocks.retain(|_, alloc| {
            let keep = alloc.owner != owner;
            if !keep {
                shared.release(alloc.block.len as u64);
            }
            keep
        });
    }

    /// Host address of `[addr, addr + len)` (`len > 0`), which must lie inside one
    /// allocation; swaps the heap in when the range is in it and it is swapped out.
    fn region(&mut self, addr: u64, len: u64) -> GpuResult<NonNull<u8>> {
        if let Some(heap) = self.heap.as_mut() {
            if heap.find(addr, len).is_some() {
                if heap.is_swapped() {
                    heap.swap_in()?;
                }
                return heap
                    .memory()
                    .host_ptr(addr, len)
                    .ok_or(Status::INVALID_VALUE);
            }
        }
        let (&start, alloc) = self
            .blocks
            .range(..=addr)
            .next_back()
            .ok_or(Status::INVALID_VALUE)?;
        let offset = addr - start;
        offset
            .checked_add(len)
            .filter(|end| *end <= alloc.block.len as u64)
            .ok_or(Status::INVALID_VALUE)?;
        // SAFETY: offset + len <= the block's length (checked above), so the result stays
        // inside the block.
        Ok(unsafe { alloc.block.ptr.add(offset as usize) })
    }

    /// The bytes of `[addr, addr + len)`, inside one allocation.
    pub(super) fn bytes(&mut self, addr: u64, len: u64) -> GpuResult<&[u8]> {
        let ptr = self.region(addr, len)?;
        // SAFETY: region checked the range lies in one live allocation, which only &mut
        // self can free or write; len fits it, so it fits a usize.
        Ok(unsafe { std::slice::from_raw_parts(ptr.as_ptr(), len as usize) })
    }

    /// The bytes of `[addr, addr + len)`, mutably.
    pub(super) fn bytes_mut(&mut self, addr: u64, len: u64) -> GpuResult<&mut [u8]> {
        let ptr = self.region(addr, len)?;
        // SAFETY: as in bytes; the &mut self borrow makes it unique.
        Ok(unsafe { std::slice::from_raw_parts_mut(ptr.as_ptr(), len as usize) })
    }

    /// Copies `size` bytes device to device (`size > 0`); the ranges may overlap.
    pub(super) fn copy(&mut self, dst: u64, src: u64, size: u64) -> GpuResult<()> {
        let from = self.region(src, size)?;
        let to = self.region(dst, size)?;
        // SAFETY: both ranges lie in live allocations (region), `size` fits each, and
        // ptr::copy allows overlap. Swapping in (by either region call) moves no host
        // memory: heap addresses map to fixed host addresses.
        unsafe { std::ptr::copy(from.as_ptr(), to.as_ptr(), size as usize) };
        Ok(())
    }

    /// Swaps the guest allocations out (bytes moved; 0 without a heap).
    pub(super) fn swap_out(&mut self) -> GpuResult<u64> {
        self.heap.as_mut().map_or(Ok(0), ElasticHeap::swap_out)
    }

    /// Swaps the guest allocations back in.
    pub(super) fn swap_in(&mut self) -> GpuResult<u64> {
        self.heap.as_mut().map_or(Ok(0), ElasticHeap::swap_in)
    }

    pub(super) fn usage(&self) -> MemoryUsage {
        elastic::cuda::usage(self.heap.as_ref())
    }
}

/// Device address windows for heaps: fresh ones from the device's address allocator,
/// aligned to [`CHUNK`], and those of destroyed contexts again.
#[derive(Default)]
pub(super) struct Windows {
    free: Vec<(u64, u64)>,
}

impl Windows {
    pub(super) fn take(&mut self, len: u64) -> Option<u64> {
        let i = self.free.iter().position(|&(_, l)| l == len)?;
        Some(self.free.swap_remove(i).0)
    }

    pub(super) fn give_back(&mut self, base: u64, len: u64) {
        self.free.push((base, len));
    }
}

/// The chunk-aligned start of a fresh address range of `len + CHUNK` bytes at `raw`.
pub(super) fn align_window(raw: u64) -> GpuResult<u64> {
    raw.checked_next_multiple_of(CHUNK)
        .ok_or(Status::OUT_OF_MEMORY)
}
