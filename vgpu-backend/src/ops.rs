//! Submission-queue requests, executed on a session after validation.

use vgpu_spec::wire::{
    EventElapsedReq, FunctionResp, GlobalResp, LaunchReq, MemcpyDtoDReq, MemcpyHostReq, MemsetReq,
    ModuleSymbolReq, ParamInfo, ReqHeader, SgEntry, StreamWaitEventReq, CLUSTER_DIMS_BYTES,
    FLAG_ASYNC, FLAG_CLUSTER, FLAG_COOPERATIVE, FLAG_TRANSIENT_SOURCE,
};
use vgpu_spec::{Request, Status};

use crate::gpu::{LaunchConfig, LaunchMode, OccupancyQuery};
use crate::guest::{host_buffers, GuestMemoryMmap};
use crate::reply::Reply;
use crate::session::{fresh_handle, layout_end, Function, Owned, Session};

pub(crate) type OpResult = Result<Reply, Status>;

fn symbol_name(name: &[u8]) -> Result<&str, Status> {
    std::str::from_utf8(name).map_err(|_| Status::INVALID_VALUE)
}

impl Session {
    /// Executes one submission-queue request. `mem` is the connection's
    /// guest memory, for scatter-gather copies.
    pub fn execute(
        &mut self,
        header: &ReqHeader,
        req: &Request<'_>,
        mem: &GuestMemoryMmap,
    ) -> OpResult {
        let flags = header.flags.get();
        let current = header.context.get();
        // Every request but these needs a current context of this session.
        match req {
            Request::CtxCreate(_) | Request::CtxDestroy(_) | Request::MemGetInfo => {}
            _ => {
                self.check_context(current)?;
            }
        }
        // GPU work waits here while the grant board holds the slice back.
        if is_gpu_work(req) {
            self.throttle.gate();
        }
        match req {
            Request::GetDeviceInfo | Request::SessionOpen(_) | Request::SessionClose => {
                Err(Status::INVALID_VALUE)
            }
            Request::CtxCreate(r) => {
                let ctx = self
                    .gpu
                    .create_metered_context(r.flags.get(), &self.meter)?;
                Ok(Reply::Handle(self.add_context(ctx)))
            }
            Request::CtxDestroy(r) => self.destroy_context(r.handle.get()).map(|_| Reply::Empty),
            Request::CtxSynchronize => {
                self.gpu_context(current)?.synchronize()?;
                Ok(Reply::Empty)
            }
            Request::MemAlloc(r) => self.mem_alloc(current, r.size.get()),
            Request::MemFree(r) => self.mem_free(r.handle.get()),
            Request::MemGetInfo => Ok(Reply::MemInfo {
                free: self.slice.free(),
                total: self.slice.limit(),
            }),
            Request::MemcpyHtoD(r, segs) => self.memcpy_host(r, segs, mem, flags, true),
            Request::MemcpyDtoH(r, segs) => self.memcpy_host(r, segs, mem, flags, false),
            Request::MemcpyDtoD(r) => self.memcpy_dtod(r, flags),
            Request::Memset(r) => self.memset(r, flags),
            Request::ModuleLoad(_, image) => {
                let raw = self.gpu_context(current)?.module_load(image)?;
                let handle = fresh_handle();
                self.modules.insert(
                    handle,
                    Owned {
                        context: current,
                        raw,
                    },
                );
                Ok(Reply::Handle(handle))
            }
            Request::ModuleUnload(r) => {
                let module = r.handle.get();
                let m = self.module(module)?;
                self.gpu_context(m.context)?.module_unload(m.raw)?;
                self.forget_module(module);
                Ok(Reply::Empty)
            }
            Request::GetFunction(r, name) => self.get_function(r, name),
            Request::GetGlobal(r, name) => self.get_global(r, name),
            Request::ModuleLink(r, parts) => self.module_link(r, parts, current, mem),
            Request::Launch(r, params) => self.launch(r, params, flags),
            Request::StreamCreate(r) => {
                let raw = self
                    .gpu_context(current)?
                    .stream_create(r.flags.get(), r.priority.get())?;
                let handle = fresh_handle();
                self.streams.insert(
                    handle,
                    Owned {
                        context: current,
                        raw,
                    },
                );
                Ok(Reply::Handle(handle))
            }
            Request::StreamDestroy(r) => {
                let handle = r.handle.get();
                let s = *self.streams.get(&handle).ok_or(Status::INVALID_HANDLE)?;
                self.gpu_context(s.context)?.stream_destroy(s.raw)?;
                self.streams.remove(&handle);
                Ok(Reply::Empty)
            }
            Request::StreamSynchronize(r) => {
                let (ctx, stream) = self.stream_any(r.handle.get(), current)?;
                self.gpu_context(ctx)?.stream_synchronize(stream)?;
                Ok(Reply::Empty)
            }
            Request::StreamQuery(r) => {
                let (ctx, stream) = self.stream_any(r.handle.get(), current)?;
                self.gpu_context(ctx)?.stream_query(stream)?;
                Ok(Reply::Empty)
            }
            Request::StreamWaitEvent(r) => self.stream_wait_event(r, current),
            Request::EventCreate(r) => {
                let raw = self.gpu_context(current)?.event_create(r.flags.get())?;
                let handle = fresh_handle();
                self.events.insert(
                    handle,
                    Owned {
                        context: current,
                        raw,
                    },
                );
                Ok(Reply::Handle(handle))
            }
            Request::EventRecord(r) => {
                let e = self.event(r.event.get())?;
                let stream = self.stream_in(r.stream.get(), e.context)?;
                self.gpu_context(e.context)?.event_record(e.raw, stream)?;
                Ok(Reply::Empty)
            }
            Request::EventSynchronize(r) => {
                let e = self.event(r.handle.get())?;
                self.gpu_context(e.context)?.event_synchronize(e.raw)?;
                Ok(Reply::Empty)
            }
            Request::EventQuery(r) => {
                let e = self.event(r.handle.get())?;
                self.gpu_context(e.context)?.event_query(e.raw)?;
                Ok(Reply::Empty)
            }
            Request::EventElapsed(r) => self.event_elapsed(r),
            Request::EventDestroy(r) => {
                let handle = r.handle.get();
                let e = self.event(handle)?;
                self.gpu_context(e.context)?.event_destroy(e.raw)?;
                self.events.remove(&handle);
                Ok(Reply::Empty)
            }
            Request::FuncGetAttribute(r) => {
                let (ctx, raw) = self.function_raw(r.function.get())?;
                let value = self
                    .gpu_context(ctx)?
                    .func_get_attribute(raw, r.attrib.get())?;
                Ok(Reply::Value(value.into()))
            }
            Request::FuncSetAttribute(r) => {
                let (ctx, raw) = self.function_raw(r.function.get())?;
                let ctx = self.gpu_context(ctx)?;
                ctx.func_set_attribute(raw, r.attrib.get(), r.value.get())?;
                Ok(Reply::Empty)
            }
            Request::FuncOccupancy(r) => {
                let (ctx, raw) = self.function_raw(r.function.get())?;
                let query = OccupancyQuery {
                    kind: r.query.get(),
                    flags: r.flags.get(),
                    config: LaunchConfig {
                        grid: r.grid.map(|v| v.get()),
                        block: r.block.map(|v| v.get()),
                        shared_mem: r.shared_mem.get(),
                    },
                    cluster: r.cluster.map(|v| v.get()),
                    num_blocks: r.num_blocks.get(),
                };
                Ok(Reply::Value(self.gpu_context(ctx)?.occupancy(raw, &query)?))
            }
        }
    }

