//! The driver side of a virtio 1.x split virtqueue, over shared memory.
//!
//! [`SplitRing`] owns no memory: it lays a ring out at a host pointer that the
//! caller maps (and shares with the device), and knows the guest-physical
//! address the device sees for the same bytes. It keeps the descriptor free
//! list in private shadow state, so a misbehaving device can corrupt at most
//! what it reports as used, never the driver's bookkeeping.
//!
//! Memory ordering follows the virtio spec: descriptors and avail-ring entries
//! are written with volatile stores, a `Release` fence orders them before the
//! avail index store, the used index is loaded with `Acquire` before the used
//! entries are read, and a `SeqCst` fence separates publishing from reading
//! the device's `VRING_USED_F_NO_NOTIFY` flag (the classic store/load pairing
//! with the device's "enable notifications, then re-check avail" sequence).
//!
//! `VIRTIO_F_EVENT_IDX` is not used: notification suppression goes through the
//! flags fields only.

use std::sync::atomic::{fence, AtomicU16, Ordering};

use thiserror::Error;

/// Descriptor flag: the chain continues in `next`.
pub const VRING_DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer.
pub const VRING_DESC_F_WRITE: u16 = 2;
/// Avail-ring flag: the driver does not want used-buffer notifications.
pub const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;
/// Used-ring flag: the device does not want available-buffer notifications.
pub const VRING_USED_F_NO_NOTIFY: u16 = 1;

const DESC_SIZE: usize = 16;
const USED_ELEM_SIZE: usize = 8;
/// Alignment the ring's base pointer must have (the descriptor table's).
pub const RING_ALIGN: usize = 16;

/// Errors of the split-ring driver.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RingError {
    /// The queue size is not a power of two between 1 and 32768.
    #[error("Queue size {0} is not a power of two between 1 and 32768")]
    BadSize(u16),
    /// The base pointer or guest-physical address is misaligned.
    #[error("Ring base is not {RING_ALIGN}-byte aligned")]
    Misaligned,
    /// A chain must have at least one segment.
    #[error("A descriptor chain needs at least one segment")]
    EmptyChain,
    /// Not enough free descriptors for the chain.
    #[error("Ring is full: chain needs {need} descriptors, {free} are free")]
    Full {
        /// Descriptors the chain needs.
        need: usize,
        /// Descriptors free.
        free: usize,
    },
    /// A readable segment follows a writable one (virtio forbids it).
    #[error("Readable segment after a writable one")]
    ReadableAfterWritable,
    /// A segment is longer than a descriptor can describe.
    #[error("Segment of {0} bytes is longer than a descriptor allows")]
    SegmentTooLong(u64),
    /// The device reported a used entry for a chain that is not in flight.
    #[error("Device returned descriptor {0}, which is not the head of an in-flight chain")]
    BadUsedId(u32),
}

/// Byte offsets of the three parts of a split ring, relative to its base.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingLayout {
    /// Queue size (number of descriptors).
    pub size: u16,
    /// Offset of the descriptor table (16-byte aligned).
    pub desc: usize,
    /// Offset of the avail ring (2-byte aligned).
    pub avail: usize,
    /// Offset of the used ring (4-byte aligned; placed on its own cache line).
    pub used: usize,
    /// Total bytes the ring occupies.
    pub bytes: usize,
}

impl RingLayout {
    /// The layout of a ring of `size` descriptors.
    pub fn new(size: u16) -> Result<RingLayout, RingError> {
        if size == 0 || !size.is_power_of_two() {
            return Err(RingError::BadSize(size));
        }
        let n = usize::from(size);
        let desc = 0;
        let avail = desc + DESC_SIZE * n;
        // flags, idx, ring[n], used_event
        let avail_end = avail + 4 + 2 * n + 2;
        // Keep the device-written used ring off the driver's cache lines.
        let used = avail_end.next_multiple_of(64);
        // flags, idx, ring[n], avail_event
        let bytes = used + 4 + USED_ELEM_SIZE * n + 2;
        Ok(RingLayout {
            size,
            desc,
            avail,
            used,
            bytes,
        })
    }
}

