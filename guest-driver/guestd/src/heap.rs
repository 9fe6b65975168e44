//! A heap over DMA memory for request, response and bounce buffers.
//!
//! First fit over 4 KiB blocks with a sorted, coalescing free list. An
//! allocation blocks until enough is free; every user holds at most one
//! buffer at a time while it waits, so waiting cannot deadlock.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use thiserror::Error;

use crate::dma::{DmaError, DmaMemory};

/// Allocation granularity.
pub const BLOCK: usize = 4096;

/// Heap failures.
#[derive(Debug, Error)]
pub enum HeapError {
    /// The request can never be satisfied.
    #[error("{want} bytes exceed the {capacity}-byte DMA heap")]
    TooLarge {
        /// Bytes asked for.
        want: usize,
        /// Heap size.
        capacity: usize,
    },
}

struct FreeList {
    /// (offset, len), sorted by offset, never adjacent.
    free: Vec<(usize, usize)>,
    used: usize,
}

impl FreeList {
    fn take(&mut self, len: usize) -> Option<usize> {
        let i = self.free.iter().position(|&(_, n)| n >= len)?;
        let (off, n) = self.free[i];
        if n == len {
            self.free.remove(i);
        } else {
            self.free[i] = (off + len, n - len);
        }
        self.used += len;
        Some(off)
    }

    fn give(&mut self, off: usize, len: usize) {
        self.used -= len;
        let i = self.free.partition_point(|&(o, _)| o < off);
        self.free.insert(i, (off, len));
        if i + 1 < self.free.len() && self.free[i].0 + self.free[i].1 == self.free[i + 1].0 {
            self.free[i].1 += self.free[i + 1].1;
            self.free.remove(i + 1);
        }
        if i > 0 && self.free[i - 1].0 + self.free[i - 1].1 == self.free[i].0 {
            self.free[i - 1].1 += self.free[i].1;
            self.free.remove(i);
        }
    }
}

/// The heap: a range of a [`DmaMemory`].
pub struct Heap {
    mem: Arc<DmaMemory>,
    start: usize,
    capacity: usize,
    state: Mutex<FreeList>,
    freed: Condvar,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Heap {
    /// A heap over `[start, start + len)` of `mem` (trimmed to whole blocks).
    pub fn new(mem: Arc<DmaMemory>, start: usize, len: usize) -> Result<Arc<Heap>, DmaError> {
        let start = start.next_multiple_of(BLOCK);
        let end =
            start
                .checked_add(len)
                .filter(|e| *e <= mem.len())
                .ok_or(DmaError::OutOfRange {
                    offset: start,
                    len,
                    size: mem.len(),
                })?;
        let capacity = (end - start) / BLOCK * BLOCK;
        Ok(Arc::new(Heap {
            mem,
            start,
            capacity,
            state: Mutex::new(FreeList {
                free: if capacity > 0 {
                    vec![(start, capacity)]
                } else {
                    Vec::new()
                },
                used: 0,
            }),
            freed: Condvar::new(),
        }))
    }

    /// Bytes the heap holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes allocated now.
    pub fn used(&self) -> usize {
        lock(&self.state).used
    }

    /// A zeroed buffer of at least `len` bytes; blocks until one is free.
    pub fn alloc(self: &Arc<Self>, len: usize) -> Result<DmaBuf, HeapError> {
        let rounded = len.max(1).next_multiple_of(BLOCK);
        if rounded > self.capacity {
            return Err(HeapError::TooLarge {
                want: len,
                capacity: self.capacity,
            });
        }
        let mut state = lock(&self.state);
        loop {
            if let Some(offset) = state.take(rounded) {
                drop(state);
                let mut buf = DmaBuf {
                    heap: Arc::clone(self),
                    offset,
                    len: rounded,
                };
                buf.as_mut_slice().fill(0);
                return Ok(buf);
            }
            state = self.freed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Offset of the heap in its memory.
    pub fn start(&self) -> usize {
        self.start
    }
}

/// A buffer of the heap; returned on drop.
pub struct DmaBuf {
    heap: Arc<Heap>,
    offset: usize,
    len: usize,
}

impl std::fmt::Debug for DmaBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaBuf")
            .field("offset", &self.offset)
            .field("len", &self.len)
            .finish()
    }
}

impl DmaBuf {
    /// Length (a whole number of blocks).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if empty (never).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes, for the driver to fill or read while the device does not
    /// own the buffer.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the range lies inside the heap's memory (FreeList only
        // hands out ranges inside it), no other DmaBuf overlaps it, and
        // `&mut self` makes this the only view.
        unsafe { std::slice::from_raw_parts_mut(self.heap.mem.ptr().add(self.offset), self.len) }
    }

