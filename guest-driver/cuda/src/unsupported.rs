//! Entry points that real programs look up but this version does not
//! implement. They are exported (a missing symbol would make loaders such
//! as cudarc's fail outright) and return `CUDA_ERROR_NOT_SUPPORTED`, logging
//! their name once. They ignore their arguments, which the C calling
//! convention allows whatever the caller passes.

use std::ffi::c_void;

use vgpu_spec::Status;

use crate::logging;
use crate::types::CUresult;

/// The shared body: logs the name once and refuses.
fn not_supported(name: &str) -> CUresult {
    logging::warn_once(&format!("unsupported entry point {name}"));
    Status::NOT_SUPPORTED.0
}

macro_rules! unsupported {
    ($($name:ident),* $(,)?) => {
        $(
            #[doc = concat!("`", stringify!($name), "`: not supported; returns `CUDA_ERROR_NOT_SUPPORTED`.")]
            #[no_mangle]
            pub extern "C" fn $name() -> CUresult {
                not_supported(stringify!($name))
            }
        )*

        /// The unsupported entry points' names.
        #[cfg(test)]
        pub(crate) const NAMES: &[&str] = &[$(stringify!($name)),*];

        /// True if `ptr` is one of the unsupported entry points.
        pub(crate) fn is_stub(ptr: *mut c_void) -> bool {
            false $(|| ptr == $name as *mut c_void)*
        }

        /// The address of an unsupported entry point, by name.
        pub(crate) fn lookup(name: &str) -> Option<*mut c_void> {
            match name {
                $(stringify!($name) => Some($name as *mut c_void),)*
                _ => None,
            }
        }
    };
}

unsupported!(
    cuCtxSetFlags,
    cuFuncGetName,
    cuStreamGetCtx,
    cuStreamGetFlags,
    cuDeviceCanAccessPeer,
    cuDeviceGetP2PAttribute,
    cuMemHostRegister_v2,
    cuMemHostUnregister,
    cuMemHostGetDevicePointer_v2,
    cuLaunchHostFunc,
    cuStreamWaitValue32,
    cuStreamBatchMemOp,
    cuGraphKernelNodeGetParams,
    cuGraphExecKernelNodeSetParams,
    cuGraphNodeGetType,
    cuMemcpy2DAsync_v2,
    cuMemPrefetchAsync,
    cuCtxDisablePeerAccess,
    cuCtxEnablePeerAccess,
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsupported_entry_points_return_not_supported() {
        assert_eq!(cuStreamGetFlags(), Status::NOT_SUPPORTED.0);
        assert!(lookup("cuFuncGetName").is_some());
        assert!(lookup("cuMemAlloc_v2").is_none());
        assert!(NAMES.contains(&"cuStreamGetFlags"));
        assert!(is_stub(cuStreamGetFlags as *mut c_void));
        assert!(!is_stub(crate::errors::cuGetErrorName as *mut c_void));
    }
}
