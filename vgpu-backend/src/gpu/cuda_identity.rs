//! Reading a CUDA device's identity and attributes at open.

use std::ffi::{c_int, c_void, CStr};

use cudarc::driver::sys::{self as cu, CUdevice};
use tracing::info;
use vgpu_spec::DEVICE_ATTRIBUTE_SLOTS;

use super::cuda::{driver, CudaError};
use super::DeviceIdentity;

/// Logs which file the driver library was loaded from (our own guest
/// `libcuda.so` on the library path would be a misconfiguration).
pub(super) fn log_library_path() {
    // SAFETY: culib() was loaded by the caller; the symbol is only used as
    // an address for dladdr, which fills info on success.
    unsafe {
        let Ok(symbol) = cu::culib().get::<unsafe extern "C" fn()>(b"cuInit") else {
            return;
        };
        let mut info: libc::Dl_info = std::mem::zeroed();
        if libc::dladdr(*symbol as *const c_void, &mut info) != 0 && !info.dli_fname.is_null() {
            let path = CStr::from_ptr(info.dli_fname).to_string_lossy();
            info!(%path, "Loaded the CUDA driver library");
        }
    }
}

/// Every driver function `cuda.rs` calls (with `cuda_func::SYMBOLS` and
/// `elastic::cuda::SYMBOLS`, all checked at open).
pub(super) const REQUIRED_SYMBOLS: &[&str] = &[
    "cuInit",
    "cuDeviceGet",
    "cuDeviceGetName",
    "cuDeviceGetUuid_v2",
    "cuDeviceTotalMem_v2",
    "cuDeviceGetAttribute",
    "cuDriverGetVersion",
    "cuDevicePrimaryCtxRetain",
    "cuDevicePrimaryCtxRelease_v2",
    "cuMemHostRegister_v2",
    "cuMemHostUnregister",
    "cuCtxCreate_v4",
    "cuCtxDestroy_v2",
    "cuCtxPopCurrent_v2",
    "cuCtxSetCurrent",
    "cuCtxSynchronize",
    "cuMemAlloc_v2",
    "cuMemFree_v2",
    "cuMemcpyHtoD_v2",
    "cuMemcpyDtoH_v2",
    "cuMemcpyDtoD_v2",
    "cuMemcpyHtoDAsync_v2",
    "cuMemcpyDtoHAsync_v2",
    "cuMemcpyDtoDAsync_v2",
    "cuMemsetD8_v2",
    "cuMemsetD16_v2",
    "cuMemsetD32_v2",
    "cuMemsetD8Async",
    "cuMemsetD16Async",
    "cuMemsetD32Async",
    "cuModuleLoadData",
    "cuModuleUnload",
    "cuModuleGetFunction",
    "cuModuleGetGlobal_v2",
    "cuFuncGetParamInfo",
    "cuLaunchKernel",
    "cuStreamCreateWithPriority",
    "cuStreamDestroy_v2",
    "cuStreamSynchronize",
    "cuStreamQuery",
    "cuStreamWaitEvent",
    "cuEventCreate",
    "cuEventRecord",
    "cuEventSynchronize",
    "cuEventQuery",
    "cuEventElapsedTime_v2",
    "cuEventDestroy_v2",
];

type GetAttributeFn = unsafe extern "C" fn(*mut c_int, c_int, CUdevice) -> c_int;

pub(super) fn read_identity(device: CUdevice) -> Result<DeviceIdentity, CudaError> {
    let mut name = [0 as std::ffi::c_char; 256];
    // SAFETY: the buffer holds 256 bytes, as the length says.
    driver("cuDeviceGetName", unsafe {
        cu::cuDeviceGetName(name.as_mut_ptr(), 256, device)
    })?;
    let name_bytes: Vec<u8> = name
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8)
        .collect();
    let mut uuid = cu::CUuuid { bytes: [0; 16] };
    // SAFETY: uuid is a valid out-pointer.
    driver("cuDeviceGetUuid_v2", unsafe {
        cu::cuDeviceGetUuid_v2(&mut uuid, device)
    })?;
    let mut total_mem = 0usize;
    // SAFETY: total_mem is a valid out-pointer.
    driver("cuDeviceTotalMem_v2", unsafe {
        cu::cuDeviceTotalMem_v2(&mut total_mem, device)
    })?;
    let mut version: c_int = 0;
    // SAFETY: version is a valid out-pointer.
    driver("cuDriverGetVersion", unsafe {
        cu::cuDriverGetVersion(&mut version)
    })?;

    // cudarc types the attribute as a Rust enum, which cannot hold ids the
    // bindings do not name; call the driver's symbol with a plain int.
    // SAFETY: the symbol exists (checked in open) and has this C signature.
    let get_attribute: GetAttributeFn = unsafe {
        *cu::culib()
            .get::<GetAttributeFn>(b"cuDeviceGetAttribute")
            .map_err(|_| CudaError::MissingSymbol {
                name: "cuDeviceGetAttribute",
            })?
    };
    let attributes: Vec<i32> = (0..DEVICE_ATTRIBUTE_SLOTS as c_int)
        .map(|id| {
            let mut value: c_int = 0;
            // SAFETY: value is a valid out-pointer; unknown ids just fail.
            let result = unsafe { get_attribute(&mut value, id, device) };
            if id > 0 && result == 0 {
                value
            } else {
                0
            }
        })
        .collect();
    let attr = |id: usize| attributes.get(id).copied().unwrap_or(0);
    Ok(DeviceIdentity {
        name: String::from_utf8_lossy(&name_bytes).into_owned(),
        uuid: uuid.bytes.map(|b| b as u8),
        total_mem: total_mem as u64,
        pci: (
            u32::try_from(attr(50)).unwrap_or(0),
            u8::try_from(attr(33)).unwrap_or(0),
            u8::try_from(attr(34)).unwrap_or(0),
            0,
        ),
        compute_capability: (
            u32::try_from(attr(75)).unwrap_or(0),
            u32::try_from(attr(76)).unwrap_or(0),
        ),
        sm_count: u32::try_from(attr(16)).unwrap_or(0),
        driver_version: u32::try_from(version).unwrap_or(0),
        attributes,
        executes_kernels: true,
    })
}
