//! The `Gpu` executor: what the backend asks of a device, independent of
//! whether a real GPU sits behind it.
//!
//! Two implementations: [`cuda`] drives a real NVIDIA GPU through cudarc's
//! dynamically loaded driver bindings, and [`emulated`] serves machines with
//! no GPU (host memory, PTX parsed for entry points, kernels validated but
//! not executed). The session layer above validates every guest handle and
//! guest-physical range before anything reaches an executor; executors see
//! only their own opaque handles and [`HostBuf`]s that are known to be valid.

pub mod cuda;
mod cuda_func;
mod cuda_identity;
mod cuda_link;
pub mod emulated;
pub mod emulated_card;
mod inflight;
pub mod link;
pub mod ptx;
pub mod timed;

use std::sync::Arc;

use vgpu_spec::Status;

use crate::metering::SessionMeter;
pub use link::{LinkJob, Linked};

/// Results of executor calls carry the `CUresult` to return to the guest.
pub type GpuResult<T> = Result<T, Status>;

/// An executor-level handle (module, function, stream, event). Opaque to
/// everything but the executor that issued it.
pub type RawHandle = u64;

/// Identity and attributes of the device, read once at start.
#[derive(Clone, Debug)]
pub struct DeviceIdentity {
    /// Name as `cuDeviceGetName` returns it.
    pub name: String,
    /// UUID of the physical device.
    pub uuid: [u8; 16],
    /// Physical memory of the device in bytes.
    pub total_mem: u64,
    /// PCI domain, bus, device and function.
    pub pci: (u32, u8, u8, u8),
    /// Compute capability (major, minor).
    pub compute_capability: (u32, u32),
    /// Streaming multiprocessors.
    pub sm_count: u32,
    /// Driver version (`cuDriverGetVersion`, e.g. 13000).
    pub driver_version: u32,
    /// `CUdevice_attribute` values, index = attribute id, length
    /// [`vgpu_spec::DEVICE_ATTRIBUTE_SLOTS`]. Index 0 is unused.
    pub attributes: Vec<i32>,
    /// True if launches really run kernels.
    pub executes_kernels: bool,
}

/// One kernel parameter's place in the packed parameter block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParamLayout {
    /// Byte offset in the packed block.
    pub offset: u32,
    /// Size in bytes.
    pub size: u32,
}

/// Launch geometry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchConfig {
    /// Grid dimensions.
    pub grid: [u32; 3],
    /// Block dimensions.
    pub block: [u32; 3],
    /// Dynamic shared memory in bytes.
    pub shared_mem: u32,
}

/// How a launch differs from a plain `cuLaunchKernel` (`cuLaunchKernelEx` attributes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LaunchMode {
    /// Thread block cluster dimensions (`FLAG_CLUSTER`).
    pub cluster: Option<[u32; 3]>,
    /// Every block resident at once (`FLAG_COOPERATIVE`).
    pub cooperative: bool,
}

impl LaunchMode {
    /// A cooperative launch, without clusters.
    pub const COOPERATIVE: LaunchMode = LaunchMode {
        cluster: None,
        cooperative: true,
    };
}

/// An occupancy question about a function (`cuOccupancy*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OccupancyQuery {
    /// One of [`vgpu_spec::wire::occupancy`].
    pub kind: u32,
    /// `CUoccupancy_flags`.
    pub flags: u32,
    /// Launch geometry and dynamic shared memory per block.
    pub config: LaunchConfig,
    /// Cluster dimensions; all zero when the launch sets none.
    pub cluster: [u32; 3],
    /// Blocks per multiprocessor (available dynamic shared memory query).
    pub num_blocks: u32,
}

/// A context's device memory, in chunk bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryUsage {
    /// On the device (mapped).
    pub resident: u64,
    /// Swapped out to host memory.
    pub swapped: u64,
}

impl std::ops::Add for MemoryUsage {
    type Output = MemoryUsage;
    fn add(self, other: MemoryUsage) -> MemoryUsage {
        MemoryUsage {
            resident: self.resident.saturating_add(other.resident),
            swapped: self.swapped.saturating_add(other.swapped),
        }
    }
}

/// A host buffer an executor may read or write: a piece of mapped guest
/// memory that the session layer has validated.
#[derive(Clone, Copy, Debug)]
pub struct HostBuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: a HostBuf is a plain address range in guest memory that stays
// mapped for the life of the connection; it carries no thread affinity.
unsafe impl Send for HostBuf {}
// SAFETY: as above; concurrent access is governed by the guest's own
// ordering, exactly as for DMA from a real device.
unsafe impl Sync for HostBuf {}

impl HostBuf {
    /// Wraps a range of mapped memory.
    ///
    /// # Safety
    /// `ptr..ptr+len` must be mapped, readable and writable memory that
    /// stays mapped for as long as any executor may use this buffer
    /// (including asynchronous work queued on a stream).
    pub unsafe fn new(ptr: *mut u8, len: usize) -> Self {
        HostBuf { ptr, len }
    }

