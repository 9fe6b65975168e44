//! Faulting kernels on the emulated device: `vgpu_fault(u64 kind)`.
//!
//! On a real GPU a kernel that faults (an illegal address, a `trap`)
//! poisons its context: the launch itself is accepted, and from then on
//! every call in that context returns the same *sticky* error until the
//! context is destroyed. Other contexts are unaffected. The CUDA executor
//! gets this from the driver and passes every status through unchanged.
//!
//! The emulated device does not run kernels, so [`Faulting`] models it: it
//! wraps an emulated context, recognises launches of the module
//! [`FAULT_PTX`] (which faults the same way on a real GPU), and after one
//! returns the sticky error from every call. Kind 0 stands for an illegal
//! address ([`Status::ILLEGAL_ADDRESS`]), any other kind for a trap
//! ([`Status::LAUNCH_FAILED`], what the driver reports for `trap;`).
//! Dropping the context (`cuCtxDestroy`) still frees everything it held.

use std::collections::HashSet;

use vgpu_spec::Status;

use super::{
    GpuContext, GpuResult, HostBuf, LaunchConfig, LaunchMode, LinkJob, Linked, MemoryUsage,
    ParamLayout, RawHandle, StreamRef,
};

/// The entry point of the faulting kernel.
pub const FAULT_ENTRY: &str = "vgpu_fault";

/// A PTX module holding `vgpu_fault(u64 kind)`.
pub const FAULT_PTX: &str = include_str!("../../../tests/ptx/vgpu_fault.ptx");

/// `kind` of an illegal-address fault; every other value traps.
pub const KIND_ILLEGAL_ADDRESS: u64 = 0;
/// `kind` of a trap.
pub const KIND_TRAP: u64 = 1;

/// True if an entry with this name and layout is the faulting kernel.
pub fn is_fault(name: &str, params: &[ParamLayout]) -> bool {
    name == FAULT_ENTRY && params == [ParamLayout { offset: 0, size: 8 }]
}

/// The sticky error a `vgpu_fault` launch with these packed parameters
/// leaves behind, as a real GPU reports it.
pub fn fault_status(params: &[u8]) -> Option<Status> {
    let bytes: [u8; 8] = params.get(..8)?.try_into().ok()?;
    Some(match u64::from_le_bytes(bytes) {
        KIND_ILLEGAL_ADDRESS => Status::ILLEGAL_ADDRESS,
        _ => Status::LAUNCH_FAILED,
    })
}

/// A context that a faulting kernel can poison, as a GPU fault does.
pub struct Faulting<C> {
    inner: C,
    /// Handles of `vgpu_fault` functions looked up in this context.
    fault_functions: HashSet<RawHandle>,
    /// The sticky error, once a faulting kernel ran.
    poisoned: Option<Status>,
}

impl<C: GpuContext> Faulting<C> {
    /// Wraps a healthy context.
    pub fn new(inner: C) -> Faulting<C> {
        Faulting {
            inner,
            fault_functions: HashSet::new(),
            poisoned: None,
        }
    }

    /// The sticky error, if the context is poisoned.
    pub fn poisoned(&self) -> Option<Status> {
        self.poisoned
    }
}

impl<C> Faulting<C> {
    /// After an accepted launch: a `vgpu_fault` kernel poisons the context.
    fn after_launch(&mut self, function: RawHandle, params: &[u8]) -> GpuResult<()> {
        if self.fault_functions.contains(&function) {
            let status = fault_status(params).ok_or(Status::INVALID_VALUE)?;
            tracing::info!(%status, "A vgpu_fault kernel poisoned its context");
            self.poisoned = Some(status);
        }
        Ok(())
    }
}

/// Returns the sticky error, or the inner context to call.
macro_rules! healthy {
    ($self:ident) => {{
        if let Some(status) = $self.poisoned {
            return Err(status);
        }
        &mut $self.inner
    }};
}

impl<C: GpuContext> GpuContext for Faulting<C> {
    fn synchronize(&mut self) -> GpuResult<()> {
        healthy!(self).synchronize()
    }

    fn mem_alloc(&mut self, size: u64) -> GpuResult<u64> {
        healthy!(self).mem_alloc(size)
    }

