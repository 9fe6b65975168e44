//! [`HostChunks`]: [`ChunkMemory`] in host memory, for the emulated device.
//!
//! The reservation is one anonymous private mapping (`MAP_NORESERVE`, so untouched pages cost
//! nothing), and device address `va` lies at host address `host + (va - base)`: device ranges
//! are contiguous in host memory across chunks, so a copy spanning chunks is one host copy.
//! Device addresses come from a window the emulated executor hands over (its own address
//! allocator keeps every device's addresses apart).
//!
//! Mapping a chunk only marks it (its pages are zero: fresh, or dropped with
//! `MADV_DONTNEED`); an optional budget of mapped chunks makes running out of device memory
//! testable. Unmapping and saving drop the chunk's pages, so device memory read without a
//! correct restore reads zeros, which integrity tests catch.

use std::collections::{HashMap, HashSet};
use std::ptr::NonNull;

use tracing::warn;
use vgpu_spec::Status;

use super::{ChunkMemory, CHUNK};
use crate::gpu::GpuResult;

/// The host mapping behind a reservation.
struct Mapping {
    host: NonNull<u8>,
    /// Device address of the first byte.
    base: u64,
    len: u64,
}

/// Host memory standing in for device chunks.
pub struct HostChunks {
    /// The device address window reservations are placed in.
    window_base: u64,
    window_len: u64,
    mapping: Option<Mapping>,
    mapped: HashSet<u64>,
    saved: HashMap<u64, Vec<u8>>,
    /// Most chunks mapped at once; `None` for no limit.
    budget: Option<usize>,
}

// SAFETY: HostChunks exclusively owns its mapping (like a Box<[u8]>); nothing in it is tied
// to a thread.
unsafe impl Send for HostChunks {}

impl HostChunks {
    /// Chunk memory whose reservation will lie at `window_base` (a multiple of [`CHUNK`]) and
    /// may be at most `window_len` bytes.
    pub fn new(window_base: u64, window_len: u64) -> HostChunks {
        HostChunks {
            window_base,
            window_len,
            mapping: None,
            mapped: HashSet::new(),
            saved: HashMap::new(),
            budget: None,
        }
    }

    /// Limits the chunks mapped at once to `chunks` (`None`: no limit); mapping beyond it
    /// fails with `OUT_OF_MEMORY`. Chunks mapped already stay mapped.
    pub fn set_budget(&mut self, chunks: Option<usize>) {
        self.budget = chunks;
    }

    /// Chunks mapped now.
    pub fn mapped_chunks(&self) -> usize {
        self.mapped.len()
    }

    /// Chunks saved now.
    pub fn saved_chunks(&self) -> usize {
        self.saved.len()
    }

    /// Host address of device range `[va, va + len)`, if it lies in the reservation and every
    /// chunk it touches is mapped (`len > 0`).
    pub fn host_ptr(&self, va: u64, len: u64) -> Option<NonNull<u8>> {
        let m = self.mapping.as_ref()?;
        let offset = va.checked_sub(m.base)?;
        let end = offset.checked_add(len).filter(|end| *end <= m.len)?;
        if len == 0 {
            return None;
        }
        let first = va - offset % CHUNK;
        let last = m.base + (end - 1) / CHUNK * CHUNK;
        let all_mapped = (first..=last)
            .step_by(CHUNK as usize)
            .all(|chunk| self.mapped.contains(&chunk));
        if !all_mapped {
            return None;
        }
        let offset = usize::try_from(offset).ok()?;
        // SAFETY: offset + len <= the mapping's length (checked above), so the result stays
        // inside the mapping.
        Some(unsafe { m.host.add(offset) })
    }

    /// The bytes of device range `[va, va + len)` (see [`HostChunks::host_ptr`]).
    pub fn slice(&self, va: u64, len: u64) -> Option<&[u8]> {
        let ptr = self.host_ptr(va, len)?;
        // SAFETY: host_ptr checked the range lies in the mapping, which lives as long as
        // &self and is only written through &mut self.
        Some(unsafe { std::slice::from_raw_parts(ptr.as_ptr(), usize::try_from(len).ok()?) })
    }

    /// The bytes of device range `[va, va + len)`, mutably.
    pub fn slice_mut(&mut self, va: u64, len: u64) -> Option<&mut [u8]> {
        let ptr = self.host_ptr(va, len)?;
        // SAFETY: as in slice; &mut self makes the borrow unique.
        Some(unsafe { std::slice::from_raw_parts_mut(ptr.as_ptr(), usize::try_from(len).ok()?) })
    }

