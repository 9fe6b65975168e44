//! [`CudaChunks`]: [`ChunkMemory`] on a real GPU, with the CUDA virtual memory management
//! API (`cuMemAddressReserve`, `cuMemCreate`, `cuMemMap`, `cuMemSetAccess`, ...).
//!
//! Each extent is one physical allocation (`CU_MEM_ALLOCATION_TYPE_PINNED` on the context's
//! device) of its whole length: one `cuMemCreate`, one `cuMemMap`, one `cuMemSetAccess` and
//! one zeroing memset where another guest process could have held the memory
//! ([`super::zero_new_extents`]); its handle is released as soon as it is mapped, so its one
//! `cuMemUnmap` frees it. Swapping copies extents to pinned host memory (slabs of chunk-sized
//! slots in a pool, pinned ahead by the swap reserve when it is on: see [`super::pinned`]; an
//! extent's slots need not be contiguous) with
//! asynchronous copies spread over [`STREAMS`] non-blocking streams, each copy a run of chunks
//! contiguous on both sides (inside one slab) of at most [`MAX_COPY`] bytes. Swap-out unmaps
//! each extent as soon as its copies are done, while later ones are still copying; swap-in
//! maps each extent and queues its copies before mapping the next, so mapping overlaps the
//! copies.
//!
//! **Every method, and drop, must run with the owning CUDA context current on the calling
//! thread** (the CUDA executor enters its context before touching its heap). Streams belong
//! to that context; pinned buffers to the device's primary context (portable).

use std::collections::HashMap;
use std::ptr;
use std::sync::{Arc, OnceLock};

use cudarc::driver::sys::{self as cu, CUdevice, CUresult};
use tracing::warn;
use vgpu_spec::Status;

pub use super::pinned::SLAB_CHUNKS;
use super::pinned::{PinContext, SharedPool, SwapReserve};
use super::{ChunkMemory, ElasticHeap, Extent, CHUNK};
use crate::gpu::{GpuResult, MemoryUsage};

/// Driver functions used here; the CUDA executor checks them at open, with its own.
pub const SYMBOLS: &[&str] = &[
    "cuMemAddressReserve",
    "cuMemAddressFree",
    "cuMemCreate",
    "cuMemMap",
    "cuMemSetAccess",
    "cuMemUnmap",
    "cuCtxSynchronize",
    "cuMemRelease",
    "cuMemGetAllocationGranularity",
    "cuMemHostAlloc",
    "cuMemFreeHost",
    "cuCtxPushCurrent_v2",
    "cuCtxSetCurrent",
    "cuCtxPopCurrent_v2",
    "cuMemHostRegister_v2",
    "cuMemHostUnregister",
    "cuStreamCreate",
    "cuStreamDestroy_v2",
    "cuStreamSynchronize",
    "cuMemcpyDtoHAsync_v2",
    "cuMemcpyHtoDAsync_v2",
    "cuMemsetD8Async",
    "cuEventCreate",
    "cuEventRecord",
    "cuEventSynchronize",
    "cuEventDestroy_v2",
];

/// Streams the swap copies are spread over.
pub const STREAMS: usize = 4;
/// Longest single copy (32 MiB): extents are cut into copies of at most this, so every
/// stream gets work.
pub const MAX_COPY: u64 = 16 * CHUNK;

/// False when the environment sets `VGPU_ELASTIC=0` (or `off`, `false`): contexts then
/// allocate with plain `cuMemAlloc` (or host blocks on the emulated device) and cannot swap.
/// Read once per process.
pub fn enabled_by_env() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| {
        !matches!(
            std::env::var("VGPU_ELASTIC").as_deref(),
            Ok("0" | "off" | "false")
        )
    })
}

/// Resident and swapped bytes of an optional heap (zero without one).
pub fn usage<M: ChunkMemory>(heap: Option<&ElasticHeap<M>>) -> MemoryUsage {
    heap.map_or(MemoryUsage::default(), |h| MemoryUsage {
        resident: h.resident_bytes(),
        swapped: h.swapped_bytes(),
    })
}

