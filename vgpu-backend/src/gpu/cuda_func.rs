//! Function attributes and occupancy calculations on a real GPU: the
//! driver's own answers (`cuFuncGetAttribute`, `cuFuncSetAttribute`,
//! `cuOccupancy*`), so that libraries which size their launches from them
//! (cuBLAS, PyTorch) choose exactly what they would natively. The caller
//! has made the function's context current.

use std::ffi::c_int;

use cudarc::driver::sys::{self as cu, CUfunction_attribute_enum as A};
use vgpu_spec::wire::occupancy;
use vgpu_spec::Status;

use super::cuda::check;
use super::{GpuResult, LaunchConfig, LaunchMode, OccupancyQuery, ParamLayout};
use zerocopy::IntoBytes;

/// The driver functions this module calls (checked at open).
pub(super) const SYMBOLS: &[&str] = &[
    "cuFuncGetAttribute",
    "cuFuncSetAttribute",
    "cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags",
    "cuOccupancyAvailableDynamicSMemPerBlock",
    "cuOccupancyMaxActiveClusters",
    "cuOccupancyMaxPotentialClusterSize",
    "cuLaunchKernelEx",
];

/// The `CUfunction_attribute` with value `attrib`.
fn attribute(attrib: i32) -> GpuResult<cu::CUfunction_attribute> {
    Ok(match attrib {
        0 => A::CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK,
        1 => A::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES,
        2 => A::CU_FUNC_ATTRIBUTE_CONST_SIZE_BYTES,
        3 => A::CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES,
        4 => A::CU_FUNC_ATTRIBUTE_NUM_REGS,
        5 => A::CU_FUNC_ATTRIBUTE_PTX_VERSION,
        6 => A::CU_FUNC_ATTRIBUTE_BINARY_VERSION,
        7 => A::CU_FUNC_ATTRIBUTE_CACHE_MODE_CA,
        8 => A::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        9 => A::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT,
        10 => A::CU_FUNC_ATTRIBUTE_CLUSTER_SIZE_MUST_BE_SET,
        11 => A::CU_FUNC_ATTRIBUTE_REQUIRED_CLUSTER_WIDTH,
        12 => A::CU_FUNC_ATTRIBUTE_REQUIRED_CLUSTER_HEIGHT,
        13 => A::CU_FUNC_ATTRIBUTE_REQUIRED_CLUSTER_DEPTH,
        14 => A::CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED,
        15 => A::CU_FUNC_ATTRIBUTE_CLUSTER_SCHEDULING_POLICY_PREFERENCE,
        _ => return Err(Status::INVALID_VALUE),
    })
}

/// `cuFuncGetAttribute`.
pub(super) fn get_attribute(func: cu::CUfunction, attrib: i32) -> GpuResult<i32> {
    let attrib = attribute(attrib)?;
    let mut value: c_int = 0;
    // SAFETY: a valid out-pointer; the session layer passes only live
    // function handles.
    check(unsafe { cu::cuFuncGetAttribute(&mut value, attrib, func) })?;
    Ok(value)
}

/// `cuFuncSetAttribute`.
pub(super) fn set_attribute(func: cu::CUfunction, attrib: i32, value: i32) -> GpuResult<()> {
    let attrib = attribute(attrib)?;
    // SAFETY: a live function handle (see `get_attribute`).
    check(unsafe { cu::cuFuncSetAttribute(func, attrib, value) })
}

fn int(value: u32) -> GpuResult<c_int> {
    c_int::try_from(value).map_err(|_| Status::INVALID_VALUE)
}

/// Answers one `cuOccupancy*` question.
pub(super) fn occupancy(func: cu::CUfunction, q: &OccupancyQuery) -> GpuResult<i64> {
    match q.kind {
        occupancy::MAX_ACTIVE_BLOCKS_PER_SM => {
            let mut blocks: c_int = 0;
            let (block, smem) = (int(q.config.block[0])?, q.config.shared_mem as usize);
            // SAFETY: a valid out-pointer and a live function handle.
            check(unsafe {
                cu::cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(
                    &mut blocks,
                    func,
                    block,
                    smem,
                    q.flags,
                )
            })?;
            Ok(blocks.into())
        }
        occupancy::AVAILABLE_DYNAMIC_SMEM_PER_BLOCK => {
            let mut bytes = 0usize;
            let (blocks, block) = (int(q.num_blocks)?, int(q.config.block[0])?);
            // SAFETY: a valid out-pointer and a live function handle.
            check(unsafe {
                cu::cuOccupancyAvailableDynamicSMemPerBlock(&mut bytes, func, blocks, block)
            })?;
            i64::try_from(bytes).map_err(|_| Status::INVALID_VALUE)
        }
        occupancy::MAX_ACTIVE_CLUSTERS | occupancy::MAX_POTENTIAL_CLUSTER_SIZE => {
            cluster_query(func, q)
        }
        _ => Err(Status::INVALID_VALUE),
    }
}

