//! Stream-ordered memory pools: `cuDeviceGetDefaultMemPool`,
//! `cuMemPoolCreate`, the pool attributes, `cuMemAllocFromPoolAsync`, and
//! the accounting of `cuMemAllocAsync` / `cuMemFreeAsync` to the current
//! pool. Pools are answered locally ([`crate::mempool_table`]); the memory
//! itself is allocated and freed through the backend as for `cuMemAlloc`.
//! Only device pools of ordinary (pinned) device memory exist: host and
//! managed pools and exportable (IPC) pools are refused with
//! `CUDA_ERROR_NOT_SUPPORTED`.

use std::ffi::{c_int, c_void};
use std::sync::{LazyLock, Mutex, MutexGuard};

use vgpu_spec::Status;

use crate::device::check_device;
use crate::errors::{guard, non_null, write_out, CuResult};
use crate::mempool_table::{attr_type, AttrType, PoolTable};
use crate::state::{driver, lock};
use crate::stream::backend_stream;
use crate::types::{CUdevice, CUdeviceptr, CUmemoryPool, CUresult, CUstream};

/// `CU_MEM_LOCATION_TYPE_DEVICE`.
const LOCATION_DEVICE: c_int = 1;
/// `CU_MEM_ALLOCATION_TYPE_PINNED`.
const ALLOCATION_PINNED: c_int = 1;
/// `CU_MEM_ALLOCATION_TYPE_MANAGED`.
const ALLOCATION_MANAGED: c_int = 2;
/// `CU_MEM_ACCESS_FLAGS_PROT_READWRITE`.
const ACCESS_READWRITE: c_int = 3;

/// `CUmemLocation`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CUmemLocation {
    /// `CUmemLocationType`.
    pub kind: c_int,
    /// The device ordinal (for device locations).
    pub id: c_int,
}

/// The leading fields of `CUmemPoolProps`, the only ones read (the rest,
/// a maximum size and reserved bytes, differ between CUDA versions).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CUmemPoolPropsHead {
    /// `CUmemAllocationType`.
    pub alloc_type: c_int,
    /// `CUmemAllocationHandleType` bits: the handle types it can export.
    pub handle_types: c_int,
    /// Where its memory lives.
    pub location: CUmemLocation,
}

/// `CUmemAccessDesc`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CUmemAccessDesc {
    /// The location being granted access.
    pub location: CUmemLocation,
    /// `CUmemAccess_flags`.
    pub flags: c_int,
}

static POOLS: LazyLock<Mutex<PoolTable>> = LazyLock::new(Mutex::default);

fn pools() -> MutexGuard<'static, PoolTable> {
    lock(&POOLS)
}

fn id_of(pool: CUmemoryPool) -> usize {
    pool.addr()
}

fn as_pool(id: usize) -> CUmemoryPool {
    std::ptr::without_provenance_mut(id)
}

/// The device ordinal of the calling thread's allocations (there is one
/// device).
const DEVICE: CUdevice = 0;

/// Accounts an allocation `cuMemAllocAsync` made to the device's current
/// pool.
pub(crate) fn allocated_from_current(dptr: u64, size: usize) {
    let ctx = crate::ctx::current().unwrap_or(0);
    let mut table = pools();
    let pool = table.current_pool(DEVICE);
    // The current pool is live by construction.
    let _ = table.record_alloc(pool, dptr, size as u64, ctx);
}

/// Forgets a freed allocation, if a pool handed it out.
pub(crate) fn freed(dptr: u64) {
    pools().record_free(dptr);
}

/// Forgets the pool allocations of a destroyed context.
pub(crate) fn forget_context(ctx: u64) {
    pools().forget_context(ctx);
}

/// A device location: its ordinal. Host locations are not supported.
///
/// # Safety
/// `location` must be null or valid for a read of `CUmemLocation`.
unsafe fn device_location(location: *const CUmemLocation) -> CuResult<CUdevice> {
    non_null(location)?;
    // SAFETY: non-null, and per the API a readable `CUmemLocation`.
    let location = unsafe { location.read_unaligned() };
    if location.kind != LOCATION_DEVICE {
        return Err(Status::NOT_SUPPORTED);
    }
    check_device(location.id)?;
    Ok(location.id)
}

/// The device of a CUDA 13 pool query (`cuMemGet/SetDefaultMemPool`-style): a device
/// location holding ordinary device memory.
///
/// # Safety
/// As [`device_location`].
unsafe fn pool_device(location: *const CUmemLocation, kind: c_int) -> CuResult<CUdevice> {
    // SAFETY: the caller's contract.
    let dev = unsafe { device_location(location) }?;
    check_allocation_type(kind)?;
    Ok(dev)
}

