//! `cuGetProcAddress`: entry points by name. A (name, CUDA version, flags)
//! request is first answered from the real driver's table
//! ([`crate::procaddr_table`]: `cuMemAlloc` asked for by a CUDA 3.2+ program
//! is `cuMemAlloc_v2`, `cuLaunchKernel` with the per-thread-stream flag is
//! `cuLaunchKernel_ptsz`), then that exact symbol is looked up among this
//! library's exports. A symbol the driver knows but this library does not
//! export is reported as not found.

use std::ffi::{c_char, c_int, c_void, CStr};

use vgpu_spec::Status;

use crate::errors::{guard, non_null, write_out, CuResult};
use crate::types::{CUresult, CU_GET_PROC_ADDRESS_SUCCESS};
use crate::unsupported;

#[allow(clippy::wildcard_imports)]
use crate::{
    capture_api::*, copy::*, copy_generic::*, ctx::*, device::*, errors::*, event::*, graph::*,
    launch::*, launch_ex::*, link::*, memory::*, mempool::*, module::*, pointer_attr::*,
    priority::*, stream::*,
};

macro_rules! exports {
    ($($name:ident),* $(,)?) => {
        /// The address of an export of this library, by exact name.
        pub(crate) fn exported(name: &str) -> Option<*mut c_void> {
            match name {
                $(stringify!($name) => Some($name as *mut c_void),)*
                _ => crate::runtime_exports::lookup(name)
                    .or_else(|| unsupported::lookup(name)),
            }
        }
    };
}

exports!(
    cuPointerGetAttribute,
    cuPointerGetAttributes,
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
    cuDeviceGetDefaultMemPool,
    cuDeviceGetMemPool,
    cuDeviceSetMemPool,
    cuMemGetDefaultMemPool,
    cuMemGetMemPool,
    cuMemSetMemPool,
    cuMemPoolCreate,
    cuMemPoolDestroy,
    cuMemPoolSetAttribute,
    cuMemPoolGetAttribute,
    cuMemPoolTrimTo,
    cuMemPoolSetAccess,
    cuMemPoolGetAccess,
    cuMemAllocFromPoolAsync,
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
    cuMemcpy,
    cuMemcpyAsync,
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
    cuEventRecordWithFlags,
    cuEventSynchronize,
    cuEventQuery,
    cuEventElapsedTime,
    cuEventElapsedTime_v2,
    cuEventDestroy,
    cuEventDestroy_v2,
    cuLaunchKernelEx,
    cuLaunchKernelEx_ptsz,
    cuLaunchCooperativeKernel,
    cuLaunchCooperativeKernel_ptsz,
    cuLinkCreate,
    cuLinkCreate_v2,
    cuLinkAddData,
    cuLinkAddData_v2,
    cuLinkAddFile,
    cuLinkAddFile_v2,
    cuLinkComplete,
    cuLinkDestroy,
    cuCtxGetStreamPriorityRange,
    cuStreamGetPriority,
    cuStreamGetPriority_ptsz,
    cuStreamBeginCapture,
    cuStreamBeginCapture_ptsz,
    cuStreamBeginCapture_v2,
    cuStreamBeginCapture_v2_ptsz,
    cuStreamEndCapture,
    cuStreamEndCapture_ptsz,
    cuStreamIsCapturing,
    cuStreamIsCapturing_ptsz,
    cuStreamGetCaptureInfo,
    cuStreamGetCaptureInfo_ptsz,
    cuStreamGetCaptureInfo_v2,
    cuStreamGetCaptureInfo_v2_ptsz,
    cuStreamGetCaptureInfo_v3,
    cuStreamGetCaptureInfo_v3_ptsz,
    cuThreadExchangeStreamCaptureMode,
    cuGraphCreate,
    cuGraphDestroy,
    cuGraphGetNodes,
    cuGraphInstantiate,
    cuGraphInstantiate_v2,
    cuGraphInstantiateWithFlags,
    cuGraphInstantiateWithParams,
    cuGraphInstantiateWithParams_ptsz,
    cuGraphLaunch,
    cuGraphLaunch_ptsz,
    cuGraphExecDestroy,
    cuGraphUpload,
    cuGraphUpload_ptsz,
);

/// Resolves `name` as the real driver does for `version` and `flags`: this
/// library's export of the symbol the driver would return, or the symbol
/// status to report.
pub(crate) fn resolve(name: &str, version: c_int, flags: u64) -> Result<*mut c_void, c_int> {
    crate::procaddr_table::resolve(name, version, flags, exported)
}

