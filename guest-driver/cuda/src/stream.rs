//! Streams. A `CUstream` is a guest id from [`crate::handles`]; NULL and
//! `CU_STREAM_LEGACY` mean the backend's default stream (handle 0),
//! `CU_STREAM_PER_THREAD` the calling thread's per-thread default stream
//! ([`crate::ptds`]). Requests about a created stream carry the stream's
//! own context; default-stream requests the current one.

use std::ffi::{c_int, c_uint};

use vgpu_spec::wire::{HandleReq, HandleResp, StreamCreateReq, StreamWaitEventReq};
use vgpu_spec::{Request, Status};

use crate::ctx::session_ctx;
use crate::errors::{guard, non_null, write_out, CuResult};
use crate::state::{driver, parse, Driver};
use crate::types::{CUevent, CUresult, CUstream, CU_STREAM_LEGACY, CU_STREAM_PER_THREAD};

/// True for the pointer values that name the default stream.
pub(crate) fn is_default_stream(stream: CUstream) -> bool {
    matches!(stream.addr(), 0 | CU_STREAM_LEGACY | CU_STREAM_PER_THREAD)
}

/// The backend handle of a stream (0 for the default stream).
pub(crate) fn backend_stream(drv: &Driver, stream: CUstream) -> CuResult<u64> {
    if stream.addr() == CU_STREAM_PER_THREAD {
        let (_, ctx) = session_ctx()?;
        return crate::ptds::per_thread_stream(drv, ctx);
    }
    if is_default_stream(stream) {
        return Ok(0);
    }
    drv.streams
        .get(stream)
        .map(|entry| entry.backend)
        .ok_or(Status::INVALID_HANDLE)
}

/// The driver, the context to put in the header and the backend handle for
/// a request about `stream`.
pub(crate) fn stream_target(stream: CUstream) -> CuResult<(&'static Driver, u64, u64)> {
    if stream.addr() == CU_STREAM_PER_THREAD {
        let (drv, ctx) = session_ctx()?;
        return Ok((drv, ctx, crate::ptds::per_thread_stream(drv, ctx)?));
    }
    if is_default_stream(stream) {
        let (drv, ctx) = session_ctx()?;
        return Ok((drv, ctx, 0));
    }
    let drv = driver()?;
    let entry = drv.streams.get(stream).ok_or(Status::INVALID_HANDLE)?;
    Ok((drv, entry.ctx, entry.backend))
}

unsafe fn create(ph_stream: *mut CUstream, flags: c_uint, priority: c_int) -> CuResult<()> {
    let (drv, ctx) = session_ctx()?;
    non_null(ph_stream)?;
    let priority = crate::priority::clamp(priority);
    let req = StreamCreateReq {
        flags: flags.into(),
        priority: priority.into(),
    };
    let mut body = Vec::new();
    drv.call(ctx, 0, &Request::StreamCreate(req), &mut body)?;
    let (resp, _) = parse::<HandleResp>(&body, "STREAM_CREATE")?;
    let id = drv.streams.insert(resp.handle.get(), ctx);
    crate::priority::note_stream(id, flags, priority);
    // SAFETY: non-null, and per the API a writable `CUstream`.
    unsafe { write_out(ph_stream, id) }
}

/// `cuStreamCreate`.
#[no_mangle]
pub unsafe extern "C" fn cuStreamCreate(ph_stream: *mut CUstream, flags: c_uint) -> CUresult {
    // SAFETY: forwards the caller's pointer under the same contract.
    guard(|| unsafe { create(ph_stream, flags, 0) })
}

/// `cuStreamCreateWithPriority`.
#[no_mangle]
pub unsafe extern "C" fn cuStreamCreateWithPriority(
    ph_stream: *mut CUstream,
    flags: c_uint,
    priority: c_int,
) -> CUresult {
    // SAFETY: forwards the caller's pointer under the same contract.
    guard(|| unsafe { create(ph_stream, flags, priority) })
}