/// Accepts ordinary device memory only.
fn check_allocation_type(kind: c_int) -> CuResult<()> {
    match kind {
        ALLOCATION_PINNED => Ok(()),
        ALLOCATION_MANAGED => Err(Status::NOT_SUPPORTED),
        _ => Err(Status::INVALID_VALUE),
    }
}

/// Writes a pool handle out.
///
/// # Safety
/// `out` must be null or valid for a write of `CUmemoryPool`.
unsafe fn write_pool(out: *mut CUmemoryPool, id: usize) -> CuResult<()> {
    // SAFETY: the caller's contract; null is refused by `write_out`.
    unsafe { write_out(out, as_pool(id)) }
}

/// `cuDeviceGetDefaultMemPool`.
#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetDefaultMemPool(
    pool_out: *mut CUmemoryPool,
    dev: CUdevice,
) -> CUresult {
    guard(|| {
        driver()?;
        non_null(pool_out)?;
        check_device(dev)?;
        let id = pools().default_pool(dev);
        // SAFETY: per the API a writable `CUmemoryPool`.
        unsafe { write_pool(pool_out, id) }
    })
}

/// `cuDeviceGetMemPool`: the current pool of the device.
#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetMemPool(
    pool_out: *mut CUmemoryPool,
    dev: CUdevice,
) -> CUresult {
    guard(|| {
        driver()?;
        non_null(pool_out)?;
        check_device(dev)?;
        let id = pools().current_pool(dev);
        // SAFETY: per the API a writable `CUmemoryPool`.
        unsafe { write_pool(pool_out, id) }
    })
}

/// `cuDeviceSetMemPool`: the pool `cuMemAllocAsync` uses on the device.
#[no_mangle]
pub unsafe extern "C" fn cuDeviceSetMemPool(dev: CUdevice, pool: CUmemoryPool) -> CUresult {
    guard(|| {
        driver()?;
        check_device(dev)?;
        pools().set_current(dev, id_of(pool))
    })
}

/// Writes the pool `pick` names for a device location into `pool_out`.
///
/// # Safety
/// `location` is null or a readable `CUmemLocation`; `pool_out` is null or a writable
/// `CUmemoryPool`.
unsafe fn location_pool(
    pool_out: *mut CUmemoryPool,
    location: *const CUmemLocation,
    kind: c_int,
    pick: fn(&mut PoolTable, CUdevice) -> usize,
) -> CUresult {
    guard(|| {
        driver()?;
        non_null(pool_out)?;
        // SAFETY: per the caller, a readable `CUmemLocation`.
        let dev = unsafe { pool_device(location, kind) }?;
        let id = pick(&mut pools(), dev);
        // SAFETY: per the caller, a writable `CUmemoryPool`.
        unsafe { write_pool(pool_out, id) }
    })
}

/// `cuMemGetDefaultMemPool` (CUDA 13): a device location's default pool.
#[no_mangle]
pub unsafe extern "C" fn cuMemGetDefaultMemPool(
    pool_out: *mut CUmemoryPool,
    location: *const CUmemLocation,
    kind: c_int,
) -> CUresult {
    // SAFETY: the caller's pointers, under the API's contract.
    unsafe { location_pool(pool_out, location, kind, PoolTable::default_pool) }
}

/// `cuMemGetMemPool` (CUDA 13): a device location's current pool.
#[no_mangle]
pub unsafe extern "C" fn cuMemGetMemPool(
    pool_out: *mut CUmemoryPool,
    location: *const CUmemLocation,
    kind: c_int,
) -> CUresult {
    // SAFETY: the caller's pointers, under the API's contract.
    unsafe { location_pool(pool_out, location, kind, PoolTable::current_pool) }
}

/// `cuMemSetMemPool` (CUDA 13): sets a device location's current pool.
#[no_mangle]
pub unsafe extern "C" fn cuMemSetMemPool(
    location: *const CUmemLocation,
    kind: c_int,
    pool: CUmemoryPool,
) -> CUresult {
    guard(|| {
        driver()?;
        // SAFETY: per the API a readable `CUmemLocation`.
        let dev = unsafe { pool_device(location, kind) }?;
        pools().set_current(dev, id_of(pool))
    })
}

/// `cuMemPoolCreate`: a pool of ordinary device memory on one device.
#[no_mangle]
pub unsafe extern "C" fn cuMemPoolCreate(
    pool_out: *mut CUmemoryPool,
    props: *const CUmemPoolPropsHead,
) -> CUresult {
    guard(|| {
        driver()?;
        non_null(pool_out)?;
        non_null(props)?;
        // SAFETY: non-null, and per the API a readable `CUmemPoolProps`,
        // which begins with these fields.
        let head = unsafe { props.read_unaligned() };
        check_allocation_type(head.alloc_type)?;
        if head.handle_types != 0 {
            return Err(Status::NOT_SUPPORTED);
        }
        let location = head.location;
        // SAFETY: a local value.
        let dev = unsafe { device_location(&location) }?;
        let id = pools().create(dev);
        // SAFETY: per the API a writable `CUmemoryPool`.
        unsafe { write_pool(pool_out, id) }
    })
}

