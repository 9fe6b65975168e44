//! CUDA graphs, implemented in the guest. A graph is the list of work a
//! stream capture recorded ([`crate::capture`]), in the order it was issued;
//! that order is a valid topological order of the captured dependencies, so
//! an executable graph is the same list, and `cuGraphLaunch` submits it in
//! order on the launch stream, without waiting, with one flush at the end.
//! Kernel parameters were copied when the launch was captured; host memory
//! of copy nodes is read or written when the node runs, as native.
//!
//! Handles (`CUgraph`, `CUgraphExec`, `CUgraphNode`) are ids of this module,
//! never dereferenced.

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_uint, c_ulonglong, c_void};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};

use vgpu_spec::wire::{LaunchReq, MemcpyDtoDReq, MemsetReq, StreamWaitEventReq, FLAG_ASYNC};
use vgpu_spec::{Request, Status};

use crate::capture;
use crate::copy;
use crate::errors::{guard, non_null, write_out, CuResult};
use crate::state::{driver, lock, Driver};
use crate::stream::stream_target;
use crate::types::{CUresult, CUstream};

/// `CUgraph`.
pub type CUgraph = *mut c_void;
/// `CUgraphExec`.
pub type CUgraphExec = *mut c_void;
/// `CUgraphNode`.
pub type CUgraphNode = *mut c_void;

/// `CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH`.
const INSTANTIATE_AUTO_FREE_ON_LAUNCH: u64 = 1;
/// `CUDA_GRAPH_INSTANTIATE_FLAG_UPLOAD`.
const INSTANTIATE_UPLOAD: u64 = 2;
/// `CUDA_GRAPH_INSTANTIATE_FLAG_DEVICE_LAUNCH`.
const INSTANTIATE_DEVICE_LAUNCH: u64 = 4;
/// `CUDA_GRAPH_INSTANTIATE_FLAG_USE_NODE_PRIORITY`.
const INSTANTIATE_USE_NODE_PRIORITY: u64 = 8;

/// One recorded operation, with everything it needs to be issued again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    /// A kernel launch; `params` is the packed block copied at capture.
    Launch {
        /// Backend function handle.
        function: u64,
        /// Grid dimensions.
        grid: [u32; 3],
        /// Block dimensions.
        block: [u32; 3],
        /// Dynamic shared memory bytes.
        shared_mem: u32,
        /// The packed parameter block.
        params: Vec<u8>,
    },
    /// A memset of `count` elements of `elem_size` bytes.
    Memset {
        /// Device address.
        dst: u64,
        /// The element value.
        value: u32,
        /// 1, 2 or 4.
        elem_size: u32,
        /// Elements.
        count: u64,
    },
    /// Host to device; `src` is the host address (exposed provenance),
    /// read when the node runs.
    HtoD {
        /// Device address.
        dst: u64,
        /// Host address.
        src: usize,
        /// Bytes.
        len: usize,
    },
    /// Device to host; `dst` is the host address (exposed provenance),
    /// written when the node runs.
    DtoH {
        /// Host address.
        dst: usize,
        /// Device address.
        src: u64,
        /// Bytes.
        len: usize,
    },
    /// Device to device.
    DtoD {
        /// Destination.
        dst: u64,
        /// Source.
        src: u64,
        /// Bytes.
        len: u64,
    },
    /// A wait on an event recorded outside the capture
    /// (`CU_EVENT_WAIT_EXTERNAL`).
    WaitEvent {
        /// Backend event handle.
        event: u64,
        /// The wait flags.
        flags: u32,
    },
}

/// A recorded operation and the context it was issued in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Work {
    /// The context for the request header.
    pub ctx: u64,
    /// What to do.
    pub op: Op,
}

/// A graph node: its handle, the nodes it depends on, and its work.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Node {
    /// The `CUgraphNode` value.
    pub id: usize,
    /// Handles of the nodes this one depends on.
    pub deps: Vec<usize>,
    /// The work.
    pub work: Work,
}

#[derive(Default)]
struct Tables {
    graphs: HashMap<usize, Vec<Node>>,
    execs: HashMap<usize, Arc<[Work]>>,
}