    fn mem_alloc(&mut self, current: u64, size: u64) -> OpResult {
        if size == 0 {
            return Err(Status::INVALID_VALUE);
        }
        if !self.slice.try_reserve(size) {
            return Err(Status::OUT_OF_MEMORY);
        }
        let mut result = self.gpu_context(current).and_then(|c| c.mem_alloc(size));
        if result == Err(Status::OUT_OF_MEMORY) {
            // Within the slice's limit but the GPU is full: the scheduler may take memory from
            // slices above their guarantee (if this one is within its own).
            if let Some(claimer) = self.claimer.clone() {
                if claimer.claim(size.next_multiple_of(crate::elastic::CHUNK)) {
                    result = self.gpu_context(current).and_then(|c| c.mem_alloc(size));
                }
            }
        }
        let ptr = match result {
            Ok(ptr) => ptr,
            Err(status) => {
                self.slice.release(size);
                return Err(status);
            }
        };
        if let Err(status) = self.memory.insert_allocation(ptr, size, current) {
            if let Ok(ctx) = self.gpu_context(current) {
                let _ = ctx.mem_free(ptr);
            }
            self.slice.release(size);
            return Err(status);
        }
        self.meter.allocated(size);
        Ok(Reply::Handle(ptr))
    }

    fn mem_free(&mut self, ptr: u64) -> OpResult {
        let range = *self.memory.allocation_at(ptr)?;
        self.gpu_context(range.context)?.mem_free(ptr)?;
        self.memory.remove(ptr);
        self.slice.release(range.size);
        self.meter.freed(range.size);
        Ok(Reply::Empty)
    }

