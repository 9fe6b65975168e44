//! The staging heap: bounce buffers and large requests inside guest memory.
//!
//! [`Heap`] is a first-fit allocator over offsets with coalescing on free.
//! [`StagingPool`] puts it over the staging part of guest memory, and
//! [`Staging`] is one allocation, released on drop. A staging buffer handed to
//! `Device::submit` lives in the in-flight record and is dropped (released)
//! when the device answers.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::mem::SharedMem;

/// Allocation granularity and alignment of the heap.
pub const HEAP_ALIGN: usize = 64;

/// First-fit allocator over `[0, capacity)`.
#[derive(Debug)]
pub struct Heap {
    /// Free blocks: offset -> length. Adjacent blocks are always merged.
    free: BTreeMap<usize, usize>,
    capacity: usize,
    used: usize,
}

impl Heap {
    /// A heap of `capacity` bytes (rounded down to [`HEAP_ALIGN`]), all free.
    pub fn new(capacity: usize) -> Heap {
        let capacity = capacity - capacity % HEAP_ALIGN;
        let mut free = BTreeMap::new();
        if capacity > 0 {
            free.insert(0, capacity);
        }
        Heap {
            free,
            capacity,
            used: 0,
        }
    }

    /// Bytes a request of `len` occupies.
    pub fn rounded(len: usize) -> Option<usize> {
        len.max(1).checked_next_multiple_of(HEAP_ALIGN)
    }

    /// Capacity in bytes: the largest allocation possible on an empty heap.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes currently allocated.
    pub fn used(&self) -> usize {
        self.used
    }

    /// The largest block that is free now.
    #[cfg(test)]
    pub fn largest_free(&self) -> usize {
        self.free.values().copied().max().unwrap_or(0)
    }

    /// Allocates `len` bytes (first fit); returns the offset.
    pub fn alloc(&mut self, len: usize) -> Option<usize> {
        let size = Self::rounded(len)?;
        let (&off, &block) = self.free.iter().find(|(_, &l)| l >= size)?;
        self.free.remove(&off);
        if block > size {
            self.free.insert(off + size, block - size);
        }
        self.used += size;
        Some(off)
    }

    /// Frees the allocation of `len` bytes at `off`, merging with neighbours.
    pub fn free(&mut self, off: usize, len: usize) {
        let Some(size) = Self::rounded(len) else {
            return;
        };
        self.used = self.used.saturating_sub(size);
        let mut start = off;
        let mut end = off + size;
        if let Some((&prev, &plen)) = self.free.range(..off).next_back() {
            if prev + plen == off {
                self.free.remove(&prev);
                start = prev;
            }
        }
        if let Some(nlen) = self.free.remove(&end) {
            end += nlen;
        }
        self.free.insert(start, end - start);
    }
}

/// The staging part of guest memory and its allocator.
pub struct StagingPool {
    mem: Arc<SharedMem>,
    /// Offset of the heap inside guest memory.
    base: usize,
    /// Guest-physical address of the heap's first byte.
    gpa: u64,
    heap: Mutex<Heap>,
}

impl StagingPool {
    /// A pool over `[base, base+len)` of `mem`, seen by the device at `gpa`.
    pub fn new(mem: Arc<SharedMem>, base: usize, len: usize, gpa: u64) -> StagingPool {
        StagingPool {
            mem,
            base,
            gpa,
            heap: Mutex::new(Heap::new(len)),
        }
    }

    fn heap(&self) -> MutexGuard<'_, Heap> {
        self.heap.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The largest allocation possible.
    pub fn capacity(&self) -> usize {
        self.heap().capacity()
    }

    /// Bytes allocated now.
    pub fn used(&self) -> usize {
        self.heap().used()
    }

    /// Allocates `len` bytes if a block is free now.
    pub fn try_alloc(self: &Arc<Self>, len: usize) -> Option<Staging> {
        let off = self.heap().alloc(len)?;
        Some(Staging {
            pool: Arc::clone(self),
            off,
            len,
        })
    }

    /// If `[ptr, ptr+len)` lies inside the heap, its guest-physical address.
    pub fn translate(&self, ptr: *const u8, len: usize) -> Option<u64> {
        let off = self.mem.offset_of(ptr, len)?;
        let rel = off.checked_sub(self.base)?;
        let cap = self.heap().capacity();
        (rel.checked_add(len)? <= cap).then(|| self.gpa + rel as u64)
    }
}

/// A buffer in guest memory the device can reach; released on drop.
pub struct Staging {
    pool: Arc<StagingPool>,
    off: usize,
    len: usize,
}

