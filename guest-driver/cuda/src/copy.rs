//! Copies between host and device. A host range inside pinned memory is
//! handed to the backend as a scatter-gather entry pointing at it (zero
//! copy); any other host range is bounced through the transport's staging
//! area in chunks of at most half its capacity, so one chunk can be filled
//! while the previous one is in flight.
//!
//! - Sync HtoD from pageable memory: every chunk but the last is queued
//!   (with `FLAG_TRANSIENT_SOURCE`); the last is waited for, and any error
//!   of the earlier ones surfaces with it.
//! - Async HtoD from pageable memory: every chunk is queued with
//!   `FLAG_ASYNC | FLAG_TRANSIENT_SOURCE`; the backend snapshots each before
//!   answering, so the application may reuse its buffer at once.
//! - DtoH into pageable memory is synchronous even on the async entry
//!   points, as native CUDA does for pageable memory.
//! - Async copies from or into pinned memory are queued with `FLAG_ASYNC`.

use std::ffi::{c_uint, c_void};

use vgpu_spec::wire::{MemcpyDtoDReq, MemcpyHostReq, SgEntry, FLAG_ASYNC, FLAG_TRANSIENT_SOURCE};
use vgpu_spec::{Request, Status};

use crate::capture;
use crate::ctx::session_ctx;
use crate::errors::{guard, CuResult};
use crate::graph::Op;
use crate::state::Driver;
use crate::stream::backend_stream;
use crate::types::{CUdeviceptr, CUdeviceptrV1, CUresult, CUstream};

/// Chunks are whole pages when the staging area allows, so two of them fit
/// whatever alignment the staging allocator rounds to.
const CHUNK_ALIGN: usize = 4096;

/// Bytes per bounce chunk: half the staging area (so two chunks can be in
/// flight) rounded down to whole pages, at most the copy's length.
pub(crate) fn chunk_size(len: usize, staging_capacity: usize) -> CuResult<usize> {
    if staging_capacity == 0 {
        return Err(Status::OUT_OF_MEMORY);
    }
    let half = staging_capacity / 2;
    let aligned = if half >= CHUNK_ALIGN {
        half - half % CHUNK_ALIGN
    } else {
        half.max(1)
    };
    Ok(len.min(aligned))
}

/// Splits `[0, len)` into `(offset, length)` chunks.
pub(crate) fn chunks(len: usize, chunk: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..len)
        .step_by(chunk.max(1))
        .map(move |offset| (offset, chunk.min(len - offset)))
}

fn host_req(device_ptr: u64, stream: u64, len: usize) -> MemcpyHostReq {
    MemcpyHostReq {
        device_ptr: device_ptr.into(),
        stream: stream.into(),
        total_len: (len as u64).into(),
        nsegs: 1.into(),
        _pad: 0.into(),
    }
}

fn sg(gpa: u64, len: usize) -> [SgEntry; 1] {
    [SgEntry {
        gpa: gpa.into(),
        len: (len as u64).into(),
    }]
}

/// The common checks: context, stream, pointers. `None` means there is
/// nothing to copy.
fn prepare(
    dev_ptr: u64,
    host_null: bool,
    len: usize,
    stream: Option<CUstream>,
) -> CuResult<Option<(&'static Driver, u64, u64)>> {
    let (drv, ctx) = session_ctx()?;
    let handle = match stream {
        Some(stream) => backend_stream(drv, stream)?,
        None => 0,
    };
    if len == 0 {
        return Ok(None);
    }
    if host_null || dev_ptr == 0 {
        return Err(Status::INVALID_VALUE);
    }
    dev_ptr
        .checked_add(len as u64)
        .ok_or(Status::INVALID_VALUE)?;
    if stream.is_none() {
        capture::on_legacy_sync()?;
    }
    Ok(Some((drv, ctx, handle)))
}

