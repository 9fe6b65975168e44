//! Function attributes and the occupancy calculators, answered by the
//! backend's device (`FUNC_GET_ATTRIBUTE`, `FUNC_SET_ATTRIBUTE`,
//! `FUNC_OCCUPANCY`): register counts, shared memory sizes and occupancy
//! depend on the compiled code and the device, and libraries such as cuBLAS
//! choose kernels and grid sizes from them, so the answers must be the real
//! driver's. `cuOccupancyMaxPotentialBlockSize` runs the runtime's search
//! over block sizes here, asking the backend for each candidate.
//!
//! A backend without these requests (`CUDA_ERROR_NOT_SUPPORTED`) gets the
//! earlier local answers: 1024 threads per block, and only the settings
//! that change nothing (the carveout hint, dynamic shared memory up to the
//! default 48 KiB).

use std::ffi::{c_int, c_uint};

use vgpu_spec::wire::{occupancy, FuncAttributeReq, OccupancyReq, ValueResp};
use vgpu_spec::{Request, Status};

use crate::ctx::session_ctx;
use crate::errors::{guard, non_null, write_out, CuResult};
use crate::launch_ex::CUlaunchConfig;
use crate::state::{lock, parse};
use crate::types::{CUfunction, CUresult, CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK};

/// `CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES`.
const ATTR_MAX_DYNAMIC_SHARED: c_int = 8;
/// `CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT`.
const ATTR_CARVEOUT: c_int = 9;
/// Dynamic shared memory every kernel may use without opting in.
const DEFAULT_DYNAMIC_SHARED: c_int = 48 * 1024;
/// `CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION`.
const LAUNCH_ATTR_CLUSTER_DIMENSION: c_uint = 4;
/// `CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK`.
const DEV_MAX_THREADS_PER_BLOCK: c_int = 1;
/// `CU_DEVICE_ATTRIBUTE_WARP_SIZE`.
const DEV_WARP_SIZE: c_int = 10;
/// `CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT`.
const DEV_MULTIPROCESSOR_COUNT: c_int = 16;
/// `CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR`.
const DEV_MAX_THREADS_PER_SM: c_int = 39;

/// `size_t (*)(int blockSize)`: dynamic shared memory for a block size.
pub type CUoccupancyB2DSize = Option<unsafe extern "C" fn(c_int) -> usize>;

/// The backend handle of `f` (a function or a kernel) and the context to
/// send the request in.
fn backend_function(f: CUfunction) -> CuResult<(&'static crate::state::Driver, u64, u64)> {
    let (drv, ctx) = session_ctx()?;
    let f = crate::library::as_function(f)?;
    let handle = lock(&drv.modules)
        .function(f)
        .map(|info| info.handle)
        .ok_or(Status::INVALID_HANDLE)?;
    Ok((drv, ctx, handle))
}

/// A device attribute this library reports (0 if unknown).
fn device_attribute(drv: &crate::state::Driver, attrib: c_int) -> c_int {
    crate::device::attribute(&drv.info.attributes, attrib).unwrap_or(0)
}

/// Sends a request answered by a [`ValueResp`].
fn value_call(f: CUfunction, build: impl FnOnce(u64) -> Request<'static>) -> CuResult<i64> {
    let (drv, ctx, handle) = backend_function(f)?;
    let mut body = Vec::new();
    drv.call(ctx, 0, &build(handle), &mut body)?;
    let (resp, _) = parse::<ValueResp>(&body, "a function query")?;
    Ok(resp.value.get())
}

/// A function attribute, from the backend.
pub(crate) fn get_attribute(f: CUfunction, attrib: c_int) -> CuResult<c_int> {
    let asked = value_call(f, |function| {
        Request::FuncGetAttribute(FuncAttributeReq {
            function: function.into(),
            attrib: attrib.into(),
            value: 0.into(),
        })
    });
    match asked {
        Ok(value) => c_int::try_from(value).map_err(|_| Status::UNKNOWN),
        Err(Status::NOT_SUPPORTED) => local_attribute(attrib),
        Err(status) => Err(status),
    }
}