fn destroy(stream: CUstream) -> CuResult<()> {
    let drv = driver()?;
    if is_default_stream(stream) {
        return Err(Status::INVALID_HANDLE);
    }
    let entry = drv.streams.get(stream).ok_or(Status::INVALID_HANDLE)?;
    let req = HandleReq {
        handle: entry.backend.into(),
    };
    let result = drv.call_release(entry.ctx, &Request::StreamDestroy(req), &mut Vec::new());
    if result.is_ok() || result == Err(Status::INVALID_HANDLE) {
        drv.streams.remove(stream);
        crate::priority::forget_stream(stream);
        crate::capture::forget_stream(stream);
    }
    result
}

/// `cuStreamDestroy`.
#[no_mangle]
pub unsafe extern "C" fn cuStreamDestroy(stream: CUstream) -> CUresult {
    guard(|| destroy(stream))
}

/// `cuStreamDestroy_v2`.
#[no_mangle]
pub unsafe extern "C" fn cuStreamDestroy_v2(stream: CUstream) -> CUresult {
    guard(|| destroy(stream))
}

/// `cuStreamSynchronize`: waits for the stream; returns earlier async errors.
#[no_mangle]
pub unsafe extern "C" fn cuStreamSynchronize(stream: CUstream) -> CUresult {
    guard(|| {
        let (drv, ctx, handle) = stream_target(stream)?;
        crate::capture::on_stream_sync(stream)?;
        let req = HandleReq {
            handle: handle.into(),
        };
        drv.call_settled(ctx, 0, &Request::StreamSynchronize(req), &mut Vec::new())
    })
}

/// `cuStreamQuery`: success when idle, `CUDA_ERROR_NOT_READY` otherwise.
#[no_mangle]
pub unsafe extern "C" fn cuStreamQuery(stream: CUstream) -> CUresult {
    guard(|| {
        let (drv, ctx, handle) = stream_target(stream)?;
        crate::capture::on_stream_sync(stream)?;
        let req = HandleReq {
            handle: handle.into(),
        };
        drv.call(ctx, 0, &Request::StreamQuery(req), &mut Vec::new())
    })
}

/// `cuStreamWaitEvent`: queued; later work on the stream waits for the event.
#[no_mangle]
pub unsafe extern "C" fn cuStreamWaitEvent(
    stream: CUstream,
    event: CUevent,
    flags: c_uint,
) -> CUresult {
    guard(|| {
        let (drv, ctx, handle) = stream_target(stream)?;
        let entry = drv.events.get(event).ok_or(Status::INVALID_HANDLE)?;
        if crate::capture::wait_event(stream, event, flags, ctx, entry.backend)? {
            return Ok(());
        }
        let event = entry;
        let req = StreamWaitEventReq {
            stream: handle.into(),
            event: event.backend.into(),
            flags: flags.into(),
            _pad: 0.into(),
        };
        drv.submit(ctx, 0, &Request::StreamWaitEvent(req), None)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn null_legacy_and_per_thread_streams_are_the_default_stream() {
        for value in [0usize, 1, 2] {
            assert!(is_default_stream(std::ptr::without_provenance_mut(value)));
        }
        assert!(!is_default_stream(std::ptr::without_provenance_mut(0x1000)));
    }

    #[test]
    fn stream_calls_before_init_are_not_initialized() {
        let mut s: CUstream = std::ptr::null_mut();
        // SAFETY: a valid out-pointer.
        let rc = unsafe { cuStreamCreate(&mut s, 0) };
        assert_eq!(rc, Status::NOT_INITIALIZED.0);
        // SAFETY: the default stream needs no pointer validity.
        let rc = unsafe { cuStreamSynchronize(std::ptr::null_mut()) };
        assert_eq!(rc, Status::NOT_INITIALIZED.0);
    }
}
