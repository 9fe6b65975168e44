//! `cuGetProcAddress`: entry points by name. A name is first mapped to the
//! ABI version the caller's CUDA version expects (`cuMemAlloc` asked for by
//! a CUDA 3.2+ program is `cuMemAlloc_v2`, `cuCtxCreate` from 12.5 on is
//! `cuCtxCreate_v4`), then looked up among this library's exports. The full
//! table generated from the real driver is a later step; per-thread-stream
//! flags resolve to the same functions for now.

use std::ffi::{c_char, c_int, c_void, CStr};

use vgpu_spec::Status;

use crate::errors::{guard, non_null, write_out, CuResult};
use crate::types::{CUresult, CU_GET_PROC_ADDRESS_SUCCESS, CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND};
use crate::unsupported;

#[allow(clippy::wildcard_imports)]
use crate::{
    copy::*, ctx::*, device::*, errors::*, event::*, launch::*, memory::*, module::*, stream::*,
};

/// Base names whose ABI changed, with the CUDA version each variant
/// appeared in (ascending).
const VERSIONED: &[(&str, &[(c_int, &str)])] = &[
    (
        "cuCtxCreate",
        &[
            (3020, "cuCtxCreate_v2"),
            (11040, "cuCtxCreate_v3"),
            (12050, "cuCtxCreate_v4"),
        ],
    ),
    ("cuCtxDestroy", &[(4000, "cuCtxDestroy_v2")]),
    ("cuCtxPushCurrent", &[(4000, "cuCtxPushCurrent_v2")]),
    ("cuCtxPopCurrent", &[(4000, "cuCtxPopCurrent_v2")]),
    ("cuCtxSynchronize", &[(13000, "cuCtxSynchronize_v2")]),
    ("cuCtxGetDevice", &[(13000, "cuCtxGetDevice_v2")]),
    ("cuDeviceTotalMem", &[(3020, "cuDeviceTotalMem_v2")]),
    ("cuDeviceGetUuid", &[(11040, "cuDeviceGetUuid_v2")]),
    (
        "cuDevicePrimaryCtxRelease",
        &[(11000, "cuDevicePrimaryCtxRelease_v2")],
    ),
    (
        "cuDevicePrimaryCtxReset",
        &[(11000, "cuDevicePrimaryCtxReset_v2")],
    ),
    (
        "cuDevicePrimaryCtxSetFlags",
        &[(11000, "cuDevicePrimaryCtxSetFlags_v2")],
    ),
    ("cuMemAlloc", &[(3020, "cuMemAlloc_v2")]),
    ("cuMemFree", &[(3020, "cuMemFree_v2")]),
    ("cuMemGetInfo", &[(3020, "cuMemGetInfo_v2")]),
    ("cuMemAllocHost", &[(3020, "cuMemAllocHost_v2")]),
    (
        "cuMemHostGetDevicePointer",
        &[(3020, "cuMemHostGetDevicePointer_v2")],
    ),
    ("cuMemHostRegister", &[(6050, "cuMemHostRegister_v2")]),
    ("cuMemcpyHtoD", &[(3020, "cuMemcpyHtoD_v2")]),
    ("cuMemcpyDtoH", &[(3020, "cuMemcpyDtoH_v2")]),
    ("cuMemcpyDtoD", &[(3020, "cuMemcpyDtoD_v2")]),
    ("cuMemcpyHtoDAsync", &[(3020, "cuMemcpyHtoDAsync_v2")]),
    ("cuMemcpyDtoHAsync", &[(3020, "cuMemcpyDtoHAsync_v2")]),
    ("cuMemcpyDtoDAsync", &[(3020, "cuMemcpyDtoDAsync_v2")]),
    ("cuMemsetD8", &[(3020, "cuMemsetD8_v2")]),
    ("cuMemsetD16", &[(3020, "cuMemsetD16_v2")]),
    ("cuMemsetD32", &[(3020, "cuMemsetD32_v2")]),
    ("cuModuleGetGlobal", &[(3020, "cuModuleGetGlobal_v2")]),
    ("cuStreamDestroy", &[(4000, "cuStreamDestroy_v2")]),
    ("cuEventDestroy", &[(4000, "cuEventDestroy_v2")]),
    ("cuEventElapsedTime", &[(12080, "cuEventElapsedTime_v2")]),
    ("cuGetProcAddress", &[(12000, "cuGetProcAddress_v2")]),
];

/// The symbol a request for `name` at CUDA version `version` means.
pub(crate) fn versioned_name(name: &str, version: c_int) -> &str {
    let Some((_, variants)) = VERSIONED.iter().find(|(base, _)| *base == name) else {
        return name;
    };
    variants
        .iter()
        .rev()
        .find(|(since, _)| *since <= version)
        .map_or(name, |(_, symbol)| symbol)
}