    fn mem_free(&mut self, dptr: u64) -> GpuResult<()> {
        healthy!(self).mem_free(dptr)
    }

    fn memcpy_htod(
        &mut self,
        dst: u64,
        src: &[HostBuf],
        stream: StreamRef,
        asynchronous: bool,
        snapshot: bool,
    ) -> GpuResult<()> {
        healthy!(self).memcpy_htod(dst, src, stream, asynchronous, snapshot)
    }

    fn memcpy_dtoh(
        &mut self,
        dst: &[HostBuf],
        src: u64,
        stream: StreamRef,
        asynchronous: bool,
    ) -> GpuResult<()> {
        healthy!(self).memcpy_dtoh(dst, src, stream, asynchronous)
    }

    fn memcpy_dtod(
        &mut self,
        dst: u64,
        src: u64,
        size: u64,
        stream: StreamRef,
        asynchronous: bool,
    ) -> GpuResult<()> {
        healthy!(self).memcpy_dtod(dst, src, size, stream, asynchronous)
    }

    fn memset(
        &mut self,
        dst: u64,
        value: u32,
        elem_size: u32,
        count: u64,
        stream: StreamRef,
        asynchronous: bool,
    ) -> GpuResult<()> {
        healthy!(self).memset(dst, value, elem_size, count, stream, asynchronous)
    }

    fn module_load(&mut self, image: &[u8]) -> GpuResult<RawHandle> {
        healthy!(self).module_load(image)
    }

    fn module_unload(&mut self, module: RawHandle) -> GpuResult<()> {
        healthy!(self).module_unload(module)
    }

    fn get_function(
        &mut self,
        module: RawHandle,
        name: &str,
    ) -> GpuResult<(RawHandle, Vec<ParamLayout>)> {
        let (handle, params) = healthy!(self).get_function(module, name)?;
        if is_fault(name, &params) {
            self.fault_functions.insert(handle);
        }
        Ok((handle, params))
    }

    fn get_global(&mut self, module: RawHandle, name: &str) -> GpuResult<(u64, u64)> {
        healthy!(self).get_global(module, name)
    }

    fn launch(
        &mut self,
        function: RawHandle,
        config: LaunchConfig,
        stream: StreamRef,
        params: &[u8],
        layout: &[ParamLayout],
    ) -> GpuResult<()> {
        healthy!(self).launch(function, config, stream, params, layout)?;
        self.after_launch(function, params)
    }

    /// A cluster or cooperative `vgpu_fault` launch poisons the context as a
    /// plain one does.
    fn launch_ex(
        &mut self,
        function: RawHandle,
        config: LaunchConfig,
        mode: LaunchMode,
        stream: StreamRef,
        params: &[u8],
        layout: &[ParamLayout],
    ) -> GpuResult<()> {
        healthy!(self).launch_ex(function, config, mode, stream, params, layout)?;
        self.after_launch(function, params)
    }

    fn link(&mut self, job: &LinkJob<'_>) -> Linked {
        match self.poisoned {
            Some(status) => Linked::failed(status),
            None => self.inner.link(job),
        }
    }

    fn stream_create(&mut self, flags: u32, priority: i32) -> GpuResult<RawHandle> {
        healthy!(self).stream_create(flags, priority)
    }

    fn stream_destroy(&mut self, stream: RawHandle) -> GpuResult<()> {
        healthy!(self).stream_destroy(stream)
    }

    fn stream_synchronize(&mut self, stream: StreamRef) -> GpuResult<()> {
        healthy!(self).stream_synchronize(stream)
    }

    fn stream_query(&mut self, stream: StreamRef) -> GpuResult<()> {
        healthy!(self).stream_query(stream)
    }

    fn stream_wait_event(&mut self, stream: StreamRef, event: RawHandle) -> GpuResult<()> {
        healthy!(self).stream_wait_event(stream, event)
    }

    fn event_create(&mut self, flags: u32) -> GpuResult<RawHandle> {
        healthy!(self).event_create(flags)
    }

