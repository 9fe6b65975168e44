//! The C types of the CUDA driver API, defined here so the library does not
//! depend on any binding crate. Handles are opaque pointers; what they point
//! at is never dereferenced by callers.

use std::ffi::{c_int, c_uint, c_void};

/// `CUresult`.
pub type CUresult = u32;
/// `CUdevice`: a device ordinal.
pub type CUdevice = c_int;
/// `CUdeviceptr`: a device address.
pub type CUdeviceptr = u64;
/// `CUdeviceptr_v1`: the 32-bit device address of the legacy entry points.
pub type CUdeviceptrV1 = c_uint;
/// `CUcontext`: the backend's context handle as a pointer value.
pub type CUcontext = *mut c_void;
/// `CUmodule`: the backend's module handle as a pointer value.
pub type CUmodule = *mut c_void;
/// `CUfunction`: points at this library's record of the function.
pub type CUfunction = *mut c_void;
/// `CUstream`: a guest-side stream id (never 0, 1 or 2).
pub type CUstream = *mut c_void;
/// `CUevent`: a guest-side event id.
pub type CUevent = *mut c_void;
/// `CUmemoryPool`: a guest-side pool id ([`crate::mempool`]).
pub type CUmemoryPool = *mut c_void;

/// `CUuuid`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CUuuid {
    /// The 16 bytes of the UUID.
    pub bytes: [u8; 16],
}

/// `CU_STREAM_LEGACY`: the legacy default stream.
pub const CU_STREAM_LEGACY: usize = 0x1;
/// `CU_STREAM_PER_THREAD`: the per-thread default stream.
pub const CU_STREAM_PER_THREAD: usize = 0x2;

/// `CU_LAUNCH_PARAM_END`.
pub const CU_LAUNCH_PARAM_END: usize = 0x0;
/// `CU_LAUNCH_PARAM_BUFFER_POINTER`.
pub const CU_LAUNCH_PARAM_BUFFER_POINTER: usize = 0x1;
/// `CU_LAUNCH_PARAM_BUFFER_SIZE`.
pub const CU_LAUNCH_PARAM_BUFFER_SIZE: usize = 0x2;

/// `CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK`.
pub const CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK: c_int = 0;

/// `CU_GET_PROC_ADDRESS_SUCCESS`.
pub const CU_GET_PROC_ADDRESS_SUCCESS: c_int = 0;
/// `CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND`.
pub const CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND: c_int = 1;

/// The API version `cuCtxGetApiVersion` reports (contexts of the `_v2` ABI).
pub const CTX_API_VERSION: c_uint = 3020;
/// The driver version reported before `cuInit` has reached a backend.
pub const DEFAULT_DRIVER_VERSION: c_int = 13000;