fn check(result: CUresult) -> GpuResult<()> {
    Status(result as u32).into_result()
}

/// The host copy of a swapped-out extent.
struct Saved {
    len: u64,
    /// One pinned slot per chunk of the extent, in order.
    slots: Vec<*mut u8>,
    /// Its unmap failed after the copy: the extent is still mapped, with its contents (nothing
    /// runs in a swapped-out context), so restoring it needs no copy.
    still_mapped: bool,
}

/// The (device chunk, host slot) pairs of the extent at `va` saved in `slots`.
fn pairs_of(va: u64, slots: &[*mut u8]) -> Vec<(u64, *mut u8)> {
    (0u64..)
        .zip(slots)
        .map(|(i, &slot)| (va + i * CHUNK, slot))
        .collect()
}

/// Device extents through the CUDA virtual memory management API.
pub struct CudaChunks {
    device: CUdevice,
    streams: Vec<cu::CUstream>,
    /// Host copies of swapped-out extents, by start.
    saved: HashMap<u64, Saved>,
    pool: Arc<SharedPool>,
    /// A zeroing memset was queued since the last [`ChunkMemory::settle`].
    zeroing: bool,
}

// SAFETY: the streams and pinned buffers belong to a CUDA context, which may be used from any
// thread; CudaChunks is only used with that context current (see the module docs) and owns
// its buffers exclusively.
unsafe impl Send for CudaChunks {}

impl CudaChunks {
    /// Chunk memory on `device` for the context current on this thread, swapping through host
    /// memory pinned under `primary` (ahead of need when `reserve` is given). `NOT_SUPPORTED`
    /// when the device's mapping granularity does not divide [`CHUNK`].
    pub fn new(
        device: CUdevice,
        primary: PinContext,
        reserve: Option<&SwapReserve>,
    ) -> GpuResult<CudaChunks> {
        let pool = SharedPool::new(primary);
        if let Some(reserve) = reserve {
            reserve.watch(&pool);
        }
        let mut chunks = CudaChunks {
            device,
            streams: Vec::with_capacity(STREAMS),
            saved: HashMap::new(),
            pool,
            zeroing: false,
        };
        let prop = chunks.prop();
        let mut granularity = 0usize;
        // SAFETY: both pointers are valid for the call.
        check(unsafe {
            cu::cuMemGetAllocationGranularity(
                &mut granularity,
                &prop,
                cu::CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_MINIMUM,
            )
        })?;
        if granularity == 0 || !(CHUNK as usize).is_multiple_of(granularity) {
            warn!(
                granularity,
                "The device's mapping granularity does not divide 2 MiB"
            );
            return Err(Status::NOT_SUPPORTED);
        }
        for _ in 0..STREAMS {
            let mut stream: cu::CUstream = ptr::null_mut();
            let flags = cu::CUstream_flags::CU_STREAM_NON_BLOCKING as u32;
            // SAFETY: stream is a valid out-pointer. On failure, dropping `chunks` destroys
            // the streams made so far.
            check(unsafe { cu::cuStreamCreate(&mut stream, flags) })?;
            chunks.streams.push(stream);
        }
        Ok(chunks)
    }

    /// Bytes of pinned host memory held for swapping (in use or pooled).
    pub fn pinned_bytes(&self) -> u64 {
        self.pool.lock().bytes()
    }

    /// Frees pooled pinned host memory no saved extent uses.
    pub fn release_idle_pinned(&mut self) {
        self.pool.lock().trim_to(0);
    }

    fn location(&self) -> cu::CUmemLocation {
        cu::CUmemLocation {
            type_: cu::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
            id: self.device,
        }
    }

