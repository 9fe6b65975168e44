//! Fixed-layout wire structs: headers and per-opcode bodies.
//!
//! Every struct is `#[repr(C)]`, built only from little-endian zerocopy
//! integers (alignment 1, so no padding and no alignment demands on guest
//! buffers), and its size is asserted at compile time.

use zerocopy::little_endian::{I32, I64, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

macro_rules! wire {
    ($(#[$meta:meta])* $name:ident ($size:expr) { $($(#[$fmeta:meta])* $field:ident : $ty:ty,)* }) => {
        $(#[$meta])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
        pub struct $name {
            $($(#[$fmeta])* pub $field: $ty,)*
        }
        const _: () = assert!(std::mem::size_of::<$name>() == $size);
        const _: () = assert!(std::mem::align_of::<$name>() == 1);
    };
}

/// Opcodes. Control-queue opcodes are below 0x100.
pub mod op {
    /// Device identity and attribute table.
    pub const GET_DEVICE_INFO: u32 = 0x0001;
    /// Open a session (one per guest process).
    pub const SESSION_OPEN: u32 = 0x0002;
    /// Close a session, freeing everything it holds.
    pub const SESSION_CLOSE: u32 = 0x0003;

    /// Create a context in the session.
    pub const CTX_CREATE: u32 = 0x0100;
    /// Destroy a context and everything created in it.
    pub const CTX_DESTROY: u32 = 0x0101;
    /// Wait for all work of the header's context.
    pub const CTX_SYNCHRONIZE: u32 = 0x0102;

    /// Allocate device memory.
    pub const MEM_ALLOC: u32 = 0x0200;
    /// Free device memory.
    pub const MEM_FREE: u32 = 0x0201;
    /// Free and total memory of the slice.
    pub const MEM_GET_INFO: u32 = 0x0202;
    /// Copy guest memory (scatter-gather) to device memory.
    pub const MEMCPY_HTOD: u32 = 0x0210;
    /// Copy device memory to guest memory (scatter-gather).
    pub const MEMCPY_DTOH: u32 = 0x0211;
    /// Copy device memory to device memory.
    pub const MEMCPY_DTOD: u32 = 0x0212;
    /// Fill device memory with an 8, 16 or 32-bit value.
    pub const MEMSET: u32 = 0x0220;

    /// Load a PTX, cubin or fatbin image.
    pub const MODULE_LOAD: u32 = 0x0300;
    /// Unload a module.
    pub const MODULE_UNLOAD: u32 = 0x0301;
    /// Look up a kernel and its parameter layout.
    pub const MODULE_GET_FUNCTION: u32 = 0x0302;
    /// Look up a module global.
    pub const MODULE_GET_GLOBAL: u32 = 0x0303;
    /// Link inputs with the JIT linker into one image ([`super::LinkReq`]).
    pub const MODULE_LINK: u32 = 0x0304;

    /// Launch a kernel.
    pub const LAUNCH_KERNEL: u32 = 0x0400;

    /// Create a stream.
    pub const STREAM_CREATE: u32 = 0x0500;
    /// Destroy a stream.
    pub const STREAM_DESTROY: u32 = 0x0501;
    /// Wait for a stream.
    pub const STREAM_SYNCHRONIZE: u32 = 0x0502;
    /// Ask whether a stream is idle.
    pub const STREAM_QUERY: u32 = 0x0503;
    /// Make a stream wait for an event.
    pub const STREAM_WAIT_EVENT: u32 = 0x0504;

    /// Create an event.
    pub const EVENT_CREATE: u32 = 0x0600;
    /// Record an event on a stream.
    pub const EVENT_RECORD: u32 = 0x0601;
    /// Wait for an event.
    pub const EVENT_SYNCHRONIZE: u32 = 0x0602;
    /// Ask whether an event has completed.
    pub const EVENT_QUERY: u32 = 0x0603;
    /// Milliseconds between two recorded events.
    pub const EVENT_ELAPSED: u32 = 0x0604;
    /// Destroy an event.
    pub const EVENT_DESTROY: u32 = 0x0605;

    /// Read a `CUfunction_attribute` of a function.
    pub const FUNC_GET_ATTRIBUTE: u32 = 0x0700;
    /// Set a `CUfunction_attribute` of a function.
    pub const FUNC_SET_ATTRIBUTE: u32 = 0x0701;
    /// An occupancy calculation for a function ([`super::occupancy`]).
    pub const FUNC_OCCUPANCY: u32 = 0x0702;

    /// True for opcodes that belong on the control queue.
    pub fn is_control(opcode: u32) -> bool {
        opcode < 0x100
    }
}

/// `FUNC_OCCUPANCY` queries: which `cuOccupancy*` call to answer.
pub mod occupancy {
    /// `cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags`: uses
    /// `block[0]` (threads per block), `shared_mem` and `flags`.
    pub const MAX_ACTIVE_BLOCKS_PER_SM: u32 = 1;
    /// `cuOccupancyAvailableDynamicSMemPerBlock`: uses `num_blocks` and
    /// `block[0]`.
    pub const AVAILABLE_DYNAMIC_SMEM_PER_BLOCK: u32 = 2;
    /// `cuOccupancyMaxActiveClusters`: uses the launch geometry (`grid`,
    /// `block`, `shared_mem`) and `cluster` (all zero: none given).
    pub const MAX_ACTIVE_CLUSTERS: u32 = 3;
    /// `cuOccupancyMaxPotentialClusterSize`: as `MAX_ACTIVE_CLUSTERS`.
    pub const MAX_POTENTIAL_CLUSTER_SIZE: u32 = 4;
}

/// Request flag: execute asynchronously on the request's stream. The device
/// may answer before the work completes; its errors surface at the next
/// synchronizing request, as with native CUDA.
pub const FLAG_ASYNC: u32 = 1 << 0;
/// Request flag, on `MEMCPY_HTOD`: the source ranges are a driver bounce
/// buffer that the driver reuses as soon as the device answers, so the device
/// must consume (snapshot) them before it answers, even when `FLAG_ASYNC` is
/// set. Without it, an async copy may read the source until the stream
/// reaches it, as with native pinned memory.
pub const FLAG_TRANSIENT_SOURCE: u32 = 1 << 1;
/// Request flag, on `LAUNCH_KERNEL`: launch in thread block clusters. The
/// trailing bytes start with the cluster dimensions (3 little-endian u32,
/// [`CLUSTER_DIMS_BYTES`]) and `param_bytes` counts them; the packed
/// parameters follow.
pub const FLAG_CLUSTER: u32 = 1 << 2;
/// Bytes of cluster dimensions that precede the parameters under
/// [`FLAG_CLUSTER`].
pub const CLUSTER_DIMS_BYTES: usize = 12;
/// Request flag, on `LAUNCH_KERNEL`: a cooperative launch
/// (`cuLaunchCooperativeKernel`, `CU_LAUNCH_ATTRIBUTE_COOPERATIVE`): every
/// block of the grid must be resident at once. May be combined with
/// [`FLAG_CLUSTER`].
pub const FLAG_COOPERATIVE: u32 = 1 << 3;
/// All request flags this version defines.
pub const KNOWN_FLAGS: u32 = FLAG_ASYNC | FLAG_TRANSIENT_SOURCE | FLAG_CLUSTER | FLAG_COOPERATIVE;

/// Module image kinds (informational; the device detects the format).
pub mod image {
    /// Unknown: let the device detect it.
    pub const UNKNOWN: u32 = 0;
    /// NUL-terminated PTX text.
    pub const PTX: u32 = 1;
    /// ELF cubin.
    pub const CUBIN: u32 = 2;
    /// Fatbin container.
    pub const FATBIN: u32 = 3;
}

wire! {
    /// The first bytes of every request chain.
    ReqHeader (32) {
        /// One of [`op`].
        opcode: U32,
        /// `FLAG_*` bits.
        flags: U32,
        /// The session, from `SESSION_OPEN`; zero on `GET_DEVICE_INFO` and
        /// `SESSION_OPEN`, the session to close on `SESSION_CLOSE`.
        session: U64,
        /// Chosen by the driver, echoed in the response.
        request_id: U64,
        /// The context current in the guest thread; zero for none.
        context: U64,
    }
}

wire! {
    /// The first bytes of every response.
    RespHeader (16) {
        /// A [`crate::Status`] (`CUresult`) value.
        status: U32,
        /// Reserved, zero.
        flags: U32,
        /// The request's `request_id`.
        request_id: U64,
    }
}

wire! {
    /// `SESSION_OPEN` body.
    SessionOpenReq (8) {
        /// The guest process id, for logs.
        pid: U32,
        /// The protocol version the driver speaks.
        version: U32,
    }
}

wire! {
    /// A request that names one handle or pointer.
    HandleReq (8) {
        /// The handle.
        handle: U64,
    }
}

wire! {
    /// A response that returns one handle or pointer.
    HandleResp (8) {
        /// The handle.
        handle: U64,
    }
}

wire! {
    /// `CTX_CREATE` body.
    CtxCreateReq (8) {
        /// `CUctx_flags`.
        flags: U32,
        /// Reserved, zero.
        _pad: U32,
    }
}

wire! {
    /// `MEM_ALLOC` body.
    MemAllocReq (8) {
        /// Bytes to allocate.
        size: U64,
    }
}

wire! {
    /// `MEM_GET_INFO` response.
    MemInfoResp (16) {
        /// Free bytes within the slice.
        free: U64,
        /// The slice's memory limit.
        total: U64,
    }
}

wire! {
    /// One guest-physical range of a scatter-gather list.
    SgEntry (16) {
        /// Guest-physical address.
        gpa: U64,
        /// Length in bytes.
        len: U64,
    }
}

wire! {
    /// `MEMCPY_HTOD` / `MEMCPY_DTOH` body, followed by `nsegs` [`SgEntry`].
    MemcpyHostReq (32) {
        /// Device address: destination of HtoD, source of DtoH.
        device_ptr: U64,
        /// Stream handle; zero for the default stream.
        stream: U64,
        /// Total bytes; equals the sum of the entries' lengths.
        total_len: U64,
        /// Number of scatter-gather entries that follow.
        nsegs: U32,
        /// Reserved, zero.
        _pad: U32,
    }
}

wire! {
    /// `MEMCPY_DTOD` body.
    MemcpyDtoDReq (32) {
        /// Destination device address.
        dst: U64,
        /// Source device address.
        src: U64,
        /// Bytes to copy.
        size: U64,
        /// Stream handle; zero for the default stream.
        stream: U64,
    }
}

wire! {
    /// `MEMSET` body.
    MemsetReq (32) {
        /// Destination device address.
        dst: U64,
        /// The value, in the low `elem_size` bytes.
        value: U32,
        /// 1, 2 or 4.
        elem_size: U32,
        /// Number of elements.
        count: U64,
        /// Stream handle; zero for the default stream.
        stream: U64,
    }
}

wire! {
    /// `MODULE_LOAD` body, followed by `image_len` image bytes.
    ModuleLoadReq (16) {
        /// Bytes of image that follow.
        image_len: U64,
        /// One of [`image`].
        kind: U32,
        /// Reserved, zero.
        _pad: U32,
    }
}

wire! {
    /// `MODULE_GET_FUNCTION` / `MODULE_GET_GLOBAL` body, followed by the name.
    ModuleSymbolReq (16) {
        /// Module handle.
        module: U64,
        /// Bytes of name that follow (no NUL).
        name_len: U32,
        /// Reserved, zero.
        _pad: U32,
    }
}

wire! {
    /// One kernel parameter's place in the packed parameter block.
    ParamInfo (8) {
        /// Byte offset in the packed block.
        offset: U32,
        /// Size in bytes.
        size: U32,
    }
}

wire! {
    /// `MODULE_GET_FUNCTION` response, followed by `param_count` [`ParamInfo`].
    FunctionResp (16) {
        /// Function handle.
        function: U64,
        /// Number of kernel parameters.
        param_count: U32,
        /// Size of the packed parameter block.
        param_bytes: U32,
    }
}

wire! {
    /// `MODULE_GET_GLOBAL` response.
    GlobalResp (16) {
        /// Device address of the global.
        dptr: U64,
        /// Its size in bytes.
        size: U64,
    }
}

wire! {
    /// `LAUNCH_KERNEL` body, followed by `param_bytes` of packed parameters.
    LaunchReq (48) {
        /// Function handle.
        function: U64,
        /// Stream handle; zero for the default stream.
        stream: U64,
        /// Grid dimensions.
        grid: [U32; 3],
        /// Block dimensions.
        block: [U32; 3],
        /// Dynamic shared memory bytes.
        shared_mem: U32,
        /// Bytes of packed parameters that follow.
        param_bytes: U32,
    }
}

wire! {
    /// `STREAM_CREATE` body.
    StreamCreateReq (8) {
        /// `CUstream_flags`.
        flags: U32,
        /// Stream priority.
        priority: I32,
    }
}

wire! {
    /// `STREAM_WAIT_EVENT` body.
    StreamWaitEventReq (24) {
        /// Stream handle; zero for the default stream.
        stream: U64,
        /// Event handle.
        event: U64,
        /// Flags, zero.
        flags: U32,
        /// Reserved, zero.
        _pad: U32,
    }
}

wire! {
    /// `EVENT_CREATE` body.
    EventCreateReq (8) {
        /// `CUevent_flags`.
        flags: U32,
        /// Reserved, zero.
        _pad: U32,
    }
}

wire! {
    /// `EVENT_RECORD` body.
    EventRecordReq (16) {
        /// Event handle.
        event: U64,
        /// Stream handle; zero for the default stream.
        stream: U64,
    }
}

wire! {
    /// `EVENT_ELAPSED` body.
    EventElapsedReq (16) {
        /// Start event handle.
        start: U64,
        /// End event handle.
        end: U64,
    }
}

wire! {
    /// `EVENT_ELAPSED` response.
    ElapsedResp (8) {
        /// Milliseconds, as IEEE-754 single-precision bits.
        millis_bits: U32,
        /// Reserved, zero.
        _pad: U32,
    }
}

wire! {
    /// `SESSION_OPEN` response.
    SessionOpenResp (8) {
        /// The new session id.
        session: U64,
    }
}

wire! {
    /// `GET_DEVICE_INFO` response, followed by `attr_count` little-endian i32:
    /// the value of `CUdevice_attribute` *i* at index *i* (index 0 unused).
    DeviceInfoResp (16) {
        /// Total memory the guest sees (the slice limit).
        total_mem: U64,
        /// The driver version to report (`cuDriverGetVersion`).
        driver_version: U32,
        /// Number of attribute values that follow.
        attr_count: U32,
    }
}

wire! {
    /// `FUNC_GET_ATTRIBUTE` / `FUNC_SET_ATTRIBUTE` body.
    FuncAttributeReq (16) {
        /// Function handle.
        function: U64,
        /// `CUfunction_attribute`.
        attrib: I32,
        /// The value to set; zero on `FUNC_GET_ATTRIBUTE`.
        value: I32,
    }
}

wire! {
    /// `FUNC_OCCUPANCY` body.
    OccupancyReq (64) {
        /// Function handle.
        function: U64,
        /// One of [`occupancy`].
        query: U32,
        /// `CUoccupancy_flags` (`MAX_ACTIVE_BLOCKS_PER_SM` only).
        flags: U32,
        /// Grid dimensions.
        grid: [U32; 3],
        /// Block dimensions.
        block: [U32; 3],
        /// Cluster dimensions, all zero when the launch sets none.
        cluster: [U32; 3],
        /// Dynamic shared memory bytes per block.
        shared_mem: U32,
        /// Blocks per multiprocessor (`AVAILABLE_DYNAMIC_SMEM_PER_BLOCK`).
        num_blocks: U32,
        /// Reserved, zero.
        _pad: U32,
    }
}

wire! {
    /// `FUNC_GET_ATTRIBUTE` / `FUNC_OCCUPANCY` response.
    ValueResp (8) {
        /// The attribute's value or the query's answer.
        value: I64,
    }
}

/// `MODULE_LINK` input kinds: `CUjitInputType` values.
pub mod jit_input {
    /// `CU_JIT_INPUT_CUBIN`.
    pub const CUBIN: u32 = 0;
    /// `CU_JIT_INPUT_PTX` (NUL-terminated text).
    pub const PTX: u32 = 1;
    /// `CU_JIT_INPUT_FATBINARY`.
    pub const FATBINARY: u32 = 2;
    /// `CU_JIT_INPUT_OBJECT` (a host object holding device code).
    pub const OBJECT: u32 = 3;
    /// `CU_JIT_INPUT_LIBRARY` (an archive of the above).
    pub const LIBRARY: u32 = 4;
    /// `CU_JIT_INPUT_NVVM` (LTO IR).
    pub const NVVM: u32 = 5;
}

wire! {
    /// `MODULE_LINK` body. Followed by `option_count` [`JitOption`], then
    /// `input_count` [`LinkInput`], then `nsegs` [`SgEntry`] (the output
    /// buffer in guest memory), then `data_len` bytes: for each input in
    /// order, its name (`name_len` bytes) and then its data (`data_len`
    /// bytes).
    LinkReq (40) {
        /// Number of [`LinkInput`] that follow the options.
        input_count: U32,
        /// Number of [`JitOption`] that follow this body.
        option_count: U32,
        /// Bytes of names and input data at the end of the request.
        data_len: U64,
        /// Bytes of output buffer: equals the sum of the entries' lengths.
        out_len: U64,
        /// Bytes at the start of the output buffer for the info log.
        info_log_len: U32,
        /// Bytes after the info log area for the error log.
        error_log_len: U32,
        /// Number of [`SgEntry`] describing the output buffer.
        nsegs: U32,
        /// Reserved, zero.
        _pad: U32,
    }
}

wire! {
    /// One JIT option of a `MODULE_LINK` request: a `CUjit_option` with an
    /// integer value.
    JitOption (16) {
        /// The `CUjit_option`.
        option: U32,
        /// Reserved, zero.
        _pad: U32,
        /// Its value (options of type `unsigned int` or `int`: the low 32
        /// bits).
        value: U64,
    }
}

wire! {
    /// One input of a `MODULE_LINK` request.
    LinkInput (16) {
        /// One of [`jit_input`] (`CUjitInputType`).
        kind: U32,
        /// Bytes of name (no NUL) in the data area; 0 for none.
        name_len: U32,
        /// Bytes of input data in the data area, after the name.
        data_len: U64,
    }
}

wire! {
    /// `MODULE_LINK` response.
    LinkResp (24) {
        /// Bytes of the linked image. It was written at the start of the
        /// image area only if it fits there; otherwise nothing was written
        /// and the driver retries with an image area of at least this size.
        image_len: U64,
        /// The linker's `CU_JIT_INFO_LOG_BUFFER_SIZE_BYTES` output.
        info_log_used: U32,
        /// The linker's `CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES` output.
        error_log_used: U32,
        /// The linker's `CU_JIT_WALL_TIME` output: milliseconds as IEEE-754
        /// binary32 bits.
        wall_ms_bits: U32,
        /// Reserved, zero.
        _pad: U32,
    }
}
