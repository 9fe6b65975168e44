//! [`CudaChunks`]: [`ChunkMemory`] on a real GPU, with the CUDA virtual memory management
//! API (`cuMemAddressReserve`, `cuMemCreate`, `cuMemMap`, `cuMemSetAccess`, ...).
//!
//! Each chunk is its own physical allocation (`CU_MEM_ALLOCATION_TYPE_PINNED` on the
//! context's device), mapped read/write for that device; its handle is released as soon as
//! it is mapped, so unmapping frees it. Swapping copies chunks to pinned host memory
//! (`cuMemHostAlloc` slabs of up to [`SLAB_CHUNKS`] chunks, kept in a pool and reused by the
//! next swap, since pinning is slower than copying) with asynchronous copies spread over
//! [`STREAMS`] non-blocking streams and merged where both sides are contiguous, then waits
//! for all of them.
//!
//! **Every method, and drop, must run with the owning CUDA context current on the calling
//! thread** (the CUDA executor enters its context before touching its heap). Streams and
//! pinned buffers belong to that context.

use std::collections::HashMap;
use std::ptr;
use std::sync::OnceLock;

use cudarc::driver::sys::{self as cu, CUdevice, CUresult};
use tracing::warn;
use vgpu_spec::Status;

use super::{ChunkMemory, ElasticHeap, CHUNK};
use crate::gpu::{GpuResult, MemoryUsage};

