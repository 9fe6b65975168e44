//! Stream flags and priorities, kept by the guest: the range an H100
//! reports (0 lowest, -5 highest), creation priorities clamped into it as
//! native does, and `cuStreamGetPriority` answered locally.

use std::collections::HashMap;
use std::ffi::{c_int, c_uint};
use std::sync::{LazyLock, Mutex};

use vgpu_spec::Status;

use crate::capture::per_thread;
use crate::ctx::session_ctx;
use crate::errors::{guard, non_null, write_out, CuResult};
use crate::state::{driver, lock};
use crate::stream::is_default_stream;
use crate::types::{CUresult, CUstream};

/// The lowest priority (the default).
pub(crate) const LEAST_PRIORITY: c_int = 0;
/// The highest priority.
pub(crate) const GREATEST_PRIORITY: c_int = -5;

/// Creation flags and priority of each created stream, by guest id.
static STREAMS: LazyLock<Mutex<HashMap<usize, (c_uint, c_int)>>> = LazyLock::new(Mutex::default);

/// A requested priority clamped into the supported range.
pub(crate) fn clamp(priority: c_int) -> c_int {
    priority.clamp(GREATEST_PRIORITY, LEAST_PRIORITY)
}

/// Remembers a created stream's flags and (clamped) priority.
pub(crate) fn note_stream(stream: CUstream, flags: c_uint, priority: c_int) {
    lock(&STREAMS).insert(stream.addr(), (flags, priority));
}

/// Forgets a destroyed stream.
pub(crate) fn forget_stream(stream: CUstream) {
    lock(&STREAMS).remove(&stream.addr());
}

/// The creation flags of a stream (0 for default or unknown streams).
pub(crate) fn stream_flags(stream: CUstream) -> c_uint {
    lock(&STREAMS)
        .get(&stream.addr())
        .map_or(0, |(flags, _)| *flags)
}

/// `cuCtxGetStreamPriorityRange`: either pointer may be NULL.
#[no_mangle]
pub unsafe extern "C" fn cuCtxGetStreamPriorityRange(
    least: *mut c_int,
    greatest: *mut c_int,
) -> CUresult {
    guard(|| {
        session_ctx()?;
        if !least.is_null() {
            // SAFETY: non-null, and per the API a writable `int`.
            unsafe { write_out(least, LEAST_PRIORITY) }?;
        }
        if !greatest.is_null() {
            // SAFETY: as above.
            unsafe { write_out(greatest, GREATEST_PRIORITY) }?;
        }
        Ok(())
    })
}

unsafe fn get_priority(stream: CUstream, priority: *mut c_int) -> CuResult<()> {
    let drv = driver()?;
    non_null(priority)?;
    let value = if is_default_stream(stream) {
        session_ctx()?;
        LEAST_PRIORITY
    } else {
        drv.streams.get(stream).ok_or(Status::INVALID_HANDLE)?;
        lock(&STREAMS)
            .get(&stream.addr())
            .map_or(LEAST_PRIORITY, |(_, p)| *p)
    };
    // SAFETY: non-null, and per the API a writable `int`.
    unsafe { write_out(priority, value) }
}

/// `cuStreamGetPriority`.
#[no_mangle]
pub unsafe extern "C" fn cuStreamGetPriority(stream: CUstream, priority: *mut c_int) -> CUresult {
    // SAFETY: forwards the caller's pointer under the same contract.
    guard(|| unsafe { get_priority(stream, priority) })
}

/// `cuStreamGetPriority_ptsz`.
#[no_mangle]
pub unsafe extern "C" fn cuStreamGetPriority_ptsz(
    stream: CUstream,
    priority: *mut c_int,
) -> CUresult {
    // SAFETY: forwards the caller's pointer under the same contract.
    guard(|| unsafe { get_priority(per_thread(stream), priority) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priorities_are_clamped_to_the_h100_range() {
        assert_eq!(clamp(0), 0);
        assert_eq!(clamp(-3), -3);
        assert_eq!(clamp(-100), GREATEST_PRIORITY);
        assert_eq!(clamp(7), LEAST_PRIORITY);
    }

    #[test]
    fn noted_stream_flags_are_remembered_until_forgotten() {
        let s: CUstream = std::ptr::without_provenance_mut(0x7777_0000);
        assert_eq!(stream_flags(s), 0);
        note_stream(s, 1, -2);
        assert_eq!(stream_flags(s), 1);
        forget_stream(s);
        assert_eq!(stream_flags(s), 0);
    }

    #[test]
    fn priority_calls_before_init_are_not_initialized() {
        let mut p = 0;
        // SAFETY: a valid out-pointer.
        let rc = unsafe { cuStreamGetPriority(std::ptr::null_mut(), &mut p) };
        assert_eq!(rc, Status::NOT_INITIALIZED.0);
        // SAFETY: valid out-pointers.
        let rc = unsafe { cuCtxGetStreamPriorityRange(&mut p, &mut p) };
        assert_eq!(rc, Status::NOT_INITIALIZED.0);
    }
}