    /// The host bytes of the chunk at `va` (which must be in the reservation).
    fn chunk_ptr(&self, va: u64) -> GpuResult<*mut u8> {
        let m = self.mapping.as_ref().ok_or(Status::INVALID_VALUE)?;
        let offset = va
            .checked_sub(m.base)
            .filter(|o| o.is_multiple_of(CHUNK) && o + CHUNK <= m.len)
            .ok_or(Status::INVALID_VALUE)?;
        let offset = usize::try_from(offset).map_err(|_| Status::INVALID_VALUE)?;
        // SAFETY: offset + CHUNK <= the mapping's length (checked above).
        Ok(unsafe { m.host.as_ptr().add(offset) })
    }

    /// Drops the pages of the chunk at `ptr`: they read as zeros from now on.
    fn drop_pages(ptr: *mut u8) {
        // SAFETY: ptr starts a CHUNK-long, page-aligned piece of our private anonymous
        // mapping; MADV_DONTNEED only discards its contents.
        let rc = unsafe { libc::madvise(ptr.cast(), CHUNK as usize, libc::MADV_DONTNEED) };
        if rc != 0 {
            warn!(error = %std::io::Error::last_os_error(), "madvise(MADV_DONTNEED) failed");
        }
    }

    fn within_budget(&self, more: usize) -> bool {
        self.budget
            .is_none_or(|budget| self.mapped.len().saturating_add(more) <= budget)
    }
}

impl ChunkMemory for HostChunks {
    fn reserve(&mut self, size: u64) -> GpuResult<u64> {
        if self.mapping.is_some() || !size.is_multiple_of(CHUNK) || size == 0 {
            return Err(Status::INVALID_VALUE);
        }
        if size > self.window_len {
            return Err(Status::OUT_OF_MEMORY);
        }
        let len = usize::try_from(size).map_err(|_| Status::OUT_OF_MEMORY)?;
        // SAFETY: a fresh anonymous mapping at an address of the kernel's choosing; it
        // touches no existing memory.
        let host = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if host == libc::MAP_FAILED {
            warn!(size, error = %std::io::Error::last_os_error(), "Reserving emulated device memory failed");
            return Err(Status::OUT_OF_MEMORY);
        }
        let host = NonNull::new(host.cast::<u8>()).ok_or(Status::OUT_OF_MEMORY)?;
        self.mapping = Some(Mapping {
            host,
            base: self.window_base,
            len: size,
        });
        Ok(self.window_base)
    }

    fn release_reservation(&mut self, base: u64, size: u64) {
        let Some(m) = self.mapping.take_if(|m| m.base == base && m.len == size) else {
            warn!(base, size, "Released an unknown emulated reservation");
            return;
        };
        self.mapped.clear();
        self.saved.clear();
        unmap(&m);
    }

    fn map(&mut self, va: u64) -> GpuResult<()> {
        self.chunk_ptr(va)?;
        if self.mapped.contains(&va) || self.saved.contains_key(&va) {
            return Err(Status::INVALID_VALUE);
        }
        if !self.within_budget(1) {
            return Err(Status::OUT_OF_MEMORY);
        }
        self.mapped.insert(va);
        Ok(())
    }

    fn unmap(&mut self, va: u64) -> GpuResult<()> {
        let ptr = self.chunk_ptr(va)?;
        if !self.mapped.remove(&va) {
            return Err(Status::INVALID_VALUE);
        }
        Self::drop_pages(ptr);
        Ok(())
    }

    fn save(&mut self, vas: &[u64]) -> GpuResult<()> {
        let mut copies = Vec::with_capacity(vas.len());
        for &va in vas {
            if !self.mapped.contains(&va) {
                return Err(Status::INVALID_VALUE);
            }
            let ptr = self.chunk_ptr(va)?;
            let mut copy = Vec::new();
            copy.try_reserve_exact(CHUNK as usize)
                .map_err(|_| Status::OUT_OF_MEMORY)?;
            // SAFETY: ptr starts a mapped CHUNK-long piece of our mapping (chunk_ptr).
            copy.extend_from_slice(unsafe { std::slice::from_raw_parts(ptr, CHUNK as usize) });
            copies.push((va, ptr, copy));
        }
        // Every copy is taken: only now is anything unmapped.
        for (va, ptr, copy) in copies {
            self.mapped.remove(&va);
            Self::drop_pages(ptr);
            self.saved.insert(va, copy);
        }
        Ok(())
    }