static TABLES: LazyLock<Mutex<Tables>> = LazyLock::new(Mutex::default);

/// Ids start far from stream and event ids and are 16-aligned, so they look
/// like the pointers they stand for.
const FIRST_ID: usize = 0x10_0000_0000;
static NEXT_ID: AtomicUsize = AtomicUsize::new(0);

/// A fresh id for a graph, an executable graph or a node.
pub(crate) fn new_id() -> usize {
    FIRST_ID + NEXT_ID.fetch_add(1, Ordering::Relaxed) * 0x10
}

/// Stores the graph a capture produced under the id reserved for it.
pub(crate) fn insert_graph(id: usize, nodes: Vec<Node>) {
    lock(&TABLES).graphs.insert(id, nodes);
}

/// Where replayed work goes: the driver, or a recorder in tests.
pub(crate) trait Sink {
    /// Queues a request.
    fn submit(&self, ctx: u64, flags: u32, req: &Request<'_>) -> CuResult<()>;
    /// An asynchronous host-to-device copy on `stream`.
    ///
    /// # Safety
    /// `src` must be readable for `len` bytes.
    unsafe fn htod(
        &self,
        ctx: u64,
        stream: u64,
        dst: u64,
        src: *const u8,
        len: usize,
    ) -> CuResult<()>;
    /// An asynchronous device-to-host copy on `stream`.
    ///
    /// # Safety
    /// `dst` must be writable for `len` bytes.
    unsafe fn dtoh(
        &self,
        ctx: u64,
        stream: u64,
        dst: *mut u8,
        src: u64,
        len: usize,
    ) -> CuResult<()>;
    /// Makes everything queued visible to the device.
    fn flush(&self) -> CuResult<()>;
}

impl Sink for Driver {
    fn submit(&self, ctx: u64, flags: u32, req: &Request<'_>) -> CuResult<()> {
        Driver::submit(self, ctx, flags, req, None)
    }

    unsafe fn htod(
        &self,
        ctx: u64,
        stream: u64,
        dst: u64,
        src: *const u8,
        len: usize,
    ) -> CuResult<()> {
        // SAFETY: the caller's contract.
        unsafe { copy::htod_on(self, ctx, stream, dst, src.cast(), len, true) }
    }

    unsafe fn dtoh(
        &self,
        ctx: u64,
        stream: u64,
        dst: *mut u8,
        src: u64,
        len: usize,
    ) -> CuResult<()> {
        // SAFETY: the caller's contract.
        unsafe { copy::dtoh_on(self, ctx, stream, dst.cast(), src, len, true) }
    }

