//! Stream capture, implemented in the guest. While a stream captures, the
//! work issued to it (launches, async copies and memsets, external event
//! waits) is recorded as graph nodes ([`crate::graph`]) instead of being
//! submitted. Event records and waits between capturing streams fork and
//! join the capture as native: a stream that waits on an event recorded in
//! a capture joins it. The rules native CUDA enforces are enforced here:
//! synchronizing a capturing stream or a captured event, legacy-stream use
//! while a blocking stream captures, and "potentially unsafe" calls
//! (allocation, synchronization) under the capture interaction modes of
//! `cuThreadExchangeStreamCaptureMode` fail and invalidate the capture.
//!
//! The hooks the rest of the library calls return at once, without
//! locking, while no capture exists.

use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{LazyLock, Mutex};
use std::thread::ThreadId;

use vgpu_spec::Status;

use crate::errors::CuResult;
use crate::graph::{self, CUgraphNode, Node, Op, Work};
use crate::state::lock;
use crate::types::{CUevent, CUstream, CU_STREAM_LEGACY, CU_STREAM_PER_THREAD};

/// `CUDA_ERROR_ILLEGAL_STATE`.
pub(crate) const ILLEGAL_STATE: Status = Status(401);
/// `CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED`.
pub(crate) const CAPTURE_UNSUPPORTED: Status = Status(900);
/// `CUDA_ERROR_STREAM_CAPTURE_INVALIDATED`.
pub(crate) const CAPTURE_INVALIDATED: Status = Status(901);
/// `CUDA_ERROR_STREAM_CAPTURE_MERGE`.
pub(crate) const CAPTURE_MERGE: Status = Status(902);
/// `CUDA_ERROR_STREAM_CAPTURE_UNMATCHED`.
pub(crate) const CAPTURE_UNMATCHED: Status = Status(903);
/// `CUDA_ERROR_STREAM_CAPTURE_UNJOINED`.
pub(crate) const CAPTURE_UNJOINED: Status = Status(904);
/// `CUDA_ERROR_STREAM_CAPTURE_ISOLATION`.
pub(crate) const CAPTURE_ISOLATION: Status = Status(905);
/// `CUDA_ERROR_STREAM_CAPTURE_IMPLICIT`.
pub(crate) const CAPTURE_IMPLICIT: Status = Status(906);
/// `CUDA_ERROR_CAPTURED_EVENT`.
pub(crate) const CAPTURED_EVENT: Status = Status(907);
/// `CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD`.
pub(crate) const CAPTURE_WRONG_THREAD: Status = Status(908);

/// `CUstreamCaptureStatus` values.
pub(crate) const STATUS_NONE: c_int = 0;
/// `CU_STREAM_CAPTURE_STATUS_ACTIVE`.
pub(crate) const STATUS_ACTIVE: c_int = 1;
/// `CU_STREAM_CAPTURE_STATUS_INVALIDATED`.
pub(crate) const STATUS_INVALIDATED: c_int = 2;

/// `CU_EVENT_WAIT_EXTERNAL`.
const EVENT_WAIT_EXTERNAL: u32 = 1;
/// `CU_STREAM_NON_BLOCKING`.
const STREAM_NON_BLOCKING: u32 = 1;

/// `CUstreamCaptureMode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// `CU_STREAM_CAPTURE_MODE_GLOBAL`.
    Global,
    /// `CU_STREAM_CAPTURE_MODE_THREAD_LOCAL`.
    ThreadLocal,
    /// `CU_STREAM_CAPTURE_MODE_RELAXED`.
    Relaxed,
}

impl Mode {
    pub(crate) fn from_raw(raw: c_int) -> CuResult<Mode> {
        match raw {
            0 => Ok(Mode::Global),
            1 => Ok(Mode::ThreadLocal),
            2 => Ok(Mode::Relaxed),
            _ => Err(Status::INVALID_VALUE),
        }
    }

    pub(crate) fn raw(self) -> c_int {
        match self {
            Mode::Global => 0,
            Mode::ThreadLocal => 1,
            Mode::Relaxed => 2,
        }
    }
}

/// A stream as capture knows it: a created stream's id, or the calling
/// thread's per-thread default stream. The legacy stream has none.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Key(u64);

const PER_THREAD_BIT: u64 = 1 << 63;
static NEXT_THREAD: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static MODE: Cell<Mode> = const { Cell::new(Mode::Global) };
    static THREAD_KEY: Key = Key(PER_THREAD_BIT | NEXT_THREAD.fetch_add(1, Ordering::Relaxed));
}