macro_rules! exports {
    ($($name:ident),* $(,)?) => {
        /// The address of an export of this library, by exact name.
        pub(crate) fn exported(name: &str) -> Option<*mut c_void> {
            match name {
                $(stringify!($name) => Some($name as *mut c_void),)*
                _ => unsupported::lookup(name),
            }
        }
    };
}

exports!(
    cuGetErrorName,
    cuGetErrorString,
    cuGetProcAddress,
    cuGetProcAddress_v2,
    cuInit,
    cuDriverGetVersion,
    cuDeviceGet,
    cuDeviceGetCount,
    cuDeviceGetName,
    cuDeviceGetUuid,
    cuDeviceGetUuid_v2,
    cuDeviceTotalMem,
    cuDeviceTotalMem_v2,
    cuDeviceGetAttribute,
    cuDeviceComputeCapability,
    cuDeviceGetPCIBusId,
    cuDeviceGetByPCIBusId,
    cuCtxCreate,
    cuCtxCreate_v2,
    cuCtxCreate_v3,
    cuCtxCreate_v4,
    cuCtxDestroy,
    cuCtxDestroy_v2,
    cuCtxSynchronize,
    cuCtxSynchronize_v2,
    cuCtxGetCurrent,
    cuCtxSetCurrent,
    cuCtxPushCurrent,
    cuCtxPushCurrent_v2,
    cuCtxPopCurrent,
    cuCtxPopCurrent_v2,
    cuCtxGetDevice,
    cuCtxGetDevice_v2,
    cuCtxGetApiVersion,
    cuCtxGetFlags,
    cuDevicePrimaryCtxRetain,
    cuDevicePrimaryCtxRelease,
    cuDevicePrimaryCtxRelease_v2,
    cuDevicePrimaryCtxReset,
    cuDevicePrimaryCtxReset_v2,
    cuDevicePrimaryCtxGetState,
    cuDevicePrimaryCtxSetFlags,
    cuDevicePrimaryCtxSetFlags_v2,
    cuMemAlloc,
    cuMemAlloc_v2,
    cuMemAllocAsync,
    cuMemFree,
    cuMemFree_v2,
    cuMemFreeAsync,
    cuMemGetInfo,
    cuMemGetInfo_v2,
    cuMemAllocHost,
    cuMemAllocHost_v2,
    cuMemHostAlloc,
    cuMemFreeHost,
    cuMemsetD8,
    cuMemsetD8_v2,
    cuMemsetD16,
    cuMemsetD16_v2,
    cuMemsetD32,
    cuMemsetD32_v2,
    cuMemsetD8Async,
    cuMemsetD16Async,
    cuMemsetD32Async,
    cuMemcpyHtoD,
    cuMemcpyHtoD_v2,
    cuMemcpyHtoDAsync,
    cuMemcpyHtoDAsync_v2,
    cuMemcpyDtoH,
    cuMemcpyDtoH_v2,
    cuMemcpyDtoHAsync,
    cuMemcpyDtoHAsync_v2,
    cuMemcpyDtoD,
    cuMemcpyDtoD_v2,
    cuMemcpyDtoDAsync,
    cuMemcpyDtoDAsync_v2,
    cuModuleLoadData,
    cuModuleLoadDataEx,
    cuModuleLoad,
    cuModuleUnload,
    cuModuleGetFunction,
    cuModuleGetGlobal,
    cuModuleGetGlobal_v2,
    cuLaunchKernel,
    cuFuncGetAttribute,
    cuStreamCreate,
    cuStreamCreateWithPriority,
    cuStreamDestroy,
    cuStreamDestroy_v2,
    cuStreamSynchronize,
    cuStreamQuery,
    cuStreamWaitEvent,
    cuEventCreate,
    cuEventRecord,
    cuEventSynchronize,
    cuEventQuery,
    cuEventElapsedTime,
    cuEventElapsedTime_v2,
    cuEventDestroy,
    cuEventDestroy_v2,
);

/// Resolves `name` at `version`: the versioned symbol if exported, else the
/// exact name.
pub(crate) fn resolve(name: &str, version: c_int) -> Option<*mut c_void> {
    exported(versioned_name(name, version)).or_else(|| exported(name))
}

/// Shared body of both versions.
///
/// # Safety
/// `symbol` must be null or NUL-terminated; `pfn` and `status` null or
/// writable.
unsafe fn get_proc_address(
    symbol: *const c_char,
    pfn: *mut *mut c_void,
    version: c_int,
    status: *mut c_int,
) -> CuResult<()> {
    non_null(symbol)?;
    non_null(pfn)?;
    // SAFETY: non-null, and per the API a NUL-terminated name.
    let name = unsafe { CStr::from_ptr(symbol) }.to_str().unwrap_or("");
    let found = resolve(name, version);
    let code = if found.is_some() {
        CU_GET_PROC_ADDRESS_SUCCESS
    } else {
        tracing::debug!(name, version, "cuGetProcAddress: not found");
        CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND
    };
    // SAFETY: non-null, and per the API a writable function pointer slot.
    unsafe { write_out(pfn, found.unwrap_or(std::ptr::null_mut())) }?;
    if !status.is_null() {
        // SAFETY: non-null, and per the API a writable
        // `CUdriverProcAddressQueryResult`.
        unsafe { write_out(status, code) }?;
    }
    found.map(|_| ()).ok_or(Status::NOT_FOUND)
}

