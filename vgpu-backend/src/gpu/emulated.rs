//! An executor for machines without a GPU.
//!
//! Device memory is real host memory behind fake device addresses, so copies
//! and memsets really move bytes and can be checked end to end. Modules must
//! be PTX: they are parsed for their entry points, parameter layouts and
//! globals.
//!
//! **Kernels are NOT executed.** A launch is validated exactly as far as the
//! driver would validate it (function handle, stream, launch geometry,
//! shared memory, parameter block size) and then does nothing, so device
//! memory a kernel would have written keeps its old contents. The device
//! reports `executes_kernels: false` so clients and tests can tell. The one
//! exception is the timed kernel `vgpu_timed_spin(u64 ns)`, which takes
//! `ns` of emulated GPU time (see [`super::timed`]), and the faulting
//! kernel `vgpu_fault(u64 kind)`, which poisons its context (see [`fault`]).
//!
//! Work runs immediately, in call order, which trivially keeps every
//! stream's order; streams and events exist for handle validation and
//! timing only.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::Instant;

use tracing::{debug, warn};
use vgpu_spec::{Status, DEVICE_ATTRIBUTE_SLOTS};

use super::ptx::{self, ImageKind};
use super::timed::{self, EmulatedClock};
use super::{
    DeviceIdentity, Gpu, GpuContext, GpuResult, HostBuf, LaunchConfig, LaunchMode, LinkJob, Linked,
    MemoryUsage, ParamLayout, RawHandle, StreamRef,
};
use crate::elastic;
use mem::{ContextMemory, Owner};

/// First fake device address handed out.
const ADDRESS_BASE: u64 = 0x7f00_0000_0000;
/// Fake addresses stay below this (2^51).
const ADDRESS_END: u64 = 1 << 51;
/// Each worker process's share of the address space (16 TiB): room for many contexts' heaps,
/// each of which reserves the whole device's memory.
const WORKER_SPAN: u64 = 1 << 44;
/// Alignment of every allocation, as `cuMemAlloc` guarantees.
const ALLOC_ALIGN: u64 = 256;
/// Largest dynamic shared memory per block (227 KiB, as on Hopper).
const MAX_DYNAMIC_SHARED: u32 = 227 * 1024;
const CU_EVENT_DISABLE_TIMING: u32 = 0x2;
const CU_EVENT_INTERPROCESS: u32 = 0x4;

