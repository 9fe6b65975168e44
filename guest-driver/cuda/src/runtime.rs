//! Context and function settings the CUDA runtime queries and sets at
//! start-up: limits, cache and shared-memory configuration, function
//! attributes. Limits are kept per context in the guest (defaults are an
//! H100's), configuration preferences are hints that are accepted, and
//! function attributes are set on the backend's function.

use std::collections::HashMap;
use std::ffi::{c_int, c_uint};
use std::sync::{LazyLock, Mutex};

use vgpu_spec::Status;

use crate::ctx::session_ctx;
use crate::errors::{guard, non_null, write_out, CuResult};
use crate::state::{driver, lock};
use crate::types::{CUfunction, CUresult};

/// `CUDA_ERROR_UNSUPPORTED_LIMIT` (not in the protocol's status table).
const UNSUPPORTED_LIMIT: Status = Status(215);

/// `CUlimit` values.
const LIMIT_STACK_SIZE: c_int = 0;
const LIMIT_PRINTF_FIFO_SIZE: c_int = 1;
const LIMIT_MALLOC_HEAP_SIZE: c_int = 2;
const LIMIT_DEV_RUNTIME_SYNC_DEPTH: c_int = 3;
const LIMIT_DEV_RUNTIME_PENDING_LAUNCH_COUNT: c_int = 4;
const LIMIT_MAX_L2_FETCH_GRANULARITY: c_int = 5;
const LIMIT_PERSISTING_L2_CACHE_SIZE: c_int = 6;
/// Read-only: whether the context is a CUDA-in-graphics (CIG) context.
const LIMIT_CIG_ENABLED: c_int = 8;
/// Read-only: whether a CIG context may fall back to shared memory.
const LIMIT_CIG_SHMEM_FALLBACK_ENABLED: c_int = 9;

/// `CU_SHARED_MEM_CONFIG_FOUR_BYTE_BANK_SIZE`.
const FOUR_BYTE_BANKS: c_int = 1;

/// The default value of a limit, `None` for an unknown limit.
fn default_limit(limit: c_int) -> Option<usize> {
    Some(match limit {
        LIMIT_STACK_SIZE => 1024,
        LIMIT_PRINTF_FIFO_SIZE => 1 << 20,
        LIMIT_MALLOC_HEAP_SIZE => 8 << 20,
        LIMIT_DEV_RUNTIME_SYNC_DEPTH => 2,
        LIMIT_DEV_RUNTIME_PENDING_LAUNCH_COUNT => 2048,
        LIMIT_MAX_L2_FETCH_GRANULARITY => 128,
        LIMIT_PERSISTING_L2_CACHE_SIZE => 0,
        // No context of this library is a CIG context.
        LIMIT_CIG_ENABLED | LIMIT_CIG_SHMEM_FALLBACK_ENABLED => 0,
        _ => return None,
    })
}

/// Limits set by the application, by (context, limit).
static LIMITS: LazyLock<Mutex<HashMap<(u64, c_int), usize>>> = LazyLock::new(Mutex::default);

fn get_limit(ctx: u64, limit: c_int) -> CuResult<usize> {
    let default = default_limit(limit).ok_or(UNSUPPORTED_LIMIT)?;
    Ok(lock(&LIMITS).get(&(ctx, limit)).copied().unwrap_or(default))
}

fn set_limit(ctx: u64, limit: c_int, value: usize) -> CuResult<()> {
    let default = default_limit(limit).ok_or(UNSUPPORTED_LIMIT)?;
    match limit {
        // The backend launches with the device's own settings; asking for
        // less than the default changes nothing observable, more is refused.
        LIMIT_CIG_ENABLED | LIMIT_CIG_SHMEM_FALLBACK_ENABLED => Err(Status::INVALID_VALUE),
        LIMIT_STACK_SIZE | LIMIT_PRINTF_FIFO_SIZE | LIMIT_MALLOC_HEAP_SIZE if value > default => {
            crate::logging::warn_once(&format!("cuCtxSetLimit({limit}, {value}) is not supported"));
            Err(UNSUPPORTED_LIMIT)
        }
        _ => {
            lock(&LIMITS).insert((ctx, limit), value);
            Ok(())
        }
    }
}

/// `cuCtxGetLimit`.
#[no_mangle]
pub unsafe extern "C" fn cuCtxGetLimit(value: *mut usize, limit: c_int) -> CUresult {
    guard(|| {
        non_null(value)?;
        let (_, ctx) = session_ctx()?;
        let v = get_limit(ctx, limit)?;
        // SAFETY: non-null, and per the API a writable `size_t`.
        unsafe { write_out(value, v) }
    })
}

/// `cuCtxSetLimit`.
#[no_mangle]
pub unsafe extern "C" fn cuCtxSetLimit(limit: c_int, value: usize) -> CUresult {
    guard(|| {
        let (_, ctx) = session_ctx()?;
        set_limit(ctx, limit, value)
    })
}

/// `cuCtxGetCacheConfig`: no preference.
#[no_mangle]
pub unsafe extern "C" fn cuCtxGetCacheConfig(config: *mut c_int) -> CUresult {
    guard(|| {
        non_null(config)?;
        session_ctx()?;
        // SAFETY: non-null, and per the API a writable `CUfunc_cache`.
        unsafe { write_out(config, 0) }
    })
}