/// Driver functions used here; the CUDA executor checks them at open, with its own.
pub const SYMBOLS: &[&str] = &[
    "cuMemAddressReserve",
    "cuMemAddressFree",
    "cuMemCreate",
    "cuMemMap",
    "cuMemSetAccess",
    "cuMemUnmap",
    "cuMemRelease",
    "cuMemGetAllocationGranularity",
    "cuMemHostAlloc",
    "cuMemFreeHost",
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
/// Chunks per pinned host slab (64 MiB).
pub const SLAB_CHUNKS: usize = 32;
/// Longest single copy: contiguous runs are cut here so every stream gets work.
const MAX_COPY: u64 = 16 * CHUNK;

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

/// One `cuMemHostAlloc` allocation.
struct Slab {
    ptr: *mut u8,
    chunks: usize,
}

/// Pinned host chunks, handed out and taken back; freed only on drop or
/// [`CudaChunks::release_idle_pinned`].
#[derive(Default)]
struct PinnedPool {
    slabs: Vec<Slab>,
    /// Free chunk-sized slots, each inside a slab.
    free: Vec<*mut u8>,
}

impl PinnedPool {
    /// `n` slots, pinning new slabs as needed (`OUT_OF_MEMORY` when the host cannot).
    fn take(&mut self, n: usize) -> GpuResult<Vec<*mut u8>> {
        while self.free.len() < n {
            let chunks = (n - self.free.len()).min(SLAB_CHUNKS);
            let bytes = chunks * CHUNK as usize;
            let mut p: *mut std::ffi::c_void = ptr::null_mut();
            // SAFETY: p is a valid out-pointer; flags 0 pins memory for this context.
            check(unsafe { cu::cuMemHostAlloc(&mut p, bytes, 0) }).map_err(|status| {
                warn!(%status, bytes, "Pinning host memory for a swap failed");
                Status::OUT_OF_MEMORY
            })?;
            let base = p.cast::<u8>();
            // Pushed last-first so that popping (split_off) yields ascending addresses.
            self.free.extend(
                (0..chunks)
                    .rev()
                    .map(|i| base.wrapping_add(i * CHUNK as usize)),
            );
            self.slabs.push(Slab { ptr: base, chunks });
        }
        let mut taken = self.free.split_off(self.free.len() - n);
        taken.reverse();
        Ok(taken)
    }

    fn put(&mut self, slots: impl IntoIterator<Item = *mut u8>) {
        self.free.extend(slots);
    }

    fn bytes(&self) -> u64 {
        self.slabs.iter().map(|s| s.chunks as u64 * CHUNK).sum()
    }

    /// Frees every slab none of whose slots is in use.
    fn release_idle(&mut self) {
        let mut kept = Vec::new();
        for slab in std::mem::take(&mut self.slabs) {
            let end = slab.ptr.wrapping_add(slab.chunks * CHUNK as usize);
            let inside = |p: &*mut u8| *p >= slab.ptr && *p < end;
            if self.free.iter().filter(|p| inside(p)).count() == slab.chunks {
                self.free.retain(|p| !inside(p));
                free_slab(&slab);
            } else {
                kept.push(slab);
            }
        }
        self.slabs = kept;
    }
}

fn free_slab(slab: &Slab) {
    // SAFETY: the slab came from cuMemHostAlloc and no slot of it is in use.
    if let Err(status) = check(unsafe { cu::cuMemFreeHost(slab.ptr.cast()) }) {
        warn!(%status, "Freeing pinned swap memory failed");
    }
}

/// Device chunks through the CUDA virtual memory management API.
pub struct CudaChunks {
    device: CUdevice,
    streams: Vec<cu::CUstream>,
    /// Host copies of swapped-out chunks.
    saved: HashMap<u64, *mut u8>,
    pool: PinnedPool,
}

// SAFETY: the streams and pinned buffers belong to a CUDA context, which may be used from any
// thread; CudaChunks is only used with that context current (see the module docs) and owns
// its buffers exclusively.
unsafe impl Send for CudaChunks {}

impl CudaChunks {
    /// Chunk memory on `device` for the context current on this thread. `NOT_SUPPORTED`
    /// when the device's mapping granularity does not divide [`CHUNK`].
    pub fn new(device: CUdevice) -> GpuResult<CudaChunks> {
        let mut chunks = CudaChunks {
            device,
            streams: Vec::with_capacity(STREAMS),
            saved: HashMap::new(),
            pool: PinnedPool::default(),
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
        self.pool.bytes()
    }

    /// Frees pooled pinned host memory no saved chunk uses.
    pub fn release_idle_pinned(&mut self) {
        self.pool.release_idle();
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

    /// Creates a physical chunk and maps it at `va` (no access set yet).
    fn map_physical(&self, va: u64) -> GpuResult<()> {
        let prop = self.prop();
        let mut handle: cu::CUmemGenericAllocationHandle = 0;
        // SAFETY: handle and prop are valid pointers for the call.
        check(unsafe { cu::cuMemCreate(&mut handle, CHUNK as usize, &prop, 0) })?;
        // SAFETY: va is a CHUNK-aligned, unmapped chunk of our reservation; handle is live.
        let mapped = check(unsafe { cu::cuMemMap(va, CHUNK as usize, 0, handle, 0) });
        // SAFETY: the handle is not used again; a mapping keeps the memory alive until it is
        // unmapped, and without one the memory is freed now.
        if let Err(status) = check(unsafe { cu::cuMemRelease(handle) }) {
            warn!(%status, "Releasing a chunk handle failed");
        }
        mapped
    }

    /// Lets the device read and write `[va, va + len)`, all mapped.
    fn set_access(&self, va: u64, len: u64) -> GpuResult<()> {
        let desc = cu::CUmemAccessDesc {
            location: self.location(),
            flags: cu::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
        };
        // SAFETY: the range is mapped; desc is valid for the call.
        check(unsafe { cu::cuMemSetAccess(va, len as usize, &desc, 1) })
    }

    fn unmap_chunk(va: u64) -> GpuResult<()> {
        // SAFETY: va starts a chunk we mapped; its contents are given up.
        check(unsafe { cu::cuMemUnmap(va, CHUNK as usize) })
    }

    fn unmap_all(vas: &[u64]) {
        for &va in vas {
            if let Err(status) = Self::unmap_chunk(va) {
                warn!(%status, va, "Unmapping a chunk while undoing a failed map failed");
            }
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

    /// Splits `pairs` into copies: runs of chunks contiguous on both sides, at most
    /// [`MAX_COPY`] each, as (first index, chunks).
    fn copies(pairs: &[(u64, *mut u8)]) -> Vec<(usize, usize)> {
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
        // SAFETY: the host range is `len` bytes of pinned slots (contiguous, checked by
        // `copies`), the device range `len` bytes of mapped chunks; both stay alive until the
        // copy's stream is synchronized.
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

    fn map(&mut self, va: u64) -> GpuResult<()> {
        self.map_physical(va)?;
        let stream = self
            .streams
            .first()
            .copied()
            .ok_or(Status::NOT_INITIALIZED)?;
        let zeroing = self.set_access(va, CHUNK).and_then(|()| {
            // SAFETY: the chunk is mapped and accessible; the stream is ours. A fresh chunk
            // may hold another context's old data: it is zeroed before any use (`settle`
            // waits for it before the allocation is handed out).
            check(unsafe { cu::cuMemsetD8Async(va, 0, CHUNK as usize, stream) })
        });
        if let Err(status) = zeroing {
            Self::unmap_all(&[va]);
            return Err(status);
        }
        Ok(())
    }

    fn settle(&mut self) -> GpuResult<()> {
        match self.streams.first() {
            // SAFETY: our own live stream.
            Some(&stream) => check(unsafe { cu::cuStreamSynchronize(stream) }),
            None => Ok(()),
        }
    }

    fn unmap(&mut self, va: u64) -> GpuResult<()> {
        Self::unmap_chunk(va)
    }

    /// Copies every chunk out, unmapping each run as soon as its copy is done (the unmaps
    /// overlap the later copies). A failed copy unmaps nothing. A chunk whose unmap fails is
    /// still counted saved (its data is), and stays mapped.
    fn save(&mut self, vas: &[u64]) -> GpuResult<()> {
        if vas.iter().any(|va| self.saved.contains_key(va)) {
            return Err(Status::INVALID_VALUE);
        }
        let slots = self.pool.take(vas.len())?;
        let pairs: Vec<(u64, *mut u8)> = vas.iter().copied().zip(slots).collect();
        let copies = Self::copies(&pairs);
        let mut events = Vec::with_capacity(copies.len());
        let mut issued = Ok(());
        for (k, &copy) in copies.iter().enumerate() {
            issued = self
                .issue(&pairs, copy, k, true)
                .and_then(|()| self.mark(k).map(|e| events.push(e)));
            if issued.is_err() {
                break;
            }
        }
        if let Err(status) = issued.and(if events.len() == copies.len() {
            Ok(())
        } else {
            Err(Status::UNKNOWN)
        }) {
            let _ = self.synchronize_streams();
            events.into_iter().for_each(destroy_event);
            self.pool.put(pairs.iter().map(|&(_, host)| host));
            return Err(status);
        }
        let mut result = Ok(());
        for (&(i, n), event) in copies.iter().zip(events) {
            // SAFETY: a live event recorded after this copy.
            let done = check(unsafe { cu::cuEventSynchronize(event) });
            destroy_event(event);
            if let Err(status) = done {
                result = Err(status);
            }
            for &(va, host) in &pairs[i..i + n] {
                if result.is_ok() {
                    if let Err(status) = Self::unmap_chunk(va) {
                        warn!(%status, va, "Unmapping a saved chunk failed");
                    }
                }
                self.saved.insert(va, host);
            }
        }
        result
    }

    /// Maps, opens and copies back run by run, so that mapping the next run overlaps the copy
    /// of the previous one; any failure unmaps what it mapped and keeps every saved copy.
    fn restore(&mut self, vas: &[u64]) -> GpuResult<()> {
        let mut pairs = Vec::with_capacity(vas.len());
        for va in vas {
            pairs.push((*va, *self.saved.get(va).ok_or(Status::INVALID_VALUE)?));
        }
        pairs.sort_unstable_by_key(|&(va, _)| va);
        let mut mapped = 0usize;
        let mut result = Ok(());
        for (k, (i, n)) in Self::copies(&pairs).into_iter().enumerate() {
            for &(va, _) in &pairs[i..i + n] {
                result = self.map_physical(va);
                if result.is_err() {
                    break;
                }
                mapped += 1;
            }
            result = result
                .and_then(|()| self.set_access(pairs[i].0, n as u64 * CHUNK))
                .and_then(|()| self.issue(&pairs, (i, n), k, false));
            if result.is_err() {
                break;
            }
        }
        let result = result.and(self.synchronize_streams());
        if let Err(status) = result {
            let _ = self.synchronize_streams();
            let vas: Vec<u64> = pairs[..mapped].iter().map(|&(va, _)| va).collect();
            Self::unmap_all(&vas);
            return Err(status);
        }
        for (va, host) in pairs {
            self.saved.remove(&va);
            self.pool.put([host]);
        }
        Ok(())
    }

    fn discard(&mut self, va: u64) {
        if let Some(host) = self.saved.remove(&va) {
            self.pool.put([host]);
        }
    }
}

impl Drop for CudaChunks {
    fn drop(&mut self) {
        let saved: Vec<*mut u8> = self.saved.drain().map(|(_, host)| host).collect();
        self.pool.put(saved);
        for slab in self.pool.slabs.drain(..) {
            free_slab(&slab);
        }
        self.pool.free.clear();
        for stream in self.streams.drain(..) {
            // SAFETY: our own stream, idle (every method waits for its copies).
            if let Err(status) = check(unsafe { cu::cuStreamDestroy_v2(stream) }) {
                warn!(%status, "Destroying a swap stream failed");
            }
        }
    }
}

/// The elastic heap of a new CUDA context (current on this thread) on `device`, reserving
/// [`super::reservation_for_limit`] of `limit`; `None` when elastic memory is off.
pub fn context_heap(device: CUdevice, limit: u64) -> GpuResult<Option<ElasticHeap<CudaChunks>>> {
    if !enabled_by_env() {
        return Ok(None);
    }
    let chunks = CudaChunks::new(device)?;
    ElasticHeap::new(chunks, super::reservation_for_limit(limit)).map(Some)
}

#[cfg(test)]
#[path = "cuda_tests.rs"]
mod tests;