/// A launch through `cuLaunchKernelEx`: in thread block clusters of
/// `cluster` blocks when given (`CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION`),
/// cooperative when asked (`CU_LAUNCH_ATTRIBUTE_COOPERATIVE`, as
/// `cuLaunchCooperativeKernel`).
///
/// # Safety
/// `func` and `stream` are live handles of the current context and
/// `kernel_params` is NULL or points at one pointer per parameter, each to
/// a value that stays valid for the call.
pub(super) unsafe fn launch_ex(
    func: cu::CUfunction,
    config: &LaunchConfig,
    LaunchMode {
        cluster,
        cooperative,
    }: LaunchMode,
    stream: cu::CUstream,
    kernel_params: *mut *mut std::ffi::c_void,
) -> GpuResult<()> {
    // At most two attributes, on the stack: this is a launch path.
    let mut attrs = [cooperative_attribute(); 2];
    let mut n = 0;
    if let Some(cluster) = cluster {
        if cluster.contains(&0) {
            return Err(Status::INVALID_VALUE);
        }
        attrs[n] = cluster_attribute(cluster);
        n += 1;
    }
    if cooperative {
        attrs[n] = cooperative_attribute();
        n += 1;
    }
    let launch = driver_config(config, stream, &mut attrs[..n]);
    // SAFETY: the configuration and its attributes outlive the call; the
    // caller guarantees the handles and the parameter array.
    check(unsafe { cu::cuLaunchKernelEx(&launch, func, kernel_params, std::ptr::null_mut()) })
}

/// The driver's launch configuration for `config` on `stream`, with `attrs` (which must
/// outlive its use).
fn driver_config(
    config: &LaunchConfig,
    stream: cu::CUstream,
    attrs: &mut [cu::CUlaunchAttribute],
) -> cu::CUlaunchConfig {
    let [gx, gy, gz] = config.grid;
    let [bx, by, bz] = config.block;
    cu::CUlaunchConfig {
        gridDimX: gx,
        gridDimY: gy,
        gridDimZ: gz,
        blockDimX: bx,
        blockDimY: by,
        blockDimZ: bz,
        sharedMemBytes: config.shared_mem,
        hStream: stream,
        attrs: if attrs.is_empty() {
            std::ptr::null_mut()
        } else {
            attrs.as_mut_ptr()
        },
        // At most two attributes.
        numAttrs: attrs.len() as u32,
    }
}

/// A `CU_LAUNCH_ATTRIBUTE_COOPERATIVE` attribute set to 1.
fn cooperative_attribute() -> cu::CUlaunchAttribute {
    // SAFETY: the attribute is plain data (an id and a union of integers
    // and pointers), for which all zero bits are a valid value.
    let mut attr: cu::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attr.id = cu::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_COOPERATIVE;
    attr.value.cooperative = 1;
    attr
}

/// A `CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION` attribute.
fn cluster_attribute(cluster: [u32; 3]) -> cu::CUlaunchAttribute {
    // SAFETY: the attribute is plain data (an id and a union of integers
    // and pointers), for which all zero bits are a valid value.
    let mut attr: cu::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attr.id = cu::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
    let [x, y, z] = cluster;
    attr.value.clusterDim = cu::CUlaunchAttributeValue_union__bindgen_ty_1 { x, y, z };
    attr
}

/// The two cluster queries, which take a launch configuration.
fn cluster_query(func: cu::CUfunction, q: &OccupancyQuery) -> GpuResult<i64> {
    let mut attr = [cluster_attribute(q.cluster)];
    let has_cluster = q.cluster.iter().any(|d| *d != 0);
    let attrs = if has_cluster { &mut attr[..] } else { &mut [] };
    let config = driver_config(&q.config, std::ptr::null_mut(), attrs);
    let mut answer: c_int = 0;
    // SAFETY: a valid out-pointer, a configuration whose attribute pointer
    // (if any) outlives the call, and a live function handle.
    check(unsafe {
        if q.kind == occupancy::MAX_ACTIVE_CLUSTERS {
            cu::cuOccupancyMaxActiveClusters(&mut answer, func, &config)
        } else {
            cu::cuOccupancyMaxPotentialClusterSize(&mut answer, func, &config)
        }
    })?;
    Ok(answer.into())
}

/// Copies `bytes` into 8-byte aligned storage with at least one trailing
/// zero byte, so the driver sees an aligned image and PTX text always ends
/// in a NUL.
pub(super) fn aligned_image(bytes: &[u8]) -> Vec<u64> {
    let mut words = vec![0u64; bytes.len() / 8 + 1];
    words.as_mut_bytes()[..bytes.len()].copy_from_slice(bytes);
    words
}

/// Copies a packed parameter block into aligned storage `words` (reused),
/// after checking that every parameter lies inside it.
pub(super) fn aligned_params(
    words: &mut Vec<u64>,
    params: &[u8],
    layout: &[ParamLayout],
) -> GpuResult<()> {
    let fits = layout.iter().all(|p| {
        (p.offset as usize)
            .checked_add(p.size as usize)
            .is_some_and(|end| end <= params.len())
    });
    if !fits {
        return Err(Status::INVALID_VALUE);
    }
    words.clear();
    words.resize(params.len() / 8 + 1, 0);
    words.as_mut_bytes()[..params.len()].copy_from_slice(params);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attribute_ids_map_to_the_drivers_enum_and_unknown_ids_are_invalid() {
        assert_eq!(attribute(4), Ok(A::CU_FUNC_ATTRIBUTE_NUM_REGS));
        assert_eq!(
            attribute(8),
            Ok(A::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES)
        );
        for id in 0..16 {
            assert_eq!(attribute(id).map(|a| a as i32), Ok(id));
        }
        assert_eq!(attribute(16), Err(Status::INVALID_VALUE));
        assert_eq!(attribute(-1), Err(Status::INVALID_VALUE));
    }
}
