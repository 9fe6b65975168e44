//! The executor for a real NVIDIA GPU, on cudarc's raw driver bindings
//! (`cudarc::driver::sys`, loaded at run time).
//!
//! One [`CudaGpu`] per device. It keeps the device's primary context
//! retained, only to register guest RAM with `cuMemHostRegister` (portable
//! registrations are pinned for every context). Every [`GpuContext`] is a
//! real, separate CUDA context created with `cuCtxCreate`, so one guest
//! process's fault cannot poison another's; dropping it destroys the context
//! and everything in it.
//!
//! Contexts are not left current: each method makes its context current on
//! the calling thread first. Which context is current is cached per thread
//! by a process-unique context id (never by pointer, which the driver may
//! reuse), so repeated calls from one thread cost no driver call. This cache
//! assumes nothing else in the process changes the current context.
//!
//! Handles given out (modules, functions, streams, events) are the driver's
//! pointers as integers; the session layer above validates every handle
//! before passing it back, since the driver trusts them.
//!
//! cudarc panics when the library or a symbol is missing, so
//! [`CudaGpu::open`] checks for the library and for every symbol used here
//! before the first driver call.

use std::cell::Cell;
use std::ffi::{c_int, c_void, CString};
use std::ptr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use cudarc::driver::sys::{self as cu, CUcontext, CUdevice, CUresult};
use thiserror::Error;
use tracing::{debug, info, warn};
use vgpu_spec::{Status, MAX_PARAMS};
use zerocopy::IntoBytes;

use crate::elastic::{self, CudaChunks, ElasticHeap};
use crate::metering::SessionMeter;
use crate::throttle::Throttle;

use super::cuda_func::{aligned_image, aligned_params};
use super::cuda_identity::{log_library_path, read_identity, REQUIRED_SYMBOLS};
use super::inflight::SharedTracker;
use super::{cuda_func, ptx};
use super::{
    DeviceIdentity, Gpu, GpuContext, GpuResult, HostBuf, LaunchConfig, LaunchMode, LinkJob, Linked,
    MemoryUsage, OccupancyQuery, ParamLayout, RawHandle, StreamRef,
};