/// `cuCtxSetCacheConfig`: a hint, accepted.
#[no_mangle]
pub unsafe extern "C" fn cuCtxSetCacheConfig(_config: c_int) -> CUresult {
    guard(|| session_ctx().map(|_| ()))
}

/// `cuCtxGetSharedMemConfig`: four-byte banks.
#[no_mangle]
pub unsafe extern "C" fn cuCtxGetSharedMemConfig(config: *mut c_int) -> CUresult {
    guard(|| {
        non_null(config)?;
        session_ctx()?;
        // SAFETY: non-null, and per the API a writable `CUsharedconfig`.
        unsafe { write_out(config, FOUR_BYTE_BANKS) }
    })
}

/// `cuCtxSetSharedMemConfig`: a hint, accepted.
#[no_mangle]
pub unsafe extern "C" fn cuCtxSetSharedMemConfig(_config: c_int) -> CUresult {
    guard(|| session_ctx().map(|_| ()))
}

/// `cuCtxResetPersistingL2Cache`: nothing is persisted.
#[no_mangle]
pub unsafe extern "C" fn cuCtxResetPersistingL2Cache() -> CUresult {
    guard(|| session_ctx().map(|_| ()))
}

/// Fails unless `f` is a live function or kernel.
fn check_function(f: CUfunction) -> CuResult<()> {
    let f = crate::library::as_function(f)?;
    let drv = driver()?;
    match lock(&drv.modules).function(f) {
        Some(_) => Ok(()),
        None => Err(Status::INVALID_HANDLE),
    }
}

/// `cuFuncSetCacheConfig`: a hint, accepted.
#[no_mangle]
pub unsafe extern "C" fn cuFuncSetCacheConfig(hfunc: CUfunction, _config: c_int) -> CUresult {
    guard(|| check_function(hfunc))
}

/// `cuFuncSetSharedMemConfig`: a hint, accepted.
#[no_mangle]
pub unsafe extern "C" fn cuFuncSetSharedMemConfig(hfunc: CUfunction, _config: c_uint) -> CUresult {
    guard(|| check_function(hfunc))
}

/// `cuFuncSetAttribute`: set on the backend's function.
#[no_mangle]
pub unsafe extern "C" fn cuFuncSetAttribute(
    hfunc: CUfunction,
    attrib: c_int,
    value: c_int,
) -> CUresult {
    guard(|| {
        check_function(hfunc)?;
        crate::func_query::set_attribute(hfunc, attrib, value)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_default_to_an_h100s_and_remember_what_was_set() {
        let ctx = 0x5151_0001;
        assert_eq!(get_limit(ctx, LIMIT_STACK_SIZE), Ok(1024));
        assert_eq!(get_limit(ctx, LIMIT_MALLOC_HEAP_SIZE), Ok(8 << 20));
        assert_eq!(get_limit(ctx, 77), Err(UNSUPPORTED_LIMIT));
        set_limit(ctx, LIMIT_DEV_RUNTIME_SYNC_DEPTH, 4).unwrap();
        assert_eq!(get_limit(ctx, LIMIT_DEV_RUNTIME_SYNC_DEPTH), Ok(4));
        assert_eq!(get_limit(ctx + 1, LIMIT_DEV_RUNTIME_SYNC_DEPTH), Ok(2));
        set_limit(ctx, LIMIT_STACK_SIZE, 512).unwrap();
        assert_eq!(get_limit(ctx, LIMIT_STACK_SIZE), Ok(512));
    }

    #[test]
    fn cig_limits_read_as_disabled_and_cannot_be_set() {
        let ctx = 0x5151_0003;
        assert_eq!(get_limit(ctx, LIMIT_CIG_ENABLED), Ok(0));
        assert_eq!(get_limit(ctx, LIMIT_CIG_SHMEM_FALLBACK_ENABLED), Ok(0));
        assert_eq!(
            set_limit(ctx, LIMIT_CIG_ENABLED, 1),
            Err(Status::INVALID_VALUE)
        );
        assert_eq!(get_limit(ctx, LIMIT_CIG_ENABLED), Ok(0));
    }

    #[test]
    fn raising_stack_or_heap_limits_is_unsupported_limit() {
        assert_eq!(
            set_limit(0x5151_0002, LIMIT_MALLOC_HEAP_SIZE, 1 << 30),
            Err(UNSUPPORTED_LIMIT)
        );
        assert_eq!(set_limit(0x5151_0002, 99, 1), Err(UNSUPPORTED_LIMIT));
    }

    #[test]
    fn context_settings_before_init_are_not_initialized() {
        let mut v = 0usize;
        // SAFETY: a valid out-pointer.
        let rc = unsafe { cuCtxGetLimit(&mut v, LIMIT_STACK_SIZE) };
        assert_eq!(rc, Status::NOT_INITIALIZED.0);
        // SAFETY: no pointers.
        let rc = unsafe { cuFuncSetAttribute(std::ptr::null_mut(), 9, 50) };
        assert_eq!(rc, Status::NOT_INITIALIZED.0);
    }
}