/// `cuMemPoolDestroy`: default pools cannot be destroyed.
#[no_mangle]
pub unsafe extern "C" fn cuMemPoolDestroy(pool: CUmemoryPool) -> CUresult {
    guard(|| {
        driver()?;
        pools().destroy(id_of(pool))
    })
}

/// `cuMemPoolSetAttribute`: `value` points at an `int` or a `cuuint64_t`,
/// as the attribute says.
#[no_mangle]
pub unsafe extern "C" fn cuMemPoolSetAttribute(
    pool: CUmemoryPool,
    attr: c_int,
    value: *mut c_void,
) -> CUresult {
    guard(|| {
        driver()?;
        non_null(value)?;
        let id = id_of(pool);
        pools().check(id)?;
        let value = match attr_type(attr)? {
            // SAFETY: non-null, and per the API an `int` for this attribute.
            AttrType::Int => u64::from(unsafe { value.cast::<c_int>().read_unaligned() } != 0),
            // SAFETY: non-null, and per the API a `cuuint64_t` for this attribute.
            AttrType::U64 => unsafe { value.cast::<u64>().read_unaligned() },
        };
        pools().set_attr(id, attr, value)
    })
}

/// `cuMemPoolGetAttribute`: writes an `int` or a `cuuint64_t` to `value`,
/// as the attribute says.
#[no_mangle]
pub unsafe extern "C" fn cuMemPoolGetAttribute(
    pool: CUmemoryPool,
    attr: c_int,
    value: *mut c_void,
) -> CUresult {
    guard(|| {
        driver()?;
        non_null(value)?;
        let got = pools().get_attr(id_of(pool), attr)?;
        match attr_type(attr)? {
            // SAFETY: non-null, and per the API a writable `int` for this
            // attribute; int attributes are 0 or 1.
            AttrType::Int => unsafe { write_out(value.cast::<c_int>(), c_int::from(got != 0)) },
            // SAFETY: non-null, and per the API a writable `cuuint64_t`.
            AttrType::U64 => unsafe { write_out(value.cast::<u64>(), got) },
        }
    })
}

/// `cuMemPoolTrimTo`: nothing to release (freed memory goes back to the
/// slice at once), so this only checks the pool.
#[no_mangle]
pub unsafe extern "C" fn cuMemPoolTrimTo(
    pool: CUmemoryPool,
    _min_bytes_to_keep: usize,
) -> CUresult {
    guard(|| {
        driver()?;
        pools().check(id_of(pool))
    })
}

/// `cuMemPoolSetAccess`: the pool's own device always has read-write
/// access, which is all that can be asked for (there are no peers).
#[no_mangle]
pub unsafe extern "C" fn cuMemPoolSetAccess(
    pool: CUmemoryPool,
    map: *const CUmemAccessDesc,
    count: usize,
) -> CUresult {
    guard(|| {
        driver()?;
        let dev = pools().device(id_of(pool))?;
        if count == 0 {
            return Ok(());
        }
        non_null(map)?;
        for i in 0..count {
            // SAFETY: per the API `map` holds `count` readable descriptors.
            let desc = unsafe { map.add(i).read_unaligned() };
            if desc.location.kind != LOCATION_DEVICE {
                return Err(Status::NOT_SUPPORTED);
            }
            check_device(desc.location.id)?;
            if desc.location.id != dev || desc.flags != ACCESS_READWRITE {
                return Err(Status::INVALID_VALUE);
            }
        }
        Ok(())
    })
}

/// `cuMemPoolGetAccess`: read-write for the pool's own device.
#[no_mangle]
pub unsafe extern "C" fn cuMemPoolGetAccess(
    flags_out: *mut c_int,
    pool: CUmemoryPool,
    location: *mut CUmemLocation,
) -> CUresult {
    guard(|| {
        driver()?;
        non_null(flags_out)?;
        let dev = pools().device(id_of(pool))?;
        // SAFETY: per the API a readable `CUmemLocation`.
        let asked = unsafe { device_location(location) }?;
        if asked != dev {
            return Err(Status::INVALID_DEVICE);
        }
        // SAFETY: non-null, and per the API a writable `CUmemAccess_flags`.
        unsafe { write_out(flags_out, ACCESS_READWRITE) }
    })
}

