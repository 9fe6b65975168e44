//! Device memory (allocation, free, info, memset) and pinned host memory.
//! Pinned memory comes from the transport: a memfd region shared with the
//! backend, so copies to and from it need no bounce.

use std::ffi::{c_uchar, c_uint, c_ushort, c_void};

use vgpu_spec::wire::{HandleReq, HandleResp, MemAllocReq, MemInfoResp, MemsetReq, FLAG_ASYNC};
use vgpu_spec::{Request, Status};

use crate::ctx::{live_contexts, session_ctx};
use crate::errors::{guard, non_null, write_out, CuResult};
use crate::graph::Op;
use crate::state::{driver, parse};
use crate::stream::backend_stream;
use crate::types::{CUdeviceptr, CUdeviceptrV1, CUresult, CUstream};

pub(crate) fn alloc(size: usize) -> CuResult<u64> {
    let (drv, ctx) = session_ctx()?;
    if size == 0 {
        return Err(Status::INVALID_VALUE);
    }
    let req = MemAllocReq {
        size: (size as u64).into(),
    };
    let mut body = Vec::new();
    drv.call(ctx, 0, &Request::MemAlloc(req), &mut body)?;
    let (resp, _) = parse::<HandleResp>(&body, "MEM_ALLOC")?;
    Ok(resp.handle.get())
}

/// Frees device memory. NULL is accepted and does nothing, as natively:
/// the runtime's `cudaFree(0)` (cuBLAS's way to make sure a context
/// exists) reaches the driver as `cuMemFree(0)` and must succeed.
pub(crate) fn free(dptr: u64) -> CuResult<()> {
    let (drv, ctx) = session_ctx()?;
    if dptr == 0 {
        return Ok(());
    }
    let req = HandleReq {
        handle: dptr.into(),
    };
    let result = drv.call_release(ctx, &Request::MemFree(req), &mut Vec::new());
    // Whatever the answer, the address no longer names a pool allocation.
    crate::mempool::freed(dptr);
    result
}

fn mem_info() -> CuResult<(u64, u64)> {
    let (drv, ctx) = session_ctx()?;
    let mut body = Vec::new();
    drv.call(ctx, 0, &Request::MemGetInfo, &mut body)?;
    let (resp, _) = parse::<MemInfoResp>(&body, "MEM_GET_INFO")?;
    Ok((resp.free.get(), resp.total.get()))
}

/// `cuMemAlloc_v2`.
#[no_mangle]
pub unsafe extern "C" fn cuMemAlloc_v2(dptr: *mut CUdeviceptr, bytesize: usize) -> CUresult {
    guard(|| {
        non_null(dptr)?;
        crate::capture::on_unsafe_call()?;
        let addr = alloc(bytesize)?;
        // SAFETY: non-null, and per the API a writable `CUdeviceptr`.
        unsafe { write_out(dptr, addr) }
    })
}

/// `cuMemAlloc` (legacy: 32-bit address; fails if the allocation lies
/// above 4 GiB).
#[no_mangle]
pub unsafe extern "C" fn cuMemAlloc(dptr: *mut CUdeviceptrV1, bytesize: c_uint) -> CUresult {
    guard(|| {
        non_null(dptr)?;
        crate::capture::on_unsafe_call()?;
        let addr = alloc(bytesize as usize)?;
        let Ok(narrow) = CUdeviceptrV1::try_from(addr) else {
            // Best effort: the allocation cannot be returned through this ABI.
            let _ = free(addr);
            return Err(Status::OUT_OF_MEMORY);
        };
        // SAFETY: non-null, and per the API a writable `CUdeviceptr_v1`.
        unsafe { write_out(dptr, narrow) }
    })
}

/// `cuMemAllocAsync`: allocated at once (the allocation is valid before
/// anything queued later on the stream runs), and accounted to the
/// device's current memory pool.
#[no_mangle]
pub unsafe extern "C" fn cuMemAllocAsync(
    dptr: *mut CUdeviceptr,
    bytesize: usize,
    stream: CUstream,
) -> CUresult {
    guard(|| {
        non_null(dptr)?;
        backend_stream(driver()?, stream)?;
        let addr = alloc(bytesize)?;
        crate::mempool::allocated_from_current(addr, bytesize);
        // SAFETY: non-null, and per the API a writable `CUdeviceptr`.
        unsafe { write_out(dptr, addr) }
    })
}

/// `cuMemFree_v2`.
#[no_mangle]
pub unsafe extern "C" fn cuMemFree_v2(dptr: CUdeviceptr) -> CUresult {
    guard(|| {
        crate::capture::on_unsafe_call()?;
        free(dptr)
    })
}