/// The answer when the backend has no `FUNC_GET_ATTRIBUTE`.
fn local_attribute(attrib: c_int) -> CuResult<c_int> {
    if attrib == CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK {
        return Ok(1024);
    }
    crate::logging::warn_once(&format!("cuFuncGetAttribute({attrib}) is not supported"));
    Err(Status::NOT_SUPPORTED)
}

/// Sets a function attribute on the backend's function.
pub(crate) fn set_attribute(f: CUfunction, attrib: c_int, value: c_int) -> CuResult<()> {
    let (drv, ctx, handle) = backend_function(f)?;
    let req = Request::FuncSetAttribute(FuncAttributeReq {
        function: handle.into(),
        attrib: attrib.into(),
        value: value.into(),
    });
    match drv.call(ctx, 0, &req, &mut Vec::new()) {
        Err(Status::NOT_SUPPORTED) => local_set_attribute(attrib, value),
        other => other,
    }
}

/// The answer when the backend has no `FUNC_SET_ATTRIBUTE`.
fn local_set_attribute(attrib: c_int, value: c_int) -> CuResult<()> {
    match attrib {
        ATTR_CARVEOUT => Ok(()),
        ATTR_MAX_DYNAMIC_SHARED if (0..=DEFAULT_DYNAMIC_SHARED).contains(&value) => Ok(()),
        _ => {
            crate::logging::warn_once(&format!(
                "setting function attribute {attrib} to {value} is not supported"
            ));
            Err(Status::NOT_SUPPORTED)
        }
    }
}

/// Asks the backend one occupancy question.
fn occupancy_call(f: CUfunction, mut req: OccupancyReq) -> CuResult<i64> {
    value_call(f, move |function| {
        req.function = function.into();
        Request::FuncOccupancy(req)
    })
}

fn block_size(value: c_int) -> CuResult<u32> {
    u32::try_from(value).map_err(|_| Status::INVALID_VALUE)
}

/// `cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags` on the backend.
fn max_active_blocks(f: CUfunction, block: c_int, smem: usize, flags: c_uint) -> CuResult<c_int> {
    let req = OccupancyReq {
        query: occupancy::MAX_ACTIVE_BLOCKS_PER_SM.into(),
        flags: flags.into(),
        block: [block_size(block)?.into(), 1.into(), 1.into()],
        shared_mem: u32::try_from(smem)
            .map_err(|_| Status::INVALID_VALUE)?
            .into(),
        ..OccupancyReq::default()
    };
    c_int::try_from(occupancy_call(f, req)?).map_err(|_| Status::UNKNOWN)
}

/// `cuOccupancyMaxActiveBlocksPerMultiprocessor`.
#[no_mangle]
pub unsafe extern "C" fn cuOccupancyMaxActiveBlocksPerMultiprocessor(
    num_blocks: *mut c_int,
    func: CUfunction,
    block_size: c_int,
    dynamic_smem_size: usize,
) -> CUresult {
    guard(|| {
        non_null(num_blocks)?;
        let n = max_active_blocks(func, block_size, dynamic_smem_size, 0)?;
        // SAFETY: non-null, and per the API a writable `int`.
        unsafe { write_out(num_blocks, n) }
    })
}

/// `cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags`.
#[no_mangle]
pub unsafe extern "C" fn cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(
    num_blocks: *mut c_int,
    func: CUfunction,
    block_size: c_int,
    dynamic_smem_size: usize,
    flags: c_uint,
) -> CUresult {
    guard(|| {
        non_null(num_blocks)?;
        let n = max_active_blocks(func, block_size, dynamic_smem_size, flags)?;
        // SAFETY: non-null, and per the API a writable `int`.
        unsafe { write_out(num_blocks, n) }
    })
}

/// `cuOccupancyAvailableDynamicSMemPerBlock`.
#[no_mangle]
pub unsafe extern "C" fn cuOccupancyAvailableDynamicSMemPerBlock(
    dynamic_smem_size: *mut usize,
    func: CUfunction,
    num_blocks: c_int,
    block_size: c_int,
) -> CUresult {
    guard(|| {
        non_null(dynamic_smem_size)?;
        let req = OccupancyReq {
            query: occupancy::AVAILABLE_DYNAMIC_SMEM_PER_BLOCK.into(),
            block: [self::block_size(block_size)?.into(), 1.into(), 1.into()],
            num_blocks: self::block_size(num_blocks)?.into(),
            ..OccupancyReq::default()
        };
        let bytes = usize::try_from(occupancy_call(func, req)?).map_err(|_| Status::UNKNOWN)?;
        // SAFETY: non-null, and per the API a writable `size_t`.
        unsafe { write_out(dynamic_smem_size, bytes) }
    })
}