/// One buffer of a descriptor chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical address of the buffer.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u32,
    /// True if the device writes the buffer.
    pub writable: bool,
}

impl Segment {
    /// A buffer the device reads.
    pub fn readable(gpa: u64, len: u32) -> Segment {
        Segment {
            gpa,
            len,
            writable: false,
        }
    }

    /// A buffer the device writes.
    pub fn writable(gpa: u64, len: u32) -> Segment {
        Segment {
            gpa,
            len,
            writable: true,
        }
    }
}

/// A chain the device has finished with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Used {
    /// Head descriptor of the chain, as [`SplitRing::add_chain`] returned it.
    pub head: u16,
    /// Bytes the device reports having written into the writable buffers.
    pub len: u32,
}

/// The driver side of one split virtqueue.
///
/// Usage: [`add_chain`](Self::add_chain) one or more chains, then
/// [`publish`](Self::publish) them, then notify the device if
/// [`needs_kick`](Self::needs_kick) says so; later [`pop_used`](Self::pop_used)
/// returns finished chains and recycles their descriptors.
pub struct SplitRing {
    base: *mut u8,
    gpa: u64,
    layout: RingLayout,
    /// Shadow of each descriptor's `next`; threads the free list and chains.
    next: Vec<u16>,
    /// Descriptors in the chain headed here; 0 if not an in-flight head.
    chain_len: Vec<u16>,
    free_head: u16,
    num_free: usize,
    /// Avail index including added but unpublished chains.
    avail_idx: u16,
    /// Avail index the device has been shown.
    published_idx: u16,
    /// Next used index to read.
    last_used: u16,
}

// SAFETY: `base` points into a shared mapping that the creator of the ring
// guarantees outlives it (see `SplitRing::new`); every access goes through
// `&mut self` or atomic loads, so moving the ring to another thread is sound.
unsafe impl Send for SplitRing {}
// SAFETY: methods taking `&self` only read the shared memory through atomics
// (indices and flags) or return addresses; all writes need `&mut self`.
unsafe impl Sync for SplitRing {}

impl SplitRing {
    /// Lays out a ring of `size` descriptors at `base` (host pointer), which
    /// the device sees at guest-physical `gpa`. The ring memory is zeroed and
    /// used-buffer notifications start suppressed (`VRING_AVAIL_F_NO_INTERRUPT`).
    ///
    /// # Safety
    /// `base` must be valid for reads and writes of `RingLayout::new(size)?.bytes`
    /// bytes for the whole life of the returned ring, and nothing but this ring
    /// and the device may access that memory.
    pub unsafe fn new(base: *mut u8, gpa: u64, size: u16) -> Result<SplitRing, RingError> {
        let layout = RingLayout::new(size)?;
        if !(base as usize).is_multiple_of(RING_ALIGN) || !gpa.is_multiple_of(RING_ALIGN as u64) {
            return Err(RingError::Misaligned);
        }
        // SAFETY: the caller guarantees `base` is valid for `layout.bytes` bytes.
        unsafe { std::ptr::write_bytes(base, 0, layout.bytes) };
        let n = usize::from(size);
        let next = (1..=n).map(|i| (i % n) as u16).collect();
        let ring = SplitRing {
            base,
            gpa,
            layout,
            next,
            chain_len: vec![0; n],
            free_head: 0,
            num_free: n,
            avail_idx: 0,
            published_idx: 0,
            last_used: 0,
        };
        ring.avail_flags()
            .store(VRING_AVAIL_F_NO_INTERRUPT, Ordering::Relaxed);
        Ok(ring)
    }

    /// The ring's layout.
    pub fn layout(&self) -> RingLayout {
        self.layout
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.layout.size
    }