/// Shared body of both versions. A symbol that cannot be resolved leaves
/// NULL in `pfn` and its status in `status`; `cuGetProcAddress_v2` then
/// returns `CUDA_SUCCESS`, as driver 580 does (the probed table records
/// rc 0 for every such request), while `cuGetProcAddress`, which has no
/// status to report, returns `CUDA_ERROR_NOT_FOUND`.
///
/// # Safety
/// `symbol` must be null or NUL-terminated; `pfn` and `status` null or
/// writable.
unsafe fn get_proc_address(
    symbol: *const c_char,
    pfn: *mut *mut c_void,
    version: c_int,
    flags: u64,
    status: Option<*mut c_int>,
) -> CuResult<()> {
    non_null(symbol)?;
    non_null(pfn)?;
    // SAFETY: non-null, and per the API a NUL-terminated name.
    let name = unsafe { CStr::from_ptr(symbol) }.to_str().unwrap_or("");
    let found = resolve(name, version, flags);
    let code = match found {
        Ok(ptr) => {
            if unsupported::is_stub(ptr) {
                tracing::debug!(
                    name,
                    version,
                    flags,
                    "cuGetProcAddress: an unsupported stub"
                );
            }
            CU_GET_PROC_ADDRESS_SUCCESS
        }
        Err(code) => {
            tracing::debug!(name, version, flags, code, "cuGetProcAddress: not found");
            code
        }
    };
    // SAFETY: non-null, and per the API a writable function pointer slot.
    unsafe { write_out(pfn, found.unwrap_or(std::ptr::null_mut())) }?;
    match status {
        Some(status) if !status.is_null() => {
            // SAFETY: non-null, and per the API a writable
            // `CUdriverProcAddressQueryResult`.
            unsafe { write_out(status, code) }
        }
        Some(_) => Ok(()),
        None => found.map(|_| ()).map_err(|_| Status::NOT_FOUND),
    }
}

/// `cuGetProcAddress`. Works before `cuInit`.
#[no_mangle]
pub unsafe extern "C" fn cuGetProcAddress(
    symbol: *const c_char,
    pfn: *mut *mut c_void,
    cuda_version: c_int,
    flags: u64,
) -> CUresult {
    // SAFETY: forwards the caller's pointers under the same contract.
    guard(|| unsafe { get_proc_address(symbol, pfn, cuda_version, flags, None) })
}