pub(crate) fn key_of(stream: CUstream) -> Option<Key> {
    match stream.addr() {
        0 | CU_STREAM_LEGACY => None,
        CU_STREAM_PER_THREAD => Some(THREAD_KEY.with(|key| *key)),
        addr => Some(Key(addr as u64)),
    }
}

/// What the `_ptsz` entry points mean by a NULL stream.
pub(crate) fn per_thread(stream: CUstream) -> CUstream {
    if stream.is_null() {
        std::ptr::without_provenance_mut(CU_STREAM_PER_THREAD)
    } else {
        stream
    }
}

pub(crate) fn this_thread() -> ThreadId {
    std::thread::current().id()
}

pub(crate) fn thread_mode() -> Mode {
    MODE.with(Cell::get)
}

/// Sets the calling thread's capture interaction mode; returns the old one.
pub(crate) fn exchange_mode(mode: Mode) -> Mode {
    MODE.with(|cell| cell.replace(mode))
}

/// A stream taking part in a capture.
#[derive(Debug)]
struct Member {
    /// The nodes the stream's next work depends on.
    frontier: Vec<usize>,
    /// Whether the stream synchronizes with the legacy stream.
    blocking: bool,
    /// The last `cuStreamGetCaptureInfo` answer (kept alive for the caller).
    deps_out: Vec<usize>,
    /// Default edge data, one per dependency.
    edges_out: Vec<u64>,
}

impl Member {
    fn new(frontier: Vec<usize>, blocking: bool) -> Member {
        Member {
            frontier,
            blocking,
            deps_out: Vec::new(),
            edges_out: Vec::new(),
        }
    }
}

/// One capture sequence.
#[derive(Debug)]
struct Capture {
    id: u64,
    graph: usize,
    mode: Mode,
    thread: ThreadId,
    origin: Key,
    invalidated: bool,
    nodes: Vec<Node>,
    members: HashMap<Key, Member>,
}

impl Capture {
    fn push(&mut self, key: Key, work: Work) {
        let member = self
            .members
            .entry(key)
            .or_insert_with(|| Member::new(Vec::new(), true));
        let id = graph::new_id();
        let deps = std::mem::replace(&mut member.frontier, vec![id]);
        self.nodes.push(Node { id, deps, work });
    }

    /// The nodes `start` depends on, directly or not, and `start` itself.
    fn ancestors(&self, start: &[usize]) -> HashSet<usize> {
        let index: HashMap<usize, usize> = self
            .nodes
            .iter()
            .enumerate()
            .map(|(i, node)| (node.id, i))
            .collect();
        let mut seen = HashSet::new();
        let mut stack = start.to_vec();
        while let Some(id) = stack.pop() {
            if !seen.insert(id) {
                continue;
            }
            if let Some(&i) = index.get(&id) {
                stack.extend(self.nodes[i].deps.iter().copied());
            }
        }
        seen
    }

    /// True when every forked stream's work is joined into the origin.
    fn joined(&self) -> bool {
        let origin = self
            .members
            .get(&self.origin)
            .map_or(&[][..], |m| &m.frontier[..]);
        let ancestors = self.ancestors(origin);
        self.members
            .iter()
            .filter(|(key, _)| **key != self.origin)
            .all(|(_, m)| m.frontier.iter().all(|n| ancestors.contains(n)))
    }
}

/// What `cuStreamGetCaptureInfo` reports about a capturing stream.
#[derive(Debug)]
pub(crate) struct Info {
    /// `CUstreamCaptureStatus`.
    pub status: c_int,
    /// The capture id.
    pub id: u64,
    /// The graph being built.
    pub graph: usize,
    /// The stream's current dependencies.
    pub deps: *const CUgraphNode,
    /// Default edge data, one per dependency.
    pub edges: *const c_void,
    /// How many dependencies.
    pub count: usize,
}

/// Every capture of the process, and which streams and events take part.
#[derive(Debug, Default)]
pub(crate) struct Captures {
    captures: HashMap<u64, Capture>,
    streams: HashMap<Key, u64>,
    /// Events recorded in a capture: the capture and the recorded frontier.
    events: HashMap<usize, (u64, Vec<usize>)>,
    next_id: u64,
}

impl Captures {
    pub(crate) fn begin(
        &mut self,
        key: Key,
        blocking: bool,
        mode: Mode,
        thread: ThreadId,
        graph: usize,
    ) -> CuResult<u64> {
        if self.streams.contains_key(&key) {
            return Err(ILLEGAL_STATE);
        }
        self.next_id += 1;
        let id = self.next_id;
        let mut members = HashMap::new();
        members.insert(key, Member::new(Vec::new(), blocking));
        self.captures.insert(
            id,
            Capture {
                id,
                graph,
                mode,
                thread,
                origin: key,
                invalidated: false,
                nodes: Vec::new(),
                members,
            },
        );
        self.streams.insert(key, id);
        Ok(id)
    }

