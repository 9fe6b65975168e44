//! `cuGetExportTable`: the driver's private function tables, looked up by
//! UUID, that the statically linked CUDA runtime and cuBLASLt require.
//!
//! What each slot does comes from public reverse-engineering notes (ZLUDA's
//! `dark_api`, and others that list slot names) and from the call traces in
//! `shared/reference/cuda-call-traces`, which show the slots actually
//! called. A table starts with its size in bytes (the context-local-storage
//! table excepts) as the real driver's do, with the sizes the traces
//! recorded. Slots whose meaning is unknown return
//! `CUDA_ERROR_NOT_SUPPORTED`, logging table and slot once. Unknown UUIDs
//! (including the optional `f8cff951…`, whose presence changes how the
//! runtime initializes) are refused with `CUDA_ERROR_INVALID_VALUE` and
//! NULL, as the real driver refuses tables it does not have.
//!
//! cuBLASLt also dereferences two tables without checking for NULL:
//! `42d85a81…` slot 2 (the calling thread's current context, asked before
//! every matmul) and `1734dc26…` slot 4 (a per-multiprocessor layout for
//! its thread-block-cluster heuristics, whose refusal it handles).

use std::collections::HashMap;
use std::ffi::{c_int, c_uint, c_void};
use std::sync::{LazyLock, Mutex};

use vgpu_spec::Status;

use crate::ctx::current;
use crate::errors::{guard, non_null, write_out, CuResult};
use crate::integrity::{self, DeviceIdentity, Inputs};
use crate::logging;
use crate::state::{driver, initialized, lock};
use crate::types::{CUcontext, CUdevice, CUresult, CUuuid, DEFAULT_DRIVER_VERSION};

/// `CUDART_INTERFACE`.
const CUDART: [u8; 16] = uuid(0x6bd5_fb6c_5bf4_e74a_8987_d939_12fd_9df9);
/// Tools runtime callback hooks.
const TOOLS_HOOKS: [u8; 16] = uuid(0xa094_798c_2e74_2e74_93f2_0800_200c_0a66);
/// Tools thread-local state.
const TOOLS_TLS: [u8; 16] = uuid(0x42d8_5a81_23f6_cb47_8298_f6e7_8a3a_ecdc);
/// Context-local storage.
const CONTEXT_STORAGE: [u8; 16] = uuid(0xc693_336e_1121_df11_a8c3_68f3_55d8_9593);
/// Context checks.
const CONTEXT_CHECKS: [u8; 16] = uuid(0x263e_8860_7cd2_6143_92f6_bbd5_006d_fa7e);
/// The integrity check.
const INTEGRITY: [u8; 16] = uuid(0xd408_2055_bde6_704b_8d34_ba12_3c66_e1f2);
/// Context queries used by cuBLASLt.
const CONTEXT_QUERIES: [u8; 16] = uuid(0x2131_8c60_9714_3248_8ca6_41ff_7324_c8f2);
/// Device layout queries used by cuBLASLt's cluster heuristics.
const DEVICE_LAYOUT: [u8; 16] = uuid(0x1734_dc26_800d_4745_8726_c0f1_e7dd_8bca);

/// A UUID written as one big-endian number, as the traces print them.
const fn uuid(value: u128) -> [u8; 16] {
    value.to_be_bytes()
}

/// A table of pointer-sized slots, shared with C code that only reads it.
#[repr(transparent)]
struct Table<const N: usize>([*const c_void; N]);

// SAFETY: the tables are immutable statics of function addresses and
// integers; nothing is ever written through them.
unsafe impl<const N: usize> Sync for Table<N> {}

impl<const N: usize> Table<N> {
    fn start(&'static self) -> *const c_void {
        self.0.as_ptr().cast()
    }
}

/// The first slot of a sized table: its size in bytes.
const fn size_slot(slots: usize) -> *const c_void {
    std::ptr::without_provenance(slots * std::mem::size_of::<usize>())
}