    fn memcpy_host(
        &mut self,
        r: &MemcpyHostReq,
        segs: &[SgEntry],
        mem: &GuestMemoryMmap,
        flags: u32,
        to_device: bool,
    ) -> OpResult {
        let ptr = r.device_ptr.get();
        let context = self.memory.find(ptr, r.total_len.get())?.context;
        let stream = self.stream_in(r.stream.get(), context)?;
        let mut bufs = std::mem::take(&mut self.bufs);
        let result = host_buffers(mem, segs, &mut bufs).and_then(|()| {
            let asynchronous = flags & FLAG_ASYNC != 0;
            let ctx = self.gpu_context(context)?;
            if to_device {
                let snapshot = flags & FLAG_TRANSIENT_SOURCE != 0;
                ctx.memcpy_htod(ptr, &bufs, stream, asynchronous, snapshot)
            } else {
                ctx.memcpy_dtoh(&bufs, ptr, stream, asynchronous)
            }
        });
        bufs.clear();
        self.bufs = bufs;
        result?;
        let bytes = r.total_len.get();
        let (htod, dtoh) = if to_device { (bytes, 0) } else { (0, bytes) };
        self.throttle.add_copied(htod, dtoh);
        self.meter.add_copied(htod, dtoh);
        Ok(Reply::Empty)
    }

    fn memcpy_dtod(&mut self, r: &MemcpyDtoDReq, flags: u32) -> OpResult {
        let size = r.size.get();
        let dst = self.memory.find(r.dst.get(), size)?.context;
        let src = self.memory.find(r.src.get(), size)?.context;
        if dst != src {
            return Err(Status::INVALID_VALUE);
        }
        let stream = self.stream_in(r.stream.get(), dst)?;
        self.gpu_context(dst)?.memcpy_dtod(
            r.dst.get(),
            r.src.get(),
            size,
            stream,
            flags & FLAG_ASYNC != 0,
        )?;
        Ok(Reply::Empty)
    }

    fn memset(&mut self, r: &MemsetReq, flags: u32) -> OpResult {
        let elem = r.elem_size.get();
        let count = r.count.get();
        let len = count
            .checked_mul(u64::from(elem))
            .ok_or(Status::INVALID_VALUE)?;
        let context = self.memory.find(r.dst.get(), len)?.context;
        let stream = self.stream_in(r.stream.get(), context)?;
        self.gpu_context(context)?.memset(
            r.dst.get(),
            r.value.get(),
            elem,
            count,
            stream,
            flags & FLAG_ASYNC != 0,
        )?;
        Ok(Reply::Empty)
    }

    fn get_function(&mut self, r: &ModuleSymbolReq, name: &[u8]) -> OpResult {
        let module = r.module.get();
        let m = self.module(module)?;
        let name = symbol_name(name)?;
        let (raw, layout) = self.gpu_context(m.context)?.get_function(m.raw, name)?;
        let param_bytes = layout_end(&layout);
        let params: Vec<ParamInfo> = layout
            .iter()
            .map(|p| ParamInfo {
                offset: p.offset.into(),
                size: p.size.into(),
            })
            .collect();
        let resp = |handle: u64| FunctionResp {
            function: handle.into(),
            param_count: (params.len() as u32).into(),
            param_bytes: (param_bytes.min(u64::from(u32::MAX)) as u32).into(),
        };
        // Looking a kernel up again returns the handle issued before.
        if let Some((handle, _)) = self
            .functions
            .iter()
            .find(|(_, f)| f.module == module && f.raw == raw)
        {
            return Ok(Reply::Function(resp(*handle), params));
        }
        let handle = fresh_handle();
        self.functions.insert(
            handle,
            Function {
                context: m.context,
                module,
                raw,
                layout,
                param_bytes,
            },
        );
        Ok(Reply::Function(resp(handle), params))
    }

    fn get_global(&mut self, r: &ModuleSymbolReq, name: &[u8]) -> OpResult {
        let module = r.module.get();
        let m = self.module(module)?;
        let name = symbol_name(name)?;
        let (dptr, size) = self.gpu_context(m.context)?.get_global(m.raw, name)?;
        self.memory.insert_global(dptr, size, m.context, module)?;
        Ok(Reply::Global(GlobalResp {
            dptr: dptr.into(),
            size: size.into(),
        }))
    }

