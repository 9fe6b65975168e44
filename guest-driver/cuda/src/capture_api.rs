//! The stream-capture entry points: begin, end, status queries and the
//! thread's capture interaction mode. The logic lives in [`crate::capture`].

use std::ffi::{c_int, c_void};

use vgpu_spec::Status;

use crate::capture::{
    self, exchange_mode, key_of, this_thread, with, Info, Mode, CAPTURE_IMPLICIT,
    CAPTURE_INVALIDATED, CAPTURE_UNJOINED, CAPTURE_UNSUPPORTED, ILLEGAL_STATE, STATUS_NONE,
};
use crate::ctx::session_ctx;
use crate::errors::{guard, non_null, write_out, CuResult};
use crate::graph::{self, CUgraph, CUgraphNode};
use crate::state::driver;
use crate::stream::is_default_stream;
use crate::types::{CUresult, CUstream, CU_STREAM_PER_THREAD};

/// Checks that `stream` is the per-thread default stream or a live stream.
fn check_stream(stream: CUstream) -> CuResult<()> {
    if stream.addr() == CU_STREAM_PER_THREAD {
        session_ctx()?;
        return Ok(());
    }
    let drv = driver()?;
    if !is_default_stream(stream) && drv.streams.get(stream).is_none() {
        return Err(Status::INVALID_HANDLE);
    }
    Ok(())
}

fn begin(stream: CUstream, mode: c_int) -> CuResult<()> {
    driver()?;
    let mode = Mode::from_raw(mode)?;
    let Some(key) = key_of(stream) else {
        return Err(CAPTURE_UNSUPPORTED);
    };
    check_stream(stream)?;
    let blocking = capture::blocking(stream);
    let graph = graph::new_id();
    with(|c| c.begin(key, blocking, mode, this_thread(), graph))?;
    tracing::debug!(stream = stream.addr(), ?mode, "capture begins");
    Ok(())
}

/// `cuStreamBeginCapture` (the CUDA 10.0 ABI: global mode).
#[no_mangle]
pub unsafe extern "C" fn cuStreamBeginCapture(stream: CUstream) -> CUresult {
    guard(|| begin(stream, Mode::Global.raw()))
}

/// `cuStreamBeginCapture_ptsz`.
#[no_mangle]
pub unsafe extern "C" fn cuStreamBeginCapture_ptsz(stream: CUstream) -> CUresult {
    guard(|| begin(capture::per_thread(stream), Mode::Global.raw()))
}

/// `cuStreamBeginCapture_v2`: begins capturing `stream` in `mode`.
#[no_mangle]
pub unsafe extern "C" fn cuStreamBeginCapture_v2(stream: CUstream, mode: c_int) -> CUresult {
    guard(|| begin(stream, mode))
}

/// `cuStreamBeginCapture_v2_ptsz`.
#[no_mangle]
pub unsafe extern "C" fn cuStreamBeginCapture_v2_ptsz(stream: CUstream, mode: c_int) -> CUresult {
    guard(|| begin(capture::per_thread(stream), mode))
}

unsafe fn end(stream: CUstream, graph_out: *mut CUgraph) -> CuResult<()> {
    driver()?;
    non_null(graph_out)?;
    check_stream(stream)?;
    let key = key_of(stream).ok_or(ILLEGAL_STATE)?;
    match with(|c| c.end(key, this_thread())) {
        Ok((graph, nodes)) => {
            tracing::debug!(nodes = nodes.len(), "capture ends");
            graph::insert_graph(graph, nodes);
            // SAFETY: non-null, and per the API a writable `CUgraph`.
            unsafe { write_out(graph_out, std::ptr::without_provenance_mut(graph)) }
        }
        Err(status) => {
            if status == CAPTURE_INVALIDATED || status == CAPTURE_UNJOINED {
                // SAFETY: as above.
                unsafe { write_out(graph_out, std::ptr::null_mut()) }?;
            }
            Err(status)
        }
    }
}

/// `cuStreamEndCapture`: the captured graph.
#[no_mangle]
pub unsafe extern "C" fn cuStreamEndCapture(stream: CUstream, graph_out: *mut CUgraph) -> CUresult {
    // SAFETY: forwards the caller's pointer under the same contract.
    guard(|| unsafe { end(stream, graph_out) })
}