/// An unimplemented slot: logs its table and index once and refuses.
extern "C" fn unknown_slot<const TABLE: u32, const SLOT: usize>() -> CUresult {
    logging::safely(|| tracing::debug!("export table {TABLE:08x} slot {SLOT}: not supported"));
    logging::warn_once(&format!(
        "export table {TABLE:08x} slot {SLOT} is not supported"
    ));
    Status::NOT_SUPPORTED.0
}

/// Fills slots `1..N` with [`unknown_slot`] instances, slot 0 with the size.
macro_rules! stub_table {
    ($table:expr; $($slot:literal)*) => {{
        let mut slots = [std::ptr::null::<c_void>(); { 1 + [$($slot),*].len() }];
        slots[0] = size_slot(slots.len());
        $( slots[$slot] = unknown_slot::<$table, $slot> as *const c_void; )*
        slots
    }};
}

static CUDART_TABLE: Table<13> = Table({
    let mut t = stub_table!(0x6bd5_fb6c; 1 2 3 4 5 6 7 8 9 10 11 12);
    t[1] = cudart_module_from_wrapper as *const c_void;
    t[2] = cudart_primary_context as *const c_void;
    t[6] = cudart_module_from_wrapper_ext as *const c_void;
    t[7] = cudart_noop as *const c_void;
    t[8] = cudart_module_from_fatbin_ext as *const c_void;
    t[12] = cudart_load_compilers as *const c_void;
    t
});

static TOOLS_HOOKS_TABLE: Table<7> = Table({
    let mut t = stub_table!(0xa094_798c; 1 2 3 4 5 6);
    t[2] = hooks_buffer_slot2 as *const c_void;
    t[6] = hooks_buffer_slot6 as *const c_void;
    t
});

static TOOLS_TLS_TABLE: Table<3> = Table({
    let mut t = stub_table!(0x42d8_5a81; 1 2);
    t[2] = tools_current_context as *const c_void;
    t
});

static CONTEXT_STORAGE_TABLE: Table<4> = Table([
    storage_put as *const c_void,
    storage_delete as *const c_void,
    storage_get as *const c_void,
    std::ptr::null(),
]);

static CONTEXT_CHECKS_TABLE: Table<15> = Table({
    let mut t = stub_table!(0x263e_8860; 1 2 3 4 5 6 7 8 9 10 11 12 13 14);
    t[2] = context_check as *const c_void;
    t[3] = context_check_flag as *const c_void;
    t
});

static INTEGRITY_TABLE: Table<3> = Table({
    let mut t = stub_table!(0xd408_2055; 1 2);
    t[1] = integrity_check as *const c_void;
    t
});

static CONTEXT_QUERIES_TABLE: Table<93> = Table({
    let mut t = stub_table!(0x2131_8c60;
        1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30
        31 32 33 34 35 36 37 38 39 40 41 42 43 44 45 46 47 48 49 50 51 52 53 54 55 56 57 58 59 60
        61 62 63 64 65 66 67 68 69 70 71 72 73 74 75 76 77 78 79 80 81 82 83 84 85 86 87 88 89 90
        91 92);
    t[3] = context_device as *const c_void;
    t[4] = context_id as *const c_void;
    t[39] = stream_identity as *const c_void;
    t[51] = stream_from_public as *const c_void;
    t
});

/// cuBLASLt asks slot 4 for a per-multiprocessor layout when it weighs
/// kernels that launch thread block clusters, and without the table it
/// calls through NULL. Every slot refuses (`CUDA_ERROR_NOT_SUPPORTED`),
/// which cuBLASLt handles by estimating without the layout; this slice
/// launches no clusters anyway.
static DEVICE_LAYOUT_TABLE: Table<8> = Table(stub_table!(0x1734_dc26; 1 2 3 4 5 6 7));

/// The table for a UUID, if this library has it.
fn table(id: &[u8; 16]) -> Option<*const c_void> {
    Some(match *id {
        CUDART => CUDART_TABLE.start(),
        TOOLS_HOOKS => TOOLS_HOOKS_TABLE.start(),
        TOOLS_TLS => TOOLS_TLS_TABLE.start(),
        CONTEXT_STORAGE => CONTEXT_STORAGE_TABLE.start(),
        CONTEXT_CHECKS => CONTEXT_CHECKS_TABLE.start(),
        INTEGRITY => INTEGRITY_TABLE.start(),
        CONTEXT_QUERIES => CONTEXT_QUERIES_TABLE.start(),
        DEVICE_LAYOUT => DEVICE_LAYOUT_TABLE.start(),
        _ => return None,
    })
}