    fn invalidate(&mut self, id: u64) {
        if let Some(capture) = self.captures.get_mut(&id) {
            capture.invalidated = true;
        }
    }

    /// The capture `key` takes part in, if it is still valid.
    fn active(&mut self, key: Key) -> CuResult<Option<&mut Capture>> {
        let Some(id) = self.streams.get(&key) else {
            return Ok(None);
        };
        match self.captures.get_mut(id) {
            Some(capture) if capture.invalidated => Err(CAPTURE_INVALIDATED),
            capture => Ok(capture),
        }
    }

    /// Whether a capture has a stream that synchronizes with the legacy one.
    pub(crate) fn legacy_blocked(&self) -> bool {
        self.captures
            .values()
            .any(|c| c.members.values().any(|m| m.blocking))
    }

    /// Legacy-stream use: invalidates captures of blocking streams.
    fn legacy_use(&mut self) -> CuResult<()> {
        let mut hit = false;
        for capture in self.captures.values_mut() {
            if capture.members.values().any(|m| m.blocking) {
                capture.invalidated = true;
                hit = true;
            }
        }
        if hit {
            Err(CAPTURE_IMPLICIT)
        } else {
            Ok(())
        }
    }

    /// Records work issued to `key` (`None`: the legacy stream). True if
    /// it was recorded rather than to be submitted.
    fn record(&mut self, key: Option<Key>, make: impl FnOnce() -> Vec<Work>) -> CuResult<bool> {
        let Some(key) = key else {
            self.legacy_use()?;
            return Ok(false);
        };
        let Some(capture) = self.active(key)? else {
            return Ok(false);
        };
        for work in make() {
            capture.push(key, work);
        }
        Ok(true)
    }

    /// `cuEventRecord`: in a capture, the event marks the stream's
    /// frontier; elsewhere it stops being a captured event.
    fn record_event(&mut self, event: usize, key: Option<Key>) -> CuResult<bool> {
        let Some(key) = key else {
            self.legacy_use()?;
            self.events.remove(&event);
            return Ok(false);
        };
        let Some(capture) = self.active(key)? else {
            self.events.remove(&event);
            return Ok(false);
        };
        let frontier = capture
            .members
            .get(&key)
            .map(|m| m.frontier.clone())
            .unwrap_or_default();
        let id = capture.id;
        self.events.insert(event, (id, frontier));
        Ok(true)
    }

    /// `cuStreamWaitEvent`: joins or forks captures. True if handled here.
    fn wait_event(
        &mut self,
        key: Option<Key>,
        blocking: bool,
        event: usize,
        flags: u32,
        external: impl FnOnce() -> Work,
    ) -> CuResult<bool> {
        let captured = self.events.get(&event).cloned();
        let stream_capture = key.and_then(|k| self.streams.get(&k).copied());
        match (key, stream_capture, captured) {
            (Some(key), Some(sid), Some((eid, frontier))) => {
                if sid != eid {
                    self.invalidate(sid);
                    self.invalidate(eid);
                    return Err(CAPTURE_MERGE);
                }
                let Some(capture) = self.active(key)? else {
                    return Ok(false);
                };
                if let Some(member) = capture.members.get_mut(&key) {
                    for node in frontier {
                        if !member.frontier.contains(&node) {
                            member.frontier.push(node);
                        }
                    }
                }
                Ok(true)
            }
            (Some(key), Some(sid), None) => {
                if flags & EVENT_WAIT_EXTERNAL == 0 {
                    self.active(key)?;
                    self.invalidate(sid);
                    return Err(CAPTURE_ISOLATION);
                }
                let Some(capture) = self.active(key)? else {
                    return Ok(false);
                };
                capture.push(key, external());
                Ok(true)
            }
            (Some(key), None, Some((eid, frontier))) => {
                let Some(capture) = self.captures.get_mut(&eid) else {
                    return Ok(false);
                };
                if capture.invalidated {
                    return Err(CAPTURE_INVALIDATED);
                }
                capture.members.insert(key, Member::new(frontier, blocking));
                self.streams.insert(key, eid);
                Ok(true)
            }
            (None, _, Some((eid, _))) => {
                self.invalidate(eid);
                Err(CAPTURE_UNSUPPORTED)
            }
            (None, _, None) => {
                self.legacy_use()?;
                Ok(false)
            }
            (Some(_), None, None) => Ok(false),
        }
    }

