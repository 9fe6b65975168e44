//! DMA memory: huge pages and their guest-physical addresses.
//!
//! As DPDK does: memory the device reads or writes is hugetlb memory,
//! because a huge page is physically contiguous and never swapped, and its
//! physical address comes from `/proc/self/pagemap` (which shows page frame
//! numbers only to CAP_SYS_ADMIN). Ranges are translated page by page and
//! split where a page ends, merging neighbours that happen to be
//! physically contiguous.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use thiserror::Error;

/// The huge page size the driver allocates.
pub const HUGE_PAGE: usize = 2 << 20;
/// The base page size pagemap is indexed by.
const PAGEMAP_PAGE: usize = 4096;
/// Pagemap entry: page present.
const PM_PRESENT: u64 = 1 << 63;
/// Pagemap entry: page swapped out.
const PM_SWAPPED: u64 = 1 << 62;
/// Pagemap entry: page frame number, bits 0–54.
const PM_PFN_MASK: u64 = (1 << 55) - 1;
/// Longest run merged into one physical segment (fits a descriptor's u32).
const MAX_SEGMENT: u64 = 1 << 31;
/// Where the kernel keeps the 2 MiB huge page pool.
const HUGEPAGES_2M: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB";

/// DMA memory failures.
#[derive(Debug, Error)]
pub enum DmaError {
    /// Huge pages could not be mapped.
    #[error(
        "Cannot map {len} bytes of huge pages: {source}. Reserve more with \
         /proc/sys/vm/nr_hugepages"
    )]
    Map {
        /// Bytes asked for.
        len: usize,
        /// The cause.
        source: io::Error,
    },
    /// `/proc/self/pagemap` could not be read.
    #[error("Cannot read /proc/self/pagemap: {0}")]
    Pagemap(io::Error),
    /// The page is not in memory.
    #[error("Page at {0:#x} is not present in memory")]
    NotPresent(usize),
    /// The kernel hid the frame number.
    #[error("pagemap shows no page frame numbers: vgpu-guestd must run as root (CAP_SYS_ADMIN)")]
    NoPfn,
    /// A huge page is not aligned physically as a huge page must be.
    #[error("Huge page at {vaddr:#x} has physical address {phys:#x}, not {align:#x}-aligned")]
    Misaligned {
        /// Its virtual address.
        vaddr: usize,
        /// Its physical address.
        phys: u64,
        /// The alignment expected.
        align: usize,
    },
    /// The huge page pool could not be grown.
    #[error("Cannot reserve {want} free 2 MiB huge pages ({free} free): {reason}")]
    Reserve {
        /// Pages wanted free.
        want: u64,
        /// Pages free.
        free: u64,
        /// Why.
        reason: String,
    },
    /// A range is outside the memory it should be in.
    #[error("Range {offset:#x}+{len:#x} is outside {size:#x} bytes of DMA memory")]
    OutOfRange {
        /// Offset asked for.
        offset: usize,
        /// Length asked for.
        len: usize,
        /// Size of the memory.
        size: usize,
    },
}

/// The page frame number in a pagemap entry.
pub fn decode_pagemap_entry(entry: u64, vaddr: usize) -> Result<u64, DmaError> {
    if entry & PM_PRESENT == 0 || entry & PM_SWAPPED != 0 {
        return Err(DmaError::NotPresent(vaddr));
    }
    match entry & PM_PFN_MASK {
        0 => Err(DmaError::NoPfn),
        pfn => Ok(pfn),
    }
}

/// Translates virtual addresses of this process to physical ones.
pub trait PhysLookup: Send + Sync {
    /// The physical address of the byte at `vaddr`, which must be mapped
    /// and resident.
    fn phys(&self, vaddr: usize) -> Result<u64, DmaError>;
}

/// `/proc/self/pagemap`.
#[derive(Debug)]
pub struct Pagemap {
    file: File,
}

impl Pagemap {
    /// Opens this process's pagemap.
    pub fn open() -> Result<Pagemap, DmaError> {
        let file = File::open("/proc/self/pagemap").map_err(DmaError::Pagemap)?;
        Ok(Pagemap { file })
    }
}