    /// Start address.
    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for a zero-length buffer.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies `src` into the buffer at `offset`.
    pub fn write_at(&self, offset: usize, src: &[u8]) -> GpuResult<()> {
        let end = offset
            .checked_add(src.len())
            .filter(|end| *end <= self.len)
            .ok_or(Status::INVALID_VALUE)?;
        debug_assert!(end <= self.len);
        // SAFETY: the range offset..end lies inside the buffer (checked
        // above), which HostBuf::new's contract keeps mapped; src is a
        // separate Rust slice, so the ranges cannot overlap.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.add(offset), src.len()) };
        Ok(())
    }

    /// Copies from the buffer at `offset` into `dst`.
    pub fn read_at(&self, offset: usize, dst: &mut [u8]) -> GpuResult<()> {
        let end = offset
            .checked_add(dst.len())
            .filter(|end| *end <= self.len)
            .ok_or(Status::INVALID_VALUE)?;
        debug_assert!(end <= self.len);
        // SAFETY: as in write_at, with the copy going the other way.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(offset), dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }
}

/// Which stream an operation goes to: `None` is the context's default
/// (legacy NULL) stream.
pub type StreamRef = Option<RawHandle>;

/// A device: identity, host memory registration, and contexts.
pub trait Gpu: Send + Sync {
    /// The device's identity, read at start.
    fn identity(&self) -> &DeviceIdentity;

    /// Registers a range of host memory (a guest RAM region) for DMA, so
    /// copies to and from it need no bounce. Idempotent per range.
    fn register_host(&self, buf: HostBuf) -> GpuResult<()>;

    /// Undoes [`Gpu::register_host`] for a range registered before.
    fn unregister_host(&self, buf: HostBuf) -> GpuResult<()>;

    /// Creates an isolated context (one real CUDA context on `cuda`).
    fn create_context(&self, flags: u32) -> GpuResult<Box<dyn GpuContext>>;

    /// Creates a context whose GPU busy time is also counted on `meter`
    /// (the owning session's). Executors that time work asynchronously
    /// (`cuda`: CUDA events around each batch) keep the meter; the default
    /// keeps none, for executors whose kernels run before the launch returns
    /// and charge the calling thread instead
    /// ([`crate::metering::charge_thread_gpu_ns`]).
    fn create_metered_context(
        &self,
        flags: u32,
        meter: &Arc<SessionMeter>,
    ) -> GpuResult<Box<dyn GpuContext>> {
        let _ = meter;
        self.create_context(flags)
    }
}

/// One isolated context. Every method runs with this context current on the
/// calling thread. Dropping the context frees everything created in it.
pub trait GpuContext: Send {
    /// Waits for all work in the context.
    fn synchronize(&mut self) -> GpuResult<()>;

    /// Allocates device memory.
    fn mem_alloc(&mut self, size: u64) -> GpuResult<u64>;
    /// Frees device memory allocated by [`GpuContext::mem_alloc`].
    fn mem_free(&mut self, dptr: u64) -> GpuResult<()>;

    /// Copies the concatenation of `src` to device address `dst`.
    /// With `stream = Some(..)` or `asynchronous`, the copy is queued in
    /// stream order; `snapshot` means `src` may be reused once this returns.
    fn memcpy_htod(
        &mut self,
        dst: u64,
        src: &[HostBuf],
        stream: StreamRef,
        asynchronous: bool,
        snapshot: bool,
    ) -> GpuResult<()>;
    /// Copies device memory at `src` into the concatenation of `dst`.
    fn memcpy_dtoh(
        &mut self,
        dst: &[HostBuf],
        src: u64,
        stream: StreamRef,
        asynchronous: bool,
    ) -> GpuResult<()>;
    /// Copies device to device.
    fn memcpy_dtod(
        &mut self,
        dst: u64,
        src: u64,
        size: u64,
        stream: StreamRef,
        asynchronous: bool,
    ) -> GpuResult<()>;
    /// Fills `count` elements of `elem_size` (1, 2 or 4) bytes with `value`.
    fn memset(
        &mut self,
        dst: u64,
        value: u32,
        elem_size: u32,
        count: u64,
        stream: StreamRef,
        asynchronous: bool,
    ) -> GpuResult<()>;