/// `cuStreamEndCapture_ptsz`.
#[no_mangle]
pub unsafe extern "C" fn cuStreamEndCapture_ptsz(
    stream: CUstream,
    graph_out: *mut CUgraph,
) -> CUresult {
    // SAFETY: forwards the caller's pointer under the same contract.
    guard(|| unsafe { end(capture::per_thread(stream), graph_out) })
}

/// The capture state of `stream`; `None` when it is not capturing.
fn info(stream: CUstream) -> CuResult<Option<Info>> {
    check_stream(stream)?;
    if capture::idle() {
        return Ok(None);
    }
    match key_of(stream) {
        None => {
            if with(|c| c.legacy_blocked()) {
                Err(CAPTURE_IMPLICIT)
            } else {
                Ok(None)
            }
        }
        Some(key) => Ok(with(|c| c.info(key))),
    }
}

unsafe fn is_capturing(stream: CUstream, status: *mut c_int) -> CuResult<()> {
    driver()?;
    non_null(status)?;
    let state = info(stream)?.map_or(STATUS_NONE, |i| i.status);
    // SAFETY: non-null, and per the API a writable `CUstreamCaptureStatus`.
    unsafe { write_out(status, state) }
}

/// `cuStreamIsCapturing`.
#[no_mangle]
pub unsafe extern "C" fn cuStreamIsCapturing(stream: CUstream, status: *mut c_int) -> CUresult {
    // SAFETY: forwards the caller's pointer under the same contract.
    guard(|| unsafe { is_capturing(stream, status) })
}

/// `cuStreamIsCapturing_ptsz`.
#[no_mangle]
pub unsafe extern "C" fn cuStreamIsCapturing_ptsz(
    stream: CUstream,
    status: *mut c_int,
) -> CUresult {
    // SAFETY: forwards the caller's pointer under the same contract.
    guard(|| unsafe { is_capturing(capture::per_thread(stream), status) })
}

/// Where `cuStreamGetCaptureInfo*` writes; every pointer but `status` may
/// be null.
struct InfoOut {
    status: *mut c_int,
    id: *mut u64,
    graph: *mut CUgraph,
    deps: *mut *const CUgraphNode,
    edges: *mut *const c_void,
    count: *mut usize,
}

impl InfoOut {
    fn new(status: *mut c_int, id: *mut u64) -> InfoOut {
        InfoOut {
            status,
            id,
            graph: std::ptr::null_mut(),
            deps: std::ptr::null_mut(),
            edges: std::ptr::null_mut(),
            count: std::ptr::null_mut(),
        }
    }
}

/// Writes `value` through `out` unless it is null.
///
/// # Safety
/// `out` must be null or writable.
unsafe fn write_opt<T>(out: *mut T, value: T) -> CuResult<()> {
    if out.is_null() {
        return Ok(());
    }
    // SAFETY: non-null and writable (caller's contract).
    unsafe { write_out(out, value) }
}

unsafe fn capture_info(stream: CUstream, out: &InfoOut) -> CuResult<()> {
    driver()?;
    non_null(out.status)?;
    let Some(info) = info(stream)? else {
        // SAFETY: non-null, and per the API a writable status.
        return unsafe { write_out(out.status, STATUS_NONE) };
    };
    // SAFETY: each pointer is null or, per the API, writable for its type.
    unsafe {
        write_out(out.status, info.status)?;
        write_opt(out.id, info.id)?;
        write_opt(out.graph, std::ptr::without_provenance_mut(info.graph))?;
        write_opt(out.deps, info.deps)?;
        write_opt(out.edges, info.edges)?;
        write_opt(out.count, info.count)
    }
}

/// `cuStreamGetCaptureInfo` (status and id).
#[no_mangle]
pub unsafe extern "C" fn cuStreamGetCaptureInfo(
    stream: CUstream,
    status: *mut c_int,
    id: *mut u64,
) -> CUresult {
    // SAFETY: forwards the caller's pointers under the same contract.
    guard(|| unsafe { capture_info(stream, &InfoOut::new(status, id)) })
}

/// `cuStreamGetCaptureInfo_ptsz`.
#[no_mangle]
pub unsafe extern "C" fn cuStreamGetCaptureInfo_ptsz(
    stream: CUstream,
    status: *mut c_int,
    id: *mut u64,
) -> CUresult {
    let stream = capture::per_thread(stream);
    // SAFETY: forwards the caller's pointers under the same contract.
    guard(|| unsafe { capture_info(stream, &InfoOut::new(status, id)) })
}