/// The cluster dimensions a launch configuration sets (zero: none).
///
/// # Safety
/// `config.attrs` must hold `config.num_attrs` attributes (or be NULL).
unsafe fn cluster_dims(config: &CUlaunchConfig) -> CuResult<[u32; 3]> {
    if config.attrs.is_null() || config.num_attrs == 0 {
        return Ok([0; 3]);
    }
    if config.num_attrs > 64 {
        return Err(Status::INVALID_VALUE);
    }
    // SAFETY: the caller's contract.
    let attrs = unsafe { std::slice::from_raw_parts(config.attrs, config.num_attrs as usize) };
    let found = attrs
        .iter()
        .rev()
        .find(|a| a.id == LAUNCH_ATTR_CLUSTER_DIMENSION);
    // Truncations intended: the dimensions are three 32-bit words.
    Ok(found.map_or([0; 3], |a| {
        [
            a.value[0] as u32,
            (a.value[0] >> 32) as u32,
            a.value[1] as u32,
        ]
    }))
}

/// Shared body of the two cluster queries.
///
/// # Safety
/// `config` must be NULL or a valid `CUlaunchConfig`.
unsafe fn cluster_query(
    out: *mut c_int,
    func: CUfunction,
    config: *const CUlaunchConfig,
    query: u32,
) -> CuResult<()> {
    non_null(out)?;
    non_null(config)?;
    // SAFETY: non-null, and per the API a readable `CUlaunchConfig`.
    let config = unsafe { &*config };
    // SAFETY: per the API `attrs` holds `num_attrs` attributes.
    let cluster = unsafe { cluster_dims(config) }?;
    let req = OccupancyReq {
        query: query.into(),
        grid: config.grid_dim.map(Into::into),
        block: config.block_dim.map(Into::into),
        cluster: cluster.map(Into::into),
        shared_mem: config.shared_mem_bytes.into(),
        ..OccupancyReq::default()
    };
    let n = c_int::try_from(occupancy_call(func, req)?).map_err(|_| Status::UNKNOWN)?;
    // SAFETY: non-null, and per the API a writable `int`.
    unsafe { write_out(out, n) }
}

/// `cuOccupancyMaxActiveClusters`.
#[no_mangle]
pub unsafe extern "C" fn cuOccupancyMaxActiveClusters(
    num_clusters: *mut c_int,
    func: CUfunction,
    config: *const CUlaunchConfig,
) -> CUresult {
    // SAFETY: forwards the caller's pointers under the API's contract.
    guard(|| unsafe { cluster_query(num_clusters, func, config, occupancy::MAX_ACTIVE_CLUSTERS) })
}

/// `cuOccupancyMaxPotentialClusterSize`.
#[no_mangle]
pub unsafe extern "C" fn cuOccupancyMaxPotentialClusterSize(
    cluster_size: *mut c_int,
    func: CUfunction,
    config: *const CUlaunchConfig,
) -> CUresult {
    // SAFETY: forwards the caller's pointers under the API's contract.
    guard(|| unsafe {
        cluster_query(
            cluster_size,
            func,
            config,
            occupancy::MAX_POTENTIAL_CLUSTER_SIZE,
        )
    })
}

/// What the block-size search needs to know about device and function.
#[derive(Clone, Copy, Debug)]
struct SearchLimits {
    /// The largest block size to try.
    block_limit: c_int,
    /// Block sizes are tried in steps of this (the warp size).
    granularity: c_int,
    /// Threads per multiprocessor: no block size can beat it.
    threads_per_sm: c_int,
}

