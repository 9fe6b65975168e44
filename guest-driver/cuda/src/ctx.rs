//! Contexts: the per-thread context stack, the primary context and the
//! context exports. A guest `CUcontext` is the backend's context handle as a
//! pointer value; every submission request carries the calling thread's
//! current context in its header.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{c_int, c_uint, c_void};

use vgpu_spec::wire::{CtxCreateReq, HandleReq, HandleResp};
use vgpu_spec::{Request, Status};

use crate::device::check_device;
use crate::errors::{guard, non_null, write_out, CuResult};
use crate::state::{driver, lock, parse, Driver};
use crate::types::{CUcontext, CUdevice, CUresult, CTX_API_VERSION};

thread_local! {
    /// The calling thread's context stack; the current context is the top.
    static STACK: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on this thread's stack (an empty one while the thread exits).
fn with_stack<R>(f: impl FnOnce(&mut Vec<u64>) -> R) -> R {
    let mut f = Some(f);
    let mut run = |stack: &mut Vec<u64>| f.take().map(|f| f(stack));
    match STACK.try_with(|stack| run(&mut stack.borrow_mut())) {
        Ok(Some(result)) => result,
        _ => match run(&mut Vec::new()) {
            Some(result) => result,
            None => unreachable!("the closure runs at most once"),
        },
    }
}

/// The calling thread's current context.
pub(crate) fn current() -> Option<u64> {
    with_stack(|stack| stack.last().copied())
}

/// The driver and the current context, for calls that need one.
pub(crate) fn session_ctx() -> CuResult<(&'static Driver, u64)> {
    let drv = driver()?;
    let ctx = current().ok_or(Status::INVALID_CONTEXT)?;
    Ok((drv, ctx))
}

fn push(ctx: u64) {
    with_stack(|stack| stack.push(ctx));
}

fn pop() -> Option<u64> {
    with_stack(|stack| stack.pop())
}

/// `cuCtxSetCurrent`: replaces the top (or pushes onto an empty stack);
/// `None` pops.
fn set_current(ctx: Option<u64>) {
    with_stack(|stack| match (ctx, stack.last_mut()) {
        (Some(ctx), Some(top)) => *top = ctx,
        (Some(ctx), None) => stack.push(ctx),
        (None, _) => {
            stack.pop();
        }
    });
}

/// Removes a destroyed context from this thread's stack.
fn unstack(ctx: u64) {
    with_stack(|stack| stack.retain(|c| *c != ctx));
}

fn as_ptr(handle: u64) -> CUcontext {
    std::ptr::without_provenance_mut(handle as usize)
}

fn as_handle(ctx: CUcontext) -> u64 {
    ctx.addr() as u64
}

/// Live contexts of the process and the state of the primary context.
#[derive(Debug, Default)]
pub(crate) struct ContextTable {
    /// Context handle to its creation flags.
    live: HashMap<u64, u32>,
    primary: Primary,
}

#[derive(Debug, Default)]
struct Primary {
    handle: Option<u64>,
    refs: u32,
    flags: u32,
}

impl ContextTable {
    fn flags(&self, ctx: u64) -> Option<u32> {
        if self.primary.handle == Some(ctx) {
            return Some(self.primary.flags);
        }
        self.live.get(&ctx).copied()
    }
}

/// Every live context, the primary one included.
pub(crate) fn live_contexts(drv: &Driver) -> Vec<u64> {
    let table = lock(&drv.contexts);
    table
        .live
        .keys()
        .copied()
        .chain(table.primary.handle)
        .collect()
}

/// Fails with `CUDA_ERROR_INVALID_CONTEXT` unless `ctx` is live.
fn check_live(drv: &Driver, ctx: u64) -> CuResult<()> {
    match lock(&drv.contexts).flags(ctx) {
        Some(_) => Ok(()),
        None => Err(Status::INVALID_CONTEXT),
    }
}

/// `CTX_CREATE`: a new backend context.
fn create(drv: &Driver, flags: u32) -> CuResult<u64> {
    let req = CtxCreateReq {
        flags: flags.into(),
        _pad: 0.into(),
    };
    let mut body = Vec::new();
    drv.call(0, 0, &Request::CtxCreate(req), &mut body)?;
    let (resp, _) = parse::<HandleResp>(&body, "CTX_CREATE")?;
    let handle = resp.handle.get();
    if handle == 0 {
        return Err(Status::UNKNOWN);
    }
    Ok(handle)
}

/// `CTX_DESTROY`, then forgets everything the context held. Always sent,
/// even when a sticky error poisoned the context: destroying it is how an
/// application frees it (natively that succeeds).
fn destroy(drv: &Driver, ctx: u64) -> CuResult<()> {
    // Context-local storage destructors run while the context still exists.
    crate::export_table::context_destroyed(ctx);
    let req = HandleReq { handle: ctx.into() };
    match drv.send(ctx, 0, &Request::CtxDestroy(req), &mut Vec::new()) {
        // The backend frees the context's objects with it; whatever it
        // answered, the handles are unusable from here on.
        Ok(status) => {
            forget(drv, ctx);
            status.into_result()
        }
        // No backend left to hold anything.
        Err(Status::DEVICE_UNAVAILABLE) => {
            forget(drv, ctx);
            Err(Status::DEVICE_UNAVAILABLE)
        }
        // Not delivered: the context still exists and may be destroyed again.
        Err(status) => Err(status),
    }
}

fn forget(drv: &Driver, ctx: u64) {
    lock(&drv.contexts).live.remove(&ctx);
    drv.forget_errors(ctx);
    lock(&drv.modules).forget_context(ctx);
    drv.streams.forget_context(ctx);
    drv.events.forget_context(ctx);
    crate::ptds::forget_context(ctx);
    crate::library::forget_context(ctx);
    crate::mempool::forget_context(ctx);
    unstack(ctx);
}

/// Shared body of the `cuCtxCreate` versions: creates and pushes.
unsafe fn ctx_create(pctx: *mut CUcontext, flags: c_uint, dev: CUdevice) -> CuResult<()> {
    let drv = driver()?;
    non_null(pctx)?;
    check_device(dev)?;
    let handle = create(drv, flags)?;
    lock(&drv.contexts).live.insert(handle, flags);
    push(handle);
    // SAFETY: `pctx` is non-null and, per the API, writable.
    unsafe { write_out(pctx, as_ptr(handle)) }
}

/// `cuCtxCreate` (same ABI as `_v2`).
#[no_mangle]
pub unsafe extern "C" fn cuCtxCreate(
    pctx: *mut CUcontext,
    flags: c_uint,
    dev: CUdevice,
) -> CUresult {
    // SAFETY: forwards the caller's pointer under the same contract.
    guard(|| unsafe { ctx_create(pctx, flags, dev) })
}

/// `cuCtxCreate_v2`.
#[no_mangle]
pub unsafe extern "C" fn cuCtxCreate_v2(
    pctx: *mut CUcontext,
    flags: c_uint,
    dev: CUdevice,
) -> CUresult {
    // SAFETY: forwards the caller's pointer under the same contract.
    guard(|| unsafe { ctx_create(pctx, flags, dev) })
}

/// `cuCtxCreate_v3`: the affinity parameters are ignored.
#[no_mangle]
pub unsafe extern "C" fn cuCtxCreate_v3(
    pctx: *mut CUcontext,
    _params: *mut c_void,
    _num_params: c_int,
    flags: c_uint,
    dev: CUdevice,
) -> CUresult {
    // SAFETY: forwards the caller's pointer under the same contract.
    guard(|| unsafe { ctx_create(pctx, flags, dev) })
}

/// `cuCtxCreate_v4`: the creation parameters are ignored.
#[no_mangle]
pub unsafe extern "C" fn cuCtxCreate_v4(
    pctx: *mut CUcontext,
    _params: *mut c_void,
    flags: c_uint,
    dev: CUdevice,
) -> CUresult {
    // SAFETY: forwards the caller's pointer under the same contract.
    guard(|| unsafe { ctx_create(pctx, flags, dev) })
}

fn ctx_destroy(ctx: CUcontext) -> CuResult<()> {
    let drv = driver()?;
    let handle = as_handle(ctx);
    {
        let table = lock(&drv.contexts);
        if table.primary.handle == Some(handle) || !table.live.contains_key(&handle) {
            return Err(Status::INVALID_CONTEXT);
        }
    }
    destroy(drv, handle)
}

/// `cuCtxDestroy`.
#[no_mangle]
pub unsafe extern "C" fn cuCtxDestroy(ctx: CUcontext) -> CUresult {
    guard(|| ctx_destroy(ctx))
}

/// `cuCtxDestroy_v2`.
#[no_mangle]
pub unsafe extern "C" fn cuCtxDestroy_v2(ctx: CUcontext) -> CUresult {
    guard(|| ctx_destroy(ctx))
}

fn synchronize(ctx: u64) -> CuResult<()> {
    let drv = driver()?;
    crate::capture::on_ctx_sync()?;
    drv.call_settled(ctx, 0, &Request::CtxSynchronize, &mut Vec::new())
}

/// `cuCtxSynchronize`: waits for all work of the current context.
#[no_mangle]
pub unsafe extern "C" fn cuCtxSynchronize() -> CUresult {
    guard(|| {
        let (_, ctx) = session_ctx()?;
        synchronize(ctx)
    })
}

/// `cuCtxSynchronize_v2`: waits for the given context (NULL: the current one).
#[no_mangle]
pub unsafe extern "C" fn cuCtxSynchronize_v2(ctx: CUcontext) -> CUresult {
    guard(|| {
        let (_, handle) = session_ctx_or(ctx)?;
        synchronize(handle)
    })
}

/// The given context if non-null (checked live), else the current one.
fn session_ctx_or(ctx: CUcontext) -> CuResult<(&'static Driver, u64)> {
    if ctx.is_null() {
        return session_ctx();
    }
    let drv = driver()?;
    let handle = as_handle(ctx);
    check_live(drv, handle)?;
    Ok((drv, handle))
}

/// `cuCtxGetCurrent`: NULL when no context is current.
#[no_mangle]
pub unsafe extern "C" fn cuCtxGetCurrent(pctx: *mut CUcontext) -> CUresult {
    guard(|| {
        driver()?;
        let ctx = current().map_or(std::ptr::null_mut(), as_ptr);
        // SAFETY: the caller passes a writable slot or NULL (checked).
        unsafe { write_out(pctx, ctx) }
    })
}

/// `cuCtxSetCurrent`: NULL pops the current context.
#[no_mangle]
pub unsafe extern "C" fn cuCtxSetCurrent(ctx: CUcontext) -> CUresult {
    guard(|| {
        let drv = driver()?;
        if ctx.is_null() {
            set_current(None);
            return Ok(());
        }
        let handle = as_handle(ctx);
        check_live(drv, handle)?;
        set_current(Some(handle));
        Ok(())
    })
}

fn push_current(ctx: CUcontext) -> CuResult<()> {
    let drv = driver()?;
    let handle = as_handle(ctx);
    if handle == 0 {
        return Err(Status::INVALID_CONTEXT);
    }
    check_live(drv, handle)?;
    push(handle);
    Ok(())
}

/// `cuCtxPushCurrent`.
#[no_mangle]
pub unsafe extern "C" fn cuCtxPushCurrent(ctx: CUcontext) -> CUresult {
    guard(|| push_current(ctx))
}

/// `cuCtxPushCurrent_v2`.
#[no_mangle]
pub unsafe extern "C" fn cuCtxPushCurrent_v2(ctx: CUcontext) -> CUresult {
    guard(|| push_current(ctx))
}

/// Shared body of the `cuCtxPopCurrent` versions.
unsafe fn pop_current(pctx: *mut CUcontext) -> CuResult<()> {
    driver()?;
    let handle = pop().ok_or(Status::INVALID_CONTEXT)?;
    if pctx.is_null() {
        return Ok(());
    }
    // SAFETY: non-null, and per the API a writable slot.
    unsafe { write_out(pctx, as_ptr(handle)) }
}

/// `cuCtxPopCurrent`.
#[no_mangle]
pub unsafe extern "C" fn cuCtxPopCurrent(pctx: *mut CUcontext) -> CUresult {
    // SAFETY: forwards the caller's pointer under the same contract.
    guard(|| unsafe { pop_current(pctx) })
}

/// `cuCtxPopCurrent_v2`.
#[no_mangle]
pub unsafe extern "C" fn cuCtxPopCurrent_v2(pctx: *mut CUcontext) -> CUresult {
    // SAFETY: forwards the caller's pointer under the same contract.
    guard(|| unsafe { pop_current(pctx) })
}

/// `cuCtxGetDevice`: always device 0.
#[no_mangle]
pub unsafe extern "C" fn cuCtxGetDevice(device: *mut CUdevice) -> CUresult {
    guard(|| {
        non_null(device)?;
        session_ctx()?;
        // SAFETY: non-null, and per the API a writable `CUdevice`.
        unsafe { write_out(device, 0) }
    })
}

/// `cuCtxGetDevice_v2`: the device of the given context (NULL: current).
#[no_mangle]
pub unsafe extern "C" fn cuCtxGetDevice_v2(device: *mut CUdevice, ctx: CUcontext) -> CUresult {
    guard(|| {
        non_null(device)?;
        session_ctx_or(ctx)?;
        // SAFETY: non-null, and per the API a writable `CUdevice`.
        unsafe { write_out(device, 0) }
    })
}

/// `cuCtxGetApiVersion`.
#[no_mangle]
pub unsafe extern "C" fn cuCtxGetApiVersion(ctx: CUcontext, version: *mut c_uint) -> CUresult {
    guard(|| {
        non_null(version)?;
        session_ctx_or(ctx)?;
        // SAFETY: non-null, and per the API a writable `unsigned int`.
        unsafe { write_out(version, CTX_API_VERSION) }
    })
}

/// `cuCtxGetFlags`: the flags the current context was created with.
#[no_mangle]
pub unsafe extern "C" fn cuCtxGetFlags(flags: *mut c_uint) -> CUresult {
    guard(|| {
        non_null(flags)?;
        let (drv, ctx) = session_ctx()?;
        let value = lock(&drv.contexts)
            .flags(ctx)
            .ok_or(Status::INVALID_CONTEXT)?;
        // SAFETY: non-null, and per the API a writable `unsigned int`.
        unsafe { write_out(flags, value) }
    })
}

/// `cuDevicePrimaryCtxRetain`: creates the primary context on first use.
#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxRetain(pctx: *mut CUcontext, dev: CUdevice) -> CUresult {
    guard(|| {
        let drv = driver()?;
        non_null(pctx)?;
        check_device(dev)?;
        let handle = {
            let mut table = lock(&drv.contexts);
            let handle = match table.primary.handle {
                Some(handle) => handle,
                None => {
                    let handle = create(drv, table.primary.flags)?;
                    table.primary.handle = Some(handle);
                    handle
                }
            };
            table.primary.refs = table.primary.refs.saturating_add(1);
            handle
        };
        // SAFETY: non-null, and per the API a writable slot.
        unsafe { write_out(pctx, as_ptr(handle)) }
    })
}

