//! Events. A `CUevent` is a guest id from [`crate::handles`]; requests
//! about an event carry the event's own context. Recording is queued;
//! synchronize, query and elapsed time wait for the backend.

use std::ffi::c_uint;

use vgpu_spec::wire::{
    ElapsedResp, EventCreateReq, EventElapsedReq, EventRecordReq, HandleReq, HandleResp,
};
use vgpu_spec::{Request, Status};

use crate::ctx::session_ctx;
use crate::errors::{guard, non_null, write_out, CuResult};
use crate::handles::Entry;
use crate::state::{driver, parse, Driver};
use crate::stream::backend_stream;
use crate::types::{CUevent, CUresult, CUstream};

fn lookup(event: CUevent) -> CuResult<(&'static Driver, Entry)> {
    let drv = driver()?;
    let entry = drv.events.get(event).ok_or(Status::INVALID_HANDLE)?;
    Ok((drv, entry))
}

/// `cuEventCreate`.
#[no_mangle]
pub unsafe extern "C" fn cuEventCreate(ph_event: *mut CUevent, flags: c_uint) -> CUresult {
    guard(|| {
        let (drv, ctx) = session_ctx()?;
        non_null(ph_event)?;
        let req = EventCreateReq {
            flags: flags.into(),
            _pad: 0.into(),
        };
        let mut body = Vec::new();
        drv.call(ctx, 0, &Request::EventCreate(req), &mut body)?;
        let (resp, _) = parse::<HandleResp>(&body, "EVENT_CREATE")?;
        let id = drv.events.insert(resp.handle.get(), ctx);
        // SAFETY: non-null, and per the API a writable `CUevent`.
        unsafe { write_out(ph_event, id) }
    })
}

/// `cuEventRecord`: queued on the stream.
#[no_mangle]
pub unsafe extern "C" fn cuEventRecord(event: CUevent, stream: CUstream) -> CUresult {
    guard(|| {
        let (drv, entry) = lookup(event)?;
        let handle = backend_stream(drv, stream)?;
        if crate::capture::record_event(event, stream)? {
            return Ok(());
        }
        let req = EventRecordReq {
            event: entry.backend.into(),
            stream: handle.into(),
        };
        drv.submit(entry.ctx, 0, &Request::EventRecord(req), None)
    })
}

/// `CU_EVENT_RECORD_EXTERNAL`: during stream capture, an external event
/// node; outside capture, an ordinary record.
const EVENT_RECORD_EXTERNAL: c_uint = 1;

/// `cuEventRecordWithFlags`: `cuEventRecord` for the flags this library
/// knows (a capture records the event as `cuEventRecord` does).
#[no_mangle]
pub unsafe extern "C" fn cuEventRecordWithFlags(
    event: CUevent,
    stream: CUstream,
    flags: c_uint,
) -> CUresult {
    if flags & !EVENT_RECORD_EXTERNAL != 0 {
        return guard(|| Err(Status::INVALID_VALUE));
    }
    // SAFETY: forwards the caller's arguments under the same contract.
    unsafe { cuEventRecord(event, stream) }
}

/// `cuEventSynchronize`: waits for the event; returns earlier async errors.
#[no_mangle]
pub unsafe extern "C" fn cuEventSynchronize(event: CUevent) -> CUresult {
    guard(|| {
        let (drv, entry) = lookup(event)?;
        crate::capture::on_event_sync(event)?;
        let req = HandleReq {
            handle: entry.backend.into(),
        };
        drv.call_settled(
            entry.ctx,
            0,
            &Request::EventSynchronize(req),
            &mut Vec::new(),
        )
    })
}

/// `cuEventQuery`: success when complete, `CUDA_ERROR_NOT_READY` otherwise.
#[no_mangle]
pub unsafe extern "C" fn cuEventQuery(event: CUevent) -> CUresult {
    guard(|| {
        let (drv, entry) = lookup(event)?;
        crate::capture::on_event_sync(event)?;
        let req = HandleReq {
            handle: entry.backend.into(),
        };
        drv.call(entry.ctx, 0, &Request::EventQuery(req), &mut Vec::new())
    })
}

unsafe fn elapsed(ms: *mut f32, start: CUevent, end: CUevent) -> CuResult<()> {
    let (drv, first) = lookup(start)?;
    non_null(ms)?;
    let (_, last) = lookup(end)?;
    let req = EventElapsedReq {
        start: first.backend.into(),
        end: last.backend.into(),
    };
    let mut body = Vec::new();
    drv.call(first.ctx, 0, &Request::EventElapsed(req), &mut body)?;
    let (resp, _) = parse::<ElapsedResp>(&body, "EVENT_ELAPSED")?;
    // SAFETY: non-null, and per the API a writable `float`.
    unsafe { write_out(ms, f32::from_bits(resp.millis_bits.get())) }
}

/// `cuEventElapsedTime`: milliseconds between two recorded events.
#[no_mangle]
pub unsafe extern "C" fn cuEventElapsedTime(
    ms: *mut f32,
    start: CUevent,
    end: CUevent,
) -> CUresult {
    // SAFETY: forwards the caller's pointer under the same contract.
    guard(|| unsafe { elapsed(ms, start, end) })
}

/// `cuEventElapsedTime_v2`.
#[no_mangle]
pub unsafe extern "C" fn cuEventElapsedTime_v2(
    ms: *mut f32,
    start: CUevent,
    end: CUevent,
) -> CUresult {
    // SAFETY: forwards the caller's pointer under the same contract.
    guard(|| unsafe { elapsed(ms, start, end) })
}

fn destroy(event: CUevent) -> CuResult<()> {
    let (drv, entry) = lookup(event)?;
    let req = HandleReq {
        handle: entry.backend.into(),
    };
    let result = drv.call_release(entry.ctx, &Request::EventDestroy(req), &mut Vec::new());
    if result.is_ok() || result == Err(Status::INVALID_HANDLE) {
        drv.events.remove(event);
    }
    result
}

/// `cuEventDestroy`.
#[no_mangle]
pub unsafe extern "C" fn cuEventDestroy(event: CUevent) -> CUresult {
    guard(|| destroy(event))
}

/// `cuEventDestroy_v2`.
#[no_mangle]
pub unsafe extern "C" fn cuEventDestroy_v2(event: CUevent) -> CUresult {
    guard(|| destroy(event))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_calls_before_init_are_not_initialized() {
        let mut e: CUevent = std::ptr::null_mut();
        // SAFETY: a valid out-pointer.
        let rc = unsafe { cuEventCreate(&mut e, 0) };
        assert_eq!(rc, Status::NOT_INITIALIZED.0);
        // SAFETY: the event id is only looked up, never dereferenced.
        let rc = unsafe { cuEventQuery(std::ptr::without_provenance_mut(0x1000)) };
        assert_eq!(rc, Status::NOT_INITIALIZED.0);
    }

    #[test]
    fn record_with_unknown_flags_is_invalid_value_and_known_flags_record() {
        let event = std::ptr::without_provenance_mut(0x1000);
        // SAFETY: the event id is only looked up, never dereferenced.
        let rc = unsafe { cuEventRecordWithFlags(event, std::ptr::null_mut(), 4) };
        assert_eq!(rc, Status::INVALID_VALUE.0);
        for flags in [0, EVENT_RECORD_EXTERNAL] {
            // SAFETY: as above.
            let rc = unsafe { cuEventRecordWithFlags(event, std::ptr::null_mut(), flags) };
            assert_eq!(rc, Status::NOT_INITIALIZED.0);
        }
    }
}
