//! Shared memory: memfd mappings and the layout of the guest memory region.
//!
//! Guest memory is one memfd mapped at guest-physical [`GUEST_BASE_GPA`]:
//!
//! ```text
//! | ring 0 | ring 1 | ring 2 | slots q0 | slots q1 | staging heap ............ |
//! ```
//!
//! Each ring is page-aligned. A slot holds one small request (up to
//! [`SLOT_REQ_BYTES`]) and its response (up to [`SLOT_RESP_BYTES`]); a queue
//! has one slot per possible in-flight chain (every chain is two descriptors).
//! The event queue gets a ring but no slots: the device posts nothing in v1.
//!
//! With `VGPU_HUGEPAGES=1` (set for processes in a VM, whose memory
//! `vgpu-guestd` relays), every memfd shared with the backend is created on
//! hugetlbfs (`MFD_HUGETLB`, 2 MiB pages, sizes rounded up to 2 MiB), so
//! the relay can hand the device physical addresses instead of copying.
//! If hugetlb memory cannot be had, the normal memfd is used, with a warning.

use std::ffi::CStr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use crate::ring::RingLayout;
use crate::TransportError;

/// Guest-physical address of the start of guest memory.
pub const GUEST_BASE_GPA: u64 = 0x4000_0000;
/// Guest-physical address of the first pinned region.
pub const PINNED_BASE_GPA: u64 = 0x10_0000_0000;
/// Request bytes a slot holds; larger requests go to staging.
pub const SLOT_REQ_BYTES: usize = 512;
/// Response bytes a slot holds; larger responses go to staging.
pub const SLOT_RESP_BYTES: usize = 256;
const SLOT_BYTES: usize = SLOT_REQ_BYTES + SLOT_RESP_BYTES;
/// The least staging heap guest memory must leave room for.
pub const MIN_STAGING_BYTES: usize = 64 << 10;
/// Queues that carry requests (control and submission) and so have slots.
pub const REQUEST_QUEUES: usize = 2;

/// Size of the huge pages used with `VGPU_HUGEPAGES=1`.
pub const HUGE_PAGE_BYTES: usize = 2 << 20;

/// True if `VGPU_HUGEPAGES=1`: shared memory should be hugetlb-backed.
pub fn hugepages_wanted() -> bool {
    static WANTED: OnceLock<bool> = OnceLock::new();
    *WANTED.get_or_init(|| std::env::var("VGPU_HUGEPAGES").is_ok_and(|v| v.trim() == "1"))
}

/// The system page size.
pub fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(n).ok().filter(|n| *n > 0).unwrap_or(4096)
}

/// A memfd mapped read-write and shared, so the backend can map the same pages.
pub struct SharedMem {
    fd: OwnedFd,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain shared memory owned by this value; it is only
// unmapped on drop, and concurrent access is coordinated by the users.
unsafe impl Send for SharedMem {}
// SAFETY: as above; `&SharedMem` only hands out the pointer and fd.
unsafe impl Sync for SharedMem {}

impl SharedMem {
    /// Creates a zero-filled memfd of `len` bytes (rounded up to a page) and
    /// maps it; hugetlb-backed if [`hugepages_wanted`].
    pub fn new(name: &CStr, len: usize) -> Result<SharedMem, TransportError> {
        Self::with_hugepages(name, len, hugepages_wanted())
    }

    /// As [`new`](Self::new), on 2 MiB huge pages (length rounded up to
    /// 2 MiB) if `huge`; falls back to normal pages with a warning when
    /// hugetlb memory is unavailable.
    pub fn with_hugepages(
        name: &CStr,
        len: usize,
        huge: bool,
    ) -> Result<SharedMem, TransportError> {
        if huge {
            match Self::create(name, len, true) {
                Ok(mem) => return Ok(mem),
                Err(e) => {
                    static WARNED: AtomicBool = AtomicBool::new(false);
                    if !WARNED.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            error = %e,
                            len,
                            "Cannot create hugetlb shared memory; using normal pages, so \
                             vgpu-guestd will copy buffers in it"
                        );
                    }
                }
            }
        }
        Self::create(name, len, false)
    }

    fn create(name: &CStr, len: usize, huge: bool) -> Result<SharedMem, TransportError> {
        let unit = if huge { HUGE_PAGE_BYTES } else { page_size() };
        let len = len
            .checked_next_multiple_of(unit)
            .filter(|l| *l > 0)
            .ok_or_else(|| TransportError::InvalidArgument(format!("Bad mapping size {len}")))?;
        let flags = if huge {
            libc::MFD_CLOEXEC | libc::MFD_HUGETLB | libc::MFD_HUGE_2MB
        } else {
            libc::MFD_CLOEXEC
        };
        // SAFETY: `name` is a valid NUL-terminated string.
        let raw = unsafe { libc::memfd_create(name.as_ptr(), flags) };
        if raw < 0 {
            return Err(TransportError::last_os("memfd_create"));
        }
        // SAFETY: `raw` is a fresh fd this function owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let size = libc::off_t::try_from(len)
            .map_err(|_| TransportError::NoMemory(format!("{len} bytes is too large")))?;
        // SAFETY: plain syscall on an fd we own.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), size) } != 0 {
            return Err(TransportError::last_os("ftruncate"));
        }
        // SAFETY: mapping a fresh memfd of `len` bytes at a kernel-chosen address.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(TransportError::last_os("mmap"));
        }
        Ok(SharedMem {
            fd,
            ptr: ptr as *mut u8,
            len,
        })
    }

    /// Start of the mapping.
    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Length of the mapping (page multiple).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for a zero-length mapping.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The memfd, for SET_MEM_TABLE / ADD_MEM_REG.
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// True if `[ptr, ptr+len)` lies inside the mapping; the offset if so.
    pub fn offset_of(&self, ptr: *const u8, len: usize) -> Option<usize> {
        let start = (ptr as usize).checked_sub(self.ptr as usize)?;
        let end = start.checked_add(len)?;
        (end <= self.len).then_some(start)
    }
}