/// Release: drops a reference; the context stays alive at zero (only a
/// reset destroys it), so handles cached by the application remain valid.
fn primary_release(dev: CUdevice) -> CuResult<()> {
    let drv = driver()?;
    check_device(dev)?;
    let mut table = lock(&drv.contexts);
    if table.primary.handle.is_none() || table.primary.refs == 0 {
        return Err(Status::INVALID_CONTEXT);
    }
    table.primary.refs -= 1;
    Ok(())
}

/// `cuDevicePrimaryCtxRelease`.
#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxRelease(dev: CUdevice) -> CUresult {
    guard(|| primary_release(dev))
}

/// `cuDevicePrimaryCtxRelease_v2`.
#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxRelease_v2(dev: CUdevice) -> CUresult {
    guard(|| primary_release(dev))
}

/// Reset: destroys the primary context and everything in it.
fn primary_reset(dev: CUdevice) -> CuResult<()> {
    let drv = driver()?;
    check_device(dev)?;
    let handle = {
        let mut table = lock(&drv.contexts);
        table.primary.refs = 0;
        table.primary.handle.take()
    };
    match handle {
        Some(handle) => destroy(drv, handle),
        None => Ok(()),
    }
}

/// `cuDevicePrimaryCtxReset`.
#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxReset(dev: CUdevice) -> CUresult {
    guard(|| primary_reset(dev))
}