impl std::fmt::Debug for Staging {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Staging")
            .field("gpa", &format_args!("{:#x}", self.gpa()))
            .field("len", &self.len)
            .finish()
    }
}

impl Staging {
    fn host_ptr(&self) -> *mut u8 {
        self.pool.mem.ptr().wrapping_add(self.pool.base + self.off)
    }

    /// The buffer, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `[off, off+len)` was allocated from the heap for this value
        // alone and lies inside the mapping the pool keeps alive. The device
        // writes it only while a request naming it is in flight, which the
        // transport ends before handing the buffer back.
        unsafe { std::slice::from_raw_parts_mut(self.host_ptr(), self.len) }
    }

    /// The buffer.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: as in `as_mut_slice`.
        unsafe { std::slice::from_raw_parts(self.host_ptr(), self.len) }
    }

    /// Guest-physical address of the first byte.
    pub fn gpa(&self) -> u64 {
        self.pool.gpa + self.off as u64
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for a zero-length buffer.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        self.pool.heap().free(self.off, self.len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_rounds_to_alignment_and_free_coalesces() {
        let mut h = Heap::new(1024);
        let a = h.alloc(1).unwrap();
        let b = h.alloc(100).unwrap();
        let c = h.alloc(64).unwrap();
        assert_eq!((a, b, c), (0, 64, 192));
        assert_eq!(h.used(), 256);
        h.free(b, 100);
        assert_eq!(h.largest_free(), 1024 - 256);
        h.free(a, 1);
        // a and b merged: 192 bytes free in front of c.
        assert_eq!(h.alloc(192), Some(0));
        h.free(0, 192);
        h.free(c, 64);
        assert_eq!(h.used(), 0);
        assert_eq!(h.largest_free(), 1024);
        assert_eq!(h.free.len(), 1);
    }

    #[test]
    fn full_heap_refuses_then_accepts_after_free() {
        let mut h = Heap::new(256);
        let a = h.alloc(128).unwrap();
        let b = h.alloc(128).unwrap();
        assert_eq!(h.alloc(1), None);
        h.free(a, 128);
        assert_eq!(h.alloc(129), None);
        assert_eq!(h.alloc(128), Some(a));
        h.free(b, 128);
        h.free(a, 128);
        assert_eq!(h.alloc(256), Some(0));
    }

    #[test]
    fn fragmentation_blocks_large_alloc_until_neighbours_free() {
        let mut h = Heap::new(64 * 8);
        let blocks: Vec<usize> = (0..8).map(|_| h.alloc(64).unwrap()).collect();
        for off in blocks.iter().step_by(2) {
            h.free(*off, 64);
        }
        assert_eq!(h.used(), 64 * 4);
        assert_eq!(h.largest_free(), 64);
        assert_eq!(h.alloc(128), None);
        h.free(blocks[1], 64);
        assert_eq!(h.largest_free(), 64 * 3);
        assert_eq!(h.alloc(192), Some(0));
    }

    #[test]
    fn oversized_request_fails_without_changing_state() {
        let mut h = Heap::new(1000);
        assert_eq!(h.capacity(), 960);
        assert_eq!(h.alloc(961), None);
        assert_eq!(h.alloc(usize::MAX), None);
        assert_eq!(h.alloc(960), Some(0));
    }

    #[test]
    fn staging_buffers_translate_and_release_on_drop() {
        let mem = Arc::new(SharedMem::new(c"vgpu-test", 1 << 16).unwrap());
        let pool = Arc::new(StagingPool::new(Arc::clone(&mem), 4096, 8192, 0x5000));
        assert_eq!(pool.capacity(), 8192);
        let mut a = pool.try_alloc(100).unwrap();
        let b = pool.try_alloc(8064).unwrap();
        assert!(pool.try_alloc(64).is_none());
        assert_eq!(a.gpa(), 0x5000);
        assert_eq!(b.gpa(), 0x5000 + 128);
        assert_eq!(a.len(), 100);
        a.as_mut_slice().fill(0xab);
        assert!(a.as_slice().iter().all(|x| *x == 0xab));
        let p = a.as_slice().as_ptr();
        assert_eq!(pool.translate(p, 100), Some(0x5000));
        assert_eq!(pool.translate(p.wrapping_add(10), 5), Some(0x500a));
        assert_eq!(pool.translate(p.wrapping_add(8000), 200), None);
        assert_eq!(pool.translate(p.wrapping_sub(1), 1), None);
        drop(b);
        assert_eq!(pool.used(), 128);
        drop(a);
        assert_eq!(pool.used(), 0);
        assert!(pool.try_alloc(8192).is_some());
    }
}
