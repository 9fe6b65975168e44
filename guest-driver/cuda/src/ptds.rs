//! The per-thread default stream and the `_ptsz` / `_ptds` entry points.
//!
//! `CU_STREAM_PER_THREAD` names, in each thread, a stream of that thread's
//! current context. It is created lazily, as a blocking stream (so it
//! synchronizes with the legacy default stream and not with other streams,
//! as native per-thread default streams do), and lives as long as its
//! context. The `_ptsz` / `_ptds` variants, which `cuGetProcAddress` returns
//! for the per-thread-default-stream flag, mean that stream by a NULL
//! stream; they forward to the plain entry points with NULL replaced by
//! `CU_STREAM_PER_THREAD`. Synchronous copies and memsets (`_ptds`) need no
//! replacement: the backend runs them on the legacy stream, which waits for
//! every blocking stream, the per-thread one included.

use std::collections::HashMap;
use std::ffi::{c_uchar, c_uint, c_ushort, c_void};
use std::sync::{LazyLock, Mutex};
use std::thread::ThreadId;

use vgpu_spec::wire::{HandleResp, StreamCreateReq};
use vgpu_spec::Request;

use crate::errors::CuResult;
use crate::state::{lock, parse, Driver};
use crate::types::{
    CUdeviceptr, CUevent, CUfunction, CUmemoryPool, CUresult, CUstream, CU_STREAM_PER_THREAD,
};

/// Backend handles of the per-thread streams, by (thread, context).
static STREAMS: LazyLock<Mutex<HashMap<(ThreadId, u64), u64>>> = LazyLock::new(Mutex::default);

/// The backend handle of the calling thread's per-thread default stream in
/// `ctx`, created on first use.
pub(crate) fn per_thread_stream(drv: &Driver, ctx: u64) -> CuResult<u64> {
    let key = (std::thread::current().id(), ctx);
    if let Some(handle) = lock(&STREAMS).get(&key) {
        return Ok(*handle);
    }
    let req = StreamCreateReq {
        flags: 0.into(),
        priority: 0.into(),
    };
    let mut body = Vec::new();
    drv.call(ctx, 0, &Request::StreamCreate(req), &mut body)?;
    let (resp, _) = parse::<HandleResp>(&body, "STREAM_CREATE")?;
    let handle = resp.handle.get();
    tracing::debug!(ctx, handle, "created a per-thread default stream");
    // Only this thread creates streams under this key.
    lock(&STREAMS).insert(key, handle);
    Ok(handle)
}

/// Forgets the per-thread streams of a destroyed context (the backend
/// destroyed them with it).
pub(crate) fn forget_context(ctx: u64) {
    lock(&STREAMS).retain(|(_, c), _| *c != ctx);
}

/// What a `_ptsz` entry point means by `stream`.
fn pt(stream: CUstream) -> CUstream {
    if stream.is_null() {
        std::ptr::without_provenance_mut(CU_STREAM_PER_THREAD)
    } else {
        stream
    }
}

/// `cuLaunchKernel_ptsz`.
#[no_mangle]
pub unsafe extern "C" fn cuLaunchKernel_ptsz(
    f: CUfunction,
    grid_x: c_uint,
    grid_y: c_uint,
    grid_z: c_uint,
    block_x: c_uint,
    block_y: c_uint,
    block_z: c_uint,
    shared_mem_bytes: c_uint,
    h_stream: CUstream,
    kernel_params: *mut *mut c_void,
    extra: *mut *mut c_void,
) -> CUresult {
    // SAFETY: forwards the caller's arguments under the same contract.
    unsafe {
        crate::launch::cuLaunchKernel(
            f,
            grid_x,
            grid_y,
            grid_z,
            block_x,
            block_y,
            block_z,
            shared_mem_bytes,
            pt(h_stream),
            kernel_params,
            extra,
        )
    }
}

/// `cuEventRecord_ptsz`.
#[no_mangle]
pub unsafe extern "C" fn cuEventRecord_ptsz(event: CUevent, stream: CUstream) -> CUresult {
    // SAFETY: forwards the caller's arguments under the same contract.
    unsafe { crate::event::cuEventRecord(event, pt(stream)) }
}