/// `cuGetExportTable`. Works before `cuInit`.
#[no_mangle]
pub unsafe extern "C" fn cuGetExportTable(
    export_table: *mut *const c_void,
    id: *const CUuuid,
) -> CUresult {
    guard(|| {
        non_null(export_table)?;
        non_null(id)?;
        // SAFETY: non-null, and per the API a readable `CUuuid`.
        let id = unsafe { id.read_unaligned() }.bytes;
        let found = table(&id);
        if found.is_none() {
            let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
            logging::warn_once(&format!("cuGetExportTable({hex}): unknown table"));
        }
        // SAFETY: non-null, and per the API a writable pointer slot.
        unsafe { write_out(export_table, found.unwrap_or(std::ptr::null())) }?;
        found.map(|_| ()).ok_or(Status::INVALID_VALUE)
    })
}

// --- CUDART_INTERFACE -----------------------------------------------------

/// Loads a fatbin wrapper (or any image) as a module of the current context.
unsafe fn load_module(module: *mut *mut c_void, image: *const c_void) -> CUresult {
    // SAFETY: forwards the caller's pointers under the API's contract.
    unsafe { crate::module::cuModuleLoadData(module, image) }
}

/// Slot 1: a module from a fatbin wrapper.
unsafe extern "C" fn cudart_module_from_wrapper(
    module: *mut *mut c_void,
    wrapper: *const c_void,
) -> CUresult {
    // SAFETY: the runtime passes a module slot and a fatbin wrapper.
    unsafe { load_module(module, wrapper) }
}

/// Slot 2: the primary context of a device (created if needed; no
/// reference is taken).
unsafe extern "C" fn cudart_primary_context(pctx: *mut CUcontext, dev: CUdevice) -> CUresult {
    guard(|| {
        non_null(pctx)?;
        // SAFETY: a writable out-pointer.
        Status(unsafe { crate::ctx::cuDevicePrimaryCtxRetain(pctx, dev) }).into_result()?;
        // SAFETY: releases the reference just taken; the context stays.
        Status(unsafe { crate::ctx::cuDevicePrimaryCtxRelease_v2(dev) }).into_result()
    })
}

/// Slot 6: a module from a fatbin wrapper, with options this library does
/// not support (they must be absent).
unsafe extern "C" fn cudart_module_from_wrapper_ext(
    module: *mut *mut c_void,
    wrapper: *const c_void,
    arg3: *mut c_void,
    arg4: *mut c_void,
    arg5: c_uint,
) -> CUresult {
    if !arg3.is_null() || !arg4.is_null() || arg5 != 0 {
        logging::warn_once("cudart module load with options is not supported");
        return Status::NOT_SUPPORTED.0;
    }
    // SAFETY: the runtime passes a module slot and a fatbin wrapper.
    unsafe { load_module(module, wrapper) }
}

/// Slot 7: nothing to do.
extern "C" fn cudart_noop(_arg: usize) {}

/// Slot 8: a module from a fatbin (not a wrapper), options as slot 6.
unsafe extern "C" fn cudart_module_from_fatbin_ext(
    fatbin: *const c_void,
    module: *mut *mut c_void,
    arg3: *mut c_void,
    arg4: *mut c_void,
    arg5: c_uint,
) -> CUresult {
    // SAFETY: as slot 6, arguments in this slot's order.
    unsafe { cudart_module_from_wrapper_ext(module, fatbin, arg3, arg4, arg5) }
}

/// Slot 12: the native driver loads its JIT compilers here; nothing to do.
extern "C" fn cudart_load_compilers() -> CUresult {
    Status::SUCCESS.0
}

// --- Tools runtime callback hooks -----------------------------------------

/// A zeroed buffer the runtime may write its hook settings into.
#[repr(C, align(8))]
struct HookBuffer<const N: usize>(std::cell::UnsafeCell<[u8; N]>);