/// `cuMemAllocFromPoolAsync`: allocated at once, as `cuMemAllocAsync`,
/// and accounted to `pool`.
#[no_mangle]
pub unsafe extern "C" fn cuMemAllocFromPoolAsync(
    dptr: *mut CUdeviceptr,
    bytesize: usize,
    pool: CUmemoryPool,
    stream: CUstream,
) -> CUresult {
    guard(|| {
        let drv = driver()?;
        non_null(dptr)?;
        let id = id_of(pool);
        pools().check(id)?;
        backend_stream(drv, stream)?;
        let addr = crate::memory::alloc(bytesize)?;
        let ctx = crate::ctx::current().unwrap_or(0);
        if let Err(status) = pools().record_alloc(id, addr, bytesize as u64, ctx) {
            // The pool was destroyed meanwhile; best effort.
            let _ = crate::memory::free(addr);
            return Err(status);
        }
        // SAFETY: non-null, and per the API a writable `CUdeviceptr`.
        unsafe { write_out(dptr, addr) }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_calls_before_init_are_not_initialized() {
        let mut pool: CUmemoryPool = std::ptr::null_mut();
        // SAFETY: a valid out-pointer.
        let rc = unsafe { cuDeviceGetDefaultMemPool(&mut pool, 0) };
        assert_eq!(rc, Status::NOT_INITIALIZED.0);
        assert!(pool.is_null());
        // SAFETY: no pointer is dereferenced before the check.
        let rc = unsafe { cuMemPoolTrimTo(as_pool(0x5000), 0) };
        assert_eq!(rc, Status::NOT_INITIALIZED.0);
    }

    #[test]
    fn host_locations_and_managed_memory_are_not_supported() {
        let at = |kind, id| {
            let location = CUmemLocation { kind, id };
            // SAFETY: a local value.
            unsafe { device_location(&location) }
        };
        assert_eq!(at(2, 0), Err(Status::NOT_SUPPORTED));
        assert_eq!(at(LOCATION_DEVICE, 0), Ok(0));
        assert_eq!(at(LOCATION_DEVICE, 3), Err(Status::INVALID_DEVICE));
        // SAFETY: null is refused before use.
        let null = unsafe { device_location(std::ptr::null()) };
        assert_eq!(null, Err(Status::INVALID_VALUE));
        assert_eq!(check_allocation_type(ALLOCATION_PINNED), Ok(()));
        assert_eq!(
            check_allocation_type(ALLOCATION_MANAGED),
            Err(Status::NOT_SUPPORTED)
        );
        assert_eq!(check_allocation_type(0), Err(Status::INVALID_VALUE));
    }

    #[test]
    fn proc_address_resolves_every_pool_entry_point_to_its_export() {
        use crate::procaddr::resolve;
        let plain: [(&str, *mut c_void); 14] = [
            (
                "cuDeviceGetDefaultMemPool",
                cuDeviceGetDefaultMemPool as *mut c_void,
            ),
            ("cuDeviceGetMemPool", cuDeviceGetMemPool as *mut c_void),
            ("cuDeviceSetMemPool", cuDeviceSetMemPool as *mut c_void),
            (
                "cuMemGetDefaultMemPool",
                cuMemGetDefaultMemPool as *mut c_void,
            ),
            ("cuMemGetMemPool", cuMemGetMemPool as *mut c_void),
            ("cuMemSetMemPool", cuMemSetMemPool as *mut c_void),
            ("cuMemPoolCreate", cuMemPoolCreate as *mut c_void),
            ("cuMemPoolDestroy", cuMemPoolDestroy as *mut c_void),
            (
                "cuMemPoolSetAttribute",
                cuMemPoolSetAttribute as *mut c_void,
            ),
            (
                "cuMemPoolGetAttribute",
                cuMemPoolGetAttribute as *mut c_void,
            ),
            ("cuMemPoolTrimTo", cuMemPoolTrimTo as *mut c_void),
            ("cuMemPoolSetAccess", cuMemPoolSetAccess as *mut c_void),
            ("cuMemPoolGetAccess", cuMemPoolGetAccess as *mut c_void),
            (
                "cuMemAllocFromPoolAsync",
                cuMemAllocFromPoolAsync as *mut c_void,
            ),
        ];
        for (name, export) in plain {
            assert_eq!(resolve(name, 13000, 0), Ok(export), "{name}");
        }
        assert_eq!(
            resolve("cuMemAllocFromPoolAsync", 12000, 2),
            Ok(crate::ptds::cuMemAllocFromPoolAsync_ptsz as *mut c_void)
        );
        assert_eq!(
            resolve("cuDeviceGetDefaultMemPool", 12000, 2),
            Ok(cuDeviceGetDefaultMemPool as *mut c_void)
        );
    }

    #[test]
    fn pool_props_head_matches_the_c_layout() {
        assert_eq!(std::mem::size_of::<CUmemLocation>(), 8);
        assert_eq!(std::mem::size_of::<CUmemPoolPropsHead>(), 16);
        assert_eq!(std::mem::offset_of!(CUmemPoolPropsHead, location), 8);
        assert_eq!(std::mem::size_of::<CUmemAccessDesc>(), 12);
    }
}