/// The runtime's block-size search: from the largest block size down in
/// warp steps, the one with the most resident threads per multiprocessor
/// (the largest on ties). Returns (blocks per multiprocessor, block size).
fn search_block_size(
    limits: SearchLimits,
    mut blocks_for: impl FnMut(c_int) -> CuResult<c_int>,
) -> CuResult<(c_int, c_int)> {
    let SearchLimits {
        block_limit,
        granularity,
        threads_per_sm,
    } = limits;
    if block_limit <= 0 || granularity <= 0 {
        return Err(Status::INVALID_VALUE);
    }
    let (mut best_blocks, mut best_size, mut best_threads) = (0, 0, 0);
    let mut aligned = (block_limit + granularity - 1) / granularity * granularity;
    while aligned > 0 {
        let size = aligned.min(block_limit);
        let blocks = blocks_for(size)?;
        let threads = blocks * size;
        if threads > best_threads {
            (best_blocks, best_size, best_threads) = (blocks, size, threads);
        }
        if threads_per_sm == best_threads {
            break;
        }
        aligned -= granularity;
    }
    Ok((best_blocks, best_size))
}

/// Shared body of the two `cuOccupancyMaxPotentialBlockSize` versions.
///
/// # Safety
/// Out-pointers null or writable; `b2d` a valid callback or `None`.
unsafe fn potential_block_size(
    min_grid_size: *mut c_int,
    block_size: *mut c_int,
    func: CUfunction,
    b2d: CUoccupancyB2DSize,
    dynamic_smem_size: usize,
    block_size_limit: c_int,
    flags: c_uint,
) -> CuResult<()> {
    non_null(min_grid_size)?;
    non_null(block_size)?;
    let (drv, _) = session_ctx()?;
    let func_limit = get_attribute(func, CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK)?;
    let mut block_limit = device_attribute(drv, DEV_MAX_THREADS_PER_BLOCK).min(func_limit);
    if block_size_limit > 0 {
        block_limit = block_limit.min(block_size_limit);
    }
    let limits = SearchLimits {
        block_limit,
        granularity: device_attribute(drv, DEV_WARP_SIZE),
        threads_per_sm: device_attribute(drv, DEV_MAX_THREADS_PER_SM),
    };
    let (blocks, size) = search_block_size(limits, |size| {
        let smem = match b2d {
            // SAFETY: the application's callback, called as documented.
            Some(callback) => unsafe { callback(size) },
            None => dynamic_smem_size,
        };
        max_active_blocks(func, size, smem, flags)
    })?;
    let sms = device_attribute(drv, DEV_MULTIPROCESSOR_COUNT);
    // SAFETY: non-null and writable (the caller's contract).
    unsafe { write_out(min_grid_size, blocks * sms) }?;
    // SAFETY: as above.
    unsafe { write_out(block_size, size) }
}

/// `cuOccupancyMaxPotentialBlockSize`.
#[no_mangle]
pub unsafe extern "C" fn cuOccupancyMaxPotentialBlockSize(
    min_grid_size: *mut c_int,
    block_size: *mut c_int,
    func: CUfunction,
    block_size_to_dynamic_smem_size: CUoccupancyB2DSize,
    dynamic_smem_size: usize,
    block_size_limit: c_int,
) -> CUresult {
    // SAFETY: forwards the caller's arguments under the API's contract.
    guard(|| unsafe {
        potential_block_size(
            min_grid_size,
            block_size,
            func,
            block_size_to_dynamic_smem_size,
            dynamic_smem_size,
            block_size_limit,
            0,
        )
    })
}