    fn prop(&self) -> cu::CUmemAllocationProp {
        cu::CUmemAllocationProp {
            type_: cu::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED,
            requestedHandleTypes: cu::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_NONE,
            location: self.location(),
            win32HandleMetaData: ptr::null_mut(),
            allocFlags: cu::CUmemAllocationProp_st__bindgen_ty_1 {
                compressionType: 0,
                gpuDirectRDMACapable: 0,
                usage: 0,
                reserved: [0; 4],
            },
        }
    }

    /// Creates one physical allocation of `len` bytes, maps it at `va` and lets the device
    /// read and write it (contents undefined). Nothing is left mapped on failure.
    fn map_extent(&self, va: u64, len: u64) -> GpuResult<()> {
        let bytes = usize::try_from(len).map_err(|_| Status::INVALID_VALUE)?;
        let prop = self.prop();
        let mut handle: cu::CUmemGenericAllocationHandle = 0;
        // SAFETY: handle and prop are valid pointers for the call.
        check(unsafe { cu::cuMemCreate(&mut handle, bytes, &prop, 0) })?;
        // SAFETY: [va, va + len) is a CHUNK-aligned, unmapped range of our reservation;
        // handle is live and `len` bytes long.
        let mapped = check(unsafe { cu::cuMemMap(va, bytes, 0, handle, 0) });
        // SAFETY: the handle is not used again; a mapping keeps the memory alive until it is
        // unmapped, and without one the memory is freed now.
        if let Err(status) = check(unsafe { cu::cuMemRelease(handle) }) {
            warn!(%status, "Releasing an extent handle failed");
        }
        mapped?;
        let desc = cu::CUmemAccessDesc {
            location: self.location(),
            flags: cu::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
        };
        // SAFETY: the range is mapped; desc is valid for the call.
        if let Err(status) = check(unsafe { cu::cuMemSetAccess(va, bytes, &desc, 1) }) {
            Self::unmap_logged(va, len, "Unmapping an extent after a failed cuMemSetAccess");
            return Err(status);
        }
        Ok(())
    }

    /// Unmaps (and so frees) the extent `[va, va + len)`, exactly as one `cuMemMap` mapped it.
    fn unmap_extent(va: u64, len: u64) -> GpuResult<()> {
        // SAFETY: [va, va + len) is one extent we mapped; its contents are given up.
        check(unsafe { cu::cuMemUnmap(va, len as usize) })
    }

    fn unmap_logged(va: u64, len: u64, what: &str) {
        if let Err(status) = Self::unmap_extent(va, len) {
            warn!(%status, va, len, "{what} failed");
        }
    }

    fn synchronize_streams(&self) -> GpuResult<()> {
        let mut result = Ok(());
        for &stream in &self.streams {
            // SAFETY: our own live stream.
            let r = check(unsafe { cu::cuStreamSynchronize(stream) });
            result = result.and(r);
        }
        result
    }