    /// The bytes, read-only.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: as for `as_mut_slice`; `&self` allows only reads here.
        unsafe { std::slice::from_raw_parts(self.heap.mem.ptr().add(self.offset), self.len) }
    }

    /// A raw pointer to the buffer, as a device (or a test's fake of one)
    /// reaches it behind the driver's back.
    pub fn raw_ptr(&self) -> *mut u8 {
        self.heap.mem.ptr().wrapping_add(self.offset)
    }

    /// Appends the physical segments of `[at, at + len)` of the buffer.
    pub fn segments(
        &self,
        at: usize,
        len: usize,
        out: &mut Vec<(u64, u64)>,
    ) -> Result<(), DmaError> {
        if at.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(DmaError::OutOfRange {
                offset: at,
                len,
                size: self.len,
            });
        }
        self.heap.mem.segments(self.offset + at, len, out)
    }
}

impl Drop for DmaBuf {
    fn drop(&mut self) {
        lock(&self.heap.state).give(self.offset, self.len);
        self.heap.freed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn heap(blocks: usize) -> Arc<Heap> {
        let mem = Arc::new(DmaMemory::identity((blocks + 1) * BLOCK, BLOCK));
        Heap::new(mem, 100, blocks * BLOCK).unwrap()
    }

    #[test]
    fn allocations_are_disjoint_block_multiples_and_freed_space_coalesces() {
        let h = heap(8);
        assert_eq!(h.capacity(), 8 * BLOCK);
        assert_eq!(h.start(), BLOCK);
        let a = h.alloc(1).unwrap();
        let b = h.alloc(BLOCK + 1).unwrap();
        let c = h.alloc(BLOCK).unwrap();
        assert_eq!((a.len(), b.len(), c.len()), (BLOCK, 2 * BLOCK, BLOCK));
        assert_eq!(h.used(), 4 * BLOCK);
        let ranges = [a.offset, b.offset, c.offset];
        assert!(ranges[0] + BLOCK <= ranges[1] && ranges[1] + 2 * BLOCK <= ranges[2]);
        drop(b);
        drop(a);
        drop(c);
        assert_eq!(h.used(), 0);
        // Everything coalesced back into one run.
        let all = h.alloc(8 * BLOCK).unwrap();
        assert_eq!(all.offset, BLOCK);
    }

    #[test]
    fn buffers_come_zeroed_and_writable() {
        let h = heap(2);
        let mut a = h.alloc(10).unwrap();
        a.as_mut_slice()[..3].copy_from_slice(b"abc");
        drop(a);
        let b = h.alloc(10).unwrap();
        assert!(b.as_slice().iter().all(|x| *x == 0));
        let mut segs = Vec::new();
        b.segments(0, 10, &mut segs).unwrap();
        assert_eq!(segs, [(b.as_slice().as_ptr() as u64, 10)]);
        assert!(b.segments(BLOCK - 1, 2, &mut segs).is_err());
    }

    #[test]
    fn oversized_request_fails_at_once() {
        let h = heap(2);
        assert!(matches!(
            h.alloc(3 * BLOCK),
            Err(HeapError::TooLarge { .. })
        ));
    }

    #[test]
    fn full_heap_blocks_until_a_buffer_is_dropped() {
        let h = heap(2);
        let held = h.alloc(2 * BLOCK).unwrap();
        let h2 = Arc::clone(&h);
        let waiter = std::thread::spawn(move || h2.alloc(BLOCK).map(|b| b.len()));
        // The waiter cannot finish while the heap is full.
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!waiter.is_finished());
        drop(held);
        assert_eq!(waiter.join().unwrap().unwrap(), BLOCK);
    }
}