/// `cuOccupancyMaxPotentialBlockSizeWithFlags`.
#[no_mangle]
pub unsafe extern "C" fn cuOccupancyMaxPotentialBlockSizeWithFlags(
    min_grid_size: *mut c_int,
    block_size: *mut c_int,
    func: CUfunction,
    block_size_to_dynamic_smem_size: CUoccupancyB2DSize,
    dynamic_smem_size: usize,
    block_size_limit: c_int,
    flags: c_uint,
) -> CUresult {
    // SAFETY: forwards the caller's arguments under the API's contract.
    guard(|| unsafe {
        potential_block_size(
            min_grid_size,
            block_size,
            func,
            block_size_to_dynamic_smem_size,
            dynamic_smem_size,
            block_size_limit,
            flags,
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::launch_ex::CUlaunchAttribute;

    fn limits(block_limit: c_int) -> SearchLimits {
        SearchLimits {
            block_limit,
            granularity: 32,
            threads_per_sm: 2048,
        }
    }

    #[test]
    fn block_size_search_stops_at_full_occupancy_with_the_largest_block() {
        let mut tried = Vec::new();
        let found = search_block_size(limits(1024), |size| {
            tried.push(size);
            Ok(2048 / size)
        });
        assert_eq!(found, Ok((2, 1024)));
        assert_eq!(tried, vec![1024]);
    }

    #[test]
    fn block_size_search_prefers_more_resident_threads() {
        // Registers allow 6 blocks of 256 or fewer threads, one otherwise:
        // 1536 resident threads beat 1024.
        let found = search_block_size(limits(1024), |size| Ok(if size <= 256 { 6 } else { 1 }));
        assert_eq!(found, Ok((6, 256)));
    }

    #[test]
    fn block_size_search_tries_an_unaligned_limit_first() {
        let mut tried = Vec::new();
        let found = search_block_size(limits(100), |size| {
            tried.push(size);
            Ok(1)
        });
        assert_eq!(found, Ok((1, 100)));
        assert_eq!(tried, vec![100, 96, 64, 32]);
    }

    #[test]
    fn block_size_search_with_no_room_or_bad_limits_fails() {
        assert_eq!(search_block_size(limits(1024), |_| Ok(0)), Ok((0, 0)));
        assert_eq!(
            search_block_size(limits(0), |_| Ok(1)),
            Err(Status::INVALID_VALUE)
        );
        assert_eq!(
            search_block_size(limits(64), |_| Err(Status::INVALID_HANDLE)),
            Err(Status::INVALID_HANDLE)
        );
    }

    fn config(attrs: &mut [CUlaunchAttribute]) -> CUlaunchConfig {
        CUlaunchConfig {
            grid_dim: [8, 1, 1],
            block_dim: [128, 1, 1],
            shared_mem_bytes: 0,
            stream: std::ptr::null_mut(),
            attrs: attrs.as_mut_ptr(),
            num_attrs: attrs.len() as c_uint,
        }
    }

    #[test]
    fn cluster_dimensions_come_from_the_last_cluster_attribute() {
        let mut value = [0u64; 8];
        value[0] = 2 | (1 << 32);
        value[1] = 1;
        let cluster = CUlaunchAttribute {
            id: LAUNCH_ATTR_CLUSTER_DIMENSION,
            pad: [0; 4],
            value,
        };
        let priority = CUlaunchAttribute {
            id: 8,
            pad: [0; 4],
            value: [5, 0, 0, 0, 0, 0, 0, 0],
        };
        let mut attrs = [priority, cluster];
        // SAFETY: `attrs` holds `num_attrs` attributes.
        assert_eq!(unsafe { cluster_dims(&config(&mut attrs)) }, Ok([2, 1, 1]));
        let mut none = [priority];
        // SAFETY: as above.
        assert_eq!(unsafe { cluster_dims(&config(&mut none)) }, Ok([0, 0, 0]));
    }

    #[test]
    fn without_a_backend_attribute_the_local_answers_apply() {
        assert_eq!(
            local_attribute(CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK),
            Ok(1024)
        );
        assert_eq!(local_attribute(4), Err(Status::NOT_SUPPORTED));
        assert_eq!(local_set_attribute(ATTR_CARVEOUT, 50), Ok(()));
        assert_eq!(
            local_set_attribute(ATTR_MAX_DYNAMIC_SHARED, 48 * 1024),
            Ok(())
        );
        assert_eq!(
            local_set_attribute(ATTR_MAX_DYNAMIC_SHARED, 100_000),
            Err(Status::NOT_SUPPORTED)
        );
    }

    #[test]
    fn occupancy_queries_before_init_are_not_initialized() {
        let mut n = 0;
        // SAFETY: a valid out-pointer; the function is never dereferenced.
        let rc = unsafe {
            cuOccupancyMaxActiveBlocksPerMultiprocessor(&mut n, std::ptr::null_mut(), 128, 0)
        };
        assert_eq!(rc, Status::NOT_INITIALIZED.0);
    }
}