/// Host to device; `stream` set means the async entry point.
///
/// # Safety
/// `src` must be readable for `len` bytes.
pub(crate) unsafe fn htod(
    dst: u64,
    src: *const c_void,
    len: usize,
    stream: Option<CUstream>,
) -> CuResult<()> {
    let Some((drv, ctx, handle)) = prepare(dst, src.is_null(), len, stream)? else {
        return Ok(());
    };
    if let Some(stream) = stream {
        let addr = src.expose_provenance();
        if capture::record(stream, ctx, || Op::HtoD {
            dst,
            src: addr,
            len,
        })? {
            return Ok(());
        }
    }
    // SAFETY: the caller's contract.
    unsafe { htod_on(drv, ctx, handle, dst, src, len, stream.is_some()) }
}

/// Host to device on backend stream `handle`, checks done.
///
/// # Safety
/// `src` must be readable for `len` bytes.
pub(crate) unsafe fn htod_on(
    drv: &Driver,
    ctx: u64,
    handle: u64,
    dst: u64,
    src: *const c_void,
    len: usize,
    asynchronous: bool,
) -> CuResult<()> {
    if let Some(gpa) = drv.translate(src.cast(), len) {
        let segs = sg(gpa, len);
        let req = Request::MemcpyHtoD(host_req(dst, handle, len), &segs);
        return if asynchronous {
            drv.submit(ctx, FLAG_ASYNC, &req, None)
        } else {
            drv.call_settled(ctx, 0, &req, &mut Vec::new())
        };
    }
    if !asynchronous {
        drv.settle(ctx)?;
    }
    let chunk = chunk_size(len, drv.staging_capacity())?;
    for (offset, n) in chunks(len, chunk) {
        let mut staging = drv.staging(n)?;
        // SAFETY: `src` is readable for `len` bytes (caller's contract) and
        // `offset + n <= len`.
        let part = unsafe { std::slice::from_raw_parts(src.cast::<u8>().add(offset), n) };
        staging.as_mut_slice()[..n].copy_from_slice(part);
        let segs = sg(staging.gpa(), n);
        let req = Request::MemcpyHtoD(host_req(dst + offset as u64, handle, n), &segs);
        if asynchronous {
            drv.submit(ctx, FLAG_ASYNC | FLAG_TRANSIENT_SOURCE, &req, Some(staging))?;
        } else if offset + n == len {
            drv.call_settled(ctx, FLAG_TRANSIENT_SOURCE, &req, &mut Vec::new())?;
        } else {
            drv.submit(ctx, FLAG_TRANSIENT_SOURCE, &req, Some(staging))?;
        }
    }
    Ok(())
}

/// Device to host; `stream` set means the async entry point (which is
/// synchronous unless `dst` is pinned).
///
/// # Safety
/// `dst` must be writable for `len` bytes.
pub(crate) unsafe fn dtoh(
    dst: *mut c_void,
    src: u64,
    len: usize,
    stream: Option<CUstream>,
) -> CuResult<()> {
    let Some((drv, ctx, handle)) = prepare(src, dst.is_null(), len, stream)? else {
        return Ok(());
    };
    if let Some(stream) = stream {
        let addr = dst.expose_provenance();
        if capture::record(stream, ctx, || Op::DtoH {
            dst: addr,
            src,
            len,
        })? {
            return Ok(());
        }
    }
    // SAFETY: the caller's contract.
    unsafe { dtoh_on(drv, ctx, handle, dst, src, len, stream.is_some()) }
}

