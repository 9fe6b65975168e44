//! [`HostChunks`]: [`ChunkMemory`] in host memory, for the emulated device.
//!
//! The reservation is one anonymous private mapping (`MAP_NORESERVE`, so untouched pages cost
//! nothing), and device address `va` lies at host address `host + (va - base)`: device ranges
//! are contiguous in host memory across extents, so a copy spanning extents is one host copy.
//! Device addresses come from a window the emulated executor hands over (its own address
//! allocator keeps every device's addresses apart).
//!
//! Mapping an extent only records it (its pages are zero: fresh, or dropped with
//! `MADV_DONTNEED`); an optional budget of mapped chunks makes running out of device memory
//! testable. Unmapping and saving drop the extent's pages, so device memory read without a
//! correct restore reads zeros, which integrity tests catch.

use std::collections::BTreeMap;
use std::ptr::NonNull;
use std::sync::Arc;

use tracing::warn;
use vgpu_spec::Status;

use crate::gpu::emulated_card::EmulatedCard;

use super::{ChunkMemory, Extent, CHUNK};
use crate::gpu::GpuResult;

/// The host mapping behind a reservation.
struct Mapping {
    host: NonNull<u8>,
    /// Device address of the first byte.
    base: u64,
    len: u64,
}

/// Host memory standing in for device extents.
pub struct HostChunks {
    /// The device address window reservations are placed in.
    window_base: u64,
    window_len: u64,
    mapping: Option<Mapping>,
    /// Mapped extents: start -> length.
    mapped: BTreeMap<u64, u64>,
    /// Saved extents: start -> their bytes.
    saved: BTreeMap<u64, Vec<u8>>,
    mapped_chunks: usize,
    saved_chunks: usize,
    /// Most chunks mapped at once; `None` for no limit.
    budget: Option<usize>,
    /// The emulated GPU's memory, shared with the other processes on it.
    card: Option<Arc<EmulatedCard>>,
}

// SAFETY: HostChunks exclusively owns its mapping (like a Box<[u8]>); nothing in it is tied
// to a thread.
unsafe impl Send for HostChunks {}

/// Whether an extent of `extents` (start -> what gives its length) overlaps `[va, va + len)`:
/// the last one starting before that range's end reaches past `va`.
fn overlaps<V>(extents: &BTreeMap<u64, V>, len_of: impl Fn(&V) -> u64, va: u64, len: u64) -> bool {
    extents
        .range(..va + len)
        .next_back()
        .is_some_and(|(&start, v)| start + len_of(v) > va)
}

fn chunks(len: u64) -> usize {
    (len / CHUNK) as usize
}

impl HostChunks {
    /// Chunk memory whose reservation will lie at `window_base` (a multiple of [`CHUNK`]) and
    /// may be at most `window_len` bytes.
    pub fn new(window_base: u64, window_len: u64) -> HostChunks {
        HostChunks {
            window_base,
            window_len,
            mapping: None,
            mapped: BTreeMap::new(),
            saved: BTreeMap::new(),
            mapped_chunks: 0,
            saved_chunks: 0,
            budget: None,
            card: None,
        }
    }

    /// Takes mapped extents from `card`, the emulated GPU's memory shared with every process on
    /// it: mapping fails with `OUT_OF_MEMORY` when the GPU is full.
    pub fn with_card(mut self, card: Option<Arc<EmulatedCard>>) -> HostChunks {
        self.card = card;
        self
    }

    fn take_from_card(&self, bytes: u64) -> bool {
        self.card.as_ref().is_none_or(|c| c.try_take(bytes))
    }

    fn give_to_card(&self, bytes: u64) {
        if let Some(c) = &self.card {
            c.give(bytes);
        }
    }

    /// Limits the chunks mapped at once to `chunks` (`None`: no limit); mapping beyond it
    /// fails with `OUT_OF_MEMORY`. Extents mapped already stay mapped.
    pub fn set_budget(&mut self, chunks: Option<usize>) {
        self.budget = chunks;
    }

    /// Chunks mapped now (over every extent).
    pub fn mapped_chunks(&self) -> usize {
        self.mapped_chunks
    }

    /// Extents mapped now.
    pub fn mapped_extents(&self) -> usize {
        self.mapped.len()
    }