    /// Ends the capture `key` began: its graph id and nodes.
    pub(crate) fn end(&mut self, key: Key, thread: ThreadId) -> CuResult<(usize, Vec<Node>)> {
        let id = *self.streams.get(&key).ok_or(ILLEGAL_STATE)?;
        let capture = self.captures.get_mut(&id).ok_or(ILLEGAL_STATE)?;
        if capture.mode != Mode::Relaxed && capture.thread != thread {
            return Err(CAPTURE_WRONG_THREAD);
        }
        if capture.origin != key {
            capture.invalidated = true;
            return Err(CAPTURE_UNMATCHED);
        }
        let capture = self.remove(id).ok_or(ILLEGAL_STATE)?;
        if capture.invalidated {
            return Err(CAPTURE_INVALIDATED);
        }
        if !capture.joined() {
            return Err(CAPTURE_UNJOINED);
        }
        Ok((capture.graph, capture.nodes))
    }

    /// Drops a capture and every stream's and event's part in it.
    fn remove(&mut self, id: u64) -> Option<Capture> {
        let capture = self.captures.remove(&id)?;
        for key in capture.members.keys() {
            self.streams.remove(key);
        }
        self.events.retain(|_, (owner, _)| *owner != id);
        Some(capture)
    }

    /// A destroyed stream leaves its capture (ending it if it began it).
    fn forget_stream(&mut self, key: Key) {
        let Some(id) = self.streams.remove(&key) else {
            return;
        };
        let origin = self.captures.get(&id).map(|c| c.origin);
        if origin == Some(key) {
            self.remove(id);
        } else if let Some(capture) = self.captures.get_mut(&id) {
            capture.members.remove(&key);
            capture.invalidated = true;
        }
    }

    /// The capture state of `key`.
    pub(crate) fn info(&mut self, key: Key) -> Option<Info> {
        let id = *self.streams.get(&key)?;
        let capture = self.captures.get_mut(&id)?;
        let member = capture.members.get_mut(&key)?;
        member.deps_out = member.frontier.clone();
        member.edges_out = vec![0; member.deps_out.len()];
        Some(Info {
            status: if capture.invalidated {
                STATUS_INVALIDATED
            } else {
                STATUS_ACTIVE
            },
            id: capture.id,
            graph: capture.graph,
            deps: member.deps_out.as_ptr().cast(),
            edges: member.edges_out.as_ptr().cast(),
            count: member.deps_out.len(),
        })
    }

    /// Captures that forbid a potentially unsafe call by `thread` in
    /// `mode`, as `cuThreadExchangeStreamCaptureMode` defines it.
    fn prohibiting(&self, thread: ThreadId, mode: Mode) -> Vec<u64> {
        self.captures
            .values()
            .filter(|c| {
                let own = c.thread == thread && c.mode != Mode::Relaxed;
                match mode {
                    Mode::Relaxed => false,
                    Mode::ThreadLocal => own,
                    Mode::Global => own || (c.thread != thread && c.mode == Mode::Global),
                }
            })
            .map(|c| c.id)
            .collect()
    }

    /// A potentially unsafe call: refused (invalidating the captures that
    /// forbid it) when the capture modes say so.
    fn unsafe_call(&mut self, thread: ThreadId, mode: Mode) -> CuResult<()> {
        let ids = self.prohibiting(thread, mode);
        if ids.is_empty() {
            return Ok(());
        }
        for id in ids {
            self.invalidate(id);
        }
        Err(CAPTURE_UNSUPPORTED)
    }

    /// Synchronizing or querying a stream.
    fn stream_sync(&mut self, key: Option<Key>, thread: ThreadId, mode: Mode) -> CuResult<()> {
        if let Some(&id) = key.and_then(|k| self.streams.get(&k)) {
            self.invalidate(id);
            return Err(CAPTURE_UNSUPPORTED);
        }
        self.unsafe_call(thread, mode)?;
        if key.is_none() {
            self.legacy_use()?;
        }
        Ok(())
    }

    /// Synchronizing or querying an event.
    fn event_sync(&mut self, event: usize, thread: ThreadId, mode: Mode) -> CuResult<()> {
        if let Some(&(id, _)) = self.events.get(&event) {
            self.invalidate(id);
            return Err(CAPTURED_EVENT);
        }
        self.unsafe_call(thread, mode)
    }

    /// Synchronizing the context: never allowed during a capture.
    fn ctx_sync(&mut self) -> CuResult<()> {
        if self.captures.is_empty() {
            return Ok(());
        }
        for capture in self.captures.values_mut() {
            capture.invalidated = true;
        }
        Err(CAPTURE_UNSUPPORTED)
    }

