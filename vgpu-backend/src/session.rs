//! A guest session: its contexts and the handle tables of everything created
//! in them. Every guest-supplied handle and device address is checked here
//! before anything reaches the executor.
//!
//! Handles are drawn from one process-wide counter, so a handle is never
//! reused: a stale handle, or one that belongs to another session, is simply
//! not in this session's tables.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vgpu_spec::Status;

use crate::devmem::{DeviceMemory, RangeKind};
use crate::gpu::{Gpu, GpuContext, HostBuf, ParamLayout, RawHandle, StreamRef};
use crate::metering::SessionMeter;
use crate::slice::SliceMemory;
use crate::throttle::Throttle;

static NEXT_HANDLE: AtomicU64 = AtomicU64::new(1);

/// A handle never issued before by this process.
pub fn fresh_handle() -> u64 {
    NEXT_HANDLE.fetch_add(1, Ordering::Relaxed)
}

/// An executor object that lives in one context.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owned {
    /// Guest handle of the owning context.
    pub context: u64,
    /// The executor's handle.
    pub raw: RawHandle,
}

/// A kernel: its executor handle and parameter layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Function {
    /// Guest handle of the owning context.
    pub context: u64,
    /// Guest handle of the module it came from.
    pub module: u64,
    /// The executor's handle.
    pub raw: RawHandle,
    /// Parameter layout, as the executor reported it.
    pub layout: Vec<ParamLayout>,
    /// Size of the packed parameter block: the largest `offset + size`.
    pub param_bytes: u64,
}

/// The size of the packed parameter block a layout describes.
pub fn layout_end(layout: &[ParamLayout]) -> u64 {
    layout
        .iter()
        .map(|p| u64::from(p.offset) + u64::from(p.size))
        .max()
        .unwrap_or(0)
}

/// One guest process's view of the device.
pub struct Session {
    id: u64,
    pid: u32,
    pub(crate) gpu: Arc<dyn Gpu>,
    pub(crate) slice: Arc<SliceMemory>,
    pub(crate) contexts: HashMap<u64, Box<dyn GpuContext>>,
    pub(crate) modules: HashMap<u64, Owned>,
    pub(crate) functions: HashMap<u64, Function>,
    pub(crate) streams: HashMap<u64, Owned>,
    pub(crate) events: HashMap<u64, Owned>,
    pub(crate) memory: DeviceMemory,
    /// Reused host buffer list for copies.
    pub(crate) bufs: Vec<HostBuf>,
    /// The grant board gate and usage counters.
    pub(crate) throttle: Arc<Throttle>,
    /// This session's usage, for the ledger.
    pub(crate) meter: Arc<SessionMeter>,
    /// Asks the scheduler for memory when the GPU is full (with a scheduler).
    pub(crate) claimer: Option<Arc<crate::memctl::Claimer>>,
}

impl Session {
    /// An empty session.
    pub fn new(id: u64, pid: u32, gpu: Arc<dyn Gpu>, slice: Arc<SliceMemory>) -> Self {
        Session {
            id,
            pid,
            gpu,
            slice,
            contexts: HashMap::new(),
            modules: HashMap::new(),
            functions: HashMap::new(),
            streams: HashMap::new(),
            events: HashMap::new(),
            memory: DeviceMemory::default(),
            bufs: Vec::new(),
            throttle: Throttle::disabled(),
            meter: SessionMeter::new(0),
            claimer: None,
        }
    }

    /// Counts the session's usage on `meter` (a fresh, unread meter by
    /// default).
    /// Asks `claimer` for memory when the GPU is full.
    pub fn with_claimer(mut self, claimer: Option<Arc<crate::memctl::Claimer>>) -> Self {
        self.claimer = claimer;
        self
    }

    pub fn with_meter(mut self, meter: Arc<SessionMeter>) -> Self {
        self.meter = meter;
        self
    }

    /// The session's usage meter.
    pub fn meter(&self) -> &Arc<SessionMeter> {
        &self.meter
    }

    /// Gates dispatch on, and reports usage to, `throttle`.
    pub fn with_throttle(mut self, throttle: Arc<Throttle>) -> Self {
        self.throttle = throttle;
        self
    }

    /// Marks the end of a queue batch in every context.
    pub fn end_batch(&mut self) {
        for ctx in self.contexts.values_mut() {
            ctx.end_batch();
        }
    }

    /// The session id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The guest process id given at open.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Bytes of device memory the session holds.
    pub fn allocated_bytes(&self) -> u64 {
        self.memory.allocated_bytes()
    }

    /// Number of live contexts.
    pub fn context_count(&self) -> usize {
        self.contexts.len()
    }

    /// Checks that `context` is a context of this session.
    pub fn check_context(&self, context: u64) -> Result<u64, Status> {
        if self.contexts.contains_key(&context) {
            Ok(context)
        } else {
            Err(Status::INVALID_CONTEXT)
        }
    }

    /// The executor context for a guest context handle.
    pub fn gpu_context(&mut self, context: u64) -> Result<&mut dyn GpuContext, Status> {
        match self.contexts.get_mut(&context) {
            Some(ctx) => Ok(ctx.as_mut()),
            None => Err(Status::INVALID_CONTEXT),
        }
    }

    /// Resolves a guest stream handle for work in `context`: zero is the
    /// context's default stream; any other handle must be a stream of this
    /// session created in that same context.
    pub fn stream_in(&self, stream: u64, context: u64) -> Result<StreamRef, Status> {
        if stream == 0 {
            return Ok(None);
        }
        let s = self.streams.get(&stream).ok_or(Status::INVALID_HANDLE)?;
        if s.context != context {
            return Err(Status::INVALID_HANDLE);
        }
        Ok(Some(s.raw))
    }