    /// Splits `pairs` (one extent's chunks with their host slots) into copies: runs of chunks
    /// contiguous on both sides, at most [`MAX_COPY`] each, never running into a host slot for
    /// which `starts_slab` holds, as (first index, chunks).
    fn copies(
        pairs: &[(u64, *mut u8)],
        starts_slab: impl Fn(*mut u8) -> bool,
    ) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < pairs.len() {
            let (va, host) = pairs[i];
            let mut n = 1usize;
            while let Some(&(next_va, next_host)) = pairs.get(i + n) {
                let len = n as u64 * CHUNK;
                if len >= MAX_COPY
                    || next_va != va + len
                    || next_host != host.wrapping_add(len as usize)
                    || starts_slab(next_host)
                {
                    break;
                }
                n += 1;
            }
            out.push((i, n));
            i += n;
        }
        out
    }

    /// The copies of one extent's `pairs` (see [`CudaChunks::copies`]).
    fn copies_of(&self, pairs: &[(u64, *mut u8)]) -> Vec<(usize, usize)> {
        let pool = self.pool.lock();
        Self::copies(pairs, |p| pool.starts_slab(p))
    }

    /// Issues one asynchronous copy of `n` chunks from `pairs[i]` on stream `k % STREAMS`.
    fn issue(
        &self,
        pairs: &[(u64, *mut u8)],
        (i, n): (usize, usize),
        k: usize,
        to_host: bool,
    ) -> GpuResult<()> {
        let (va, host) = pairs[i];
        let len = n * CHUNK as usize;
        let stream = self.streams[k % self.streams.len()];
        // SAFETY: the host range is `len` bytes of pinned slots (contiguous inside one slab,
        // checked by `copies`), the device range `len` bytes of one mapped extent; both stay
        // alive until the copy's stream is synchronized.
        check(unsafe {
            if to_host {
                cu::cuMemcpyDtoHAsync_v2(host.cast(), va, len, stream)
            } else {
                cu::cuMemcpyHtoDAsync_v2(va, host.cast(), len, stream)
            }
        })
    }

    /// Records an event on copy `k`'s stream (after its copy).
    fn mark(&self, k: usize) -> GpuResult<cu::CUevent> {
        let mut event: cu::CUevent = ptr::null_mut();
        // SAFETY: event is a valid out-pointer; flags disable timing (cheapest).
        check(unsafe {
            cu::cuEventCreate(
                &mut event,
                cu::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32,
            )
        })?;
        let stream = self.streams[k % self.streams.len()];
        // SAFETY: both handles are live and ours.
        if let Err(status) = check(unsafe { cu::cuEventRecord(event, stream) }) {
            destroy_event(event);
            return Err(status);
        }
        Ok(event)
    }

    /// Issues the copies to host of every extent (`plan`: each extent's chunk/slot pairs),
    /// an event after each copy; returns the events and, per extent, the end of its events.
    /// On failure waits for what was issued and destroys the events.
    fn issue_saves(
        &self,
        plan: &[(Extent, Vec<(u64, *mut u8)>)],
    ) -> GpuResult<(Vec<cu::CUevent>, Vec<usize>)> {
        let mut events = Vec::new();
        let mut ends = Vec::with_capacity(plan.len());
        let mut k = 0;
        for (_, pairs) in plan {
            for copy in self.copies_of(pairs) {
                let issued = self.issue(pairs, copy, k, true).and_then(|()| self.mark(k));
                k += 1;
                match issued {
                    Ok(event) => events.push(event),
                    Err(status) => {
                        let _ = self.synchronize_streams();
                        events.into_iter().for_each(destroy_event);
                        return Err(status);
                    }
                }
            }
            ends.push(events.len());
        }
        Ok((events, ends))
    }
}

fn destroy_event(event: cu::CUevent) {
    // SAFETY: an event we created and no longer use.
    unsafe { cu::cuEventDestroy_v2(event) };
}

impl ChunkMemory for CudaChunks {
    fn reserve(&mut self, size: u64) -> GpuResult<u64> {
        let mut base = 0;
        let size = usize::try_from(size).map_err(|_| Status::OUT_OF_MEMORY)?;
        // SAFETY: base is a valid out-pointer; no fixed address is asked for.
        check(unsafe { cu::cuMemAddressReserve(&mut base, size, CHUNK as usize, 0, 0) })?;
        Ok(base)
    }

    fn release_reservation(&mut self, base: u64, size: u64) {
        // SAFETY: the range came from cuMemAddressReserve and nothing in it is mapped.
        if let Err(status) = check(unsafe { cu::cuMemAddressFree(base, size as usize) }) {
            warn!(%status, base, size, "Freeing a device address reservation failed");
        }
    }

