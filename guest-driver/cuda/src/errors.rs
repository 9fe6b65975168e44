//! Results of the exported functions, the panic guard every export runs its
//! body in, out-pointer helpers, and `cuGetErrorName` / `cuGetErrorString`,
//! which are answered locally from [`vgpu_spec::Status`].

use std::collections::HashMap;
use std::ffi::{c_char, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::OnceLock;

use vgpu_spec::Status;

use crate::types::CUresult;

/// What every internal function of the driver API returns.
pub(crate) type CuResult<T> = Result<T, Status>;

/// Runs an export's body, turning its result into a `CUresult`. A panic
/// (which would abort the process at the C boundary) becomes
/// `CUDA_ERROR_UNKNOWN` instead. A failed call is logged at debug level
/// with the source location of the export that ran it (`VGPU_LOG=debug`),
/// so a log shows which entry point returned what; with logging off this
/// costs one relaxed load.
#[track_caller]
pub(crate) fn guard(body: impl FnOnce() -> CuResult<()>) -> CUresult {
    let rc = match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => Status::SUCCESS.0,
        Ok(Err(status)) => status.0,
        Err(_) => {
            crate::logging::report_once("Internal error: a driver API call panicked");
            Status::UNKNOWN.0
        }
    };
    if tracing::level_enabled!(tracing::Level::DEBUG) {
        let at = std::panic::Location::caller();
        crate::logging::safely(|| log_result(at, Status(rc)));
    }
    rc
}

/// Logs a call's result: every call at trace level (`VGPU_LOG=trace` is a
/// call trace), failures at debug level, except the answers that are part
/// of normal operation (`NOT_READY` from queries).
fn log_result(at: &std::panic::Location<'_>, status: Status) {
    let name = status.name().unwrap_or("unknown status");
    if status == Status::SUCCESS || status == Status::NOT_READY {
        tracing::trace!(at = %at, status = status.0, "{name}");
    } else {
        tracing::debug!(at = %at, status = status.0, "call failed: {name}");
    }
}

/// Writes `value` through an out-pointer supplied by the application.
///
/// # Safety
/// `out` must be null or valid for a write of `T` (the API contract of the
/// export that received it).
pub(crate) unsafe fn write_out<T>(out: *mut T, value: T) -> CuResult<()> {
    if out.is_null() {
        return Err(Status::INVALID_VALUE);
    }
    // SAFETY: non-null, and the caller guarantees it is valid for a write of
    // `T`; `write_unaligned` makes no alignment demand on it.
    unsafe { out.write_unaligned(value) };
    Ok(())
}

/// Fails with `CUDA_ERROR_INVALID_VALUE` if `ptr` is null.
pub(crate) fn non_null<T>(ptr: *const T) -> CuResult<()> {
    if ptr.is_null() {
        Err(Status::INVALID_VALUE)
    } else {
        Ok(())
    }
}

/// The NUL-terminated name and description of every status code that has
/// them, built once; the strings live for the rest of the process, as
/// `cuGetErrorName` promises.
fn error_strings() -> &'static HashMap<u32, (CString, CString)> {
    static TABLE: OnceLock<HashMap<u32, (CString, CString)>> = OnceLock::new();
    TABLE.get_or_init(|| {
        (0..=u16::MAX as u32)
            .filter_map(|code| {
                let status = Status(code);
                let name = CString::new(status.name()?).ok()?;
                let text = CString::new(status.description()?).ok()?;
                Some((code, (name, text)))
            })
            .collect()
    })
}

/// The static C string naming `code`, or `None` if the code is unknown.
pub(crate) fn error_name(code: CUresult) -> Option<*const c_char> {
    error_strings().get(&code).map(|(name, _)| name.as_ptr())
}

/// The static C string describing `code`, or `None` if the code is unknown.
pub(crate) fn error_text(code: CUresult) -> Option<*const c_char> {
    error_strings().get(&code).map(|(_, text)| text.as_ptr())
}

/// Shared body of the two lookups: stores the string or NULL.
///
/// # Safety
/// `out` must be null or valid for a write of a pointer.
unsafe fn lookup_into(out: *mut *const c_char, found: Option<*const c_char>) -> CuResult<()> {
    non_null(out)?;
    match found {
        Some(text) => {
            // SAFETY: `out` is non-null and the caller provides a writable pointer slot.
            unsafe { write_out(out, text) }
        }
        None => {
            // SAFETY: as above.
            unsafe { write_out(out, std::ptr::null()) }?;
            Err(Status::INVALID_VALUE)
        }
    }
}

/// `cuGetErrorName`: the enumerator name of a `CUresult`. Works before `cuInit`.
#[no_mangle]
pub unsafe extern "C" fn cuGetErrorName(error: CUresult, p_str: *mut *const c_char) -> CUresult {
    // SAFETY: `p_str` comes from the application, which per the API passes a
    // writable pointer slot or NULL (checked inside).
    guard(|| unsafe { lookup_into(p_str, error_name(error)) })
}

/// `cuGetErrorString`: a sentence describing a `CUresult`. Works before `cuInit`.
#[no_mangle]
pub unsafe extern "C" fn cuGetErrorString(error: CUresult, p_str: *mut *const c_char) -> CUresult {
    // SAFETY: as in `cuGetErrorName`.
    guard(|| unsafe { lookup_into(p_str, error_text(error)) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CStr;

    fn name_of(code: u32) -> (CUresult, Option<String>) {
        let mut out: *const c_char = std::ptr::null();
        // SAFETY: a valid out-pointer.
        let rc = unsafe { cuGetErrorName(code, &mut out) };
        let text = (!out.is_null()).then(|| {
            // SAFETY: a non-null result is a static C string.
            let text = unsafe { CStr::from_ptr(out) };
            text.to_string_lossy().into_owned()
        });
        (rc, text)
    }

    #[test]
    fn error_name_of_known_code_is_the_enumerator() {
        assert_eq!(name_of(1), (0, Some("CUDA_ERROR_INVALID_VALUE".into())));
        assert_eq!(name_of(0), (0, Some("CUDA_SUCCESS".into())));
        assert_eq!(
            name_of(46),
            (0, Some("CUDA_ERROR_DEVICE_UNAVAILABLE".into()))
        );
    }

    #[test]
    fn error_name_of_unknown_code_is_invalid_value_and_null() {
        assert_eq!(name_of(12345), (Status::INVALID_VALUE.0, None));
    }

    #[test]
    fn error_string_describes_the_code() {
        let mut out: *const c_char = std::ptr::null();
        // SAFETY: a valid out-pointer.
        let rc = unsafe { cuGetErrorString(2, &mut out) };
        assert_eq!(rc, 0);
        // SAFETY: on success the result is a static C string.
        let text = unsafe { CStr::from_ptr(out) }.to_str().unwrap();
        assert_eq!(text, "out of memory");
    }

    #[test]
    fn error_lookups_with_null_out_pointer_are_invalid_value() {
        // SAFETY: null is rejected before use.
        let rc = unsafe { cuGetErrorName(0, std::ptr::null_mut()) };
        assert_eq!(rc, Status::INVALID_VALUE.0);
        // SAFETY: as above.
        let rc = unsafe { cuGetErrorString(0, std::ptr::null_mut()) };
        assert_eq!(rc, Status::INVALID_VALUE.0);
    }

    #[test]
    fn guard_turns_a_panic_into_unknown() {
        let rc = guard(|| panic!("boom"));
        assert_eq!(rc, Status::UNKNOWN.0);
        assert_eq!(guard(|| Err(Status::NOT_READY)), 600);
        assert_eq!(guard(|| Ok(())), 0);
    }
}