/// Device to host on backend stream `handle`, checks done; asynchronous
/// only into pinned memory.
///
/// # Safety
/// `dst` must be writable for `len` bytes.
pub(crate) unsafe fn dtoh_on(
    drv: &Driver,
    ctx: u64,
    handle: u64,
    dst: *mut c_void,
    src: u64,
    len: usize,
    asynchronous: bool,
) -> CuResult<()> {
    if let Some(gpa) = drv.translate(dst.cast_const().cast(), len) {
        let segs = sg(gpa, len);
        let req = Request::MemcpyDtoH(host_req(src, handle, len), &segs);
        return if asynchronous {
            drv.submit(ctx, FLAG_ASYNC, &req, None)
        } else {
            drv.call_settled(ctx, 0, &req, &mut Vec::new())
        };
    }
    let chunk = chunk_size(len, drv.staging_capacity())?;
    for (offset, n) in chunks(len, chunk) {
        let staging = drv.staging(n)?;
        let segs = sg(staging.gpa(), n);
        let req = Request::MemcpyDtoH(host_req(src + offset as u64, handle, n), &segs);
        drv.call(ctx, 0, &req, &mut Vec::new())?;
        // SAFETY: `dst` is writable for `len` bytes (caller's contract),
        // `offset + n <= len`, and the staging buffer is distinct memory.
        unsafe {
            std::ptr::copy_nonoverlapping(
                staging.as_slice().as_ptr(),
                dst.cast::<u8>().add(offset),
                n,
            );
        }
    }
    drv.settle(ctx)
}

/// Device to device; `stream` set means async.
pub(crate) fn dtod(dst: u64, src: u64, len: usize, stream: Option<CUstream>) -> CuResult<()> {
    let Some((drv, ctx, handle)) = prepare(dst, src == 0, len, stream)? else {
        return Ok(());
    };
    if let Some(stream) = stream {
        let len = len as u64;
        if capture::record(stream, ctx, || Op::DtoD { dst, src, len })? {
            return Ok(());
        }
    }
    let req = Request::MemcpyDtoD(MemcpyDtoDReq {
        dst: dst.into(),
        src: src.into(),
        size: (len as u64).into(),
        stream: handle.into(),
    });
    match stream {
        Some(_) => drv.submit(ctx, FLAG_ASYNC, &req, None),
        None => drv.call_settled(ctx, 0, &req, &mut Vec::new()),
    }
}

/// `cuMemcpyHtoD_v2`.
#[no_mangle]
pub unsafe extern "C" fn cuMemcpyHtoD_v2(
    dst: CUdeviceptr,
    src: *const c_void,
    byte_count: usize,
) -> CUresult {
    // SAFETY: per the API `src` is readable for `byte_count` bytes.
    guard(|| unsafe { htod(dst, src, byte_count, None) })
}

/// `cuMemcpyHtoD` (legacy 32-bit address and size).
#[no_mangle]
pub unsafe extern "C" fn cuMemcpyHtoD(
    dst: CUdeviceptrV1,
    src: *const c_void,
    byte_count: c_uint,
) -> CUresult {
    // SAFETY: per the API `src` is readable for `byte_count` bytes.
    guard(|| unsafe { htod(dst.into(), src, byte_count as usize, None) })
}

/// `cuMemcpyHtoDAsync_v2`.
#[no_mangle]
pub unsafe extern "C" fn cuMemcpyHtoDAsync_v2(
    dst: CUdeviceptr,
    src: *const c_void,
    byte_count: usize,
    stream: CUstream,
) -> CUresult {
    // SAFETY: per the API `src` is readable for `byte_count` bytes.
    guard(|| unsafe { htod(dst, src, byte_count, Some(stream)) })
}

/// `cuMemcpyHtoDAsync` (legacy 32-bit address and size).
#[no_mangle]
pub unsafe extern "C" fn cuMemcpyHtoDAsync(
    dst: CUdeviceptrV1,
    src: *const c_void,
    byte_count: c_uint,
    stream: CUstream,
) -> CUresult {
    // SAFETY: per the API `src` is readable for `byte_count` bytes.
    guard(|| unsafe { htod(dst.into(), src, byte_count as usize, Some(stream)) })
}

/// `cuMemcpyDtoH_v2`.
#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoH_v2(
    dst: *mut c_void,
    src: CUdeviceptr,
    byte_count: usize,
) -> CUresult {
    // SAFETY: per the API `dst` is writable for `byte_count` bytes.
    guard(|| unsafe { dtoh(dst, src, byte_count, None) })
}