/// `cuEventRecordWithFlags_ptsz`.
#[no_mangle]
pub unsafe extern "C" fn cuEventRecordWithFlags_ptsz(
    event: CUevent,
    stream: CUstream,
    flags: std::ffi::c_uint,
) -> CUresult {
    // SAFETY: forwards the caller's arguments under the same contract.
    unsafe { crate::event::cuEventRecordWithFlags(event, pt(stream), flags) }
}

/// `cuStreamSynchronize_ptsz`.
#[no_mangle]
pub unsafe extern "C" fn cuStreamSynchronize_ptsz(stream: CUstream) -> CUresult {
    // SAFETY: forwards the caller's arguments under the same contract.
    unsafe { crate::stream::cuStreamSynchronize(pt(stream)) }
}

/// `cuStreamQuery_ptsz`.
#[no_mangle]
pub unsafe extern "C" fn cuStreamQuery_ptsz(stream: CUstream) -> CUresult {
    // SAFETY: forwards the caller's arguments under the same contract.
    unsafe { crate::stream::cuStreamQuery(pt(stream)) }
}

/// `cuStreamWaitEvent_ptsz`.
#[no_mangle]
pub unsafe extern "C" fn cuStreamWaitEvent_ptsz(
    stream: CUstream,
    event: CUevent,
    flags: c_uint,
) -> CUresult {
    // SAFETY: forwards the caller's arguments under the same contract.
    unsafe { crate::stream::cuStreamWaitEvent(pt(stream), event, flags) }
}

/// `cuMemAllocAsync_ptsz`.
#[no_mangle]
pub unsafe extern "C" fn cuMemAllocAsync_ptsz(
    dptr: *mut CUdeviceptr,
    bytesize: usize,
    stream: CUstream,
) -> CUresult {
    // SAFETY: forwards the caller's arguments under the same contract.
    unsafe { crate::memory::cuMemAllocAsync(dptr, bytesize, pt(stream)) }
}

/// `cuMemFreeAsync_ptsz`.
#[no_mangle]
pub unsafe extern "C" fn cuMemFreeAsync_ptsz(dptr: CUdeviceptr, stream: CUstream) -> CUresult {
    // SAFETY: forwards the caller's arguments under the same contract.
    unsafe { crate::memory::cuMemFreeAsync(dptr, pt(stream)) }
}

/// `cuMemAllocFromPoolAsync_ptsz`.
#[no_mangle]
pub unsafe extern "C" fn cuMemAllocFromPoolAsync_ptsz(
    dptr: *mut CUdeviceptr,
    bytesize: usize,
    pool: CUmemoryPool,
    stream: CUstream,
) -> CUresult {
    // SAFETY: forwards the caller's arguments under the same contract.
    unsafe { crate::mempool::cuMemAllocFromPoolAsync(dptr, bytesize, pool, pt(stream)) }
}

/// `cuMemcpyHtoD_v2_ptds`.
#[no_mangle]
pub unsafe extern "C" fn cuMemcpyHtoD_v2_ptds(
    dst: CUdeviceptr,
    src: *const c_void,
    byte_count: usize,
) -> CUresult {
    // SAFETY: forwards the caller's arguments under the same contract.
    unsafe { crate::copy::cuMemcpyHtoD_v2(dst, src, byte_count) }
}

/// `cuMemcpyDtoH_v2_ptds`.
#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoH_v2_ptds(
    dst: *mut c_void,
    src: CUdeviceptr,
    byte_count: usize,
) -> CUresult {
    // SAFETY: forwards the caller's arguments under the same contract.
    unsafe { crate::copy::cuMemcpyDtoH_v2(dst, src, byte_count) }
}

/// `cuMemcpyDtoD_v2_ptds`.
#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoD_v2_ptds(
    dst: CUdeviceptr,
    src: CUdeviceptr,
    byte_count: usize,
) -> CUresult {
    // SAFETY: forwards the caller's arguments under the same contract.
    unsafe { crate::copy::cuMemcpyDtoD_v2(dst, src, byte_count) }
}

/// `cuMemcpyHtoDAsync_v2_ptsz`.
#[no_mangle]
pub unsafe extern "C" fn cuMemcpyHtoDAsync_v2_ptsz(
    dst: CUdeviceptr,
    src: *const c_void,
    byte_count: usize,
    stream: CUstream,
) -> CUresult {
    // SAFETY: forwards the caller's arguments under the same contract.
    unsafe { crate::copy::cuMemcpyHtoDAsync_v2(dst, src, byte_count, pt(stream)) }
}