// SAFETY: the buffer is only ever handed to C code as raw memory; this
// library never reads or writes it.
unsafe impl<const N: usize> Sync for HookBuffer<N> {}

static HOOKS_LARGE: HookBuffer<4096> = HookBuffer(std::cell::UnsafeCell::new([0; 4096]));
static HOOKS_SMALL: HookBuffer<64> = HookBuffer(std::cell::UnsafeCell::new([0; 64]));

/// Writes a buffer's address and the size the runtime expects.
///
/// # Safety
/// Each non-null pointer must be writable.
unsafe fn give_buffer(ptr: *mut *mut c_void, size: *mut usize, buffer: *mut c_void, len: usize) {
    if !ptr.is_null() {
        // SAFETY: non-null and writable (the caller's contract).
        unsafe { ptr.write_unaligned(buffer) };
    }
    if !size.is_null() {
        // SAFETY: as above.
        unsafe { size.write_unaligned(len) };
    }
}

/// Slot 2: the first buffer (1024 reported, 4096 bytes provided, so it
/// is large enough whether the size counts bytes or 32-bit words).
unsafe extern "C" fn hooks_buffer_slot2(ptr: *mut *mut c_void, size: *mut usize) {
    // SAFETY: the runtime passes writable out-pointers.
    unsafe { give_buffer(ptr, size, HOOKS_LARGE.0.get().cast(), 1024) }
}

/// Slot 6: the second buffer (14 reported, 64 bytes provided).
unsafe extern "C" fn hooks_buffer_slot6(ptr: *mut *mut c_void, size: *mut usize) {
    // SAFETY: the runtime passes writable out-pointers.
    unsafe { give_buffer(ptr, size, HOOKS_SMALL.0.get().cast(), 14) }
}

// --- Tools thread-local state ---------------------------------------------

/// Slot 2: the calling thread's current context; NULL and
/// `CUDA_ERROR_INVALID_CONTEXT` if it has none.
unsafe extern "C" fn tools_current_context(pctx: *mut CUcontext) -> CUresult {
    guard(|| {
        let found = current();
        let ctx = found.map_or(std::ptr::null_mut(), |c| {
            std::ptr::without_provenance_mut(c as usize)
        });
        // SAFETY: the slot's contract: a writable `CUcontext` or NULL (checked).
        unsafe { write_out(pctx, ctx) }?;
        found.map(|_| ()).ok_or(Status::INVALID_CONTEXT)
    })
}

// --- Context-local storage ------------------------------------------------

/// Called with (context, key, value) when the context is destroyed.
type StorageDtor = Option<extern "C" fn(CUcontext, *mut c_void, *mut c_void)>;

/// Values by (context, key), with their destructor.
/// (context, key) to (value address, destructor).
type StorageMap = HashMap<(u64, usize), (usize, StorageDtor)>;

static STORAGE: LazyLock<Mutex<StorageMap>> = LazyLock::new(Mutex::default);

/// The given context, or the current one for NULL.
fn storage_ctx(ctx: CUcontext) -> CuResult<u64> {
    driver()?;
    if ctx.is_null() {
        current().ok_or(Status::INVALID_CONTEXT)
    } else {
        Ok(ctx.addr() as u64)
    }
}

/// Slot 0: stores a value.
extern "C" fn storage_put(
    ctx: CUcontext,
    key: *mut c_void,
    value: *mut c_void,
    dtor: StorageDtor,
) -> CUresult {
    guard(|| {
        let ctx = storage_ctx(ctx)?;
        lock(&STORAGE).insert((ctx, key.addr()), (value.expose_provenance(), dtor));
        Ok(())
    })
}

/// Slot 1: removes a value (its destructor is not called).
extern "C" fn storage_delete(ctx: CUcontext, key: *mut c_void) -> CUresult {
    guard(|| {
        let ctx = storage_ctx(ctx)?;
        lock(&STORAGE).remove(&(ctx, key.addr()));
        Ok(())
    })
}