    fn nodes_of_graph(&self, graph: usize) -> Option<Vec<usize>> {
        self.captures
            .values()
            .find(|c| c.graph == graph)
            .map(|c| c.nodes.iter().map(|n| n.id).collect())
    }
}

static REGISTRY: LazyLock<Mutex<Captures>> = LazyLock::new(Mutex::default);
/// The number of captures; 0 lets every hook return without locking.
static ACTIVE: AtomicUsize = AtomicUsize::new(0);

/// True while no capture exists.
pub(crate) fn idle() -> bool {
    ACTIVE.load(Ordering::Acquire) == 0
}

pub(crate) fn with<R>(f: impl FnOnce(&mut Captures) -> R) -> R {
    let mut registry = lock(&REGISTRY);
    let result = f(&mut registry);
    ACTIVE.store(registry.captures.len(), Ordering::Release);
    result
}

/// Hook for work issued to `stream` in context `ctx`: true if a capture
/// recorded it (the caller must not submit it).
pub(crate) fn record(stream: CUstream, ctx: u64, make: impl FnOnce() -> Op) -> CuResult<bool> {
    if idle() {
        return Ok(false);
    }
    let key = key_of(stream);
    with(|c| c.record(key, || vec![Work { ctx, op: make() }]))
}

/// As [`record`], for several pieces of work (a graph launched into a
/// capture).
pub(crate) fn record_all(stream: CUstream, make: impl FnOnce() -> Vec<Work>) -> CuResult<bool> {
    if idle() {
        return Ok(false);
    }
    let key = key_of(stream);
    with(|c| c.record(key, make))
}

/// Hook for `cuEventRecord`: true if the record was captured.
pub(crate) fn record_event(event: CUevent, stream: CUstream) -> CuResult<bool> {
    if idle() {
        return Ok(false);
    }
    let key = key_of(stream);
    with(|c| c.record_event(event.addr(), key))
}

pub(crate) fn blocking(stream: CUstream) -> bool {
    stream.addr() == CU_STREAM_PER_THREAD
        || crate::priority::stream_flags(stream) & STREAM_NON_BLOCKING == 0
}

/// Hook for `cuStreamWaitEvent`: true if the wait was handled by capture.
pub(crate) fn wait_event(
    stream: CUstream,
    event: CUevent,
    flags: u32,
    ctx: u64,
    backend_event: u64,
) -> CuResult<bool> {
    if idle() {
        return Ok(false);
    }
    let key = key_of(stream);
    let blocking = blocking(stream);
    with(|c| {
        c.wait_event(key, blocking, event.addr(), flags, || Work {
            ctx,
            op: Op::WaitEvent {
                event: backend_event,
                flags,
            },
        })
    })
}

/// Hook for `cuStreamSynchronize` / `cuStreamQuery`.
pub(crate) fn on_stream_sync(stream: CUstream) -> CuResult<()> {
    if idle() {
        return Ok(());
    }
    let key = key_of(stream);
    with(|c| c.stream_sync(key, this_thread(), thread_mode()))
}

/// Hook for `cuEventSynchronize` / `cuEventQuery`.
pub(crate) fn on_event_sync(event: CUevent) -> CuResult<()> {
    if idle() {
        return Ok(());
    }
    with(|c| c.event_sync(event.addr(), this_thread(), thread_mode()))
}

/// Hook for `cuCtxSynchronize`.
pub(crate) fn on_ctx_sync() -> CuResult<()> {
    if idle() {
        return Ok(());
    }
    with(Captures::ctx_sync)
}

/// Hook for potentially unsafe calls (`cuMemAlloc`, `cuMemFree`).
pub(crate) fn on_unsafe_call() -> CuResult<()> {
    if idle() {
        return Ok(());
    }
    with(|c| c.unsafe_call(this_thread(), thread_mode()))
}

/// Hook for synchronous copies and memsets (legacy-stream work that
/// waits).
pub(crate) fn on_legacy_sync() -> CuResult<()> {
    if idle() {
        return Ok(());
    }
    with(|c| {
        c.unsafe_call(this_thread(), thread_mode())?;
        c.legacy_use()
    })
}

/// Hook for `cuStreamDestroy`.
pub(crate) fn forget_stream(stream: CUstream) {
    if idle() {
        return;
    }
    if let Some(key) = key_of(stream) {
        with(|c| c.forget_stream(key));
    }
}

/// The node ids of the graph a capture is building, if `graph` is one.
pub(crate) fn nodes_of_graph(graph: usize) -> Option<Vec<usize>> {
    with(|c| c.nodes_of_graph(graph))
}

#[cfg(test)]
#[path = "capture_tests.rs"]
mod tests;