    /// The owning context and executor handle of a function.
    fn function_raw(&self, function: u64) -> Result<(u64, crate::gpu::RawHandle), Status> {
        let f = self
            .functions
            .get(&function)
            .ok_or(Status::INVALID_HANDLE)?;
        Ok((f.context, f.raw))
    }

    fn launch(&mut self, r: &LaunchReq, params: &[u8], flags: u32) -> OpResult {
        let (cluster, params) = split_cluster(params, flags)?;
        let function = r.function.get();
        let f = self
            .functions
            .get(&function)
            .ok_or(Status::INVALID_HANDLE)?;
        if params.len() as u64 != f.param_bytes {
            return Err(Status::INVALID_VALUE);
        }
        let stream = self.stream_in(r.stream.get(), f.context)?;
        let config = LaunchConfig {
            grid: r.grid.map(|v| v.get()),
            block: r.block.map(|v| v.get()),
            shared_mem: r.shared_mem.get(),
        };
        // Field borrows: the function table is read while a context is used.
        let ctx = self
            .contexts
            .get_mut(&f.context)
            .ok_or(Status::INVALID_CONTEXT)?;
        // A kernel the executor runs before returning (emulated timed
        // kernels) charges its GPU time to this thread.
        let charged = crate::metering::thread_gpu_ns();
        let mode = LaunchMode {
            cluster,
            cooperative: flags & FLAG_COOPERATIVE != 0,
        };
        let launched = if mode == LaunchMode::default() {
            ctx.launch(f.raw, config, stream, params, &f.layout)
        } else {
            ctx.launch_ex(f.raw, config, mode, stream, params, &f.layout)
        };
        self.meter
            .add_gpu_ns(crate::metering::thread_gpu_ns().wrapping_sub(charged));
        launched?;
        self.throttle.add_launches(1);
        self.meter.add_kernels(1);
        Ok(Reply::Empty)
    }

    fn stream_wait_event(&mut self, r: &StreamWaitEventReq, current: u64) -> OpResult {
        let e = self.event(r.event.get())?;
        let (context, stream) = self.stream_any(r.stream.get(), current)?;
        if context != e.context {
            return Err(Status::INVALID_HANDLE);
        }
        self.gpu_context(context)?
            .stream_wait_event(stream, e.raw)?;
        Ok(Reply::Empty)
    }

    fn event_elapsed(&mut self, r: &EventElapsedReq) -> OpResult {
        let start = self.event(r.start.get())?;
        let end = self.event(r.end.get())?;
        if start.context != end.context {
            return Err(Status::INVALID_HANDLE);
        }
        let ms = self
            .gpu_context(start.context)?
            .event_elapsed(start.raw, end.raw)?;
        Ok(Reply::Elapsed(ms))
    }
}

/// Requests that put work on the GPU: the grant board governs them.
pub(crate) fn is_gpu_work(req: &Request<'_>) -> bool {
    matches!(
        req,
        Request::Launch(..)
            | Request::MemcpyHtoD(..)
            | Request::MemcpyDtoH(..)
            | Request::MemcpyDtoD(..)
            | Request::Memset(..)
    )
}

/// With `FLAG_CLUSTER`, the cluster dimensions that precede a launch's
/// parameters, and the parameters; without it, no dimensions.
fn split_cluster(params: &[u8], flags: u32) -> Result<(Option<[u32; 3]>, &[u8]), Status> {
    if flags & FLAG_CLUSTER == 0 {
        return Ok((None, params));
    }
    if params.len() < CLUSTER_DIMS_BYTES {
        return Err(Status::INVALID_VALUE);
    }
    let (dims, rest) = params.split_at(CLUSTER_DIMS_BYTES);
    let mut cluster = [0u32; 3];
    for (d, bytes) in cluster.iter_mut().zip(dims.chunks_exact(4)) {
        *d = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    }
    Ok((Some(cluster), rest))
}

#[cfg(test)]
mod cluster_tests {
    use super::*;

    #[test]
    fn cluster_dimensions_precede_the_parameters_only_with_the_flag() {
        let mut bytes = Vec::new();
        for d in [2u32, 1, 1] {
            bytes.extend_from_slice(&d.to_le_bytes());
        }
        bytes.extend_from_slice(&[7, 8]);
        assert_eq!(
            split_cluster(&bytes, FLAG_CLUSTER),
            Ok((Some([2, 1, 1]), &[7u8, 8][..]))
        );
        assert_eq!(split_cluster(&bytes, 0), Ok((None, &bytes[..])));
        assert_eq!(
            split_cluster(&bytes[..8], FLAG_CLUSTER),
            Err(Status::INVALID_VALUE)
        );
    }
}
