//! The lookup table of the runtime-era exports (export tables, libraries
//! and kernels, per-thread-stream variants, context and function
//! settings), consulted by [`crate::procaddr::exported`] after its own list.

use std::ffi::c_void;

#[allow(clippy::wildcard_imports)]
use crate::{export_table::*, func_query::*, library::*, ptds::*, runtime::*};

macro_rules! runtime_exports {
    ($($name:ident),* $(,)?) => {
        /// The address of a runtime-era export, by exact name.
        pub(crate) fn lookup(name: &str) -> Option<*mut c_void> {
            match name {
                $(stringify!($name) => Some($name as *mut c_void),)*
                _ => None,
            }
        }
    };
}

runtime_exports!(
    cuGetExportTable,
    cuLibraryLoadData,
    cuLibraryLoadFromFile,
    cuLibraryUnload,
    cuLibraryGetKernel,
    cuLibraryGetModule,
    cuLibraryGetGlobal,
    cuKernelGetFunction,
    cuKernelGetLibrary,
    cuKernelGetName,
    cuKernelGetAttribute,
    cuKernelSetAttribute,
    cuKernelSetCacheConfig,
    cuFuncGetParamInfo,
    cuKernelGetParamInfo,
    cuModuleGetLoadingMode,
    cuLaunchKernel_ptsz,
    cuEventRecord_ptsz,
    cuEventRecordWithFlags_ptsz,
    cuStreamSynchronize_ptsz,
    cuStreamQuery_ptsz,
    cuStreamWaitEvent_ptsz,
    cuMemAllocAsync_ptsz,
    cuMemFreeAsync_ptsz,
    cuMemAllocFromPoolAsync_ptsz,
    cuMemcpyHtoD_v2_ptds,
    cuMemcpyDtoH_v2_ptds,
    cuMemcpyDtoD_v2_ptds,
    cuMemcpyHtoDAsync_v2_ptsz,
    cuMemcpyDtoHAsync_v2_ptsz,
    cuMemcpyDtoDAsync_v2_ptsz,
    cuMemsetD8_v2_ptds,
    cuMemsetD16_v2_ptds,
    cuMemsetD32_v2_ptds,
    cuMemsetD8Async_ptsz,
    cuMemsetD16Async_ptsz,
    cuMemsetD32Async_ptsz,
    cuCtxGetLimit,
    cuCtxSetLimit,
    cuCtxGetCacheConfig,
    cuCtxSetCacheConfig,
    cuCtxGetSharedMemConfig,
    cuCtxSetSharedMemConfig,
    cuCtxResetPersistingL2Cache,
    cuFuncSetCacheConfig,
    cuFuncSetSharedMemConfig,
    cuFuncSetAttribute,
    cuOccupancyMaxActiveBlocksPerMultiprocessor,
    cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags,
    cuOccupancyAvailableDynamicSMemPerBlock,
    cuOccupancyMaxActiveClusters,
    cuOccupancyMaxPotentialClusterSize,
    cuOccupancyMaxPotentialBlockSize,
    cuOccupancyMaxPotentialBlockSizeWithFlags,
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_runtime_export_is_listed() {
        let sources = [
            include_str!("export_table.rs"),
            include_str!("func_query.rs"),
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
                assert!(lookup(&name).is_some(), "{name} missing from the list");
                count += 1;
            }
        }
        assert!(count >= 52, "only {count} exports found");
    }
}