/// (`CUdevice_attribute` id, value) pairs of the emulated device, modelled
/// on an H100 SXM. Features the protocol does not offer (managed memory,
/// cluster launch, VMM) read 0.
const ATTRIBUTES: &[(usize, i32)] = &[
    (1, 1024),        // MAX_THREADS_PER_BLOCK
    (2, 1024),        // MAX_BLOCK_DIM_X
    (3, 1024),        // MAX_BLOCK_DIM_Y
    (4, 64),          // MAX_BLOCK_DIM_Z
    (5, 2147483647),  // MAX_GRID_DIM_X
    (6, 65535),       // MAX_GRID_DIM_Y
    (7, 65535),       // MAX_GRID_DIM_Z
    (8, 49152),       // MAX_SHARED_MEMORY_PER_BLOCK
    (9, 65536),       // TOTAL_CONSTANT_MEMORY
    (10, 32),         // WARP_SIZE
    (11, 2147483647), // MAX_PITCH
    (12, 65536),      // MAX_REGISTERS_PER_BLOCK
    (13, 1980000),    // CLOCK_RATE (kHz)
    (14, 512),        // TEXTURE_ALIGNMENT
    (15, 1),          // GPU_OVERLAP
    (16, 132),        // MULTIPROCESSOR_COUNT
    (17, 0),          // KERNEL_EXEC_TIMEOUT
    (18, 0),          // INTEGRATED
    (19, 1),          // CAN_MAP_HOST_MEMORY
    (20, 0),          // COMPUTE_MODE (default)
    (30, 512),        // SURFACE_ALIGNMENT
    (31, 1),          // CONCURRENT_KERNELS
    (32, 1),          // ECC_ENABLED
    (33, PCI_BUS as i32),
    (34, PCI_DEVICE as i32),
    (35, 0),        // TCC_DRIVER
    (36, 2619000),  // MEMORY_CLOCK_RATE (kHz)
    (37, 5120),     // GLOBAL_MEMORY_BUS_WIDTH
    (38, 52428800), // L2_CACHE_SIZE
    (39, 2048),     // MAX_THREADS_PER_MULTIPROCESSOR
    (40, 2),        // ASYNC_ENGINE_COUNT
    (41, 1),        // UNIFIED_ADDRESSING
    (50, PCI_DOMAIN as i32),
    (51, 32),     // TEXTURE_PITCH_ALIGNMENT
    (75, 9),      // COMPUTE_CAPABILITY_MAJOR
    (76, 0),      // COMPUTE_CAPABILITY_MINOR
    (78, 1),      // STREAM_PRIORITIES_SUPPORTED
    (79, 1),      // GLOBAL_L1_CACHE_SUPPORTED
    (80, 1),      // LOCAL_L1_CACHE_SUPPORTED
    (81, 233472), // MAX_SHARED_MEMORY_PER_MULTIPROCESSOR
    (82, 65536),  // MAX_REGISTERS_PER_MULTIPROCESSOR
    (87, 2),      // SINGLE_TO_DOUBLE_PRECISION_PERF_RATIO
    (90, 1),      // COMPUTE_PREEMPTION_SUPPORTED
    (95, 1),      // COOPERATIVE_LAUNCH
    (97, 232448), // MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
    (106, 32),    // MAX_BLOCKS_PER_MULTIPROCESSOR
    (111, 1024),  // RESERVED_SHARED_MEMORY_PER_BLOCK
    (115, 1),     // MEMORY_POOLS_SUPPORTED (the guest library keeps the pools)
    (126, 4),     // MEM_SYNC_DOMAIN_COUNT
];
const PCI_DOMAIN: u32 = 0;
const PCI_BUS: u8 = 0x18;
const PCI_DEVICE: u8 = 0;

/// The emulated device. Cheap to share; contexts hold a reference to its
/// memory accounting.
pub struct EmulatedGpu {
    identity: DeviceIdentity,
    shared: Arc<Shared>,
}

/// State shared by all contexts of one device.
struct Shared {
    total: u64,
    used: AtomicU64,
    next_address: AtomicU64,
    /// Addresses stay below this.
    address_end: AtomicU64,
    clock: EmulatedClock,
    /// Bytes each context's elastic heap may hold (the slice limit).
    heap_capacity: AtomicU64,
    /// Heap address windows of destroyed contexts.
    windows: Mutex<mem::Windows>,
    /// The emulated GPU's physical memory, shared with other backends on it (optional).
    card: std::sync::OnceLock<Arc<super::emulated_card::EmulatedCard>>,
}

impl Shared {
    /// Charges `size` bytes against the device's memory.
    fn charge(&self, size: u64) -> GpuResult<()> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(size).filter(|u| *u <= self.total)
            })
            .map(drop)
            .map_err(|_| Status::OUT_OF_MEMORY)
    }

    fn release(&self, size: u64) {
        // Never underflows: every release matches an earlier charge.
        self.used.fetch_sub(size, Ordering::AcqRel);
    }

    /// A fresh device address range of `size` bytes. Addresses are never
    /// reused, so a stale pointer can never alias a later allocation.
    fn reserve_address(&self, size: u64) -> GpuResult<u64> {
        let span = size
            .max(1)
            .checked_next_multiple_of(ALLOC_ALIGN)
            .ok_or(Status::OUT_OF_MEMORY)?;
        self.next_address
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |next| {
                next.checked_add(span)
                    .filter(|end| *end <= self.address_end.load(Ordering::Acquire))
            })
            .map_err(|_| Status::OUT_OF_MEMORY)
    }

    fn heap_capacity(&self) -> u64 {
        self.heap_capacity.load(Ordering::Acquire)
    }

    /// A chunk-aligned device address window of `len` bytes for a context's heap.
    fn take_window(&self, len: u64) -> GpuResult<u64> {
        let reused = self.windows.lock().ok().and_then(|mut w| w.take(len));
        match reused {
            Some(base) => Ok(base),
            None => mem::align_window(self.reserve_address(len.saturating_add(elastic::CHUNK))?),
        }
    }

    /// Gives a heap window back for the next context.
    fn return_window(&self, base: u64, len: u64) {
        if let Ok(mut windows) = self.windows.lock() {
            windows.give_back(base, len);
        }
    }
}