/// `cuGetProcAddress`. Works before `cuInit`.
#[no_mangle]
pub unsafe extern "C" fn cuGetProcAddress(
    symbol: *const c_char,
    pfn: *mut *mut c_void,
    cuda_version: c_int,
    _flags: u64,
) -> CUresult {
    // SAFETY: forwards the caller's pointers under the same contract.
    guard(|| unsafe { get_proc_address(symbol, pfn, cuda_version, std::ptr::null_mut()) })
}

/// `cuGetProcAddress_v2`. Works before `cuInit`.
#[no_mangle]
pub unsafe extern "C" fn cuGetProcAddress_v2(
    symbol: *const c_char,
    pfn: *mut *mut c_void,
    cuda_version: c_int,
    _flags: u64,
    symbol_status: *mut c_int,
) -> CUresult {
    // SAFETY: forwards the caller's pointers under the same contract.
    guard(|| unsafe { get_proc_address(symbol, pfn, cuda_version, symbol_status) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versioned_names_follow_the_callers_cuda_version() {
        assert_eq!(versioned_name("cuMemAlloc", 2000), "cuMemAlloc");
        assert_eq!(versioned_name("cuMemAlloc", 3020), "cuMemAlloc_v2");
        assert_eq!(versioned_name("cuMemAlloc", 13000), "cuMemAlloc_v2");
        assert_eq!(versioned_name("cuCtxCreate", 11040), "cuCtxCreate_v3");
        assert_eq!(versioned_name("cuCtxCreate", 12040), "cuCtxCreate_v3");
        assert_eq!(versioned_name("cuCtxCreate", 13000), "cuCtxCreate_v4");
        assert_eq!(
            versioned_name("cuCtxSynchronize", 12080),
            "cuCtxSynchronize"
        );
        assert_eq!(versioned_name("cuInit", 13000), "cuInit");
    }

    #[test]
    fn proc_address_resolves_to_the_versioned_export() {
        assert_eq!(
            resolve("cuMemAlloc", 3020),
            Some(cuMemAlloc_v2 as *mut c_void)
        );
        assert_eq!(resolve("cuMemAlloc", 2000), Some(cuMemAlloc as *mut c_void));
        assert_eq!(
            resolve("cuMemAlloc_v2", 2000),
            Some(cuMemAlloc_v2 as *mut c_void)
        );
        assert_eq!(resolve("cuInit", 12000), Some(cuInit as *mut c_void));
        assert!(resolve("cuCtxGetLimit", 12000).is_some());
        assert_eq!(resolve("cuGraphLaunch", 12000), None);
    }

    #[test]
    fn every_versioned_variant_is_exported() {
        for (base, variants) in VERSIONED {
            for (_, symbol) in *variants {
                assert!(exported(symbol).is_some(), "{symbol} ({base}) not exported");
            }
        }
    }

    #[test]
    fn every_no_mangle_export_is_in_the_proc_address_table() {
        let sources = [
            include_str!("copy.rs"),
            include_str!("ctx.rs"),
            include_str!("device.rs"),
            include_str!("errors.rs"),
            include_str!("event.rs"),
            include_str!("launch.rs"),
            include_str!("memory.rs"),
            include_str!("module.rs"),
            include_str!("procaddr.rs"),
            include_str!("stream.rs"),
        ];
        let mut count = 0;
        for source in sources {
            for line in source.lines() {
                let Some(rest) = line.trim().strip_prefix("pub unsafe extern \"C\" fn ") else {
                    continue;
                };
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                assert!(exported(&name).is_some(), "{name} missing from the table");
                count += 1;
            }
        }
        assert!(count > 90, "only {count} exports found");
    }

    #[test]
    fn unknown_symbol_is_not_found_with_null_and_status() {
        let mut pfn: *mut c_void = std::ptr::without_provenance_mut(1);
        let mut status = -1;
        // SAFETY: valid name and out-pointers.
        let rc = unsafe {
            cuGetProcAddress_v2(c"cuNoSuchThing".as_ptr(), &mut pfn, 12000, 0, &mut status)
        };
        assert_eq!(rc, Status::NOT_FOUND.0);
        assert!(pfn.is_null());
        assert_eq!(status, CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND);
        // SAFETY: as above.
        let rc =
            unsafe { cuGetProcAddress_v2(c"cuMemFree".as_ptr(), &mut pfn, 12000, 0, &mut status) };
        assert_eq!(rc, 0);
        assert_eq!(pfn, cuMemFree_v2 as *mut c_void);
        assert_eq!(status, CU_GET_PROC_ADDRESS_SUCCESS);
    }
}