/// `cuMemcpyDtoH` (legacy 32-bit address and size).
#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoH(
    dst: *mut c_void,
    src: CUdeviceptrV1,
    byte_count: c_uint,
) -> CUresult {
    // SAFETY: per the API `dst` is writable for `byte_count` bytes.
    guard(|| unsafe { dtoh(dst, src.into(), byte_count as usize, None) })
}

/// `cuMemcpyDtoHAsync_v2`.
#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoHAsync_v2(
    dst: *mut c_void,
    src: CUdeviceptr,
    byte_count: usize,
    stream: CUstream,
) -> CUresult {
    // SAFETY: per the API `dst` is writable for `byte_count` bytes.
    guard(|| unsafe { dtoh(dst, src, byte_count, Some(stream)) })
}

/// `cuMemcpyDtoHAsync` (legacy 32-bit address and size).
#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoHAsync(
    dst: *mut c_void,
    src: CUdeviceptrV1,
    byte_count: c_uint,
    stream: CUstream,
) -> CUresult {
    // SAFETY: per the API `dst` is writable for `byte_count` bytes.
    guard(|| unsafe { dtoh(dst, src.into(), byte_count as usize, Some(stream)) })
}

/// `cuMemcpyDtoD_v2`.
#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoD_v2(
    dst: CUdeviceptr,
    src: CUdeviceptr,
    byte_count: usize,
) -> CUresult {
    guard(|| dtod(dst, src, byte_count, None))
}

/// `cuMemcpyDtoD` (legacy 32-bit addresses and size).
#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoD(
    dst: CUdeviceptrV1,
    src: CUdeviceptrV1,
    byte_count: c_uint,
) -> CUresult {
    guard(|| dtod(dst.into(), src.into(), byte_count as usize, None))
}

/// `cuMemcpyDtoDAsync_v2`.
#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoDAsync_v2(
    dst: CUdeviceptr,
    src: CUdeviceptr,
    byte_count: usize,
    stream: CUstream,
) -> CUresult {
    guard(|| dtod(dst, src, byte_count, Some(stream)))
}

/// `cuMemcpyDtoDAsync` (legacy 32-bit addresses and size).
#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoDAsync(
    dst: CUdeviceptrV1,
    src: CUdeviceptrV1,
    byte_count: c_uint,
    stream: CUstream,
) -> CUresult {
    guard(|| dtod(dst.into(), src.into(), byte_count as usize, Some(stream)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_half_the_staging_area_at_most() {
        assert_eq!(chunk_size(100, 64), Ok(32));
        assert_eq!(chunk_size(10, 64), Ok(10));
        assert_eq!(chunk_size(1 << 30, 3_321_856), Ok(1_658_880));
        assert_eq!(chunk_size(1 << 30, 64 << 20), Ok(32 << 20));
        assert_eq!(chunk_size(10, 1), Ok(1));
        assert_eq!(chunk_size(10, 0), Err(Status::OUT_OF_MEMORY));
    }

    #[test]
    fn chunks_cover_the_copy_exactly() {
        let parts: Vec<_> = chunks(100, 32).collect();
        assert_eq!(parts, vec![(0, 32), (32, 32), (64, 32), (96, 4)]);
        assert_eq!(chunks(0, 32).count(), 0);
        assert_eq!(chunks(32, 32).collect::<Vec<_>>(), vec![(0, 32)]);
    }

    #[test]
    fn copies_before_init_are_not_initialized() {
        let data = [0u8; 4];
        // SAFETY: `data` is readable for 4 bytes.
        let rc = unsafe { cuMemcpyHtoD_v2(0x1000, data.as_ptr().cast(), 4) };
        assert_eq!(rc, Status::NOT_INITIALIZED.0);
    }
}