impl EmulatedGpu {
    /// An emulated device with `total_mem` bytes of (host-backed) memory,
    /// alone on its emulated GPU and reporting to no board.
    pub fn new(total_mem: u64) -> EmulatedGpu {
        let throttle = crate::throttle::Throttle::disabled();
        Self::with_clock(total_mem, EmulatedClock::unlocked(throttle))
    }

    /// An emulated device whose timed kernels run on `clock`.
    pub fn with_clock(total_mem: u64, clock: EmulatedClock) -> EmulatedGpu {
        let mut attributes = vec![0i32; DEVICE_ATTRIBUTE_SLOTS as usize];
        for &(id, value) in ATTRIBUTES {
            if let Some(slot) = attributes.get_mut(id) {
                *slot = value;
            }
        }
        let identity = DeviceIdentity {
            name: "vgpu emulated device".to_string(),
            uuid: *b"vgpu-emulated-00",
            total_mem,
            pci: (PCI_DOMAIN, PCI_BUS, PCI_DEVICE, 0),
            compute_capability: (9, 0),
            sm_count: 132,
            driver_version: 13000,
            attributes,
            executes_kernels: false,
        };
        EmulatedGpu {
            identity,
            shared: Arc::new(Shared {
                total: total_mem,
                used: AtomicU64::new(0),
                next_address: AtomicU64::new(ADDRESS_BASE),
                address_end: AtomicU64::new(ADDRESS_END),
                clock,
                heap_capacity: AtomicU64::new(total_mem),
                windows: Mutex::new(mem::Windows::default()),
                card: std::sync::OnceLock::new(),
            }),
        }
    }

    /// Gives this device the addresses `[16 TiB × index, 16 TiB × (index + 1))` above the usual
    /// base, so that the worker processes of one slice (each with its own emulated device) never
    /// hand out the same address: a pointer from another worker's session is foreign here, as it
    /// is in one process.
    pub fn for_worker(self, index: usize) -> EmulatedGpu {
        let start = ADDRESS_BASE.saturating_add((index as u64).saturating_mul(WORKER_SPAN));
        let end = start.saturating_add(WORKER_SPAN).min(ADDRESS_END);
        self.shared.next_address.store(start, Ordering::Release);
        self.shared.address_end.store(end, Ordering::Release);
        self
    }

    /// Sets the bytes each context's elastic heap may hold (default: the device's total memory,
    /// the largest limit the slice can be resized to). Applies to contexts whose first
    /// allocation comes after.
    pub fn with_heap_capacity(self, bytes: u64) -> EmulatedGpu {
        self.shared.heap_capacity.store(bytes, Ordering::Release);
        self
    }

    /// Takes elastic memory from `card`, the emulated GPU's memory shared with every backend
    /// process on it (so the GPU can be full, as a real one is, for everyone at once).
    pub fn with_card(self, card: Arc<super::emulated_card::EmulatedCard>) -> EmulatedGpu {
        let _ = self.shared.card.set(card);
        self
    }

    /// Bytes of device memory currently allocated by all contexts.
    pub fn mem_used(&self) -> u64 {
        self.shared.used.load(Ordering::Acquire)
    }
}

impl Gpu for EmulatedGpu {
    fn identity(&self) -> &DeviceIdentity {
        &self.identity
    }

    fn register_host(&self, _buf: HostBuf) -> GpuResult<()> {
        Ok(()) // host memory is directly addressable here
    }

    fn unregister_host(&self, _buf: HostBuf) -> GpuResult<()> {
        Ok(())
    }