/// `cuGetProcAddress_v2`. Works before `cuInit`.
#[no_mangle]
pub unsafe extern "C" fn cuGetProcAddress_v2(
    symbol: *const c_char,
    pfn: *mut *mut c_void,
    cuda_version: c_int,
    flags: u64,
    symbol_status: *mut c_int,
) -> CUresult {
    // SAFETY: forwards the caller's pointers under the same contract.
    guard(|| unsafe { get_proc_address(symbol, pfn, cuda_version, flags, Some(symbol_status)) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND;

    #[test]
    fn proc_address_resolves_to_the_versioned_export() {
        assert_eq!(
            resolve("cuMemAlloc", 3020, 0),
            Ok(cuMemAlloc_v2 as *mut c_void)
        );
        assert_eq!(
            resolve("cuMemAlloc", 2000, 0),
            Ok(cuMemAlloc as *mut c_void)
        );
        assert_eq!(resolve("cuInit", 12000, 0), Ok(cuInit as *mut c_void));
        assert!(resolve("cuCtxGetLimit", 12000, 0).is_ok());
        assert_eq!(
            resolve("cuGraphInstantiate", 12000, 0),
            Ok(cuGraphInstantiate_v2 as *mut c_void)
        );
        assert_eq!(
            resolve("cuStreamGetCaptureInfo", 12030, 0),
            Ok(cuStreamGetCaptureInfo_v3 as *mut c_void)
        );
        assert_eq!(
            resolve("cuCtxCreate", 12050, 0),
            Ok(cuCtxCreate_v4 as *mut c_void)
        );
    }

    #[test]
    fn link_and_cooperative_launch_resolve_as_the_driver_does() {
        // cuDNN asks with the versions these entry points appeared in.
        assert_eq!(
            resolve("cuLinkCreate", 5050, 0),
            Ok(cuLinkCreate as *mut c_void)
        );
        assert_eq!(
            resolve("cuLinkCreate", 6050, 0),
            Ok(cuLinkCreate_v2 as *mut c_void)
        );
        assert_eq!(
            resolve("cuLinkAddData", 5050, 0),
            Ok(cuLinkAddData as *mut c_void)
        );
        assert_eq!(
            resolve("cuLinkAddData", 12000, 0),
            Ok(cuLinkAddData_v2 as *mut c_void)
        );
        assert_eq!(
            resolve("cuLinkAddFile", 5050, 0),
            Ok(cuLinkAddFile as *mut c_void)
        );
        assert_eq!(
            resolve("cuLinkAddFile", 6050, 2),
            Ok(cuLinkAddFile_v2 as *mut c_void)
        );
        assert_eq!(
            resolve("cuLinkComplete", 5050, 0),
            Ok(cuLinkComplete as *mut c_void)
        );
        assert_eq!(
            resolve("cuLinkDestroy", 5050, 0),
            Ok(cuLinkDestroy as *mut c_void)
        );
        assert_eq!(
            resolve("cuLaunchCooperativeKernel", 9000, 0),
            Ok(cuLaunchCooperativeKernel as *mut c_void)
        );
        assert_eq!(
            resolve("cuLaunchCooperativeKernel", 9000, 2),
            Ok(cuLaunchCooperativeKernel_ptsz as *mut c_void)
        );
        for name in [
            "cuLinkCreate",
            "cuLinkAddData",
            "cuLinkComplete",
            "cuLinkDestroy",
        ] {
            let ptr = exported(name).unwrap();
            assert!(!unsupported::is_stub(ptr), "{name} is a real entry point");
        }
    }

    #[test]
    fn per_thread_stream_flag_resolves_to_the_ptsz_export() {
        assert_eq!(
            resolve("cuLaunchKernel", 7000, 2),
            Ok(crate::ptds::cuLaunchKernel_ptsz as *mut c_void)
        );
        assert_eq!(
            resolve("cuLaunchKernel", 7000, 0),
            Ok(cuLaunchKernel as *mut c_void)
        );
        assert_eq!(
            resolve("cuMemcpyHtoD", 7000, 2),
            Ok(crate::ptds::cuMemcpyHtoD_v2_ptds as *mut c_void)
        );
        assert_eq!(
            resolve("cuEventRecordWithFlags", 11010, 2),
            Ok(crate::ptds::cuEventRecordWithFlags_ptsz as *mut c_void)
        );
        assert_eq!(
            resolve("cuEventRecordWithFlags", 11010, 0),
            Ok(crate::event::cuEventRecordWithFlags as *mut c_void)
        );
        assert_eq!(resolve("cuMemcpy", 4000, 0), Ok(cuMemcpy as *mut c_void));
    }

    #[test]
    fn names_the_driver_does_not_know_or_too_old_versions_are_refused_with_status() {
        assert_eq!(
            resolve("cuNoSuchThing", 12000, 0),
            Err(CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND)
        );
        assert_eq!(resolve("cuLaunchKernelEx", 11000, 0), Err(2));
        // The driver's own name for a versioned symbol is not a request name.
        assert_eq!(
            resolve("cuMemAlloc_v2", 12000, 0),
            Err(CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND)
        );
    }

    #[test]
    fn over_150_of_the_drivers_symbols_are_exported() {
        let table = crate::procaddr_table::table();
        let reachable = table
            .all_symbols()
            .filter(|s| exported(s).is_some())
            .count();
        assert!(
            reachable > 150,
            "only {reachable} table symbols are exported"
        );
    }

    #[test]
    fn every_no_mangle_export_is_in_the_proc_address_table() {
        let sources = [
            include_str!("capture_api.rs"),
            include_str!("graph.rs"),
            include_str!("launch_ex.rs"),
            include_str!("link.rs"),
            include_str!("priority.rs"),
            include_str!("copy.rs"),
            include_str!("ctx.rs"),
            include_str!("device.rs"),
            include_str!("errors.rs"),
            include_str!("event.rs"),
            include_str!("launch.rs"),
            include_str!("memory.rs"),
            include_str!("mempool.rs"),
            include_str!("module.rs"),
            include_str!("procaddr.rs"),
            include_str!("stream.rs"),
            include_str!("export_table.rs"),
            include_str!("library.rs"),
            include_str!("ptds.rs"),
            include_str!("runtime.rs"),
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
    fn unknown_symbol_is_null_with_status_and_v1_returns_not_found() {
        let mut pfn: *mut c_void = std::ptr::without_provenance_mut(1);
        let mut status = -1;
        // SAFETY: valid name and out-pointers.
        let rc = unsafe {
            cuGetProcAddress_v2(c"cuNoSuchThing".as_ptr(), &mut pfn, 12000, 0, &mut status)
        };
        assert_eq!(rc, 0, "driver 580 answers CUDA_SUCCESS with a status");
        assert!(pfn.is_null());
        assert_eq!(status, CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND);
        pfn = std::ptr::without_provenance_mut(1);
        // SAFETY: as above.
        let rc = unsafe { cuGetProcAddress(c"cuNoSuchThing".as_ptr(), &mut pfn, 12000, 0) };
        assert_eq!(rc, Status::NOT_FOUND.0);
        assert!(pfn.is_null());
        // SAFETY: as above.
        let rc =
            unsafe { cuGetProcAddress_v2(c"cuMemFree".as_ptr(), &mut pfn, 12000, 0, &mut status) };
        assert_eq!(rc, 0);
        assert_eq!(pfn, cuMemFree_v2 as *mut c_void);
        assert_eq!(status, CU_GET_PROC_ADDRESS_SUCCESS);
    }
}