    fn event_record(&mut self, event: RawHandle, stream: StreamRef) -> GpuResult<()> {
        healthy!(self).event_record(event, stream)
    }

    fn event_synchronize(&mut self, event: RawHandle) -> GpuResult<()> {
        healthy!(self).event_synchronize(event)
    }

    fn event_query(&mut self, event: RawHandle) -> GpuResult<()> {
        healthy!(self).event_query(event)
    }

    fn event_elapsed(&mut self, start: RawHandle, end: RawHandle) -> GpuResult<f32> {
        healthy!(self).event_elapsed(start, end)
    }

    fn event_destroy(&mut self, event: RawHandle) -> GpuResult<()> {
        healthy!(self).event_destroy(event)
    }

    fn end_batch(&mut self) {
        self.inner.end_batch();
    }

    /// Memory is reclaimed from poisoned contexts too.
    fn swap_out(&mut self) -> GpuResult<u64> {
        self.inner.swap_out()
    }

    fn swap_in(&mut self) -> GpuResult<u64> {
        self.inner.swap_in()
    }

    fn memory_usage(&self) -> MemoryUsage {
        self.inner.memory_usage()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::emulated::EmulatedGpu;
    use crate::gpu::timed::{TIMED_SPIN_ENTRY, TIMED_SPIN_PTX};
    use crate::gpu::{ptx, Gpu};

    const ONE: LaunchConfig = LaunchConfig {
        grid: [1, 1, 1],
        block: [1, 1, 1],
        shared_mem: 0,
    };

    /// A context with the fault module loaded: (context, vgpu_fault, vgpu_timed_spin).
    fn context(gpu: &EmulatedGpu) -> (Box<dyn GpuContext>, RawHandle, RawHandle) {
        let mut ctx = gpu.create_context(0).unwrap();
        let faults = ctx.module_load(FAULT_PTX.as_bytes()).unwrap();
        let (fault, params) = ctx.get_function(faults, FAULT_ENTRY).unwrap();
        assert!(is_fault(FAULT_ENTRY, &params));
        let spins = ctx.module_load(TIMED_SPIN_PTX.as_bytes()).unwrap();
        let (spin, _) = ctx.get_function(spins, TIMED_SPIN_ENTRY).unwrap();
        (ctx, fault, spin)
    }

    fn launch(ctx: &mut dyn GpuContext, function: RawHandle, arg: u64) -> GpuResult<()> {
        let layout = [ParamLayout { offset: 0, size: 8 }];
        ctx.launch(function, ONE, None, &arg.to_le_bytes(), &layout)
    }

    /// Every kind of call a guest can make on a context, with its result.
    fn every_call(ctx: &mut dyn GpuContext, dptr: u64) -> Vec<(&'static str, GpuResult<()>)> {
        let mut host = [0u8; 16];
        // SAFETY: `host` outlives every call below, which complete at once.
        let buf = unsafe { HostBuf::new(host.as_mut_ptr(), host.len()) };
        vec![
            ("synchronize", ctx.synchronize()),
            ("mem_alloc", ctx.mem_alloc(64).map(drop)),
            ("htod", ctx.memcpy_htod(dptr, &[buf], None, false, false)),
            ("dtoh", ctx.memcpy_dtoh(&[buf], dptr, None, false)),
            ("dtod", ctx.memcpy_dtod(dptr, dptr, 16, None, false)),
            ("memset", ctx.memset(dptr, 0, 1, 16, None, false)),
            (
                "module_load",
                ctx.module_load(TIMED_SPIN_PTX.as_bytes()).map(drop),
            ),
            ("stream_create", ctx.stream_create(0, 0).map(drop)),
            ("stream_synchronize", ctx.stream_synchronize(None)),
            ("stream_query", ctx.stream_query(None)),
            ("event_create", ctx.event_create(0).map(drop)),
            ("mem_free", ctx.mem_free(dptr)),
        ]
    }

    #[test]
    fn the_fault_ptx_parses_with_one_u64_parameter() {
        let module = ptx::parse(FAULT_PTX.as_bytes()).unwrap();
        let entry = module
            .entries
            .iter()
            .find(|e| e.name == FAULT_ENTRY)
            .unwrap();
        assert!(is_fault(&entry.name, &entry.params));
        assert!(!is_fault("vgpu_timed_spin", &entry.params));
        assert!(!is_fault(
            FAULT_ENTRY,
            &[ParamLayout { offset: 0, size: 4 }]
        ));
    }

    #[test]
    fn kind_zero_is_an_illegal_address_and_others_trap() {
        assert_eq!(
            fault_status(&0u64.to_le_bytes()),
            Some(Status::ILLEGAL_ADDRESS)
        );
        assert_eq!(
            fault_status(&1u64.to_le_bytes()),
            Some(Status::LAUNCH_FAILED)
        );
        assert_eq!(
            fault_status(&7u64.to_le_bytes()),
            Some(Status::LAUNCH_FAILED)
        );
        assert_eq!(fault_status(&[0, 0]), None);
        assert!(Status::ILLEGAL_ADDRESS.is_sticky() && Status::LAUNCH_FAILED.is_sticky());
    }

    #[test]
    fn a_fault_launch_is_accepted_then_every_call_returns_the_sticky_error() {
        for (kind, sticky) in [
            (KIND_ILLEGAL_ADDRESS, Status::ILLEGAL_ADDRESS),
            (KIND_TRAP, Status::LAUNCH_FAILED),
        ] {
            let gpu = EmulatedGpu::new(1 << 20);
            let (mut ctx, fault, spin) = context(&gpu);
            let dptr = ctx.mem_alloc(4096).unwrap();
            assert_eq!(launch(ctx.as_mut(), spin, 1000), Ok(()));
            assert_eq!(launch(ctx.as_mut(), fault, kind), Ok(()), "accepted");
            for (call, result) in every_call(ctx.as_mut(), dptr) {
                assert_eq!(result, Err(sticky), "{call} after a kind {kind} fault");
            }
            assert_eq!(launch(ctx.as_mut(), spin, 1000), Err(sticky));
            assert_eq!(launch(ctx.as_mut(), fault, 1 - kind), Err(sticky));
            // Still the first error, still sticky.
            assert_eq!(ctx.synchronize(), Err(sticky));
        }
    }

    #[test]
    fn other_contexts_keep_working_and_destroying_the_poisoned_one_frees_its_memory() {
        let gpu = EmulatedGpu::new(1 << 20);
        let (mut bad, fault, _) = context(&gpu);
        let (mut good, _, spin) = context(&gpu);
        bad.mem_alloc(8192).unwrap();
        let used_before = gpu.mem_used();
        assert_eq!(launch(bad.as_mut(), fault, KIND_ILLEGAL_ADDRESS), Ok(()));
        assert_eq!(bad.synchronize(), Err(Status::ILLEGAL_ADDRESS));
        let dptr = good.mem_alloc(4096).unwrap();
        for (call, result) in every_call(good.as_mut(), dptr) {
            assert_eq!(result, Ok(()), "{call} in a healthy context");
        }
        assert_eq!(launch(good.as_mut(), spin, 1000), Ok(()));
        drop(bad);
        assert!(
            gpu.mem_used() < used_before,
            "the poisoned context's memory is freed"
        );
        let (mut fresh, _, spin) = context(&gpu);
        assert_eq!(launch(fresh.as_mut(), spin, 1000), Ok(()));
        assert_eq!(fresh.synchronize(), Ok(()));
    }

    #[test]
    fn an_invalid_fault_launch_is_refused_and_does_not_poison() {
        let gpu = EmulatedGpu::new(1 << 20);
        let (mut ctx, fault, _) = context(&gpu);
        let bad_geometry = LaunchConfig {
            block: [2048, 1, 1],
            ..ONE
        };
        let layout = [ParamLayout { offset: 0, size: 8 }];
        assert_eq!(
            ctx.launch(fault, bad_geometry, None, &0u64.to_le_bytes(), &layout),
            Err(Status::INVALID_VALUE)
        );
        assert_eq!(
            ctx.launch(fault, ONE, None, &[0u8; 4], &layout),
            Err(Status::INVALID_VALUE)
        );
        assert_eq!(ctx.synchronize(), Ok(()));
    }
}