    fn create_context(&self, flags: u32) -> GpuResult<Box<dyn GpuContext>> {
        if flags & !super::cuda::ALLOWED_CTX_FLAGS != 0 {
            return Err(Status::INVALID_VALUE);
        }
        static NOTICE: Once = Once::new();
        NOTICE.call_once(|| {
            warn!("The emulated device validates kernel launches but does not execute kernels");
        });
        Ok(Box::new(fault::Faulting::new(EmulatedContext {
            shared: Arc::clone(&self.shared),
            mem: ContextMemory::new(Arc::clone(&self.shared)),
            modules: HashMap::new(),
            functions: HashMap::new(),
            streams: HashSet::new(),
            events: HashMap::new(),
            next_handle: 1,
        })))
    }
}

struct Module {
    entries: Vec<ptx::PtxEntry>,
    globals: HashMap<String, (u64, u64)>,
    functions: HashMap<String, RawHandle>,
}

struct Function {
    params: Vec<ParamLayout>,
    /// The timed kernel ([`timed::TIMED_SPIN_ENTRY`]).
    timed: bool,
}

struct Event {
    flags: u32,
    recorded: Option<Instant>,
}

/// One emulated context: its allocations, modules, streams and events.
struct EmulatedContext {
    shared: Arc<Shared>,
    mem: ContextMemory,
    modules: HashMap<RawHandle, Module>,
    functions: HashMap<RawHandle, Function>,
    streams: HashSet<RawHandle>,
    events: HashMap<RawHandle, Event>,
    next_handle: RawHandle,
}

impl EmulatedContext {
    fn new_handle(&mut self) -> RawHandle {
        let handle = self.next_handle;
        self.next_handle += 1;
        handle
    }

    fn check_stream(&self, stream: StreamRef) -> GpuResult<()> {
        match stream {
            Some(s) if !self.streams.contains(&s) => Err(Status::INVALID_HANDLE),
            _ => Ok(()),
        }
    }

    fn event(&mut self, event: RawHandle) -> GpuResult<&mut Event> {
        self.events.get_mut(&event).ok_or(Status::INVALID_HANDLE)
    }
}

fn total_len(bufs: &[HostBuf]) -> GpuResult<u64> {
    bufs.iter()
        .try_fold(0u64, |acc, b| acc.checked_add(b.len() as u64))
        .ok_or(Status::INVALID_VALUE)
}

/// The driver's rules for cluster dimensions (portable cluster size: 8 blocks).
fn check_cluster(config: &LaunchConfig, cluster: [u32; 3]) -> GpuResult<()> {
    let blocks: u64 = cluster.iter().map(|&c| u64::from(c)).product();
    let divides = config
        .grid
        .iter()
        .zip(cluster)
        .all(|(&g, c)| c != 0 && g % c == 0);
    if divides && (1..=8).contains(&blocks) {
        Ok(())
    } else {
        Err(Status::INVALID_VALUE)
    }
}

/// The driver's rule for cooperative launches: every block resident at
/// once, here at most 32 blocks and 2048 threads per multiprocessor (the
/// occupancy limits of the modelled H100, ignoring registers and shared
/// memory) on 132 multiprocessors.
fn check_cooperative(config: &LaunchConfig) -> GpuResult<()> {
    let threads: u64 = config.block.iter().map(|&b| u64::from(b)).product();
    let per_sm = (2048 / threads.max(1)).min(32);
    let blocks: u64 = config.grid.iter().map(|&g| u64::from(g)).product();
    if blocks <= per_sm * 132 {
        Ok(())
    } else {
        Err(Status::COOPERATIVE_LAUNCH_TOO_LARGE)
    }
}

fn check_launch_config(config: &LaunchConfig) -> GpuResult<()> {
    let [gx, gy, gz] = config.grid;
    let [bx, by, bz] = config.block;
    let grid_ok =
        (1..=2147483647).contains(&gx) && (1..=65535).contains(&gy) && (1..=65535).contains(&gz);
    let block_ok = (1..=1024).contains(&bx)
        && (1..=1024).contains(&by)
        && (1..=64).contains(&bz)
        && u64::from(bx) * u64::from(by) * u64::from(bz) <= 1024;
    if grid_ok && block_ok && config.shared_mem <= MAX_DYNAMIC_SHARED {
        Ok(())
    } else {
        Err(Status::INVALID_VALUE)
    }
}