impl PhysLookup for Pagemap {
    fn phys(&self, vaddr: usize) -> Result<u64, DmaError> {
        let mut entry = [0u8; 8];
        let at = (vaddr / PAGEMAP_PAGE) as u64 * 8;
        self.file
            .read_exact_at(&mut entry, at)
            .map_err(DmaError::Pagemap)?;
        let pfn = decode_pagemap_entry(u64::from_le_bytes(entry), vaddr)?;
        Ok(pfn * PAGEMAP_PAGE as u64 + (vaddr % PAGEMAP_PAGE) as u64)
    }
}

/// Splits `[vaddr, vaddr + len)` at `page_size` boundaries and appends the
/// physical `(address, length)` of each piece to `out`, merging pieces that
/// are physically contiguous. `page_phys(page_start)` gives the physical
/// address of the page starting at `page_start`.
pub fn split_phys(
    vaddr: usize,
    len: u64,
    page_size: usize,
    page_phys: &mut dyn FnMut(usize) -> Result<u64, DmaError>,
    out: &mut Vec<(u64, u64)>,
) -> Result<(), DmaError> {
    let mut at = vaddr;
    let mut left = len;
    let mut merging = false;
    while left > 0 {
        let page = at - at % page_size;
        let in_page = (page + page_size - at) as u64;
        let n = in_page.min(left);
        let phys = page_phys(page)? + (at - page) as u64;
        match out.last_mut() {
            Some((start, run)) if merging && *start + *run == phys && *run + n <= MAX_SEGMENT => {
                *run += n;
            }
            _ => out.push((phys, n)),
        }
        merging = true;
        at += n as usize;
        left -= n;
    }
    Ok(())
}

/// Free 2 MiB huge pages in the pool.
pub fn free_hugepages() -> Option<u64> {
    read_count(&Path::new(HUGEPAGES_2M).join("free_hugepages"))
}

fn read_count(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Grows the 2 MiB huge page pool until at least `want` pages are free.
pub fn ensure_free_hugepages(want: u64) -> Result<(), DmaError> {
    let dir = Path::new(HUGEPAGES_2M);
    let free = read_count(&dir.join("free_hugepages")).unwrap_or(0);
    if free >= want {
        return Ok(());
    }
    let fail = |free, reason: String| DmaError::Reserve { want, free, reason };
    let nr_path = dir.join("nr_hugepages");
    let nr = read_count(&nr_path).ok_or_else(|| fail(free, "the pool is not in sysfs".into()))?;
    std::fs::write(&nr_path, (nr + want - free).to_string())
        .map_err(|e| fail(free, format!("writing {}: {e}", nr_path.display())))?;
    let now = read_count(&dir.join("free_hugepages")).unwrap_or(0);
    if now < want {
        return Err(fail(
            now,
            "the kernel found too little contiguous memory".into(),
        ));
    }
    Ok(())
}

/// Memory the device can reach: a mapping and the physical address of each
/// of its pages.
#[derive(Debug)]
pub struct DmaMemory {
    ptr: *mut u8,
    len: usize,
    page_size: usize,
    phys: Vec<u64>,
    owned: bool,
}

// SAFETY: the mapping is owned by this value until drop; callers coordinate
// access to its bytes (the heap hands out disjoint ranges).
unsafe impl Send for DmaMemory {}
// SAFETY: as above; `&DmaMemory` only hands out addresses.
unsafe impl Sync for DmaMemory {}

impl DmaMemory {
    /// Maps `len` bytes (rounded up to 2 MiB) of huge pages, populated and
    /// zeroed, and looks up their physical addresses.
    pub fn hugepages(len: usize, lookup: &dyn PhysLookup) -> Result<DmaMemory, DmaError> {
        let len = len.max(1).next_multiple_of(HUGE_PAGE);
        // SAFETY: an anonymous shared mapping at a kernel-chosen address.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(DmaError::Map {
                len,
                source: io::Error::last_os_error(),
            });
        }
        let mut mem = DmaMemory {
            ptr: ptr as *mut u8,
            len,
            page_size: HUGE_PAGE,
            phys: Vec::with_capacity(len / HUGE_PAGE),
            owned: true,
        };
        for page in 0..len / HUGE_PAGE {
            let vaddr = mem.ptr as usize + page * HUGE_PAGE;
            // SAFETY: `vaddr` is inside the fresh mapping; writing faults
            // the page in (MAP_POPULATE should have already).
            unsafe { std::ptr::write_volatile(vaddr as *mut u8, 0) };
            let phys = lookup.phys(vaddr)?;
            if !phys.is_multiple_of(HUGE_PAGE as u64) {
                return Err(DmaError::Misaligned {
                    vaddr,
                    phys,
                    align: HUGE_PAGE,
                });
            }
            mem.phys.push(phys);
        }
        Ok(mem)
    }

    /// Memory whose "physical" address is its virtual address, on normal
    /// pages: for tests, where a fake device dereferences what it is given.
    #[cfg(test)]
    pub fn identity(len: usize, page_size: usize) -> DmaMemory {
        let len = len.next_multiple_of(page_size);
        let layout = std::alloc::Layout::from_size_align(len, page_size).unwrap();
        // SAFETY: a non-zero size; freed in Drop with the same layout.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        let phys = (0..len / page_size)
            .map(|i| (ptr as usize + i * page_size) as u64)
            .collect();
        DmaMemory {
            ptr,
            len,
            page_size,
            phys,
            owned: false,
        }
    }

    /// Start of the mapping.
    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Bytes mapped.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if nothing is mapped (never).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Physical address of the byte at `offset`.
    pub fn phys_at(&self, offset: usize) -> Result<u64, DmaError> {
        let page = self
            .phys
            .get(offset / self.page_size)
            .ok_or(DmaError::OutOfRange {
                offset,
                len: 1,
                size: self.len,
            })?;
        Ok(page + (offset % self.page_size) as u64)
    }

    /// Appends the physical segments of `[offset, offset + len)` to `out`.
    pub fn segments(
        &self,
        offset: usize,
        len: usize,
        out: &mut Vec<(u64, u64)>,
    ) -> Result<(), DmaError> {
        if offset.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(DmaError::OutOfRange {
                offset,
                len,
                size: self.len,
            });
        }
        let base = self.ptr as usize;
        split_phys(
            base + offset,
            len as u64,
            self.page_size,
            &mut |page| self.phys_at(page - base),
            out,
        )
    }
}