/// Slot 2: reads a value; `CUDA_ERROR_INVALID_HANDLE` if there is none.
unsafe extern "C" fn storage_get(
    value: *mut *mut c_void,
    ctx: CUcontext,
    key: *mut c_void,
) -> CUresult {
    guard(|| {
        non_null(value)?;
        let ctx = storage_ctx(ctx)?;
        let found = lock(&STORAGE)
            .get(&(ctx, key.addr()))
            .map(|(v, _)| *v)
            .ok_or(Status::INVALID_HANDLE)?;
        // SAFETY: non-null, and per the slot's contract writable.
        unsafe { write_out(value, std::ptr::with_exposed_provenance_mut(found)) }
    })
}

/// Runs the storage destructors of a context about to be destroyed.
pub(crate) fn context_destroyed(ctx: u64) {
    let entries: Vec<((u64, usize), (usize, StorageDtor))> = {
        let mut storage = lock(&STORAGE);
        let keys: Vec<(u64, usize)> = storage.keys().filter(|(c, _)| *c == ctx).copied().collect();
        keys.into_iter()
            .filter_map(|k| storage.remove(&k).map(|v| (k, v)))
            .collect()
    };
    for ((ctx, key), (value, dtor)) in entries {
        if let Some(dtor) = dtor {
            dtor(
                std::ptr::without_provenance_mut(ctx as usize),
                std::ptr::without_provenance_mut(key),
                std::ptr::with_exposed_provenance_mut(value),
            );
        }
    }
}

// --- Context checks -------------------------------------------------------

/// Slot 2: nothing special about any context (`*flag = 0`).
unsafe extern "C" fn context_check(
    _ctx: CUcontext,
    flag: *mut u32,
    _detail: *mut *const c_void,
) -> CUresult {
    if !flag.is_null() {
        // SAFETY: non-null, and per the slot's contract writable.
        unsafe { flag.write_unaligned(0) };
    }
    Status::SUCCESS.0
}

/// Slot 3: always 0.
extern "C" fn context_check_flag() -> u32 {
    0
}

// --- Integrity check ------------------------------------------------------

/// The identity this library reports for device 0.
fn device_identity() -> CuResult<DeviceIdentity> {
    let drv = driver()?;
    let attr = |a: c_int| crate::device::attribute(&drv.info.attributes, a).unwrap_or(0);
    Ok(DeviceIdentity {
        uuid: drv.info.config.uuid,
        pci_domain: attr(CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID),
        pci_bus: attr(CU_DEVICE_ATTRIBUTE_PCI_BUS_ID),
        pci_device: attr(CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID),
    })
}

const CU_DEVICE_ATTRIBUTE_PCI_BUS_ID: c_int = 33;
const CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID: c_int = 34;
const CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID: c_int = 50;

/// The inputs of the check for this process and thread.
fn integrity_inputs(version: u32, unix_seconds: u64) -> CuResult<Inputs> {
    let driver_version = initialized().map_or(DEFAULT_DRIVER_VERSION, |d| d.info.driver_version);
    // SAFETY: `pthread_self` has no preconditions.
    let thread = unsafe { libc::pthread_self() } as u32;
    let devices = match initialized() {
        Some(_) => vec![device_identity()?],
        None => Vec::new(),
    };
    Ok(Inputs {
        version,
        unix_seconds,
        driver_version: driver_version as u32,
        process: std::process::id(),
        thread,
        cudart_table: CUDART_TABLE.start().addr() as u64,
        integrity_table: INTEGRITY_TABLE.start().addr() as u64,
        check_fn: INTEGRITY_TABLE.0[1].addr() as u64,
        devices,
    })
}

/// Slot 1: the integrity answer for the runtime's version and time.
unsafe extern "C" fn integrity_check(
    version: u32,
    unix_seconds: u64,
    result: *mut [u64; 2],
) -> CUresult {
    guard(|| {
        non_null(result)?;
        let answer = integrity::answer(&integrity_inputs(version, unix_seconds)?);
        // SAFETY: non-null, and per the slot's contract 16 writable bytes.
        unsafe { write_out(result, answer) }
    })
}

// --- Context queries (cuBLASLt) -------------------------------------------

/// The given context, or the current one for NULL (0 if none).
fn query_ctx(ctx: CUcontext) -> u64 {
    if ctx.is_null() {
        current().unwrap_or(0)
    } else {
        ctx.addr() as u64
    }
}