/// `cuMemFree` (legacy 32-bit address).
#[no_mangle]
pub unsafe extern "C" fn cuMemFree(dptr: CUdeviceptrV1) -> CUresult {
    guard(|| {
        crate::capture::on_unsafe_call()?;
        free(dptr.into())
    })
}

/// `cuMemFreeAsync`: freed when the backend reaches the request (the backend
/// frees device memory only once work already queued has stopped using it).
#[no_mangle]
pub unsafe extern "C" fn cuMemFreeAsync(dptr: CUdeviceptr, stream: CUstream) -> CUresult {
    guard(|| {
        backend_stream(driver()?, stream)?;
        free(dptr)
    })
}

/// `cuMemGetInfo_v2`: free and total bytes of the slice.
#[no_mangle]
pub unsafe extern "C" fn cuMemGetInfo_v2(free_out: *mut usize, total_out: *mut usize) -> CUresult {
    guard(|| {
        non_null(free_out)?;
        non_null(total_out)?;
        let (free, total) = mem_info()?;
        let clamp = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
        // SAFETY: both non-null, and per the API writable `size_t`s.
        unsafe {
            write_out(free_out, clamp(free))?;
            write_out(total_out, clamp(total))
        }
    })
}

/// `cuMemGetInfo` (legacy: 32-bit results, saturated).
#[no_mangle]
pub unsafe extern "C" fn cuMemGetInfo(free_out: *mut c_uint, total_out: *mut c_uint) -> CUresult {
    guard(|| {
        non_null(free_out)?;
        non_null(total_out)?;
        let (free, total) = mem_info()?;
        let clamp = |v: u64| c_uint::try_from(v).unwrap_or(c_uint::MAX);
        // SAFETY: both non-null, and per the API writable `unsigned int`s.
        unsafe {
            write_out(free_out, clamp(free))?;
            write_out(total_out, clamp(total))
        }
    })
}

/// Pinned host memory: a new region shared with the backend.
unsafe fn alloc_host(pp: *mut *mut c_void, bytesize: usize) -> CuResult<()> {
    let (drv, _) = session_ctx()?;
    non_null(pp)?;
    if bytesize == 0 {
        return Err(Status::INVALID_VALUE);
    }
    let ptr = drv.alloc_pinned(bytesize)?;
    // SAFETY: non-null, and per the API a writable pointer slot.
    unsafe { write_out(pp, ptr.cast::<c_void>()) }
}

/// `cuMemAllocHost_v2`.
#[no_mangle]
pub unsafe extern "C" fn cuMemAllocHost_v2(pp: *mut *mut c_void, bytesize: usize) -> CUresult {
    // SAFETY: forwards the caller's pointer under the same contract.
    guard(|| unsafe { alloc_host(pp, bytesize) })
}

/// `cuMemAllocHost` (legacy 32-bit size).
#[no_mangle]
pub unsafe extern "C" fn cuMemAllocHost(pp: *mut *mut c_void, bytesize: c_uint) -> CUresult {
    // SAFETY: forwards the caller's pointer under the same contract.
    guard(|| unsafe { alloc_host(pp, bytesize as usize) })
}

/// `cuMemHostAlloc`: the flags (portable, mapped, write-combined) are
/// accepted; all pinned memory is shared with the device the same way.
#[no_mangle]
pub unsafe extern "C" fn cuMemHostAlloc(
    pp: *mut *mut c_void,
    bytesize: usize,
    _flags: c_uint,
) -> CUresult {
    // SAFETY: forwards the caller's pointer under the same contract.
    guard(|| unsafe { alloc_host(pp, bytesize) })
}

/// `cuMemFreeHost`: waits for every context first (as native CUDA does), so
/// no queued copy still uses the region when it is withdrawn. Errors of that
/// earlier work are left for the next synchronizing call.
#[no_mangle]
pub unsafe extern "C" fn cuMemFreeHost(p: *mut c_void) -> CUresult {
    guard(|| {
        let drv = driver()?;
        non_null(p)?;
        if drv.translate(p.cast_const().cast(), 1).is_none() {
            return Err(Status::INVALID_VALUE);
        }
        for ctx in live_contexts(drv) {
            let req = Request::CtxSynchronize;
            match drv.call_unchecked(ctx, 0, &req, &mut Vec::new()) {
                Err(Status::DEVICE_UNAVAILABLE) => return Err(Status::DEVICE_UNAVAILABLE),
                _ => continue,
            }
        }
        drv.free_pinned(p.cast())
    })
}