impl Drop for SharedMem {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` describe the mapping created in `new`, and no
        // reference into it outlives this value (users hold an Arc to it).
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

/// Where everything lives inside guest memory (byte offsets).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemLayout {
    /// Queue size of every ring.
    pub queue_size: u16,
    /// Offset of each queue's ring.
    pub rings: [usize; vgpu_spec::NUM_QUEUES],
    /// Offset of the slot area of each request queue.
    pub slots: [usize; REQUEST_QUEUES],
    /// Slots per request queue (queue size / 2).
    pub slots_per_queue: usize,
    /// Offset of the staging heap.
    pub staging: usize,
    /// Bytes of staging heap.
    pub staging_len: usize,
    /// Total bytes of guest memory.
    pub total: usize,
}

impl MemLayout {
    /// Lays out `total` bytes of guest memory for queues of `queue_size`.
    pub fn new(total: usize, queue_size: u16) -> Result<MemLayout, TransportError> {
        let ring = RingLayout::new(queue_size)
            .map_err(|e| TransportError::InvalidArgument(e.to_string()))?;
        let page = page_size();
        let mut off = 0usize;
        let mut rings = [0usize; vgpu_spec::NUM_QUEUES];
        for r in rings.iter_mut() {
            *r = off;
            off = (off + ring.bytes).next_multiple_of(page);
        }
        let slots_per_queue = usize::from(queue_size / 2).max(1);
        let mut slots = [0usize; REQUEST_QUEUES];
        for s in slots.iter_mut() {
            *s = off;
            off += slots_per_queue * SLOT_BYTES;
        }
        let staging = off.next_multiple_of(page);
        let total = total.next_multiple_of(page);
        if total < staging + MIN_STAGING_BYTES {
            return Err(TransportError::InvalidArgument(format!(
                "Guest memory of {total} bytes is too small for queues of {queue_size}: \
                 needs at least {} bytes",
                staging + MIN_STAGING_BYTES
            )));
        }
        Ok(MemLayout {
            queue_size,
            rings,
            slots,
            slots_per_queue,
            staging,
            staging_len: total - staging,
            total,
        })
    }

    /// Offset of slot `slot`'s request area in request queue `queue`.
    pub fn slot_req(&self, queue: usize, slot: usize) -> usize {
        self.slots[queue] + slot * SLOT_BYTES
    }

    /// Offset of slot `slot`'s response area in request queue `queue`.
    pub fn slot_resp(&self, queue: usize, slot: usize) -> usize {
        self.slot_req(queue, slot) + SLOT_REQ_BYTES
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_parts_do_not_overlap_and_fit() {
        let l = MemLayout::new(64 << 20, 1024).unwrap();
        let ring = RingLayout::new(1024).unwrap().bytes;
        assert!(l.rings[0] + ring <= l.rings[1]);
        assert!(l.rings[1] + ring <= l.rings[2]);
        assert!(l.rings[2] + ring <= l.slots[0]);
        assert_eq!(l.slots_per_queue, 512);
        assert!(l.slot_resp(0, 511) + SLOT_RESP_BYTES <= l.slots[1]);
        assert!(l.slot_resp(1, 511) + SLOT_RESP_BYTES <= l.staging);
        assert_eq!(l.staging % page_size(), 0);
        assert_eq!(l.staging + l.staging_len, 64 << 20);
        assert!(l.staging_len > 60 << 20);
    }

    #[test]
    fn too_small_guest_memory_is_rejected() {
        assert!(matches!(
            MemLayout::new(512 << 10, 1024),
            Err(TransportError::InvalidArgument(_))
        ));
        assert!(MemLayout::new(1 << 20, 64).is_ok());
    }

    #[test]
    fn shared_mem_is_zeroed_and_bounds_checked() {
        let m = SharedMem::new(c"vgpu-test", 10_000).unwrap();
        assert_eq!(m.len() % page_size(), 0);
        assert!(m.len() >= 10_000);
        // SAFETY: inside the fresh mapping.
        let bytes = unsafe { std::slice::from_raw_parts(m.ptr(), m.len()) };
        assert!(bytes.iter().all(|b| *b == 0));
        assert_eq!(m.offset_of(m.ptr().wrapping_add(100), 10), Some(100));
        assert_eq!(m.offset_of(m.ptr().wrapping_add(m.len() - 1), 2), None);
        assert_eq!(m.offset_of(m.ptr().wrapping_sub(1), 1), None);
        assert!(m.fd() >= 0);
    }

    #[test]
    fn hugepage_request_gives_usable_memory_with_or_without_hugepages() {
        // Hosts without reserved huge pages fall back to normal pages.
        let m = SharedMem::with_hugepages(c"vgpu-test-huge", 10_000, true).unwrap();
        // 10 000 bytes round to 2 MiB on huge pages, to 12 KiB otherwise.
        assert!(
            m.len() == HUGE_PAGE_BYTES || m.len() == 10_000usize.next_multiple_of(page_size()),
            "{}",
            m.len()
        );
        assert!(m.len() >= 10_000);
        // SAFETY: inside the fresh mapping.
        let bytes = unsafe { std::slice::from_raw_parts_mut(m.ptr(), m.len()) };
        bytes[m.len() - 1] = 7;
        assert_eq!(bytes[m.len() - 1], 7);
        assert_eq!(bytes[0], 0);
    }
}