    /// Loads a PTX, cubin or fatbin image.
    fn module_load(&mut self, image: &[u8]) -> GpuResult<RawHandle>;
    /// Unloads a module (its functions become invalid).
    fn module_unload(&mut self, module: RawHandle) -> GpuResult<()>;
    /// Looks up a kernel and its parameter layout.
    fn get_function(
        &mut self,
        module: RawHandle,
        name: &str,
    ) -> GpuResult<(RawHandle, Vec<ParamLayout>)>;
    /// Looks up a global: (device address, size).
    fn get_global(&mut self, module: RawHandle, name: &str) -> GpuResult<(u64, u64)>;
    /// Launches a kernel. `params` is the packed parameter block, already
    /// checked against `layout` by the caller.
    fn launch(
        &mut self,
        function: RawHandle,
        config: LaunchConfig,
        stream: StreamRef,
        params: &[u8],
        layout: &[ParamLayout],
    ) -> GpuResult<()>;
    /// A launch that differs from a plain one in `mode` (`LAUNCH_KERNEL` with `FLAG_CLUSTER`
    /// and/or `FLAG_COOPERATIVE`): in thread block clusters, every block resident at once.
    /// Executors without such launches refuse.
    fn launch_ex(
        &mut self,
        function: RawHandle,
        config: LaunchConfig,
        mode: LaunchMode,
        stream: StreamRef,
        params: &[u8],
        layout: &[ParamLayout],
    ) -> GpuResult<()> {
        let _ = (function, config, mode, stream, params, layout);
        Err(Status::NOT_SUPPORTED)
    }

    /// Links `job`'s inputs into one image with the JIT linker
    /// (`MODULE_LINK`) for this context's device. The outcome carries the
    /// logs whatever the result. Executors without a linker refuse.
    fn link(&mut self, job: &LinkJob<'_>) -> Linked {
        let _ = job;
        Linked::failed(Status::NOT_SUPPORTED)
    }

    /// Reads a `CUfunction_attribute` of a function.
    fn func_get_attribute(&mut self, function: RawHandle, attrib: i32) -> GpuResult<i32> {
        let _ = (function, attrib);
        Err(Status::NOT_SUPPORTED)
    }
    /// Sets a `CUfunction_attribute` of a function.
    fn func_set_attribute(
        &mut self,
        function: RawHandle,
        attrib: i32,
        value: i32,
    ) -> GpuResult<()> {
        let _ = (function, attrib, value);
        Err(Status::NOT_SUPPORTED)
    }
    /// Answers an occupancy question about a function.
    fn occupancy(&mut self, function: RawHandle, query: &OccupancyQuery) -> GpuResult<i64> {
        let _ = (function, query);
        Err(Status::NOT_SUPPORTED)
    }

    /// Elastic memory: drains the context's work, copies its guest allocations' chunks to host
    /// memory and unmaps them (device pointers stay valid once swapped back in). Returns the
    /// bytes moved.
    fn swap_out(&mut self) -> GpuResult<u64> {
        Err(Status::NOT_SUPPORTED)
    }

    /// Elastic memory: maps the context's chunks back at the same addresses and restores them.
    /// `OUT_OF_MEMORY` leaves the context swapped out (nothing lost). Returns the bytes moved.
    fn swap_in(&mut self) -> GpuResult<u64> {
        Err(Status::NOT_SUPPORTED)
    }

    /// Elastic memory: the context's chunk bytes on the device and swapped out.
    fn memory_usage(&self) -> MemoryUsage {
        MemoryUsage::default()
    }

    /// Creates a stream.
    fn stream_create(&mut self, flags: u32, priority: i32) -> GpuResult<RawHandle>;
    /// Destroys a stream.
    fn stream_destroy(&mut self, stream: RawHandle) -> GpuResult<()>;
    /// Waits for a stream.
    fn stream_synchronize(&mut self, stream: StreamRef) -> GpuResult<()>;
    /// `Ok(())` if idle, `Err(Status::NOT_READY)` if work is pending.
    fn stream_query(&mut self, stream: StreamRef) -> GpuResult<()>;
    /// Makes `stream` wait for `event`.
    fn stream_wait_event(&mut self, stream: StreamRef, event: RawHandle) -> GpuResult<()>;

    /// Creates an event.
    fn event_create(&mut self, flags: u32) -> GpuResult<RawHandle>;
    /// Records an event on a stream.
    fn event_record(&mut self, event: RawHandle, stream: StreamRef) -> GpuResult<()>;
    /// Waits for an event.
    fn event_synchronize(&mut self, event: RawHandle) -> GpuResult<()>;
    /// `Ok(())` if complete, `Err(Status::NOT_READY)` otherwise.
    fn event_query(&mut self, event: RawHandle) -> GpuResult<()>;
    /// Milliseconds between two recorded events.
    fn event_elapsed(&mut self, start: RawHandle, end: RawHandle) -> GpuResult<f32>;
    /// Destroys an event.
    fn event_destroy(&mut self, event: RawHandle) -> GpuResult<()>;

    /// The end of a queue batch: work dispatched since the last call is
    /// marked so that its completion (and GPU time) can be tracked. Called
    /// only when a grant board governs dispatch.
    fn end_batch(&mut self) {}
}