/// Slot 3: the device of a context (always 0).
unsafe extern "C" fn context_device(_ctx: CUcontext, dev: *mut CUdevice) -> CUresult {
    // SAFETY: the slot's contract: a writable `CUdevice` or NULL (checked).
    guard(|| unsafe { write_out(dev, 0) })
}

/// Slot 4: a number unique to the context (its handle; 0 for none).
unsafe extern "C" fn context_id(ctx: CUcontext, id: *mut u64) -> CUresult {
    // SAFETY: the slot's contract: a writable `u64` or NULL (checked).
    guard(|| unsafe { write_out(id, query_ctx(ctx)) })
}

/// `CU_STREAM_LEGACY`, the private stream of the legacy default stream.
const STREAM_LEGACY: usize = 1;
/// `CU_STREAM_PER_THREAD`, the private stream of the per-thread default.
const STREAM_PER_THREAD: usize = 2;

/// Slot 51: the driver's private object for a public stream. This
/// library's streams are their handles; the default stream (NULL) is the
/// legacy or per-thread one, as `per_thread` says.
unsafe extern "C" fn stream_from_public(
    _ctx: CUcontext,
    stream: *mut c_void,
    private: *mut *mut c_void,
    per_thread: c_int,
) -> CUresult {
    let value = match (stream.addr(), per_thread) {
        (0, 0) => std::ptr::without_provenance_mut(STREAM_LEGACY),
        (0, _) => std::ptr::without_provenance_mut(STREAM_PER_THREAD),
        _ => stream,
    };
    // SAFETY: the slot's contract: a writable pointer slot or NULL (checked).
    guard(|| unsafe { write_out(private, value) })
}