    /// Host address of the descriptor table.
    pub fn desc_host(&self) -> u64 {
        self.base as u64 + self.layout.desc as u64
    }

    /// Host address of the avail ring.
    pub fn avail_host(&self) -> u64 {
        self.base as u64 + self.layout.avail as u64
    }

    /// Host address of the used ring.
    pub fn used_host(&self) -> u64 {
        self.base as u64 + self.layout.used as u64
    }

    /// Guest-physical address of the descriptor table.
    pub fn desc_gpa(&self) -> u64 {
        self.gpa + self.layout.desc as u64
    }

    /// Guest-physical address of the avail ring.
    pub fn avail_gpa(&self) -> u64 {
        self.gpa + self.layout.avail as u64
    }

    /// Guest-physical address of the used ring.
    pub fn used_gpa(&self) -> u64 {
        self.gpa + self.layout.used as u64
    }

    /// Free descriptors.
    pub fn num_free(&self) -> usize {
        self.num_free
    }

    /// Chains added and not yet returned by the device.
    pub fn in_flight(&self) -> usize {
        usize::from(self.layout.size) - self.num_free
    }

    /// True if chains were added since the last [`publish`](Self::publish).
    pub fn has_unpublished(&self) -> bool {
        self.avail_idx != self.published_idx
    }

    fn ptr(&self, offset: usize) -> *mut u8 {
        // Offsets passed here are always inside `layout.bytes`.
        self.base.wrapping_add(offset)
    }

    fn atomic_u16(&self, offset: usize) -> &AtomicU16 {
        let p = self.ptr(offset) as *mut u16;
        // SAFETY: `p` is inside the ring (offset < layout.bytes), 2-byte aligned
        // (the base is 16-aligned and every u16 field sits at an even offset),
        // and the memory lives as long as `self` (contract of `new`).
        unsafe { AtomicU16::from_ptr(p) }
    }

    fn avail_flags(&self) -> &AtomicU16 {
        self.atomic_u16(self.layout.avail)
    }

    fn avail_idx_field(&self) -> &AtomicU16 {
        self.atomic_u16(self.layout.avail + 2)
    }

    fn used_flags(&self) -> &AtomicU16 {
        self.atomic_u16(self.layout.used)
    }

    fn used_idx_field(&self) -> &AtomicU16 {
        self.atomic_u16(self.layout.used + 2)
    }

    fn write_desc(&mut self, index: u16, seg: Segment, flags: u16, next: u16) {
        let p = self.ptr(self.layout.desc + DESC_SIZE * usize::from(index));
        // SAFETY: `index` < size, so the 16-byte descriptor lies inside the
        // descriptor table, which is 16-byte aligned; the fields are naturally
        // aligned. Volatile because the device reads this memory.
        unsafe {
            std::ptr::write_volatile(p as *mut u64, seg.gpa.to_le());
            std::ptr::write_volatile(p.add(8) as *mut u32, seg.len.to_le());
            std::ptr::write_volatile(p.add(12) as *mut u16, flags.to_le());
            std::ptr::write_volatile(p.add(14) as *mut u16, next.to_le());
        }
    }