/// Why a CUDA device could not be opened.
#[derive(Debug, Error)]
pub enum CudaError {
    /// No `libcuda.so` could be loaded.
    #[error("No CUDA driver library (libcuda.so) could be loaded")]
    LibraryNotFound,
    /// The loaded library lacks a function this executor needs.
    #[error("The CUDA driver library has no {name}: it is not an NVIDIA CUDA 13 driver")]
    MissingSymbol { name: &'static str },
    /// The library found is vgpu's own guest `libcuda.so` (a library path
    /// that includes the guest driver's build directory).
    #[error("The libcuda.so found is vgpu's guest library, not NVIDIA's driver")]
    GuestLibrary,
    /// The ordinal does not fit the driver's `int`.
    #[error("Device ordinal {ordinal} is out of range")]
    InvalidOrdinal { ordinal: usize },
    /// A driver call failed.
    #[error("{call} failed: {status}")]
    Driver { call: &'static str, status: Status },
}

/// A symbol only vgpu's guest `libcuda.so` exports: finding it means the
/// library path leads to the guest library instead of NVIDIA's driver.
pub const GUEST_LIBRARY_MARKER: &[u8] = b"vgpu_guest_library";

/// Context flags a guest may ask for: scheduling (0x7), MAP_HOST (0x8),
/// LMEM_RESIZE_TO_MAX (0x10) and SYNC_MEMOPS (0x80). Others (core dumps,
/// green contexts) are not for guests to choose. The emulated device
/// checks the same set.
pub const ALLOWED_CTX_FLAGS: u32 = 0x1f | 0x80;
const HOST_MEMORY_ALREADY_REGISTERED: Status = Status(712);
const HOST_MEMORY_NOT_REGISTERED: Status = Status(713);

/// The status a driver call returned, as a `Result`.
pub(super) fn check(result: CUresult) -> GpuResult<()> {
    Status(result as u32).into_result()
}

pub(super) fn driver(call: &'static str, result: CUresult) -> Result<(), CudaError> {
    check(result).map_err(|status| CudaError::Driver { call, status })
}

static NEXT_CONTEXT_ID: AtomicU64 = AtomicU64::new(1);

/// How long a context being destroyed waits for its in-flight batches, so
/// their GPU time is billed (work still running after it is not).
const DRAIN_ON_DESTROY: std::time::Duration = std::time::Duration::from_secs(2);

thread_local! {
    /// Id of the context last made current on this thread (0: unknown).
    static CURRENT: Cell<u64> = const { Cell::new(0) };
}

/// Makes `ctx` (whose process-unique id is `id`) current on this thread.
pub(super) fn make_current(id: u64, ctx: CUcontext) -> GpuResult<()> {
    if CURRENT.with(Cell::get) == id {
        return Ok(());
    }
    // SAFETY: ctx is a live context; its owner calls this only while it
    // holds the context (before destroying or releasing it).
    check(unsafe { cu::cuCtxSetCurrent(ctx) })?;
    CURRENT.with(|c| c.set(id));
    Ok(())
}

/// Forgets the cached current context of this thread if it is `id`.
fn forget_current(id: u64) {
    CURRENT.with(|c| {
        if c.get() == id {
            c.set(0);
        }
    });
}

fn stream_ptr(stream: StreamRef) -> cu::CUstream {
    // None is the legacy NULL stream.
    stream.map_or(ptr::null_mut(), |h| h as usize as cu::CUstream)
}

fn to_handle<T>(p: *mut T) -> RawHandle {
    p as usize as RawHandle
}

fn from_handle<T>(h: RawHandle) -> *mut T {
    h as usize as *mut T
}

fn to_usize(n: u64) -> GpuResult<usize> {
    usize::try_from(n).map_err(|_| Status::INVALID_VALUE)
}

/// A real GPU.
pub struct CudaGpu {
    identity: DeviceIdentity,
    device: CUdevice,
    primary: CUcontext,
    primary_id: u64,
    throttle: Arc<Throttle>,
    /// What each context's elastic heap may hold: the device's memory (the largest limit a
    /// slice can be resized to) unless a test sets less.
    heap_capacity: u64,
    /// Pins swap memory ahead of need (a slice that may be reclaimed).
    reserve: Option<elastic::pinned::SwapReserve>,
}

// SAFETY: CUDA contexts and devices may be used from any thread; the
// primary context pointer is only passed to the driver.
unsafe impl Send for CudaGpu {}
// SAFETY: as above; every method takes &self and the driver is thread-safe.
unsafe impl Sync for CudaGpu {}

impl CudaGpu {
    /// Opens device `ordinal`: loads the driver, reads the device's identity
    /// and retains its primary context. Fails cleanly, never panics, on a
    /// machine without a usable driver.
    pub fn open(ordinal: usize) -> Result<CudaGpu, CudaError> {
        let ordinal_int =
            c_int::try_from(ordinal).map_err(|_| CudaError::InvalidOrdinal { ordinal })?;
        // SAFETY: only tries to dlopen the candidate library names.
        if !unsafe { cu::is_culib_present() } {
            return Err(CudaError::LibraryNotFound);
        }
        // SAFETY: the library is present, so culib() loads it rather than
        // panicking; the 'static library is never unloaded.
        let lib = unsafe { cu::culib() };
        log_library_path();
        // SAFETY: looks a symbol up without calling or typing it.
        if unsafe { lib.get::<unsafe extern "C" fn()>(GUEST_LIBRARY_MARKER) }.is_ok() {
            return Err(CudaError::GuestLibrary);
        }
        for &name in REQUIRED_SYMBOLS
            .iter()
            .chain(super::cuda_func::SYMBOLS)
            .chain(super::cuda_link::SYMBOLS)
            .chain(elastic::cuda::SYMBOLS)
        {
            // SAFETY: looks a symbol up without calling or typing it.
            if unsafe { lib.get::<unsafe extern "C" fn()>(name.as_bytes()) }.is_err() {
                return Err(CudaError::MissingSymbol { name });
            }
        }
        // SAFETY: plain driver initialization.
        driver("cuInit", unsafe { cu::cuInit(0) })?;
        let mut device: CUdevice = 0;
        // SAFETY: device is a valid out-pointer.
        driver("cuDeviceGet", unsafe {
            cu::cuDeviceGet(&mut device, ordinal_int)
        })?;
        let identity = read_identity(device)?;
        let heap_capacity = identity.total_mem;
        let mut primary: CUcontext = ptr::null_mut();
        // SAFETY: primary is a valid out-pointer; released in Drop.
        driver("cuDevicePrimaryCtxRetain", unsafe {
            cu::cuDevicePrimaryCtxRetain(&mut primary, device)
        })?;
        info!(
            ordinal,
            name = %identity.name,
            total_mem = identity.total_mem,
            driver = identity.driver_version,
            "Opened CUDA device"
        );
        Ok(CudaGpu {
            identity,
            device,
            primary,
            primary_id: NEXT_CONTEXT_ID.fetch_add(1, Ordering::Relaxed),
            throttle: Throttle::disabled(),
            heap_capacity,
            reserve: None,
        })
    }

    /// Keeps pinned host memory for swapping ahead of need, as large as each context's
    /// device memory (see [`elastic::pinned`]), for contexts created from now on.
    pub fn with_swap_reserve(mut self) -> std::io::Result<CudaGpu> {
        let primary = elastic::pinned::PinContext(self.primary);
        self.reserve = Some(elastic::pinned::SwapReserve::start(primary)?);
        Ok(self)
    }

    /// Bytes the swap reserve holds pinned (0 without one).
    pub fn swap_reserve_bytes(&self) -> u64 {
        self.reserve.as_ref().map_or(0, |r| r.pinned_bytes())
    }

    /// Reports to `throttle`; with a board, contexts created from now on
    /// track their in-flight work (bounded queue, busy time).
    pub fn with_throttle(mut self, throttle: Arc<Throttle>) -> CudaGpu {
        self.throttle = throttle;
        self
    }

    /// Sets what each context's elastic heap may hold (default: the device's memory), for
    /// contexts created from now on.
    pub fn with_heap_capacity(mut self, bytes: u64) -> CudaGpu {
        self.heap_capacity = bytes;
        self
    }
}

impl Drop for CudaGpu {
    fn drop(&mut self) {
        // The reserve thread pins under the primary context: it stops first.
        drop(self.reserve.take());
        forget_current(self.primary_id);
        // SAFETY: balances the retain in open().
        if let Err(status) = check(unsafe { cu::cuDevicePrimaryCtxRelease_v2(self.device) }) {
            warn!(%status, "Releasing the primary context failed");
        }
    }
}

impl Gpu for CudaGpu {
    fn identity(&self) -> &DeviceIdentity {
        &self.identity
    }

    fn register_host(&self, buf: HostBuf) -> GpuResult<()> {
        make_current(self.primary_id, self.primary)?;
        // SAFETY: HostBuf guarantees the range is mapped for as long as the
        // connection lives; it is unregistered before it is unmapped.
        let result = unsafe {
            cu::cuMemHostRegister_v2(buf.ptr().cast(), buf.len(), cu::CU_MEMHOSTREGISTER_PORTABLE)
        };
        match check(result) {
            Err(HOST_MEMORY_ALREADY_REGISTERED) => Ok(()),
            other => other,
        }
    }

    fn unregister_host(&self, buf: HostBuf) -> GpuResult<()> {
        make_current(self.primary_id, self.primary)?;
        // SAFETY: the driver checks that ptr starts a registered range.
        match check(unsafe { cu::cuMemHostUnregister(buf.ptr().cast()) }) {
            Err(HOST_MEMORY_NOT_REGISTERED) => {
                debug!(ptr = ?buf.ptr(), "Host range was not registered");
                Ok(())
            }
            other => other,
        }
    }

    fn create_context(&self, flags: u32) -> GpuResult<Box<dyn GpuContext>> {
        self.new_context(flags, None)
    }

    fn create_metered_context(
        &self,
        flags: u32,
        meter: &Arc<SessionMeter>,
    ) -> GpuResult<Box<dyn GpuContext>> {
        self.new_context(flags, Some(Arc::clone(meter)))
    }
}

impl CudaGpu {
    /// A new context; its in-flight tracker (with a board) also counts the
    /// context's GPU time on `meter`.
    fn new_context(
        &self,
        flags: u32,
        meter: Option<Arc<SessionMeter>>,
    ) -> GpuResult<Box<dyn GpuContext>> {
        if flags & !ALLOWED_CTX_FLAGS != 0 {
            return Err(Status::INVALID_VALUE);
        }
        let mut ctx: CUcontext = ptr::null_mut();
        // SAFETY: ctx is a valid out-pointer; null params are allowed.
        check(unsafe { cu::cuCtxCreate_v4(&mut ctx, ptr::null_mut(), flags, self.device) })?;
        let id = NEXT_CONTEXT_ID.fetch_add(1, Ordering::Relaxed);
        let heap = elastic::cuda::context_heap(
            self.device,
            self.heap_capacity,
            elastic::pinned::PinContext(self.primary),
            self.reserve.as_ref(),
        );
        let mut context = CudaContext {
            ctx,
            id,
            param_words: Vec::new(),
            param_ptrs: Vec::new(),
            inflight: (self.throttle.enabled())
                .then(|| SharedTracker::register(ctx, id, &self.throttle, meter)),
            heap: None,
        };
        context.heap = heap?;
        // cuCtxCreate pushed the new context; pop it so the thread's current
        // context (and our cache of it) is what it was. On failure,
        // dropping `context` destroys it.
        let mut popped: CUcontext = ptr::null_mut();
        // SAFETY: popped is a valid out-pointer.
        check(unsafe { cu::cuCtxPopCurrent_v2(&mut popped) })?;
        Ok(Box::new(context))
    }
}

/// One real CUDA context.
struct CudaContext {
    ctx: CUcontext,
    id: u64,
    /// Launch scratch, reused so a launch allocates nothing: the aligned
    /// parameter block and the kernelParams pointer array.
    param_words: Vec<u64>,
    param_ptrs: Vec<*mut c_void>,
    /// In-flight tracking, only when a grant board governs dispatch.
    inflight: Option<Arc<SharedTracker>>,
    /// Guest allocations, unless elastic memory is off (then plain cuMemAlloc).
    heap: Option<ElasticHeap<CudaChunks>>,
}

// SAFETY: a CUDA context may be made current on, and used from, any thread;
// `param_ptrs` only ever points into `param_words` of the same struct and is
// rebuilt before each use.
unsafe impl Send for CudaContext {}

impl Drop for CudaContext {
    fn drop(&mut self) {
        if let Some(t) = &self.inflight {
            let mut tracker = t.lock();
            // The last batches' GPU time is billed before the context and
            // its timing events go away.
            if self.enter().is_ok() {
                tracker.drain(DRAIN_ON_DESTROY);
            }
            tracker.shutdown();
        }
        // The heap's chunks are not the context's: free them while it is current.
        if self.heap.is_some() && self.enter().is_ok() {
            drop(self.heap.take());
        }
        // SAFETY: the context is owned by self and destroyed only here;
        // this frees everything allocated in it.
        if let Err(status) = check(unsafe { cu::cuCtxDestroy_v2(self.ctx) }) {
            warn!(%status, "Destroying a CUDA context failed");
        }
        forget_current(self.id);
    }
}

impl CudaContext {
    /// Copies `params` into the aligned parameter buffer and returns the
    /// `kernelParams` array pointing at each parameter (NULL for none).
    fn kernel_params(
        &mut self,
        params: &[u8],
        layout: &[ParamLayout],
    ) -> GpuResult<*mut *mut c_void> {
        aligned_params(&mut self.param_words, params, layout)?;
        let base = self.param_words.as_mut_bytes().as_mut_ptr();
        self.param_ptrs.clear();
        self.param_ptrs.extend(
            layout
                .iter()
                .map(|p| base.wrapping_add(p.offset as usize).cast::<c_void>()),
        );
        Ok(if self.param_ptrs.is_empty() {
            ptr::null_mut()
        } else {
            self.param_ptrs.as_mut_ptr()
        })
    }

    fn enter(&self) -> GpuResult<()> {
        make_current(self.id, self.ctx)
    }

    /// Enters the context and accounts one unit of GPU work on `stream`
    /// (which may first wait for older work, see [`super::inflight`]).
    fn enter_work(&mut self, stream: StreamRef) -> GpuResult<()> {
        self.enter()?;
        if let Some(heap) = self.heap.as_mut().filter(|h| h.is_swapped()) {
            heap.swap_in()?; // work needs the context's memory back
        }
        if let Some(t) = &self.inflight {
            t.lock().before_work(stream_ptr(stream));
        }
        Ok(())
    }

    /// Waits for `stream` when a queued operation must complete before
    /// returning.
    fn finish(&self, stream: StreamRef, asynchronous: bool) -> GpuResult<()> {
        if asynchronous {
            return Ok(());
        }
        // SAFETY: the stream handle was validated by the session layer.
        check(unsafe { cu::cuStreamSynchronize(stream_ptr(stream)) })
    }
}

impl GpuContext for CudaContext {
    fn synchronize(&mut self) -> GpuResult<()> {
        self.enter()?;
        // SAFETY: no arguments; our context is current.
        check(unsafe { cu::cuCtxSynchronize() })
    }

    fn mem_alloc(&mut self, size: u64) -> GpuResult<u64> {
        self.enter()?;
        if let Some(heap) = &mut self.heap {
            return heap.alloc(size);
        }
        let mut dptr = 0;
        // SAFETY: dptr is a valid out-pointer.
        check(unsafe { cu::cuMemAlloc_v2(&mut dptr, to_usize(size)?) })?;
        Ok(dptr)
    }

    fn mem_free(&mut self, dptr: u64) -> GpuResult<()> {
        self.enter()?;
        if let Some(heap) = &mut self.heap {
            return heap.free(dptr).map(drop);
        }
        // SAFETY: the driver validates the address.
        check(unsafe { cu::cuMemFree_v2(dptr) })
    }

    fn memcpy_htod(
        &mut self,
        dst: u64,
        src: &[HostBuf],
        stream: StreamRef,
        asynchronous: bool,
        snapshot: bool,
    ) -> GpuResult<()> {
        self.htod(dst, src, stream, asynchronous, snapshot)
    }

    fn memcpy_dtoh(
        &mut self,
        dst: &[HostBuf],
        src: u64,
        stream: StreamRef,
        asynchronous: bool,
    ) -> GpuResult<()> {
        self.dtoh(dst, src, stream, asynchronous)
    }

    fn memcpy_dtod(
        &mut self,
        dst: u64,
        src: u64,
        size: u64,
        stream: StreamRef,
        asynchronous: bool,
    ) -> GpuResult<()> {
        self.enter_work(stream)?;
        let size = to_usize(size)?;
        if asynchronous || stream.is_some() {
            // SAFETY: device addresses are validated by the driver.
            check(unsafe { cu::cuMemcpyDtoDAsync_v2(dst, src, size, stream_ptr(stream)) })?;
            return self.finish(stream, asynchronous);
        }
        // SAFETY: as above.
        check(unsafe { cu::cuMemcpyDtoD_v2(dst, src, size) })
    }

    fn memset(
        &mut self,
        dst: u64,
        value: u32,
        elem_size: u32,
        count: u64,
        stream: StreamRef,
        asynchronous: bool,
    ) -> GpuResult<()> {
        self.enter_work(stream)?;
        let n = to_usize(count)?;
        let s = stream_ptr(stream);
        let queued = asynchronous || stream.is_some();
        // SAFETY: device addresses are validated by the driver.
        let result = unsafe {
            match (elem_size, queued) {
                (1, true) => cu::cuMemsetD8Async(dst, value as u8, n, s),
                (1, false) => cu::cuMemsetD8_v2(dst, value as u8, n),
                (2, true) => cu::cuMemsetD16Async(dst, value as u16, n, s),
                (2, false) => cu::cuMemsetD16_v2(dst, value as u16, n),
                (4, true) => cu::cuMemsetD32Async(dst, value, n, s),
                (4, false) => cu::cuMemsetD32_v2(dst, value, n),
                _ => return Err(Status::INVALID_VALUE),
            }
        };
        check(result)?;
        if queued {
            self.finish(stream, asynchronous)?;
        }
        Ok(())
    }

    fn module_load(&mut self, image: &[u8]) -> GpuResult<RawHandle> {
        if ptx::is_fatbin_wrapper(image) {
            warn!("Rejected a fatbin wrapper: it points into the guest's address space");
            return Err(Status::INVALID_IMAGE);
        }
        if !ptx::binary_fits(image) {
            warn!("Rejected a module image whose headers reach past its end");
            return Err(Status::INVALID_IMAGE);
        }
        self.enter()?;
        let image = aligned_image(image);
        let mut module: cu::CUmodule = ptr::null_mut();
        // SAFETY: the image is NUL-terminated (PTX) or checked to lie within
        // the buffer (ELF, fatbin), and outlives the call.
        check(unsafe { cu::cuModuleLoadData(&mut module, image.as_ptr().cast()) })?;
        Ok(to_handle(module))
    }

    fn module_unload(&mut self, module: RawHandle) -> GpuResult<()> {
        self.enter()?;
        // SAFETY: the session layer passes only live module handles.
        check(unsafe { cu::cuModuleUnload(from_handle(module)) })
    }

    fn get_function(
        &mut self,
        module: RawHandle,
        name: &str,
    ) -> GpuResult<(RawHandle, Vec<ParamLayout>)> {
        self.enter()?;
        let name = CString::new(name).map_err(|_| Status::NOT_FOUND)?;
        let mut func: cu::CUfunction = ptr::null_mut();
        // SAFETY: func is a valid out-pointer, name is NUL-terminated, and
        // the module handle is live.
        check(unsafe { cu::cuModuleGetFunction(&mut func, from_handle(module), name.as_ptr()) })?;
        let mut layout = Vec::new();
        for index in 0..MAX_PARAMS as usize {
            let (mut offset, mut size) = (0usize, 0usize);
            // SAFETY: both out-pointers are valid; func is live.
            match check(unsafe { cu::cuFuncGetParamInfo(func, index, &mut offset, &mut size) }) {
                Ok(()) => layout.push(ParamLayout {
                    offset: u32::try_from(offset).map_err(|_| Status::INVALID_VALUE)?,
                    size: u32::try_from(size).map_err(|_| Status::INVALID_VALUE)?,
                }),
                // Past the last parameter.
                Err(Status::INVALID_VALUE) => return Ok((to_handle(func), layout)),
                Err(status) => return Err(status),
            }
        }
        Err(Status::NOT_SUPPORTED)
    }

    fn get_global(&mut self, module: RawHandle, name: &str) -> GpuResult<(u64, u64)> {
        self.enter()?;
        let name = CString::new(name).map_err(|_| Status::NOT_FOUND)?;
        let (mut dptr, mut bytes) = (0, 0usize);
        // SAFETY: out-pointers are valid, name is NUL-terminated, the module
        // handle is live.
        check(unsafe {
            cu::cuModuleGetGlobal_v2(&mut dptr, &mut bytes, from_handle(module), name.as_ptr())
        })?;
        Ok((dptr, bytes as u64))
    }

    fn launch(
        &mut self,
        function: RawHandle,
        config: LaunchConfig,
        stream: StreamRef,
        params: &[u8],
        layout: &[ParamLayout],
    ) -> GpuResult<()> {
        self.enter_work(stream)?;
        let kernel_params = self.kernel_params(params, layout)?;
        let [gx, gy, gz] = config.grid;
        let [bx, by, bz] = config.block;
        // SAFETY: every pointer points at a parameter inside `param_words`
        // (checked by aligned_params); the driver copies the values before
        // returning. The function and stream handles are live.
        check(unsafe {
            cu::cuLaunchKernel(
                from_handle(function),
                gx,
                gy,
                gz,
                bx,
                by,
                bz,
                config.shared_mem,
                stream_ptr(stream),
                kernel_params,
                ptr::null_mut(),
            )
        })
    }

    fn launch_ex(
        &mut self,
        function: RawHandle,
        config: LaunchConfig,
        mode: LaunchMode,
        stream: StreamRef,
        params: &[u8],
        layout: &[ParamLayout],
    ) -> GpuResult<()> {
        self.enter_work(stream)?;
        let kernel_params = self.kernel_params(params, layout)?;
        // SAFETY: as `launch`: the parameter pointers point into
        // `param_words`, which outlives the call; the handles are live.
        unsafe {
            cuda_func::launch_ex(
                from_handle(function),
                &config,
                mode,
                stream_ptr(stream),
                kernel_params,
            )
        }
    }

    fn link(&mut self, job: &LinkJob<'_>) -> Linked {
        match self.enter() {
            Ok(()) => super::cuda_link::link(job),
            Err(status) => Linked::failed(status),
        }
    }

    fn func_get_attribute(&mut self, function: RawHandle, attrib: i32) -> GpuResult<i32> {
        self.enter()?;
        cuda_func::get_attribute(from_handle(function), attrib)
    }

    fn func_set_attribute(
        &mut self,
        function: RawHandle,
        attrib: i32,
        value: i32,
    ) -> GpuResult<()> {
        self.enter()?;
        cuda_func::set_attribute(from_handle(function), attrib, value)
    }

    fn occupancy(&mut self, function: RawHandle, query: &OccupancyQuery) -> GpuResult<i64> {
        self.enter()?;
        cuda_func::occupancy(from_handle(function), query)
    }

    fn stream_create(&mut self, flags: u32, priority: i32) -> GpuResult<RawHandle> {
        self.enter()?;
        let mut stream: cu::CUstream = ptr::null_mut();
        // SAFETY: stream is a valid out-pointer.
        check(unsafe { cu::cuStreamCreateWithPriority(&mut stream, flags, priority) })?;
        Ok(to_handle(stream))
    }

    fn stream_destroy(&mut self, stream: RawHandle) -> GpuResult<()> {
        self.enter()?;
        if let Some(t) = &self.inflight {
            t.lock().forget_stream(from_handle(stream));
        }
        // SAFETY: the session layer passes only live stream handles.
        check(unsafe { cu::cuStreamDestroy_v2(from_handle(stream)) })
    }

    fn stream_synchronize(&mut self, stream: StreamRef) -> GpuResult<()> {
        self.enter()?;
        // SAFETY: as above.
        check(unsafe { cu::cuStreamSynchronize(stream_ptr(stream)) })
    }

    fn stream_query(&mut self, stream: StreamRef) -> GpuResult<()> {
        self.enter()?;
        // SAFETY: as above; NOT_READY comes back as an error.
        check(unsafe { cu::cuStreamQuery(stream_ptr(stream)) })
    }

    fn stream_wait_event(&mut self, stream: StreamRef, event: RawHandle) -> GpuResult<()> {
        self.enter()?;
        // SAFETY: live stream and event handles.
        check(unsafe { cu::cuStreamWaitEvent(stream_ptr(stream), from_handle(event), 0) })
    }

    fn event_create(&mut self, flags: u32) -> GpuResult<RawHandle> {
        self.enter()?;
        let mut event: cu::CUevent = ptr::null_mut();
        // SAFETY: event is a valid out-pointer.
        check(unsafe { cu::cuEventCreate(&mut event, flags) })?;
        Ok(to_handle(event))
    }

    fn event_record(&mut self, event: RawHandle, stream: StreamRef) -> GpuResult<()> {
        self.enter()?;
        // SAFETY: live event and stream handles.
        check(unsafe { cu::cuEventRecord(from_handle(event), stream_ptr(stream)) })
    }

    fn event_synchronize(&mut self, event: RawHandle) -> GpuResult<()> {
        self.enter()?;
        // SAFETY: live event handle.
        check(unsafe { cu::cuEventSynchronize(from_handle(event)) })
    }

    fn event_query(&mut self, event: RawHandle) -> GpuResult<()> {
        self.enter()?;
        // SAFETY: live event handle; NOT_READY comes back as an error.
        check(unsafe { cu::cuEventQuery(from_handle(event)) })
    }

    fn event_elapsed(&mut self, start: RawHandle, end: RawHandle) -> GpuResult<f32> {
        self.enter()?;
        let mut ms = 0f32;
        // SAFETY: ms is a valid out-pointer; live event handles.
        check(unsafe { cu::cuEventElapsedTime_v2(&mut ms, from_handle(start), from_handle(end)) })?;
        Ok(ms)
    }

    fn event_destroy(&mut self, event: RawHandle) -> GpuResult<()> {
        self.enter()?;
        // SAFETY: live event handle, not used again by the session layer.
        check(unsafe { cu::cuEventDestroy_v2(from_handle(event)) })
    }

    fn swap_out(&mut self) -> GpuResult<u64> {
        self.synchronize()?;
        self.heap.as_mut().map_or(Ok(0), ElasticHeap::swap_out)
    }

    fn swap_in(&mut self) -> GpuResult<u64> {
        self.enter()?;
        self.heap.as_mut().map_or(Ok(0), ElasticHeap::swap_in)
    }

    fn memory_usage(&self) -> MemoryUsage {
        elastic::cuda::usage(self.heap.as_ref())
    }

    fn end_batch(&mut self) {
        if let Some(t) = &self.inflight {
            if self.enter().is_ok() {
                t.lock().end_batch();
            }
        }
    }
}

#[path = "cuda_copy.rs"]
mod copy;

#[cfg(test)]
#[path = "cuda_tests.rs"]
pub(crate) mod tests;