impl Drop for DmaMemory {
    fn drop(&mut self) {
        if self.owned {
            // SAFETY: the mapping made in `hugepages`; nothing borrows it
            // past the owner (the heap holds an Arc).
            unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
        } else {
            #[cfg(test)]
            {
                let layout = std::alloc::Layout::from_size_align(self.len, self.page_size);
                if let Ok(layout) = layout {
                    // SAFETY: allocated in `identity` with this layout.
                    unsafe { std::alloc::dealloc(self.ptr, layout) };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pagemap_entry_gives_pfn_only_for_present_pages() {
        let pfn = 0x12_3456;
        assert_eq!(decode_pagemap_entry(PM_PRESENT | pfn, 0).unwrap(), pfn);
        // Soft-dirty and exclusive bits (55, 56) do not leak into the PFN.
        assert_eq!(
            decode_pagemap_entry(PM_PRESENT | (1 << 55) | (1 << 56) | pfn, 0).unwrap(),
            pfn
        );
        assert!(matches!(
            decode_pagemap_entry(pfn, 0x1000),
            Err(DmaError::NotPresent(0x1000))
        ));
        assert!(matches!(
            decode_pagemap_entry(PM_PRESENT | PM_SWAPPED | pfn, 0),
            Err(DmaError::NotPresent(_))
        ));
        assert!(matches!(
            decode_pagemap_entry(PM_PRESENT, 0),
            Err(DmaError::NoPfn)
        ));
    }

    /// Pages of 2 MiB: page k at physical `table[k]`.
    fn lookup(table: &[u64]) -> impl FnMut(usize) -> Result<u64, DmaError> + '_ {
        move |page| Ok(table[page / HUGE_PAGE])
    }

    #[test]
    fn range_across_huge_page_boundary_is_split_where_pages_are_not_contiguous() {
        let table = [0x4000_0000, 0x1000_0000, 0x1020_0000];
        let mut out = Vec::new();
        // 1 MiB before the first boundary, a whole page, 4 KiB of the third.
        split_phys(
            HUGE_PAGE - (1 << 20),
            (3 << 20) + 4096,
            HUGE_PAGE,
            &mut lookup(&table),
            &mut out,
        )
        .unwrap();
        // Pages 1 and 2 are physically adjacent, so they merge.
        assert_eq!(
            out,
            [
                (0x4000_0000 + (1 << 20), 1 << 20),
                (0x1000_0000, (2 << 20) + 4096)
            ]
        );
        assert_eq!(out.iter().map(|s| s.1).sum::<u64>(), (3 << 20) + 4096);
    }

    #[test]
    fn range_inside_one_page_is_one_segment_and_empty_range_none() {
        let table = [0x8000_0000];
        let mut out = Vec::new();
        split_phys(100, 200, HUGE_PAGE, &mut lookup(&table), &mut out).unwrap();
        assert_eq!(out, [(0x8000_0000 + 100, 200)]);
        split_phys(5, 0, HUGE_PAGE, &mut lookup(&table), &mut out).unwrap();
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn a_new_range_never_merges_into_the_previous_ones_segment() {
        let table = [0x1000_0000];
        let mut out = vec![(0x1000_0000u64, 100u64)];
        split_phys(100, 50, HUGE_PAGE, &mut lookup(&table), &mut out).unwrap();
        assert_eq!(out, [(0x1000_0000, 100), (0x1000_0000 + 100, 50)]);
    }

    #[test]
    fn lookup_failure_is_reported() {
        let mut out = Vec::new();
        let err = split_phys(0, 10, HUGE_PAGE, &mut |_| Err(DmaError::NoPfn), &mut out);
        assert!(matches!(err, Err(DmaError::NoPfn)));
    }

    #[test]
    fn dma_memory_segments_follow_its_page_table_and_check_bounds() {
        let mem = DmaMemory::identity(3 * 4096, 4096);
        let mut out = Vec::new();
        mem.segments(4000, 200, &mut out).unwrap();
        let base = mem.ptr() as u64;
        // Identity memory is contiguous, so the two pages merge.
        assert_eq!(out, [(base + 4000, 200)]);
        assert_eq!(mem.phys_at(4096).unwrap(), base + 4096);
        assert!(mem.segments(3 * 4096 - 10, 11, &mut out).is_err());
        assert!(mem.segments(usize::MAX, 2, &mut out).is_err());
        assert!(mem.phys_at(3 * 4096).is_err());
    }

    #[test]
    fn hugepage_dma_memory_has_aligned_physical_pages_where_the_host_allows() {
        // Needs root and free 2 MiB huge pages; elsewhere it must fail cleanly.
        let Ok(pm) = Pagemap::open() else { return };
        match DmaMemory::hugepages(3 << 20, &pm) {
            Ok(mem) => {
                assert_eq!(mem.len(), 4 << 20);
                assert_eq!(mem.phys.len(), 2);
                assert!(mem
                    .phys
                    .iter()
                    .all(|p| *p != 0 && p % HUGE_PAGE as u64 == 0));
                let mut segs = Vec::new();
                mem.segments(HUGE_PAGE - 8, 16, &mut segs).unwrap();
                assert_eq!(segs.iter().map(|s| s.1).sum::<u64>(), 16);
                assert_eq!(
                    segs[0],
                    (
                        mem.phys[0] + HUGE_PAGE as u64 - 8,
                        if segs.len() == 2 { 8 } else { 16 }
                    )
                );
            }
            Err(e) => assert!(matches!(e, DmaError::Map { .. } | DmaError::NoPfn), "{e}"),
        }
    }

    #[test]
    fn pagemap_of_own_memory_works_as_root_or_says_why_not() {
        let Ok(pm) = Pagemap::open() else { return };
        let v = Box::new(7u64);
        match pm.phys(&*v as *const u64 as usize) {
            Ok(phys) => assert_ne!(phys, 0),
            Err(e) => assert!(
                matches!(e, DmaError::NoPfn | DmaError::NotPresent(_)),
                "{e}"
            ),
        }
    }
}