    fn flush(&self) -> CuResult<()> {
        Driver::flush(self)
    }
}

/// Issues `work` in order on backend stream `stream`, then flushes once.
///
/// # Safety
/// The host ranges of copy nodes must be valid, as the CUDA API requires of
/// a graph launch.
pub(crate) unsafe fn replay(sink: &impl Sink, stream: u64, work: &[Work]) -> CuResult<()> {
    for item in work {
        let ctx = item.ctx;
        match &item.op {
            Op::Launch {
                function,
                grid,
                block,
                shared_mem,
                params,
            } => {
                let req = LaunchReq {
                    function: (*function).into(),
                    stream: stream.into(),
                    grid: grid.map(Into::into),
                    block: block.map(Into::into),
                    shared_mem: (*shared_mem).into(),
                    param_bytes: (params.len() as u32).into(),
                };
                sink.submit(ctx, 0, &Request::Launch(req, params))?;
            }
            Op::Memset {
                dst,
                value,
                elem_size,
                count,
            } => {
                let req = MemsetReq {
                    dst: (*dst).into(),
                    value: (*value).into(),
                    elem_size: (*elem_size).into(),
                    count: (*count).into(),
                    stream: stream.into(),
                };
                sink.submit(ctx, FLAG_ASYNC, &Request::Memset(req))?;
            }
            Op::DtoD { dst, src, len } => {
                let req = MemcpyDtoDReq {
                    dst: (*dst).into(),
                    src: (*src).into(),
                    size: (*len).into(),
                    stream: stream.into(),
                };
                sink.submit(ctx, FLAG_ASYNC, &Request::MemcpyDtoD(req))?;
            }
            Op::HtoD { dst, src, len } => {
                let src = std::ptr::with_exposed_provenance::<u8>(*src);
                // SAFETY: the caller's contract for host ranges.
                unsafe { sink.htod(ctx, stream, *dst, src, *len) }?;
            }
            Op::DtoH { dst, src, len } => {
                let dst = std::ptr::with_exposed_provenance_mut::<u8>(*dst);
                // SAFETY: the caller's contract for host ranges.
                unsafe { sink.dtoh(ctx, stream, dst, *src, *len) }?;
            }
            Op::WaitEvent { event, flags } => {
                let req = StreamWaitEventReq {
                    stream: stream.into(),
                    event: (*event).into(),
                    flags: (*flags).into(),
                    _pad: 0.into(),
                };
                sink.submit(ctx, 0, &Request::StreamWaitEvent(req))?;
            }
        }
    }
    sink.flush()
}

/// The executable form of a graph: its work in order.
pub(crate) fn executable(nodes: &[Node]) -> Arc<[Work]> {
    nodes.iter().map(|node| node.work.clone()).collect()
}

/// Checks `cuGraphInstantiateWithFlags` flags.
pub(crate) fn check_instantiate_flags(flags: u64) -> CuResult<()> {
    let known = INSTANTIATE_AUTO_FREE_ON_LAUNCH
        | INSTANTIATE_UPLOAD
        | INSTANTIATE_DEVICE_LAUNCH
        | INSTANTIATE_USE_NODE_PRIORITY;
    if flags & !known != 0 {
        return Err(Status::INVALID_VALUE);
    }
    if flags & INSTANTIATE_DEVICE_LAUNCH != 0 {
        crate::logging::warn_once("device-launchable graphs are not supported");
        return Err(Status::NOT_SUPPORTED);
    }
    Ok(())
}

unsafe fn instantiate(exec_out: *mut CUgraphExec, graph: CUgraph, flags: u64) -> CuResult<()> {
    driver()?;
    non_null(exec_out)?;
    check_instantiate_flags(flags)?;
    let id = new_id();
    {
        let mut tables = lock(&TABLES);
        let work = {
            let nodes = tables
                .graphs
                .get(&graph.addr())
                .ok_or(Status::INVALID_HANDLE)?;
            executable(nodes)
        };
        tables.execs.insert(id, work);
    }
    // SAFETY: non-null, and per the API a writable `CUgraphExec`.
    unsafe { write_out(exec_out, std::ptr::without_provenance_mut(id)) }
}

/// `cuGraphCreate`: an empty graph.
#[no_mangle]
pub unsafe extern "C" fn cuGraphCreate(graph_out: *mut CUgraph, flags: c_uint) -> CUresult {
    guard(|| {
        driver()?;
        non_null(graph_out)?;
        if flags != 0 {
            return Err(Status::INVALID_VALUE);
        }
        let id = new_id();
        insert_graph(id, Vec::new());
        // SAFETY: non-null, and per the API a writable `CUgraph`.
        unsafe { write_out(graph_out, std::ptr::without_provenance_mut(id)) }
    })
}

/// `cuGraphDestroy`.
#[no_mangle]
pub unsafe extern "C" fn cuGraphDestroy(graph: CUgraph) -> CUresult {
    guard(|| {
        driver()?;
        lock(&TABLES)
            .graphs
            .remove(&graph.addr())
            .map(|_| ())
            .ok_or(Status::INVALID_HANDLE)
    })
}

/// `cuGraphGetNodes`: the node count, and the nodes if `nodes` is non-null.
#[no_mangle]
pub unsafe extern "C" fn cuGraphGetNodes(
    graph: CUgraph,
    nodes: *mut CUgraphNode,
    num_nodes: *mut usize,
) -> CUresult {
    guard(|| {
        driver()?;
        non_null(num_nodes)?;
        let stored: Option<Vec<usize>> = lock(&TABLES)
            .graphs
            .get(&graph.addr())
            .map(|list| list.iter().map(|node| node.id).collect());
        let ids = match stored {
            Some(ids) => ids,
            None => capture::nodes_of_graph(graph.addr()).ok_or(Status::INVALID_HANDLE)?,
        };
        if nodes.is_null() {
            // SAFETY: non-null, and per the API a writable `size_t`.
            return unsafe { write_out(num_nodes, ids.len()) };
        }
        // SAFETY: non-null, and per the API a readable `size_t`.
        let room = unsafe { num_nodes.read_unaligned() };
        let n = room.min(ids.len());
        for (i, id) in ids.iter().take(n).enumerate() {
            // SAFETY: per the API `nodes` has room for `*num_nodes` entries.
            unsafe { write_out(nodes.add(i), std::ptr::without_provenance_mut(*id)) }?;
        }
        for i in n..room {
            // SAFETY: as above; extra entries are set to NULL.
            unsafe { write_out(nodes.add(i), std::ptr::null_mut()) }?;
        }
        // SAFETY: non-null, writable `size_t`.
        unsafe { write_out(num_nodes, n) }
    })
}

/// Shared body of the two five-argument `cuGraphInstantiate` ABIs.
///
/// # Safety
/// Pointers null or valid per the API.
unsafe fn instantiate_v1(
    exec_out: *mut CUgraphExec,
    graph: CUgraph,
    error_node: *mut CUgraphNode,
    log: *mut c_char,
    log_size: usize,
) -> CuResult<()> {
    if !log.is_null() && log_size > 0 {
        // SAFETY: per the API `log` is writable for `log_size` bytes.
        unsafe { log.write(0) };
    }
    // SAFETY: forwards the caller's pointer under the same contract.
    let result = unsafe { instantiate(exec_out, graph, 0) };
    if result.is_err() && !error_node.is_null() {
        // SAFETY: non-null, and per the API a writable `CUgraphNode`.
        unsafe { write_out(error_node, std::ptr::null_mut()) }?;
    }
    result
}

/// `cuGraphInstantiate` (the CUDA 10 ABI, with an error log).
#[no_mangle]
pub unsafe extern "C" fn cuGraphInstantiate(
    exec_out: *mut CUgraphExec,
    graph: CUgraph,
    error_node: *mut CUgraphNode,
    log: *mut c_char,
    log_size: usize,
) -> CUresult {
    // SAFETY: forwards the caller's pointers under the same contract.
    guard(|| unsafe { instantiate_v1(exec_out, graph, error_node, log, log_size) })
}

/// `cuGraphInstantiate_v2` (the CUDA 11 ABI, same arguments).
#[no_mangle]
pub unsafe extern "C" fn cuGraphInstantiate_v2(
    exec_out: *mut CUgraphExec,
    graph: CUgraph,
    error_node: *mut CUgraphNode,
    log: *mut c_char,
    log_size: usize,
) -> CUresult {
    // SAFETY: forwards the caller's pointers under the same contract.
    guard(|| unsafe { instantiate_v1(exec_out, graph, error_node, log, log_size) })
}

/// `cuGraphInstantiateWithFlags` (`cuGraphInstantiate` from CUDA 12 on).
#[no_mangle]
pub unsafe extern "C" fn cuGraphInstantiateWithFlags(
    exec_out: *mut CUgraphExec,
    graph: CUgraph,
    flags: c_ulonglong,
) -> CUresult {
    // SAFETY: forwards the caller's pointer under the same contract.
    guard(|| unsafe { instantiate(exec_out, graph, flags) })
}

/// `CUDA_GRAPH_INSTANTIATE_PARAMS`.
#[repr(C)]
pub struct CudaGraphInstantiateParams {
    /// Instantiation flags.
    pub flags: u64,
    /// The stream an upload goes to (uploads are no-ops here).
    pub upload_stream: CUstream,
    /// Out: the node that caused an error.
    pub err_node_out: CUgraphNode,
    /// Out: `CUgraphInstantiateResult`.
    pub result_out: c_int,
}

/// `CUDA_GRAPH_INSTANTIATE_ERROR`.
const INSTANTIATE_RESULT_ERROR: c_int = 1;

unsafe fn instantiate_with_params(
    exec_out: *mut CUgraphExec,
    graph: CUgraph,
    params: *mut CudaGraphInstantiateParams,
) -> CuResult<()> {
    non_null(params)?;
    // SAFETY: non-null, and per the API a readable and writable struct.
    let flags = unsafe { std::ptr::addr_of!((*params).flags).read_unaligned() };
    // SAFETY: forwards the caller's pointer under the same contract.
    let result = unsafe { instantiate(exec_out, graph, flags) };
    let code = if result.is_ok() {
        0
    } else {
        INSTANTIATE_RESULT_ERROR
    };
    // SAFETY: as above.
    unsafe {
        std::ptr::addr_of_mut!((*params).err_node_out).write_unaligned(std::ptr::null_mut());
        std::ptr::addr_of_mut!((*params).result_out).write_unaligned(code);
    }
    result
}

/// `cuGraphInstantiateWithParams`.
#[no_mangle]
pub unsafe extern "C" fn cuGraphInstantiateWithParams(
    exec_out: *mut CUgraphExec,
    graph: CUgraph,
    params: *mut CudaGraphInstantiateParams,
) -> CUresult {
    // SAFETY: forwards the caller's pointers under the same contract.
    guard(|| unsafe { instantiate_with_params(exec_out, graph, params) })
}

/// `cuGraphInstantiateWithParams_ptsz`.
#[no_mangle]
pub unsafe extern "C" fn cuGraphInstantiateWithParams_ptsz(
    exec_out: *mut CUgraphExec,
    graph: CUgraph,
    params: *mut CudaGraphInstantiateParams,
) -> CUresult {
    // SAFETY: forwards the caller's pointers under the same contract.
    guard(|| unsafe { instantiate_with_params(exec_out, graph, params) })
}

/// `cuGraphLaunch` body: records into a capture, or replays.
fn launch(exec: CUgraphExec, stream: CUstream) -> CuResult<()> {
    let (drv, _, handle) = stream_target(stream)?;
    let work = lock(&TABLES)
        .execs
        .get(&exec.addr())
        .cloned()
        .ok_or(Status::INVALID_HANDLE)?;
    if capture::record_all(stream, || work.to_vec())? {
        return Ok(());
    }
    // SAFETY: per the API, host memory of copy nodes is valid at launch.
    unsafe { replay(drv, handle, &work) }
}

/// `cuGraphLaunch`: queues the graph's work on the stream, in order.
#[no_mangle]
pub unsafe extern "C" fn cuGraphLaunch(exec: CUgraphExec, stream: CUstream) -> CUresult {
    guard(|| launch(exec, stream))
}

/// `cuGraphLaunch_ptsz`.
#[no_mangle]
pub unsafe extern "C" fn cuGraphLaunch_ptsz(exec: CUgraphExec, stream: CUstream) -> CUresult {
    guard(|| launch(exec, capture::per_thread(stream)))
}

/// `cuGraphExecDestroy`.
#[no_mangle]
pub unsafe extern "C" fn cuGraphExecDestroy(exec: CUgraphExec) -> CUresult {
    guard(|| {
        driver()?;
        lock(&TABLES)
            .execs
            .remove(&exec.addr())
            .map(|_| ())
            .ok_or(Status::INVALID_HANDLE)
    })
}

fn upload(exec: CUgraphExec, stream: CUstream) -> CuResult<()> {
    stream_target(stream)?;
    if lock(&TABLES).execs.contains_key(&exec.addr()) {
        Ok(())
    } else {
        Err(Status::INVALID_HANDLE)
    }
}

/// `cuGraphUpload`: nothing to upload ahead; checks its arguments.
#[no_mangle]
pub unsafe extern "C" fn cuGraphUpload(exec: CUgraphExec, stream: CUstream) -> CUresult {
    guard(|| upload(exec, stream))
}

/// `cuGraphUpload_ptsz`.
#[no_mangle]
pub unsafe extern "C" fn cuGraphUpload_ptsz(exec: CUgraphExec, stream: CUstream) -> CUresult {
    guard(|| upload(exec, capture::per_thread(stream)))
}

#[cfg(test)]
#[path = "graph_tests.rs"]
mod tests;