    /// Writes a chain's descriptors and its avail-ring entry; the device does
    /// not see it until [`publish`](Self::publish). Readable segments must come
    /// before writable ones. Returns the head descriptor index, which
    /// [`Used::head`] reports back.
    pub fn add_chain(&mut self, segs: &[Segment]) -> Result<u16, RingError> {
        if segs.is_empty() {
            return Err(RingError::EmptyChain);
        }
        if segs.len() > self.num_free {
            return Err(RingError::Full {
                need: segs.len(),
                free: self.num_free,
            });
        }
        if segs.windows(2).any(|w| w[0].writable && !w[1].writable) {
            return Err(RingError::ReadableAfterWritable);
        }
        let head = self.free_head;
        let mut index = head;
        for (k, seg) in segs.iter().enumerate() {
            let last = k + 1 == segs.len();
            let next = self.next[usize::from(index)];
            let mut flags = if seg.writable { VRING_DESC_F_WRITE } else { 0 };
            if !last {
                flags |= VRING_DESC_F_NEXT;
            }
            self.write_desc(index, *seg, flags, if last { 0 } else { next });
            if last {
                self.free_head = next;
            } else {
                index = next;
            }
        }
        self.num_free -= segs.len();
        self.chain_len[usize::from(head)] = segs.len() as u16;
        let slot = usize::from(self.avail_idx & (self.layout.size - 1));
        let p = self.ptr(self.layout.avail + 4 + 2 * slot);
        // SAFETY: `slot` < size, so the entry lies inside the avail ring and is
        // 2-byte aligned. Volatile because the device reads it.
        unsafe { std::ptr::write_volatile(p as *mut u16, head.to_le()) };
        self.avail_idx = self.avail_idx.wrapping_add(1);
        Ok(head)
    }

    /// Makes every added chain visible to the device (`Release` fence, then
    /// the avail index store).
    pub fn publish(&mut self) {
        fence(Ordering::Release);
        self.avail_idx_field()
            .store(self.avail_idx.to_le(), Ordering::Release);
        self.published_idx = self.avail_idx;
    }

    /// True unless the device has set `VRING_USED_F_NO_NOTIFY`. Call after
    /// [`publish`](Self::publish); a full fence orders the index store before
    /// this read.
    pub fn needs_kick(&self) -> bool {
        fence(Ordering::SeqCst);
        u16::from_le(self.used_flags().load(Ordering::Relaxed)) & VRING_USED_F_NO_NOTIFY == 0
    }

    /// Asks for (true) or suppresses (false) used-buffer notifications, with a
    /// full fence after the flag store so a following [`has_used`](Self::has_used)
    /// cannot be reordered before it.
    pub fn set_interrupts(&mut self, enabled: bool) {
        let flags = if enabled {
            0
        } else {
            VRING_AVAIL_F_NO_INTERRUPT
        };
        self.avail_flags().store(flags.to_le(), Ordering::Relaxed);
        fence(Ordering::SeqCst);
    }

    /// True if the device has returned chains not yet popped.
    pub fn has_used(&self) -> bool {
        u16::from_le(self.used_idx_field().load(Ordering::Acquire)) != self.last_used
    }

    /// The next chain the device has finished with, its descriptors recycled.
    pub fn pop_used(&mut self) -> Result<Option<Used>, RingError> {
        let used_idx = u16::from_le(self.used_idx_field().load(Ordering::Acquire));
        if used_idx == self.last_used {
            return Ok(None);
        }
        let slot = usize::from(self.last_used & (self.layout.size - 1));
        let p = self.ptr(self.layout.used + 4 + USED_ELEM_SIZE * slot);
        // SAFETY: `slot` < size, so the 8-byte element lies inside the used
        // ring, 4-byte aligned. Volatile because the device writes it.
        let (id, len) = unsafe {
            (
                u32::from_le(std::ptr::read_volatile(p as *const u32)),
                u32::from_le(std::ptr::read_volatile(p.add(4) as *const u32)),
            )
        };
        let n = match usize::try_from(id)
            .ok()
            .and_then(|i| self.chain_len.get(i).copied())
        {
            Some(n) if n > 0 => n,
            _ => return Err(RingError::BadUsedId(id)),
        };
        self.last_used = self.last_used.wrapping_add(1);
        let head = id as u16;
        let mut tail = head;
        for _ in 1..n {
            tail = self.next[usize::from(tail)];
        }
        self.next[usize::from(tail)] = self.free_head;
        self.free_head = head;
        self.num_free += usize::from(n);
        self.chain_len[usize::from(head)] = 0;
        Ok(Some(Used { head, len }))
    }
}

#[cfg(test)]
#[path = "ring_tests.rs"]
mod tests;