/// Slot 39: a number identifying a private stream (from slot 51).
unsafe extern "C" fn stream_identity(
    _ctx: CUcontext,
    private: *const c_void,
    id: *mut u64,
) -> CUresult {
    guard(|| {
        non_null(private)?;
        // SAFETY: the slot's contract: a writable `u64` or NULL (checked).
        unsafe { write_out(id, private.addr() as u64) }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(id: [u8; 16]) -> (CUresult, *const c_void) {
        let mut table: *const c_void = std::ptr::without_provenance(1);
        let uuid = CUuuid { bytes: id };
        // SAFETY: valid pointers.
        let rc = unsafe { cuGetExportTable(&mut table, &uuid) };
        (rc, table)
    }

    fn slot(table: *const c_void, index: usize) -> usize {
        // SAFETY: the tables are static arrays at least `index + 1` long.
        unsafe { table.cast::<usize>().add(index).read() }
    }

    #[test]
    fn sized_tables_start_with_their_size_in_bytes() {
        for (id, slots) in [
            (CUDART, 13),
            (TOOLS_HOOKS, 7),
            (TOOLS_TLS, 3),
            (CONTEXT_CHECKS, 15),
            (INTEGRITY, 3),
            (CONTEXT_QUERIES, 93),
            (DEVICE_LAYOUT, 8),
        ] {
            let (rc, table) = get(id);
            assert_eq!(rc, 0);
            assert_eq!(slot(table, 0), slots * 8, "{id:02x?}");
            for i in 1..slots {
                assert_ne!(slot(table, i), 0, "{id:02x?} slot {i}");
            }
        }
    }

    #[test]
    fn context_storage_table_has_three_functions_and_a_null() {
        let (rc, table) = get(CONTEXT_STORAGE);
        assert_eq!(rc, 0);
        assert_eq!(slot(table, 0), storage_put as *const () as usize);
        assert_eq!(slot(table, 2), storage_get as *const () as usize);
        assert_eq!(slot(table, 3), 0);
    }

    #[test]
    fn unknown_and_optional_tables_are_refused_with_null() {
        let (rc, table) = get([0; 16]);
        assert_eq!(rc, Status::INVALID_VALUE.0);
        assert!(table.is_null());
        let (rc, table) = get(uuid(0xf8cf_f951_2146_8b4e_b9e2_fb46_9e7c_0dd9));
        assert_eq!(rc, Status::INVALID_VALUE.0);
        assert!(table.is_null());
    }

    #[test]
    fn uuids_match_the_trace_spelling() {
        assert_eq!(CUDART[..4], [0x6b, 0xd5, 0xfb, 0x6c]);
        assert_eq!(CONTEXT_QUERIES[15], 0xf2);
    }

    #[test]
    fn unknown_slots_refuse_and_known_simple_slots_answer() {
        let stub: extern "C" fn() -> CUresult = unknown_slot::<0x6bd5_fb6c, 3>;
        assert_eq!(stub(), Status::NOT_SUPPORTED.0);
        assert_eq!(cudart_load_compilers(), 0);
        assert_eq!(context_check_flag(), 0);
        let mut flag = 7u32;
        // SAFETY: a writable flag; the other pointers are unused.
        let rc = unsafe { context_check(std::ptr::null_mut(), &mut flag, std::ptr::null_mut()) };
        assert_eq!((rc, flag), (0, 0));
        let mut ptr: *mut c_void = std::ptr::null_mut();
        let mut size = 0usize;
        // SAFETY: writable out-pointers.
        unsafe { hooks_buffer_slot2(&mut ptr, &mut size) };
        assert!(!ptr.is_null());
        assert_eq!(size, 1024);
    }

    #[test]
    fn integrity_answer_uses_our_own_table_addresses() {
        let inputs = integrity_inputs(13002, 1_700_000_000).unwrap();
        assert_eq!(inputs.cudart_table, CUDART_TABLE.start().addr() as u64);
        assert_eq!(
            inputs.check_fn,
            integrity_check as *const () as usize as u64
        );
        assert_eq!(inputs.driver_version, DEFAULT_DRIVER_VERSION as u32);
        let mut out = [0u64; 2];
        // SAFETY: a writable 16-byte result.
        let rc = unsafe { integrity_check(13002, 1_700_000_000, &mut out) };
        assert_eq!(rc, 0);
        assert_eq!(out, integrity::answer(&inputs));
        // SAFETY: as above.
        let rc = unsafe { integrity_check(13000, 1_700_000_000, &mut out) };
        assert_eq!(rc, 0);
        assert_eq!(out[1], 0x8ED3_83AA_1F4C_D1E8);
    }

    #[test]
    fn tools_current_context_without_one_is_invalid_context_and_null() {
        let mut ctx: CUcontext = std::ptr::without_provenance_mut(7);
        // SAFETY: a writable out-pointer.
        let rc = unsafe { tools_current_context(&mut ctx) };
        assert_eq!(rc, Status::INVALID_CONTEXT.0);
        assert!(ctx.is_null());
        let (_, table) = get(TOOLS_TLS);
        assert_eq!(slot(table, 2), tools_current_context as *const () as usize);
    }

    #[test]
    fn default_streams_map_to_legacy_or_per_thread_and_identify_themselves() {
        let null = std::ptr::null_mut();
        let mut private: *mut c_void = null;
        let mut id = 0u64;
        for (stream, per_thread, expected) in [(0, 0, 1), (0, 1, 2), (0x55, 0, 0x55)] {
            let stream = std::ptr::without_provenance_mut(stream);
            // SAFETY: writable out-pointers.
            let rc = unsafe { stream_from_public(null, stream, &mut private, per_thread) };
            assert_eq!((rc, private.addr()), (0, expected));
            // SAFETY: as above.
            let rc = unsafe { stream_identity(null, private, &mut id) };
            assert_eq!((rc, id), (0, expected as u64));
        }
        // SAFETY: NULL out-pointers are rejected before any write.
        let rc = unsafe { stream_from_public(null, null, std::ptr::null_mut(), 0) };
        assert_eq!(rc, Status::INVALID_VALUE.0);
        // SAFETY: as above.
        let rc = unsafe { stream_identity(null, std::ptr::null(), &mut id) };
        assert_eq!(rc, Status::INVALID_VALUE.0);
    }

    #[test]
    fn context_storage_needs_a_driver() {
        let rc = storage_put(
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            None,
        );
        assert_eq!(rc, Status::NOT_INITIALIZED.0);
    }
}