unsafe fn capture_info_v2(
    stream: CUstream,
    status: *mut c_int,
    id: *mut u64,
    graph: *mut CUgraph,
    deps: *mut *const CUgraphNode,
    count: *mut usize,
) -> CuResult<()> {
    let out = InfoOut {
        graph,
        deps,
        count,
        ..InfoOut::new(status, id)
    };
    // SAFETY: forwards the caller's pointers under the same contract.
    unsafe { capture_info(stream, &out) }
}

/// `cuStreamGetCaptureInfo_v2`: adds the graph and the dependencies.
#[no_mangle]
pub unsafe extern "C" fn cuStreamGetCaptureInfo_v2(
    stream: CUstream,
    status: *mut c_int,
    id: *mut u64,
    graph: *mut CUgraph,
    deps: *mut *const CUgraphNode,
    count: *mut usize,
) -> CUresult {
    // SAFETY: forwards the caller's pointers under the same contract.
    guard(|| unsafe { capture_info_v2(stream, status, id, graph, deps, count) })
}

/// `cuStreamGetCaptureInfo_v2_ptsz`.
#[no_mangle]
pub unsafe extern "C" fn cuStreamGetCaptureInfo_v2_ptsz(
    stream: CUstream,
    status: *mut c_int,
    id: *mut u64,
    graph: *mut CUgraph,
    deps: *mut *const CUgraphNode,
    count: *mut usize,
) -> CUresult {
    let stream = capture::per_thread(stream);
    // SAFETY: forwards the caller's pointers under the same contract.
    guard(|| unsafe { capture_info_v2(stream, status, id, graph, deps, count) })
}

#[allow(clippy::too_many_arguments)]
unsafe fn capture_info_v3(
    stream: CUstream,
    status: *mut c_int,
    id: *mut u64,
    graph: *mut CUgraph,
    deps: *mut *const CUgraphNode,
    edges: *mut *const c_void,
    count: *mut usize,
) -> CuResult<()> {
    let out = InfoOut {
        graph,
        deps,
        edges,
        count,
        ..InfoOut::new(status, id)
    };
    // SAFETY: forwards the caller's pointers under the same contract.
    unsafe { capture_info(stream, &out) }
}

/// `cuStreamGetCaptureInfo_v3`: adds edge data (all default edges).
#[no_mangle]
pub unsafe extern "C" fn cuStreamGetCaptureInfo_v3(
    stream: CUstream,
    status: *mut c_int,
    id: *mut u64,
    graph: *mut CUgraph,
    deps: *mut *const CUgraphNode,
    edges: *mut *const c_void,
    count: *mut usize,
) -> CUresult {
    // SAFETY: forwards the caller's pointers under the same contract.
    guard(|| unsafe { capture_info_v3(stream, status, id, graph, deps, edges, count) })
}

/// `cuStreamGetCaptureInfo_v3_ptsz`.
#[no_mangle]
pub unsafe extern "C" fn cuStreamGetCaptureInfo_v3_ptsz(
    stream: CUstream,
    status: *mut c_int,
    id: *mut u64,
    graph: *mut CUgraph,
    deps: *mut *const CUgraphNode,
    edges: *mut *const c_void,
    count: *mut usize,
) -> CUresult {
    let stream = capture::per_thread(stream);
    // SAFETY: forwards the caller's pointers under the same contract.
    guard(|| unsafe { capture_info_v3(stream, status, id, graph, deps, edges, count) })
}

/// `cuThreadExchangeStreamCaptureMode`: sets the calling thread's capture
/// interaction mode, returning the previous one in `*mode`.
#[no_mangle]
pub unsafe extern "C" fn cuThreadExchangeStreamCaptureMode(mode: *mut c_int) -> CUresult {
    guard(|| {
        non_null(mode)?;
        // SAFETY: non-null, and per the API a readable `CUstreamCaptureMode`.
        let wanted = Mode::from_raw(unsafe { mode.read_unaligned() })?;
        let old = exchange_mode(wanted);
        // SAFETY: non-null, and per the API writable.
        unsafe { write_out(mode, old.raw()) }
    })
}