    fn map(&mut self, va: u64, len: u64) -> GpuResult<()> {
        let stream = self
            .streams
            .first()
            .copied()
            .ok_or(Status::NOT_INITIALIZED)?;
        self.map_extent(va, len)?;
        if super::zero_new_extents() {
            // SAFETY: the extent is mapped and accessible; the stream is ours. A fresh extent
            // may hold another guest process's old data: it is zeroed before any use (`settle`
            // waits for it before the allocation is handed out).
            let zeroed = check(unsafe { cu::cuMemsetD8Async(va, 0, len as usize, stream) });
            if let Err(status) = zeroed {
                Self::unmap_logged(va, len, "Unmapping an extent after a failed memset");
                return Err(status);
            }
            self.zeroing = true;
        }
        self.pool.hold(len);
        Ok(())
    }

    fn settle(&mut self) -> GpuResult<()> {
        if !std::mem::take(&mut self.zeroing) {
            return Ok(());
        }
        match self.streams.first() {
            // SAFETY: our own live stream.
            Some(&stream) => check(unsafe { cu::cuStreamSynchronize(stream) }),
            None => Ok(()),
        }
    }

    /// Freeing: like `cuMemFree`, waits for the context's work first. Unlike `cuMemFree`,
    /// `cuMemUnmap` does not: a kernel still running on freed memory (Thrust frees its
    /// temporary storage right after queueing the kernels that use it) would fault.
    fn unmap(&mut self, va: u64, len: u64) -> GpuResult<()> {
        // SAFETY: no arguments; the owning context is current (see the module docs).
        check(unsafe { cu::cuCtxSynchronize() })?;
        Self::unmap_extent(va, len)?;
        self.pool.let_go(len);
        Ok(())
    }

    /// Issues the copies of every extent, then unmaps each extent as soon as its copies are
    /// done (the unmaps overlap the later copies). A failed issue unmaps nothing; a failed
    /// copy stops the unmapping and restores the extents already unmapped. An extent whose
    /// unmap fails is still saved (its data is), and stays mapped.
    fn save(&mut self, extents: &[Extent]) -> GpuResult<()> {
        if extents.iter().any(|(va, _)| self.saved.contains_key(va)) {
            return Err(Status::INVALID_VALUE);
        }
        let total = extents.iter().map(|&(_, len)| (len / CHUNK) as usize).sum();
        let mut slots = self.pool.lock().take(total)?.into_iter();
        let plan: Vec<(Extent, Vec<(u64, *mut u8)>)> = extents
            .iter()
            .map(|&(va, len)| {
                let mine: Vec<*mut u8> = slots.by_ref().take((len / CHUNK) as usize).collect();
                ((va, len), pairs_of(va, &mine))
            })
            .collect();
        let (events, ends) = match self.issue_saves(&plan) {
            Ok(issued) => issued,
            Err(status) => {
                self.pool
                    .lock()
                    .put(plan.iter().flat_map(|(_, p)| p.iter().map(|&(_, h)| h)));
                return Err(status);
            }
        };
        let mut result = Ok(());
        let mut done = 0; // extents unmapped (or kept) and saved
        let mut start = 0;
        for (((va, len), pairs), &end) in plan.iter().zip(&ends) {
            for &event in &events[start..end] {
                // SAFETY: a live event recorded after one of this extent's copies.
                let r = check(unsafe { cu::cuEventSynchronize(event) });
                result = result.and(r);
            }
            start = end;
            if result.is_err() {
                break;
            }
            let still_mapped = Self::unmap_extent(*va, *len)
                .inspect_err(|status| warn!(%status, va, "Unmapping a saved extent failed"))
                .is_err();
            let slots = pairs.iter().map(|&(_, host)| host).collect();
            self.saved.insert(
                *va,
                Saved {
                    len: *len,
                    slots,
                    still_mapped,
                },
            );
            done += 1;
        }
        events.into_iter().for_each(destroy_event);
        let Err(status) = result else {
            return Ok(());
        };
        // All or nothing: bring back what was unmapped, give back the other slots.
        let _ = self.synchronize_streams();
        let unmapped: Vec<Extent> = plan[..done].iter().map(|(e, _)| *e).collect();
        if let Err(error) = self.restore(&unmapped) {
            warn!(%error, "Restoring extents after a failed swap-out failed");
        }
        self.pool.lock().put(
            plan[done..]
                .iter()
                .flat_map(|(_, p)| p.iter().map(|&(_, h)| h)),
        );
        Err(status)
    }

