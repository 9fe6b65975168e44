//! Pinned host memory: extra memfd regions the device maps with ADD_MEM_REG.
//!
//! Each region gets its own guest-physical range above [`PINNED_BASE_GPA`],
//! handed out by a bump allocator in 2 MiB steps and never reused, so a stale
//! sg entry can never alias a newer region. With `VGPU_HUGEPAGES=1` a
//! region's memfd is on 2 MiB huge pages (see `mem`), its length rounded up
//! to 2 MiB, which still fits the span reserved for it.

use std::collections::BTreeMap;

use crate::mem::{SharedMem, HUGE_PAGE_BYTES, PINNED_BASE_GPA};
use crate::TransportError;

/// Guest-physical spacing of pinned regions: a multiple of the huge page
/// size, so a hugetlb region rounded up to whole huge pages fits its span.
const GPA_STEP: u64 = HUGE_PAGE_BYTES as u64;

/// One region shared with the device.
pub struct Region {
    /// The mapping.
    pub mem: SharedMem,
    /// Where the device sees it.
    pub gpa: u64,
}

/// The table of live pinned regions, keyed by host address.
pub struct Pinned {
    regions: BTreeMap<usize, Region>,
    next_gpa: u64,
    slots_left: u64,
}

impl Pinned {
    /// A table allowing `slots` regions (the backend's memory slots minus the
    /// one guest memory uses).
    pub fn new(slots: u64) -> Pinned {
        Pinned {
            regions: BTreeMap::new(),
            next_gpa: PINNED_BASE_GPA,
            slots_left: slots,
        }
    }

    /// Reserves a memory slot and a guest-physical range for `len` bytes.
    pub fn reserve(&mut self, len: usize) -> Result<u64, TransportError> {
        if self.slots_left == 0 {
            return Err(TransportError::NoMemory(
                "The backend has no free memory slot for another pinned region".into(),
            ));
        }
        let span = (len as u64)
            .checked_next_multiple_of(GPA_STEP)
            .ok_or_else(|| TransportError::NoMemory(format!("{len} bytes is too large")))?;
        let gpa = self.next_gpa;
        self.next_gpa = gpa
            .checked_add(span)
            .ok_or_else(|| TransportError::NoMemory("Guest-physical space exhausted".into()))?;
        self.slots_left -= 1;
        Ok(gpa)
    }

    /// Returns a slot reserved with [`reserve`](Self::reserve) whose region
    /// never became (or is no longer) live.
    pub fn release_slot(&mut self) {
        self.slots_left += 1;
    }

    /// Records a live region.
    pub fn insert(&mut self, region: Region) {
        self.regions.insert(region.mem.ptr() as usize, region);
    }

    /// Takes the region starting at `ptr` out of the table.
    pub fn remove(&mut self, ptr: *mut u8) -> Option<Region> {
        self.regions.remove(&(ptr as usize))
    }

    /// Guest-physical address of `[ptr, ptr+len)` if it lies in one region.
    pub fn translate(&self, ptr: *const u8, len: usize) -> Option<u64> {
        let (_, region) = self.regions.range(..=ptr as usize).next_back()?;
        let off = region.mem.offset_of(ptr, len)?;
        Some(region.gpa + off as u64)
    }

    /// Number of live regions.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.regions.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(t: &mut Pinned, len: usize) -> (*mut u8, u64) {
        let gpa = t.reserve(len).unwrap();
        let mem = SharedMem::new(c"vgpu-test", len).unwrap();
        let ptr = mem.ptr();
        t.insert(Region { mem, gpa });
        (ptr, gpa)
    }

    #[test]
    fn translate_maps_ranges_inside_one_region_only() {
        let mut t = Pinned::new(8);
        let (a, ga) = region(&mut t, 8192);
        let (b, gb) = region(&mut t, 4096);
        assert_eq!(ga, PINNED_BASE_GPA);
        assert_eq!(gb, PINNED_BASE_GPA + GPA_STEP);
        assert_eq!(t.translate(a, 8192), Some(ga));
        assert_eq!(t.translate(a.wrapping_add(100), 50), Some(ga + 100));
        assert_eq!(t.translate(b.wrapping_add(4095), 1), Some(gb + 4095));
        assert_eq!(t.translate(a.wrapping_add(8000), 500), None);
        // Even if the kernel placed the mappings back to back, a range across
        // the end of one region is not inside one region.
        assert_eq!(t.translate(b.wrapping_add(4000), 200), None);
        assert_eq!(t.translate(std::ptr::null(), 1), None);
        let stack = 0u8;
        assert_eq!(t.translate(&stack, 1), None);
    }

    #[test]
    fn removed_region_no_longer_translates_and_gpa_is_not_reused() {
        let mut t = Pinned::new(8);
        let (a, _) = region(&mut t, 4096);
        let r = t.remove(a).unwrap();
        t.release_slot();
        assert_eq!(t.translate(r.mem.ptr(), 1), None);
        assert!(t.remove(a).is_none());
        drop(r);
        let (_, g2) = region(&mut t, 4096);
        assert_eq!(g2, PINNED_BASE_GPA + GPA_STEP);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn reserved_span_fits_a_region_rounded_up_to_huge_pages() {
        let mut t = Pinned::new(8);
        for len in [1, 10_000, HUGE_PAGE_BYTES, HUGE_PAGE_BYTES + 1] {
            let a = t.reserve(len).unwrap();
            let b = t.reserve(1).unwrap();
            let huge_len = len.next_multiple_of(HUGE_PAGE_BYTES) as u64;
            assert!(b - a >= huge_len, "{len}: span {} < {huge_len}", b - a);
        }
    }

    #[test]
    fn slots_run_out() {
        let mut t = Pinned::new(1);
        t.reserve(1).unwrap();
        assert!(matches!(t.reserve(1), Err(TransportError::NoMemory(_))));
        t.release_slot();
        assert!(t.reserve(1).is_ok());
    }
}