/// `cuDevicePrimaryCtxReset_v2`.
#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxReset_v2(dev: CUdevice) -> CUresult {
    guard(|| primary_reset(dev))
}

/// `cuDevicePrimaryCtxGetState`: active while retained.
#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxGetState(
    dev: CUdevice,
    flags: *mut c_uint,
    active: *mut c_int,
) -> CUresult {
    guard(|| {
        let drv = driver()?;
        non_null(flags)?;
        non_null(active)?;
        check_device(dev)?;
        let (value, is_active) = {
            let table = lock(&drv.contexts);
            (table.primary.flags, table.primary.refs > 0)
        };
        // SAFETY: both non-null, and per the API writable.
        unsafe {
            write_out(flags, value)?;
            write_out(active, c_int::from(is_active))
        }
    })
}

fn primary_set_flags(dev: CUdevice, flags: c_uint) -> CuResult<()> {
    let drv = driver()?;
    check_device(dev)?;
    lock(&drv.contexts).primary.flags = flags;
    Ok(())
}

/// `cuDevicePrimaryCtxSetFlags`.
#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxSetFlags(dev: CUdevice, flags: c_uint) -> CUresult {
    guard(|| primary_set_flags(dev, flags))
}

/// `cuDevicePrimaryCtxSetFlags_v2`.
#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxSetFlags_v2(dev: CUdevice, flags: c_uint) -> CUresult {
    guard(|| primary_set_flags(dev, flags))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_stack_push_set_pop_follow_cuda_semantics() {
        std::thread::spawn(|| {
            assert_eq!(current(), None);
            set_current(Some(5));
            assert_eq!(current(), Some(5));
            push(6);
            assert_eq!(current(), Some(6));
            set_current(Some(7));
            assert_eq!(current(), Some(7));
            assert_eq!(pop(), Some(7));
            assert_eq!(current(), Some(5));
            set_current(None);
            assert_eq!(current(), None);
            set_current(None);
            assert_eq!(pop(), None);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn destroyed_context_leaves_the_stack() {
        std::thread::spawn(|| {
            push(1);
            push(2);
            push(1);
            unstack(1);
            assert_eq!(current(), Some(2));
            assert_eq!(pop(), Some(2));
            assert_eq!(pop(), None);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn context_calls_before_init_are_not_initialized() {
        let mut ctx: CUcontext = std::ptr::null_mut();
        // SAFETY: a valid out-pointer.
        let rc = unsafe { cuCtxGetCurrent(&mut ctx) };
        assert_eq!(rc, Status::NOT_INITIALIZED.0);
        // SAFETY: no arguments.
        let rc = unsafe { cuCtxSynchronize() };
        assert_eq!(rc, Status::NOT_INITIALIZED.0);
        // SAFETY: a valid out-pointer.
        let rc = unsafe { cuDevicePrimaryCtxRetain(&mut ctx, 0) };
        assert_eq!(rc, Status::NOT_INITIALIZED.0);
    }

    #[test]
    fn handles_round_trip_through_pointers() {
        assert_eq!(as_handle(as_ptr(0x1234_5678_9abc)), 0x1234_5678_9abc);
        assert!(as_ptr(0).is_null());
    }
}