impl GpuContext for EmulatedContext {
    fn synchronize(&mut self) -> GpuResult<()> {
        Ok(())
    }

    fn mem_alloc(&mut self, size: u64) -> GpuResult<u64> {
        self.mem.alloc_guest(size)
    }

    fn mem_free(&mut self, dptr: u64) -> GpuResult<()> {
        self.mem.free_guest(dptr)
    }

    fn swap_out(&mut self) -> GpuResult<u64> {
        self.synchronize()?;
        self.mem.swap_out()
    }

    fn swap_in(&mut self) -> GpuResult<u64> {
        self.mem.swap_in()
    }

    fn memory_usage(&self) -> MemoryUsage {
        self.mem.usage()
    }

    fn memcpy_htod(
        &mut self,
        dst: u64,
        src: &[HostBuf],
        stream: StreamRef,
        _asynchronous: bool,
        _snapshot: bool,
    ) -> GpuResult<()> {
        self.check_stream(stream)?;
        let total = total_len(src)?;
        if total == 0 {
            return Ok(());
        }
        let mut dst = self.mem.bytes_mut(dst, total)?;
        for buf in src {
            let (head, rest) = dst.split_at_mut(buf.len());
            buf.read_at(0, head)?;
            dst = rest;
        }
        Ok(())
    }

    fn memcpy_dtoh(
        &mut self,
        dst: &[HostBuf],
        src: u64,
        stream: StreamRef,
        _asynchronous: bool,
    ) -> GpuResult<()> {
        self.check_stream(stream)?;
        let total = total_len(dst)?;
        if total == 0 {
            return Ok(());
        }
        let mut src = self.mem.bytes(src, total)?;
        for buf in dst {
            let (head, rest) = src.split_at(buf.len());
            buf.write_at(0, head)?;
            src = rest;
        }
        Ok(())
    }

    fn memcpy_dtod(
        &mut self,
        dst: u64,
        src: u64,
        size: u64,
        stream: StreamRef,
        _asynchronous: bool,
    ) -> GpuResult<()> {
        self.check_stream(stream)?;
        if size == 0 {
            return Ok(());
        }
        self.mem.copy(dst, src, size)
    }

    fn memset(
        &mut self,
        dst: u64,
        value: u32,
        elem_size: u32,
        count: u64,
        stream: StreamRef,
        _asynchronous: bool,
    ) -> GpuResult<()> {
        self.check_stream(stream)?;
        if !matches!(elem_size, 1 | 2 | 4) || !dst.is_multiple_of(u64::from(elem_size)) {
            return Err(Status::INVALID_VALUE);
        }
        let len = count
            .checked_mul(u64::from(elem_size))
            .ok_or(Status::INVALID_VALUE)?;
        if len == 0 {
            return Ok(());
        }
        let bytes = self.mem.bytes_mut(dst, len)?;
        match elem_size {
            1 => bytes.fill(value as u8),
            2 => bytes
                .chunks_exact_mut(2)
                .for_each(|c| c.copy_from_slice(&(value as u16).to_le_bytes())),
            _ => bytes
                .chunks_exact_mut(4)
                .for_each(|c| c.copy_from_slice(&value.to_le_bytes())),
        }
        Ok(())
    }