/// `cuMemcpyDtoHAsync_v2_ptsz`.
#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoHAsync_v2_ptsz(
    dst: *mut c_void,
    src: CUdeviceptr,
    byte_count: usize,
    stream: CUstream,
) -> CUresult {
    // SAFETY: forwards the caller's arguments under the same contract.
    unsafe { crate::copy::cuMemcpyDtoHAsync_v2(dst, src, byte_count, pt(stream)) }
}

/// `cuMemcpyDtoDAsync_v2_ptsz`.
#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoDAsync_v2_ptsz(
    dst: CUdeviceptr,
    src: CUdeviceptr,
    byte_count: usize,
    stream: CUstream,
) -> CUresult {
    // SAFETY: forwards the caller's arguments under the same contract.
    unsafe { crate::copy::cuMemcpyDtoDAsync_v2(dst, src, byte_count, pt(stream)) }
}

/// `cuMemsetD8_v2_ptds`.
#[no_mangle]
pub unsafe extern "C" fn cuMemsetD8_v2_ptds(dst: CUdeviceptr, uc: c_uchar, n: usize) -> CUresult {
    // SAFETY: forwards the caller's arguments under the same contract.
    unsafe { crate::memory::cuMemsetD8_v2(dst, uc, n) }
}

/// `cuMemsetD16_v2_ptds`.
#[no_mangle]
pub unsafe extern "C" fn cuMemsetD16_v2_ptds(dst: CUdeviceptr, us: c_ushort, n: usize) -> CUresult {
    // SAFETY: forwards the caller's arguments under the same contract.
    unsafe { crate::memory::cuMemsetD16_v2(dst, us, n) }
}

/// `cuMemsetD32_v2_ptds`.
#[no_mangle]
pub unsafe extern "C" fn cuMemsetD32_v2_ptds(dst: CUdeviceptr, ui: c_uint, n: usize) -> CUresult {
    // SAFETY: forwards the caller's arguments under the same contract.
    unsafe { crate::memory::cuMemsetD32_v2(dst, ui, n) }
}

/// `cuMemsetD8Async_ptsz`.
#[no_mangle]
pub unsafe extern "C" fn cuMemsetD8Async_ptsz(
    dst: CUdeviceptr,
    uc: c_uchar,
    n: usize,
    stream: CUstream,
) -> CUresult {
    // SAFETY: forwards the caller's arguments under the same contract.
    unsafe { crate::memory::cuMemsetD8Async(dst, uc, n, pt(stream)) }
}

/// `cuMemsetD16Async_ptsz`.
#[no_mangle]
pub unsafe extern "C" fn cuMemsetD16Async_ptsz(
    dst: CUdeviceptr,
    us: c_ushort,
    n: usize,
    stream: CUstream,
) -> CUresult {
    // SAFETY: forwards the caller's arguments under the same contract.
    unsafe { crate::memory::cuMemsetD16Async(dst, us, n, pt(stream)) }
}

/// `cuMemsetD32Async_ptsz`.
#[no_mangle]
pub unsafe extern "C" fn cuMemsetD32Async_ptsz(
    dst: CUdeviceptr,
    ui: c_uint,
    n: usize,
    stream: CUstream,
) -> CUresult {
    // SAFETY: forwards the caller's arguments under the same contract.
    unsafe { crate::memory::cuMemsetD32Async(dst, ui, n, pt(stream)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn null_means_the_per_thread_stream_and_others_pass_through() {
        assert_eq!(pt(std::ptr::null_mut()).addr(), CU_STREAM_PER_THREAD);
        assert_eq!(pt(std::ptr::without_provenance_mut(1)).addr(), 1);
        assert_eq!(pt(std::ptr::without_provenance_mut(0x1000)).addr(), 0x1000);
    }

    #[test]
    fn forgetting_a_context_drops_only_its_streams() {
        let me = std::thread::current().id();
        lock(&STREAMS).insert((me, 0xdead_0001), 5);
        lock(&STREAMS).insert((me, 0xdead_0002), 6);
        forget_context(0xdead_0001);
        let streams = lock(&STREAMS);
        assert!(!streams.contains_key(&(me, 0xdead_0001)));
        assert_eq!(streams.get(&(me, 0xdead_0002)), Some(&6));
    }
}