    /// Chunks saved now (over every extent).
    pub fn saved_chunks(&self) -> usize {
        self.saved_chunks
    }

    /// Host address of device range `[va, va + len)`, if it lies in the reservation and every
    /// byte of it is in a mapped extent (`len > 0`).
    pub fn host_ptr(&self, va: u64, len: u64) -> Option<NonNull<u8>> {
        let m = self.mapping.as_ref()?;
        let offset = va.checked_sub(m.base)?;
        let end = offset.checked_add(len).filter(|end| *end <= m.len)?;
        if len == 0 {
            return None;
        }
        // Walk the extents covering the range: each must start where the last one ended.
        let end = m.base + end;
        let mut at = va;
        while at < end {
            let (&start, &l) = self.mapped.range(..=at).next_back()?;
            if start + l <= at {
                return None;
            }
            at = start + l;
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

    /// The host bytes of extent `[va, va + len)`, which must be whole chunks in the
    /// reservation.
    fn extent_ptr(&self, va: u64, len: u64) -> GpuResult<*mut u8> {
        let m = self.mapping.as_ref().ok_or(Status::INVALID_VALUE)?;
        let whole = len > 0 && len.is_multiple_of(CHUNK);
        let offset = va
            .checked_sub(m.base)
            .filter(|o| whole && o.is_multiple_of(CHUNK))
            .filter(|o| o.checked_add(len).is_some_and(|end| end <= m.len))
            .ok_or(Status::INVALID_VALUE)?;
        let offset = usize::try_from(offset).map_err(|_| Status::INVALID_VALUE)?;
        // SAFETY: offset + len <= the mapping's length (checked above).
        Ok(unsafe { m.host.as_ptr().add(offset) })
    }

    /// Drops the pages of the `len` bytes at `ptr`: they read as zeros from now on.
    fn drop_pages(ptr: *mut u8, len: u64) {
        // SAFETY: ptr starts a `len`-long (whole chunks), page-aligned piece of our private
        // anonymous mapping (extent_ptr); MADV_DONTNEED only discards its contents.
        let rc = unsafe { libc::madvise(ptr.cast(), len as usize, libc::MADV_DONTNEED) };
        if rc != 0 {
            warn!(error = %std::io::Error::last_os_error(), "madvise(MADV_DONTNEED) failed");
        }
    }

    fn within_budget(&self, more: usize) -> bool {
        self.budget
            .is_none_or(|budget| self.mapped_chunks.saturating_add(more) <= budget)
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
        self.mapped_chunks = 0;
        self.saved_chunks = 0;
        unmap(&m);
    }

    fn map(&mut self, va: u64, len: u64) -> GpuResult<()> {
        self.extent_ptr(va, len)?;
        if overlaps(&self.mapped, |&l| l, va, len)
            || overlaps(&self.saved, |copy| copy.len() as u64, va, len)
        {
            return Err(Status::INVALID_VALUE);
        }
        if !self.within_budget(chunks(len)) || !self.take_from_card(len) {
            return Err(Status::OUT_OF_MEMORY);
        }
        self.mapped.insert(va, len);
        self.mapped_chunks += chunks(len);
        Ok(())
    }

    fn unmap(&mut self, va: u64, len: u64) -> GpuResult<()> {
        let ptr = self.extent_ptr(va, len)?;
        if self.mapped.get(&va) != Some(&len) {
            return Err(Status::INVALID_VALUE);
        }
        self.mapped.remove(&va);
        self.mapped_chunks -= chunks(len);
        Self::drop_pages(ptr, len);
        self.give_to_card(len);
        Ok(())
    }

    fn save(&mut self, extents: &[Extent]) -> GpuResult<()> {
        let mut copies = Vec::with_capacity(extents.len());
        for &(va, len) in extents {
            if self.mapped.get(&va) != Some(&len) {
                return Err(Status::INVALID_VALUE);
            }
            let ptr = self.extent_ptr(va, len)?;
            let bytes = usize::try_from(len).map_err(|_| Status::OUT_OF_MEMORY)?;
            let mut copy = Vec::new();
            copy.try_reserve_exact(bytes)
                .map_err(|_| Status::OUT_OF_MEMORY)?;
            // SAFETY: ptr starts a mapped `len`-long piece of our mapping (extent_ptr).
            copy.extend_from_slice(unsafe { std::slice::from_raw_parts(ptr, bytes) });
            copies.push((va, len, ptr, copy));
        }
        // Every copy is taken: only now is anything unmapped.
        for (va, len, ptr, copy) in copies {
            self.mapped.remove(&va);
            self.mapped_chunks -= chunks(len);
            Self::drop_pages(ptr, len);
            self.give_to_card(len);
            self.saved.insert(va, copy);
            self.saved_chunks += chunks(len);
        }
        Ok(())
    }

    fn restore(&mut self, extents: &[Extent]) -> GpuResult<()> {
        let mut ptrs = Vec::with_capacity(extents.len());
        for &(va, len) in extents {
            if self.saved.get(&va).map(|copy| copy.len() as u64) != Some(len) {
                return Err(Status::INVALID_VALUE);
            }
            ptrs.push(self.extent_ptr(va, len)?);
        }
        let more = extents.iter().map(|&(_, len)| chunks(len)).sum();
        let bytes: u64 = extents.iter().map(|&(_, len)| len).sum();
        if !self.within_budget(more) || !self.take_from_card(bytes) {
            return Err(Status::OUT_OF_MEMORY);
        }
        for (&(va, len), ptr) in extents.iter().zip(ptrs) {
            let Some(copy) = self.saved.remove(&va) else {
                continue;
            };
            // SAFETY: ptr starts a `len`-long piece of our mapping (extent_ptr); copy holds
            // `len` bytes (checked above) in a separate allocation.
            unsafe { std::ptr::copy_nonoverlapping(copy.as_ptr(), ptr, copy.len()) };
            self.saved_chunks -= chunks(len);
            self.mapped.insert(va, len);
            self.mapped_chunks += chunks(len);
        }
        Ok(())
    }

    fn discard(&mut self, va: u64) {
        if let Some(copy) = self.saved.remove(&va) {
            self.saved_chunks -= chunks(copy.len() as u64);
        }
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
        let mapped: u64 = self.mapped.values().sum();
        self.give_to_card(mapped);
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
    fn device_ranges_are_contiguous_host_memory_across_extents() {
        let mut mem = HostChunks::new(BASE, 8 * CHUNK);
        let base = mem.reserve(4 * CHUNK).unwrap();
        assert_eq!(base, BASE);
        mem.map(base, CHUNK).unwrap();
        mem.map(base + CHUNK, CHUNK).unwrap();
        let span = mem.slice_mut(base + CHUNK - 4, 8).unwrap();
        span.copy_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(mem.slice(base + CHUNK, 4).unwrap(), &[5, 6, 7, 8]);
        // A range reaching an unmapped chunk, or past the reservation, has no host view.
        assert!(mem.slice(base + 2 * CHUNK - 1, 2).is_none());
        assert!(mem.slice(base + 4 * CHUNK, 1).is_none());
        assert!(mem.slice(base - 1, 1).is_none());
    }

    #[test]
    fn unmapped_extents_read_zeros_when_mapped_again() {
        let mut mem = HostChunks::new(BASE, 2 * CHUNK);
        let base = mem.reserve(2 * CHUNK).unwrap();
        mem.map(base, 2 * CHUNK).unwrap();
        mem.slice_mut(base + CHUNK, 16).unwrap().fill(0xee);
        mem.unmap(base, 2 * CHUNK).unwrap();
        mem.map(base, 2 * CHUNK).unwrap();
        assert!(mem.slice(base, 2 * CHUNK).unwrap().iter().all(|&b| b == 0));
    }

    #[test]
    fn an_extent_is_unmapped_only_whole_and_never_overlapped() {
        let mut mem = HostChunks::new(BASE, 8 * CHUNK);
        let base = mem.reserve(8 * CHUNK).unwrap();
        mem.map(base + CHUNK, 3 * CHUNK).unwrap();
        assert_eq!((mem.mapped_chunks(), mem.mapped_extents()), (3, 1));
        assert!(mem.slice(base + CHUNK, 3 * CHUNK).is_some());
        // Overlapping maps, parts and misaligned extents are refused.
        assert_eq!(mem.map(base, 2 * CHUNK), Err(Status::INVALID_VALUE));
        assert_eq!(mem.map(base + 3 * CHUNK, CHUNK), Err(Status::INVALID_VALUE));
        assert_eq!(mem.map(base + 4 * CHUNK, 100), Err(Status::INVALID_VALUE));
        assert_eq!(mem.map(base + 4 * CHUNK, 0), Err(Status::INVALID_VALUE));
        assert_eq!(
            mem.map(base + 6 * CHUNK, 4 * CHUNK),
            Err(Status::INVALID_VALUE)
        );
        assert_eq!(mem.unmap(base + CHUNK, CHUNK), Err(Status::INVALID_VALUE));
        assert_eq!(
            mem.unmap(base + 2 * CHUNK, 2 * CHUNK),
            Err(Status::INVALID_VALUE)
        );
        // Neighbours are fine.
        mem.map(base, CHUNK).unwrap();
        mem.map(base + 4 * CHUNK, CHUNK).unwrap();
        mem.unmap(base + CHUNK, 3 * CHUNK).unwrap();
        assert_eq!((mem.mapped_chunks(), mem.mapped_extents()), (2, 2));
        assert!(mem.slice(base, CHUNK + 1).is_none(), "a hole in the range");
    }

    #[test]
    fn save_drops_the_pages_and_restore_brings_the_bytes_back() {
        let mut mem = HostChunks::new(BASE, 4 * CHUNK);
        let base = mem.reserve(4 * CHUNK).unwrap();
        mem.map(base, CHUNK).unwrap();
        mem.map(base + CHUNK, 3 * CHUNK).unwrap();
        mem.slice_mut(base, 3).unwrap().copy_from_slice(&[9, 8, 7]);
        let last = base + 4 * CHUNK - 3;
        mem.slice_mut(last, 3).unwrap().copy_from_slice(&[1, 2, 3]);
        let extents = [(base, CHUNK), (base + CHUNK, 3 * CHUNK)];
        mem.save(&extents).unwrap();
        assert_eq!((mem.mapped_chunks(), mem.saved_chunks()), (0, 4));
        assert!(mem.slice(base, 3).is_none());
        // A saved extent's addresses cannot be mapped over.
        assert_eq!(mem.map(base + 2 * CHUNK, CHUNK), Err(Status::INVALID_VALUE));
        mem.restore(&extents).unwrap();
        assert_eq!(mem.slice(base, 3).unwrap(), &[9, 8, 7]);
        assert_eq!(mem.slice(last, 3).unwrap(), &[1, 2, 3]);
        assert_eq!((mem.mapped_chunks(), mem.saved_chunks()), (4, 0));
    }

    #[test]
    fn saving_or_restoring_an_extent_by_a_wrong_length_changes_nothing() {
        let mut mem = HostChunks::new(BASE, 4 * CHUNK);
        let base = mem.reserve(4 * CHUNK).unwrap();
        mem.map(base, 2 * CHUNK).unwrap();
        assert_eq!(mem.save(&[(base, CHUNK)]), Err(Status::INVALID_VALUE));
        assert_eq!(mem.mapped_chunks(), 2);
        mem.save(&[(base, 2 * CHUNK)]).unwrap();
        assert_eq!(mem.restore(&[(base, CHUNK)]), Err(Status::INVALID_VALUE));
        assert_eq!(mem.saved_chunks(), 2);
        mem.discard(base);
        assert_eq!((mem.mapped_chunks(), mem.saved_chunks()), (0, 0));
    }

    #[test]
    fn the_budget_limits_mapping_and_restoring_in_chunks() {
        let mut mem = HostChunks::new(BASE, 4 * CHUNK);
        let base = mem.reserve(4 * CHUNK).unwrap();
        mem.set_budget(Some(2));
        assert_eq!(mem.map(base, 3 * CHUNK), Err(Status::OUT_OF_MEMORY));
        mem.map(base, 2 * CHUNK).unwrap();
        assert_eq!(mem.map(base + 2 * CHUNK, CHUNK), Err(Status::OUT_OF_MEMORY));
        mem.save(&[(base, 2 * CHUNK)]).unwrap();
        mem.set_budget(Some(1));
        assert_eq!(
            mem.restore(&[(base, 2 * CHUNK)]),
            Err(Status::OUT_OF_MEMORY)
        );
        assert_eq!(mem.saved_chunks(), 2);
        mem.set_budget(None);
        mem.restore(&[(base, 2 * CHUNK)]).unwrap();
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
