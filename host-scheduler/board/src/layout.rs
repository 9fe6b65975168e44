//! The board's memory layout. Every field is an atomic (all-zero is a valid, empty board), rows
//! are cache-line aligned so that backends writing their own counters do not slow each other,
//! and the sizes are fixed by the asserts below: a scheduler and a backend built from different
//! commits either agree on the layout or refuse each other through [`VERSION`].

use std::sync::atomic::{AtomicU32, AtomicU64};

/// Slots (attached slices) per board.
pub const MAX_SLOTS: usize = 64;

/// Worker processes per slot: a backend serves each frontend connection from its own process,
/// and each of them owns one bit of the slot's busy and waiting masks.
pub const MAX_WORKERS: usize = 64;

/// Physical GPUs per board.
pub const MAX_GPUS: usize = 16;

/// "VGPUBRD1", little-endian.
pub(crate) const MAGIC: u64 = u64::from_le_bytes(*b"VGPUBRD1");

/// The layout's version.
pub(crate) const VERSION: u32 = 3;

/// The file's size: the layout rounded up to whole pages.
pub(crate) const BOARD_BYTES: u64 = 20 * 1024;

#[cfg(not(target_endian = "little"))]
compile_error!("The grant board is defined little-endian");

/// The board's header.
#[repr(C, align(128))]
pub(crate) struct Header {
    pub magic: AtomicU64,
    pub version: AtomicU32,
    pub slots: AtomicU32,
    pub gpus: AtomicU32,
    _pad0: AtomicU32,
    /// The scheduler's last tick (CLOCK_MONOTONIC ns).
    pub tick_ns: AtomicU64,
    _reserved: [AtomicU64; 12],
}

/// One row per physical GPU.
#[repr(C, align(64))]
pub(crate) struct GpuRow {
    /// Bit i: slot i is latency-critical, on this GPU, and busy.
    pub lc_busy_mask: AtomicU64,
    _reserved: [AtomicU64; 7],
}

/// One row per slot. Written by the scheduler: generation, gpu, class, grant, mem_limit.
/// Written by the backend: everything else (the scheduler only clears it).
#[repr(C, align(128))]
pub(crate) struct SlotRow {
    pub generation: AtomicU64,
    pub gpu: AtomicU32,
    pub class: AtomicU32,
    pub grant: AtomicU32,
    pub pid: AtomicU32,
    /// Bit w: worker w of the backend has GPU work queued, waiting or in flight.
    pub busy: AtomicU64,
    pub busy_ns: AtomicU64,
    pub throttled_ns: AtomicU64,
    pub launches: AtomicU64,
    pub htod_bytes: AtomicU64,
    pub dtoh_bytes: AtomicU64,
    pub heartbeat_ns: AtomicU64,
    pub preempt_last_ns: AtomicU64,
    pub preempt_max_ns: AtomicU64,
    /// Bit w: worker w is held back, waiting for its grant.
    pub waiting: AtomicU64,
    /// Device memory the slice holds on the GPU, bytes (its backend's total).
    pub mem_resident: AtomicU64,
    /// Device memory of the slice swapped out to host memory, bytes.
    pub mem_swapped: AtomicU64,
    /// Times the slice's memory was reclaimed (swapped out).
    pub reclaims: AtomicU64,
    /// The slice's memory limit, bytes, as the scheduler last set it (0: the limit the backend
    /// was started with). A resize of an attached slice takes effect through it.
    pub mem_limit: AtomicU64,
    _reserved: [AtomicU64; 15],
}

/// The whole board.
#[repr(C)]
pub(crate) struct Layout {
    pub header: Header,
    pub gpus: [GpuRow; MAX_GPUS],
    pub slots: [SlotRow; MAX_SLOTS],
}

const _: () = assert!(std::mem::size_of::<Header>() == 128);
const _: () = assert!(std::mem::size_of::<GpuRow>() == 64);
const _: () = assert!(std::mem::size_of::<SlotRow>() == 256);
const _: () = assert!(std::mem::offset_of!(SlotRow, mem_limit) == 128);
const _: () = assert!(std::mem::offset_of!(SlotRow, busy) == 24);
const _: () = assert!(std::mem::offset_of!(SlotRow, waiting) == 96);
const _: () = assert!(std::mem::size_of::<Layout>() == 128 + 64 * MAX_GPUS + 256 * MAX_SLOTS);
const _: () = assert!(std::mem::size_of::<Layout>() as u64 <= BOARD_BYTES);