    fn module_load(&mut self, image: &[u8]) -> GpuResult<RawHandle> {
        // A fatbin (what nvcc emits and the CUDA runtime loads) is loaded by its PTX, the
        // only code this device runs.
        let extracted;
        let image = if ptx::image_kind(image) == ImageKind::Fatbin {
            extracted = vgpu_spec::fatbin::extract_ptx(image).map_err(|error| {
                warn!(%error, "The emulated device cannot load this fatbin");
                match error {
                    vgpu_spec::fatbin::FatbinError::NoPtx => Status::NO_BINARY_FOR_GPU,
                    _ => Status::INVALID_IMAGE,
                }
            })?;
            &extracted[..]
        } else {
            image
        };
        match ptx::image_kind(image) {
            ImageKind::Ptx => {}
            kind @ (ImageKind::Elf | ImageKind::Fatbin) => {
                warn!(
                    ?kind,
                    "The emulated device can only load PTX modules, not cubins or fatbins"
                );
                return Err(Status::NOT_SUPPORTED);
            }
            ImageKind::Unknown => return Err(Status::INVALID_IMAGE),
        }
        let parsed = ptx::parse(ptx::strip_trailing_nuls(image)).map_err(|error| {
            warn!(%error, "Rejected a PTX module");
            Status::INVALID_PTX
        })?;
        let handle = self.new_handle();
        let mut globals = HashMap::new();
        for (name, size) in parsed.globals {
            match self.mem.allocate_block(size, Owner::Module(handle)) {
                Ok(address) => {
                    globals.insert(name, (address, size));
                }
                Err(status) => {
                    self.mem.free_owned_by(Owner::Module(handle));
                    return Err(status);
                }
            }
        }
        debug!(
            handle,
            entries = parsed.entries.len(),
            globals = globals.len(),
            "Loaded PTX module"
        );
        self.modules.insert(
            handle,
            Module {
                entries: parsed.entries,
                globals,
                functions: HashMap::new(),
            },
        );
        Ok(handle)
    }

    fn module_unload(&mut self, module: RawHandle) -> GpuResult<()> {
        let removed = self.modules.remove(&module).ok_or(Status::INVALID_HANDLE)?;
        for function in removed.functions.values() {
            self.functions.remove(function);
        }
        self.mem.free_owned_by(Owner::Module(module));
        Ok(())
    }

    fn get_function(
        &mut self,
        module: RawHandle,
        name: &str,
    ) -> GpuResult<(RawHandle, Vec<ParamLayout>)> {
        let found = self.modules.get(&module).ok_or(Status::INVALID_HANDLE)?;
        if let Some(&handle) = found.functions.get(name) {
            let params = self.functions.get(&handle).map(|f| f.params.clone());
            return params.map(|p| (handle, p)).ok_or(Status::INVALID_HANDLE);
        }
        let params = found
            .entries
            .iter()
            .find(|e| e.name == name)
            .map(|e| e.params.clone())
            .ok_or(Status::NOT_FOUND)?;
        let handle = self.new_handle();
        self.functions.insert(
            handle,
            Function {
                timed: timed::is_timed_spin(name, &params),
                params: params.clone(),
            },
        );
        if let Some(m) = self.modules.get_mut(&module) {
            m.functions.insert(name.to_string(), handle);
        }
        Ok((handle, params))
    }

    fn get_global(&mut self, module: RawHandle, name: &str) -> GpuResult<(u64, u64)> {
        let found = self.modules.get(&module).ok_or(Status::INVALID_HANDLE)?;
        found.globals.get(name).copied().ok_or(Status::NOT_FOUND)
    }

    /// Validates the launch; the kernel is NOT executed (see module docs).
    fn launch(
        &mut self,
        function: RawHandle,
        config: LaunchConfig,
        stream: StreamRef,
        params: &[u8],
        _layout: &[ParamLayout],
    ) -> GpuResult<()> {
        let func = self
            .functions
            .get(&function)
            .ok_or(Status::INVALID_HANDLE)?;
        let expected = func
            .params
            .iter()
            .map(|p| p.offset + p.size)
            .max()
            .unwrap_or(0);
        self.check_stream(stream)?;
        check_launch_config(&config)?;
        if params.len() != expected as usize {
            return Err(Status::INVALID_VALUE);
        }
        if func.timed {
            let ns = timed::spin_ns(params).ok_or(Status::INVALID_VALUE)?;
            self.shared.clock.run(ns);
            return Ok(());
        }
        debug!(
            function,
            ?config,
            "Emulated launch validated; the kernel is not executed"
        );
        Ok(())
    }