    fn restore(&mut self, vas: &[u64]) -> GpuResult<()> {
        if vas.iter().any(|va| !self.saved.contains_key(va)) {
            return Err(Status::INVALID_VALUE);
        }
        if !self.within_budget(vas.len()) {
            return Err(Status::OUT_OF_MEMORY);
        }
        for &va in vas {
            let ptr = self.chunk_ptr(va)?;
            let Some(copy) = self.saved.remove(&va) else {
                continue;
            };
            // SAFETY: ptr starts a CHUNK-long piece of our mapping; copy holds CHUNK bytes
            // in a separate allocation.
            unsafe { std::ptr::copy_nonoverlapping(copy.as_ptr(), ptr, CHUNK as usize) };
            self.mapped.insert(va);
        }
        Ok(())
    }

    fn discard(&mut self, va: u64) {
        self.saved.remove(&va);
    }
}

fn unmap(m: &Mapping) {
    // SAFETY: the mapping was created by mmap with exactly this address and length, and
    // nothing borrows it any more (callers hold it by value or &mut).
    let rc = unsafe { libc::munmap(m.host.as_ptr().cast(), m.len as usize) };
    if rc != 0 {
        warn!(error = %std::io::Error::last_os_error(), "munmap of emulated device memory failed");
    }
}

impl Drop for HostChunks {
    fn drop(&mut self) {
        if let Some(m) = self.mapping.take() {
            unmap(&m);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: u64 = 0x7f00_0000_0000;

    #[test]
    fn device_ranges_are_contiguous_host_memory_across_chunks() {
        let mut mem = HostChunks::new(BASE, 8 * CHUNK);
        let base = mem.reserve(4 * CHUNK).unwrap();
        assert_eq!(base, BASE);
        mem.map(base).unwrap();
        mem.map(base + CHUNK).unwrap();
        let span = mem.slice_mut(base + CHUNK - 4, 8).unwrap();
        span.copy_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(mem.slice(base + CHUNK, 4).unwrap(), &[5, 6, 7, 8]);
        // A range reaching an unmapped chunk, or past the reservation, has no host view.
        assert!(mem.slice(base + 2 * CHUNK - 1, 2).is_none());
        assert!(mem.slice(base + 4 * CHUNK, 1).is_none());
        assert!(mem.slice(base - 1, 1).is_none());
    }

    #[test]
    fn unmapped_chunks_read_zeros_when_mapped_again() {
        let mut mem = HostChunks::new(BASE, 2 * CHUNK);
        let base = mem.reserve(2 * CHUNK).unwrap();
        mem.map(base).unwrap();
        mem.slice_mut(base, 16).unwrap().fill(0xee);
        mem.unmap(base).unwrap();
        mem.map(base).unwrap();
        assert!(mem.slice(base, CHUNK).unwrap().iter().all(|&b| b == 0));
    }

    #[test]
    fn save_drops_the_pages_and_restore_brings_the_bytes_back() {
        let mut mem = HostChunks::new(BASE, 2 * CHUNK);
        let base = mem.reserve(2 * CHUNK).unwrap();
        mem.map(base).unwrap();
        mem.slice_mut(base, 3).unwrap().copy_from_slice(&[9, 8, 7]);
        mem.save(&[base]).unwrap();
        assert_eq!((mem.mapped_chunks(), mem.saved_chunks()), (0, 1));
        assert!(mem.slice(base, 3).is_none());
        mem.restore(&[base]).unwrap();
        assert_eq!(mem.slice(base, 3).unwrap(), &[9, 8, 7]);
        assert_eq!((mem.mapped_chunks(), mem.saved_chunks()), (1, 0));
    }

    #[test]
    fn the_budget_limits_mapping_and_restoring() {
        let mut mem = HostChunks::new(BASE, 4 * CHUNK);
        let base = mem.reserve(4 * CHUNK).unwrap();
        mem.set_budget(Some(1));
        mem.map(base).unwrap();
        assert_eq!(mem.map(base + CHUNK), Err(Status::OUT_OF_MEMORY));
        mem.save(&[base]).unwrap();
        mem.set_budget(Some(0));
        assert_eq!(mem.restore(&[base]), Err(Status::OUT_OF_MEMORY));
        assert_eq!(mem.saved_chunks(), 1);
        mem.set_budget(None);
        mem.restore(&[base]).unwrap();
    }

    #[test]
    fn reservations_larger_than_the_window_are_refused() {
        let mut mem = HostChunks::new(BASE, 2 * CHUNK);
        assert_eq!(mem.reserve(4 * CHUNK), Err(Status::OUT_OF_MEMORY));
        assert_eq!(mem.reserve(CHUNK + 1), Err(Status::INVALID_VALUE));
        mem.reserve(2 * CHUNK).unwrap();
        assert_eq!(mem.reserve(2 * CHUNK), Err(Status::INVALID_VALUE));
    }
}