    /// Maps, opens and queues the copies back extent by extent, so that mapping the next
    /// extent overlaps the copies of the previous ones; any failure unmaps what it mapped and
    /// keeps every saved copy.
    fn restore(&mut self, extents: &[Extent]) -> GpuResult<()> {
        let mut order = extents.to_vec();
        order.sort_unstable_by_key(|&(va, _)| va);
        if order
            .iter()
            .any(|(va, len)| self.saved.get(va).is_none_or(|s| s.len != *len))
        {
            return Err(Status::INVALID_VALUE);
        }
        let mut mapped: Vec<Extent> = Vec::new();
        let mut result = Ok(());
        let mut k = 0;
        for &(va, len) in &order {
            let pairs = match self.saved.get(&va) {
                Some(saved) if !saved.still_mapped => pairs_of(va, &saved.slots),
                _ => continue, // contents still on the device
            };
            result = self.map_extent(va, len);
            if result.is_err() {
                break;
            }
            mapped.push((va, len));
            for copy in self.copies_of(&pairs) {
                result = self.issue(&pairs, copy, k, false);
                k += 1;
                if result.is_err() {
                    break;
                }
            }
            if result.is_err() {
                break;
            }
        }
        if let Err(status) = result.and(self.synchronize_streams()) {
            let _ = self.synchronize_streams();
            for &(va, len) in &mapped {
                Self::unmap_logged(va, len, "Unmapping an extent after a failed restore");
            }
            return Err(status);
        }
        for (va, _) in order {
            if let Some(saved) = self.saved.remove(&va) {
                self.pool.lock().put(saved.slots);
            }
        }
        Ok(())
    }

    fn discard(&mut self, va: u64) {
        if let Some(saved) = self.saved.remove(&va) {
            if saved.still_mapped {
                Self::unmap_logged(va, saved.len, "Unmapping a discarded extent");
            }
            self.pool.lock().put(saved.slots);
            self.pool.let_go(saved.len);
        }
    }
}

impl Drop for CudaChunks {
    fn drop(&mut self) {
        for (va, saved) in std::mem::take(&mut self.saved) {
            if saved.still_mapped {
                Self::unmap_logged(va, saved.len, "Unmapping an extent of dropped chunk memory");
            }
            self.pool.lock().put(saved.slots);
        }
        // The pinned slabs go with the pool (the reserve thread may hold it a moment longer).
        self.pool.let_go(u64::MAX);
        self.pool.lock().trim_to(0);
        for stream in self.streams.drain(..) {
            // SAFETY: our own stream, idle (every method waits for its copies).
            if let Err(status) = check(unsafe { cu::cuStreamDestroy_v2(stream) }) {
                warn!(%status, "Destroying a swap stream failed");
            }
        }
    }
}

/// The elastic heap of a new CUDA context (current on this thread) on `device`, reserving
/// [`super::reservation_for_limit`] of `limit`, swapping through memory pinned under `primary`
/// (ahead of need with a `reserve`); `None` when elastic memory is off.
pub fn context_heap(
    device: CUdevice,
    limit: u64,
    primary: PinContext,
    reserve: Option<&SwapReserve>,
) -> GpuResult<Option<ElasticHeap<CudaChunks>>> {
    if !enabled_by_env() {
        return Ok(None);
    }
    let chunks = CudaChunks::new(device, primary, reserve)?;
    ElasticHeap::new(chunks, super::reservation_for_limit(limit)).map(Some)
}

#[cfg(test)]
#[path = "cuda_tests.rs"]
mod tests;