    /// A cooperative launch's grid must fit on the device at once ([`check_cooperative`]); a
    /// cluster launch's cluster dimensions must be at least 1, at most 8 blocks together (the
    /// portable cluster size), and divide the grid, as the driver requires; then as a launch
    /// (not executed).
    fn launch_ex(
        &mut self,
        function: RawHandle,
        config: LaunchConfig,
        mode: LaunchMode,
        stream: StreamRef,
        params: &[u8],
        layout: &[ParamLayout],
    ) -> GpuResult<()> {
        if mode.cooperative {
            check_launch_config(&config)?;
            check_cooperative(&config)?;
        }
        if let Some(cluster) = mode.cluster {
            check_cluster(&config, cluster)?;
        }
        self.launch(function, config, stream, params, layout)
    }

    /// One PTX input is its own linked image ([`super::link::single_image`]).
    fn link(&mut self, job: &LinkJob<'_>) -> Linked {
        super::link::single_image(job)
    }

    fn stream_create(&mut self, flags: u32, _priority: i32) -> GpuResult<RawHandle> {
        if flags & !1 != 0 {
            return Err(Status::INVALID_VALUE); // only CU_STREAM_NON_BLOCKING is defined
        }
        let handle = self.new_handle();
        self.streams.insert(handle);
        Ok(handle)
    }

    fn stream_destroy(&mut self, stream: RawHandle) -> GpuResult<()> {
        if self.streams.remove(&stream) {
            Ok(())
        } else {
            Err(Status::INVALID_HANDLE)
        }
    }

    fn stream_synchronize(&mut self, stream: StreamRef) -> GpuResult<()> {
        self.check_stream(stream)
    }

    fn stream_query(&mut self, stream: StreamRef) -> GpuResult<()> {
        self.check_stream(stream) // work completes as it is issued: always idle
    }

    fn stream_wait_event(&mut self, stream: StreamRef, event: RawHandle) -> GpuResult<()> {
        self.check_stream(stream)?;
        self.event(event).map(drop)
    }

    fn event_create(&mut self, flags: u32) -> GpuResult<RawHandle> {
        let interprocess_without_timing_off =
            flags & CU_EVENT_INTERPROCESS != 0 && flags & CU_EVENT_DISABLE_TIMING == 0;
        if flags & !0x7 != 0 || interprocess_without_timing_off {
            return Err(Status::INVALID_VALUE);
        }
        let handle = self.new_handle();
        self.events.insert(
            handle,
            Event {
                flags,
                recorded: None,
            },
        );
        Ok(handle)
    }

    fn event_record(&mut self, event: RawHandle, stream: StreamRef) -> GpuResult<()> {
        self.check_stream(stream)?;
        self.event(event)?.recorded = Some(Instant::now());
        Ok(())
    }

    fn event_synchronize(&mut self, event: RawHandle) -> GpuResult<()> {
        self.event(event).map(drop)
    }

    fn event_query(&mut self, event: RawHandle) -> GpuResult<()> {
        self.event(event).map(drop)
    }

    fn event_elapsed(&mut self, start: RawHandle, end: RawHandle) -> GpuResult<f32> {
        let time = |e: &Event| {
            e.recorded
                .filter(|_| e.flags & CU_EVENT_DISABLE_TIMING == 0)
                .ok_or(Status::INVALID_HANDLE)
        };
        let start = time(self.events.get(&start).ok_or(Status::INVALID_HANDLE)?)?;
        let end = time(self.events.get(&end).ok_or(Status::INVALID_HANDLE)?)?;
        let ms = if end >= start {
            end.duration_since(start).as_secs_f64() * 1e3
        } else {
            -(start.duration_since(end).as_secs_f64() * 1e3)
        };
        Ok(ms as f32)
    }

    fn event_destroy(&mut self, event: RawHandle) -> GpuResult<()> {
        self.events
            .remove(&event)
            .map(drop)
            .ok_or(Status::INVALID_HANDLE)
    }
}

#[path = "emulated_mem.rs"]
mod mem;

#[path = "fault.rs"]
pub mod fault;

#[cfg(test)]
#[path = "emulated_tests.rs"]
mod tests;