    /// Resolves a guest stream handle on its own: its context and executor
    /// handle. Zero means the default stream of `current`.
    pub fn stream_any(&self, stream: u64, current: u64) -> Result<(u64, StreamRef), Status> {
        if stream == 0 {
            return Ok((self.check_context(current)?, None));
        }
        let s = self.streams.get(&stream).ok_or(Status::INVALID_HANDLE)?;
        Ok((s.context, Some(s.raw)))
    }

    /// Looks up an event.
    pub fn event(&self, event: u64) -> Result<Owned, Status> {
        self.events
            .get(&event)
            .copied()
            .ok_or(Status::INVALID_HANDLE)
    }

    /// Looks up a module.
    pub fn module(&self, module: u64) -> Result<Owned, Status> {
        self.modules
            .get(&module)
            .copied()
            .ok_or(Status::INVALID_HANDLE)
    }

    /// Adds a new context and returns its handle.
    pub fn add_context(&mut self, ctx: Box<dyn GpuContext>) -> u64 {
        let handle = fresh_handle();
        self.contexts.insert(handle, ctx);
        handle
    }

    /// Destroys a context: forgets every object created in it, returns its
    /// allocations to the slice, and drops the executor context (which
    /// frees everything on the device).
    pub fn destroy_context(&mut self, context: u64) -> Result<(), Status> {
        let ctx = self
            .contexts
            .remove(&context)
            .ok_or(Status::INVALID_CONTEXT)?;
        self.modules.retain(|_, m| m.context != context);
        self.functions.retain(|_, f| f.context != context);
        self.streams.retain(|_, s| s.context != context);
        self.events.retain(|_, e| e.context != context);
        let freed = self.memory.remove_where(|r| r.context == context);
        drop(ctx);
        self.slice.release(freed);
        self.meter.freed(freed);
        Ok(())
    }

    /// Forgets a module, its functions and its globals.
    pub fn forget_module(&mut self, module: u64) {
        self.modules.remove(&module);
        self.functions.retain(|_, f| f.module != module);
        self.memory
            .remove_where(|r| r.kind == RangeKind::Global(module));
    }

    /// Waits for every context (before guest memory goes away).
    pub fn synchronize_all(&mut self) {
        for (handle, ctx) in self.contexts.iter_mut() {
            if let Err(status) = ctx.synchronize() {
                tracing::debug!(session = self.id, context = handle, %status, "Context synchronize failed");
            }
        }
    }

    /// Swaps every context's memory out (each drains its work first); bytes moved. Contexts
    /// whose executor has no elastic memory count nothing.
    pub fn swap_out_all(&mut self) -> Result<u64, vgpu_spec::Status> {
        let moved = self.each_context(|ctx| ctx.swap_out());
        self.meter.swapped(self.memory_usage());
        moved
    }

    /// Swaps every context's memory back in; bytes moved. Stops at the first context that
    /// cannot get its memory back (it, and those after it, stay swapped out).
    pub fn swap_in_all(&mut self) -> Result<u64, vgpu_spec::Status> {
        let moved = self.each_context(|ctx| ctx.swap_in());
        self.meter.swapped(self.memory_usage());
        moved
    }

    /// Sums `step` over the contexts, stopping at the first failure; `NOT_SUPPORTED` (no
    /// elastic memory) counts nothing.
    fn each_context(
        &mut self,
        mut step: impl FnMut(&mut dyn GpuContext) -> Result<u64, vgpu_spec::Status>,
    ) -> Result<u64, vgpu_spec::Status> {
        let mut moved = 0u64;
        for ctx in self.contexts.values_mut() {
            match step(ctx.as_mut()) {
                Ok(n) => moved = moved.saturating_add(n),
                Err(vgpu_spec::Status::NOT_SUPPORTED) => {}
                Err(status) => return Err(status),
            }
        }
        Ok(moved)
    }

    /// The contexts' device memory, resident and swapped out.
    pub fn memory_usage(&self) -> crate::gpu::MemoryUsage {
        self.contexts
            .values()
            .fold(crate::gpu::MemoryUsage::default(), |acc, c| {
                acc + c.memory_usage()
            })
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let bytes = self.memory.allocated_bytes();
        self.streams.clear();
        self.events.clear();
        self.functions.clear();
        self.modules.clear();
        // Dropping the executor contexts frees everything they hold (and
        // accounts their last GPU time to the meter).
        self.contexts.clear();
        self.slice.release(bytes);
        self.meter.close();
        tracing::debug!(
            session = self.id,
            pid = self.pid,
            freed = bytes,
            "Session closed"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_handles_are_nonzero_and_never_repeat() {
        let a = fresh_handle();
        let b = fresh_handle();
        assert!(a != 0 && b != 0);
        assert_ne!(a, b);
    }

    #[test]
    fn layout_end_is_the_largest_offset_plus_size() {
        let l = [
            ParamLayout { offset: 0, size: 8 },
            ParamLayout {
                offset: 16,
                size: 4,
            },
            ParamLayout { offset: 8, size: 8 },
        ];
        assert_eq!(layout_end(&l), 20);
        assert_eq!(layout_end(&[]), 0);
        let big = [ParamLayout {
            offset: u32::MAX,
            size: u32::MAX,
        }];
        assert_eq!(layout_end(&big), 2 * u64::from(u32::MAX));
    }
}