/// Fills `count` elements of `elem_size` bytes; `stream` set means async.
fn memset(
    dst: u64,
    value: u32,
    elem_size: u32,
    count: usize,
    stream: Option<CUstream>,
) -> CuResult<()> {
    let (drv, ctx) = session_ctx()?;
    let handle = match stream {
        Some(stream) => backend_stream(drv, stream)?,
        None => 0,
    };
    if dst == 0 {
        return Err(Status::INVALID_VALUE);
    }
    if count == 0 {
        return Ok(());
    }
    match stream {
        Some(stream) => {
            let op = || Op::Memset {
                dst,
                value,
                elem_size,
                count: count as u64,
            };
            if crate::capture::record(stream, ctx, op)? {
                return Ok(());
            }
        }
        None => crate::capture::on_legacy_sync()?,
    }
    let req = MemsetReq {
        dst: dst.into(),
        value: value.into(),
        elem_size: elem_size.into(),
        count: (count as u64).into(),
        stream: handle.into(),
    };
    match stream {
        Some(_) => drv.submit(ctx, FLAG_ASYNC, &Request::Memset(req), None),
        None => drv.call_settled(ctx, 0, &Request::Memset(req), &mut Vec::new()),
    }
}

/// `cuMemsetD8_v2`.
#[no_mangle]
pub unsafe extern "C" fn cuMemsetD8_v2(dst: CUdeviceptr, uc: c_uchar, n: usize) -> CUresult {
    guard(|| memset(dst, uc.into(), 1, n, None))
}

/// `cuMemsetD8` (legacy 32-bit address and count).
#[no_mangle]
pub unsafe extern "C" fn cuMemsetD8(dst: CUdeviceptrV1, uc: c_uchar, n: c_uint) -> CUresult {
    guard(|| memset(dst.into(), uc.into(), 1, n as usize, None))
}

/// `cuMemsetD16_v2`.
#[no_mangle]
pub unsafe extern "C" fn cuMemsetD16_v2(dst: CUdeviceptr, us: c_ushort, n: usize) -> CUresult {
    guard(|| memset(dst, us.into(), 2, n, None))
}

/// `cuMemsetD16` (legacy 32-bit address and count).
#[no_mangle]
pub unsafe extern "C" fn cuMemsetD16(dst: CUdeviceptrV1, us: c_ushort, n: c_uint) -> CUresult {
    guard(|| memset(dst.into(), us.into(), 2, n as usize, None))
}

/// `cuMemsetD32_v2`.
#[no_mangle]
pub unsafe extern "C" fn cuMemsetD32_v2(dst: CUdeviceptr, ui: c_uint, n: usize) -> CUresult {
    guard(|| memset(dst, ui, 4, n, None))
}

/// `cuMemsetD32` (legacy 32-bit address and count).
#[no_mangle]
pub unsafe extern "C" fn cuMemsetD32(dst: CUdeviceptrV1, ui: c_uint, n: c_uint) -> CUresult {
    guard(|| memset(dst.into(), ui, 4, n as usize, None))
}

/// `cuMemsetD8Async`: queued on the stream.
#[no_mangle]
pub unsafe extern "C" fn cuMemsetD8Async(
    dst: CUdeviceptr,
    uc: c_uchar,
    n: usize,
    stream: CUstream,
) -> CUresult {
    guard(|| memset(dst, uc.into(), 1, n, Some(stream)))
}

/// `cuMemsetD16Async`: queued on the stream.
#[no_mangle]
pub unsafe extern "C" fn cuMemsetD16Async(
    dst: CUdeviceptr,
    us: c_ushort,
    n: usize,
    stream: CUstream,
) -> CUresult {
    guard(|| memset(dst, us.into(), 2, n, Some(stream)))
}

/// `cuMemsetD32Async`: queued on the stream.
#[no_mangle]
pub unsafe extern "C" fn cuMemsetD32Async(
    dst: CUdeviceptr,
    ui: c_uint,
    n: usize,
    stream: CUstream,
) -> CUresult {
    guard(|| memset(dst, ui, 4, n, Some(stream)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_calls_before_init_are_not_initialized() {
        let mut d: CUdeviceptr = 0;
        // SAFETY: a valid out-pointer.
        let rc = unsafe { cuMemAlloc_v2(&mut d, 16) };
        assert_eq!(rc, Status::NOT_INITIALIZED.0);
        // SAFETY: no pointer arguments.
        let rc = unsafe { cuMemFree_v2(0x1000) };
        assert_eq!(rc, Status::NOT_INITIALIZED.0);
    }

    #[test]
    fn memory_calls_with_null_out_pointers_are_invalid_value() {
        // SAFETY: null is rejected before use.
        let rc = unsafe { cuMemAlloc_v2(std::ptr::null_mut(), 16) };
        assert_eq!(rc, Status::INVALID_VALUE.0);
        // SAFETY: as above.
        let rc = unsafe { cuMemGetInfo_v2(std::ptr::null_mut(), std::ptr::null_mut()) };
        assert_eq!(rc, Status::INVALID_VALUE.0);
    }
}
