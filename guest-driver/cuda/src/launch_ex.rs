//! `cuLaunchKernelEx`: a launch described by a `CUlaunchConfig`. Attributes
//! that are only hints (priority, cache and scheduling preferences,
//! programmatic stream serialization, memory sync domains) are accepted and
//! ignored, which keeps the launch's meaning; cluster dimensions are sent
//! with the launch (`FLAG_CLUSTER`), and so is a cooperative launch
//! (`FLAG_COOPERATIVE`); the event-triggering attributes are refused with
//! `CUDA_ERROR_NOT_SUPPORTED`. Also `cuLaunchCooperativeKernel`, the same
//! cooperative launch.

use std::ffi::{c_uint, c_void};

use vgpu_spec::Status;

use crate::capture::per_thread;
use crate::errors::{guard, non_null, CuResult};
use crate::launch::{launch_in, LaunchMode};
use crate::types::{CUfunction, CUresult, CUstream};

/// `CUlaunchAttribute`: an id, padding, and a 64-byte value union.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CUlaunchAttribute {
    /// `CUlaunchAttributeID`.
    pub id: c_uint,
    /// Padding to 8 bytes.
    pub pad: [u8; 4],
    /// `CUlaunchAttributeValue` (8-byte aligned: it holds pointers).
    pub value: [u64; 8],
}

/// `CUlaunchConfig`.
#[repr(C)]
#[derive(Debug)]
pub struct CUlaunchConfig {
    /// Grid dimensions.
    pub grid_dim: [c_uint; 3],
    /// Block dimensions.
    pub block_dim: [c_uint; 3],
    /// Dynamic shared memory bytes.
    pub shared_mem_bytes: c_uint,
    /// The stream.
    pub stream: CUstream,
    /// Attributes (`num_attrs` of them).
    pub attrs: *mut CUlaunchAttribute,
    /// Number of attributes.
    pub num_attrs: c_uint,
}

const ATTR_IGNORE: c_uint = 0;
const ATTR_ACCESS_POLICY_WINDOW: c_uint = 1;
const ATTR_COOPERATIVE: c_uint = 2;
const ATTR_SYNCHRONIZATION_POLICY: c_uint = 3;
const ATTR_CLUSTER_DIMENSION: c_uint = 4;
const ATTR_CLUSTER_SCHEDULING_POLICY_PREFERENCE: c_uint = 5;
const ATTR_PROGRAMMATIC_STREAM_SERIALIZATION: c_uint = 6;
const ATTR_PROGRAMMATIC_EVENT: c_uint = 7;
const ATTR_PRIORITY: c_uint = 8;
const ATTR_MEM_SYNC_DOMAIN_MAP: c_uint = 9;
const ATTR_MEM_SYNC_DOMAIN: c_uint = 10;
const ATTR_PREFERRED_CLUSTER_DIMENSION: c_uint = 11;
const ATTR_LAUNCH_COMPLETION_EVENT: c_uint = 12;
const ATTR_DEVICE_UPDATABLE_KERNEL_NODE: c_uint = 13;
const ATTR_PREFERRED_SHARED_MEMORY_CARVEOUT: c_uint = 14;
const ATTR_NVLINK_UTIL_CENTRIC_SCHEDULING: c_uint = 16;

impl CUlaunchAttribute {
    /// The `index`-th 32-bit word of the value.
    fn word(&self, index: usize) -> u32 {
        let pair = self.value[index / 2];
        let shift = (index % 2) * 32;
        // Truncation intended: one half of the little-endian pair.
        (pair >> shift) as u32
    }
}

/// Accepts the attributes that keep a plain launch's meaning, and returns
/// how the launch runs: in clusters if it asks for clusters of more than
/// one block, cooperative if it asks for that.
pub(crate) fn check_attributes(attrs: &[CUlaunchAttribute]) -> CuResult<LaunchMode> {
    let mut mode = LaunchMode::default();
    for attr in attrs {
        match attr.id {
            ATTR_IGNORE
            | ATTR_ACCESS_POLICY_WINDOW
            | ATTR_SYNCHRONIZATION_POLICY
            | ATTR_CLUSTER_SCHEDULING_POLICY_PREFERENCE
            | ATTR_PROGRAMMATIC_STREAM_SERIALIZATION
            | ATTR_PRIORITY
            | ATTR_MEM_SYNC_DOMAIN_MAP
            | ATTR_MEM_SYNC_DOMAIN
            | ATTR_PREFERRED_CLUSTER_DIMENSION
            | ATTR_DEVICE_UPDATABLE_KERNEL_NODE
            | ATTR_PREFERRED_SHARED_MEMORY_CARVEOUT
            | ATTR_NVLINK_UTIL_CENTRIC_SCHEDULING => {}
            ATTR_COOPERATIVE => mode.cooperative = attr.word(0) != 0,
            ATTR_CLUSTER_DIMENSION => {
                let dims = [attr.word(0), attr.word(1), attr.word(2)];
                if dims.contains(&0) {
                    return Err(Status::INVALID_VALUE);
                }
                mode.cluster = dims.iter().any(|&d| d > 1).then_some(dims);
            }
            ATTR_PROGRAMMATIC_EVENT | ATTR_LAUNCH_COMPLETION_EVENT => {
                crate::logging::warn_once(&format!(
                    "launch attribute {} (an event trigger) is not supported",
                    attr.id
                ));
                return Err(Status::NOT_SUPPORTED);
            }
            _ => return Err(Status::INVALID_VALUE),
        }
    }
    Ok(mode)
}

/// The most attributes one launch may carry (native has no documented
/// limit; this only bounds a corrupt count).
const MAX_ATTRS: usize = 64;

/// # Safety
/// `config` null or a valid `CUlaunchConfig` whose `attrs` holds
/// `num_attrs` entries; parameters as for `cuLaunchKernel`.
unsafe fn launch_ex(
    config: *const CUlaunchConfig,
    f: CUfunction,
    kernel_params: *mut *mut c_void,
    extra: *mut *mut c_void,
    ptsz: bool,
) -> CuResult<()> {
    non_null(config)?;
    // SAFETY: non-null, and per the API a readable `CUlaunchConfig`.
    let config = unsafe { &*config };
    let count = config.num_attrs as usize;
    if count > MAX_ATTRS || (count > 0 && config.attrs.is_null()) {
        return Err(Status::INVALID_VALUE);
    }
    let attrs = if count == 0 {
        &[][..]
    } else {
        // SAFETY: per the API `attrs` holds `num_attrs` attributes.
        unsafe { std::slice::from_raw_parts(config.attrs, count) }
    };
    let mode = check_attributes(attrs)?;
    let stream = if ptsz {
        per_thread(config.stream)
    } else {
        config.stream
    };
    // SAFETY: per the API, `kernel_params` / `extra` describe the function's
    // parameters.
    unsafe {
        launch_in(
            f,
            config.grid_dim,
            config.block_dim,
            mode,
            config.shared_mem_bytes,
            stream,
            kernel_params.cast_const().cast(),
            extra.cast_const().cast(),
        )
    }
}

/// `cuLaunchKernelEx`.
#[no_mangle]
pub unsafe extern "C" fn cuLaunchKernelEx(
    config: *const CUlaunchConfig,
    f: CUfunction,
    kernel_params: *mut *mut c_void,
    extra: *mut *mut c_void,
) -> CUresult {
    // SAFETY: forwards the caller's pointers under the same contract.
    guard(|| unsafe { launch_ex(config, f, kernel_params, extra, false) })
}

/// `cuLaunchKernelEx_ptsz`.
#[no_mangle]
pub unsafe extern "C" fn cuLaunchKernelEx_ptsz(
    config: *const CUlaunchConfig,
    f: CUfunction,
    kernel_params: *mut *mut c_void,
    extra: *mut *mut c_void,
) -> CUresult {
    // SAFETY: forwards the caller's pointers under the same contract.
    guard(|| unsafe { launch_ex(config, f, kernel_params, extra, true) })
}

/// # Safety
/// As `cuLaunchCooperativeKernel`.
#[allow(clippy::too_many_arguments)]
unsafe fn launch_cooperative(
    f: CUfunction,
    grid: [c_uint; 3],
    block: [c_uint; 3],
    shared_mem_bytes: c_uint,
    stream: CUstream,
    kernel_params: *mut *mut c_void,
) -> CuResult<()> {
    let mode = LaunchMode {
        cluster: None,
        cooperative: true,
    };
    // SAFETY: per the API, `kernel_params` holds the function's parameters.
    unsafe {
        launch_in(
            f,
            grid,
            block,
            mode,
            shared_mem_bytes,
            stream,
            kernel_params.cast_const().cast(),
            std::ptr::null(),
        )
    }
}

/// `cuLaunchCooperativeKernel`: every block resident at once
/// (`CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE` when the grid cannot be).
#[no_mangle]
pub unsafe extern "C" fn cuLaunchCooperativeKernel(
    f: CUfunction,
    grid_x: c_uint,
    grid_y: c_uint,
    grid_z: c_uint,
    block_x: c_uint,
    block_y: c_uint,
    block_z: c_uint,
    shared_mem_bytes: c_uint,
    h_stream: CUstream,
    kernel_params: *mut *mut c_void,
) -> CUresult {
    // SAFETY: forwards the caller's pointers under the same contract.
    guard(|| unsafe {
        launch_cooperative(
            f,
            [grid_x, grid_y, grid_z],
            [block_x, block_y, block_z],
            shared_mem_bytes,
            h_stream,
            kernel_params,
        )
    })
}

/// `cuLaunchCooperativeKernel_ptsz`: on the per-thread default stream when
/// given the default stream.
#[no_mangle]
pub unsafe extern "C" fn cuLaunchCooperativeKernel_ptsz(
    f: CUfunction,
    grid_x: c_uint,
    grid_y: c_uint,
    grid_z: c_uint,
    block_x: c_uint,
    block_y: c_uint,
    block_z: c_uint,
    shared_mem_bytes: c_uint,
    h_stream: CUstream,
    kernel_params: *mut *mut c_void,
) -> CUresult {
    // SAFETY: forwards the caller's arguments under the same contract.
    unsafe {
        cuLaunchCooperativeKernel(
            f,
            grid_x,
            grid_y,
            grid_z,
            block_x,
            block_y,
            block_z,
            shared_mem_bytes,
            per_thread(h_stream),
            kernel_params,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(id: c_uint, words: &[u32]) -> CUlaunchAttribute {
        let mut value = [0u64; 8];
        for (i, w) in words.iter().enumerate() {
            value[i / 2] |= u64::from(*w) << ((i % 2) * 32);
        }
        CUlaunchAttribute {
            id,
            pad: [0; 4],
            value,
        }
    }

    #[test]
    fn layout_matches_cuda_h() {
        assert_eq!(std::mem::size_of::<CUlaunchAttribute>(), 72);
        assert_eq!(std::mem::offset_of!(CUlaunchAttribute, value), 8);
        assert_eq!(std::mem::offset_of!(CUlaunchConfig, shared_mem_bytes), 24);
        assert_eq!(std::mem::offset_of!(CUlaunchConfig, stream), 32);
        assert_eq!(std::mem::offset_of!(CUlaunchConfig, attrs), 40);
        assert_eq!(std::mem::offset_of!(CUlaunchConfig, num_attrs), 48);
        assert_eq!(std::mem::size_of::<CUlaunchConfig>(), 56);
    }

    #[test]
    fn hint_attributes_are_accepted() {
        let attrs = [
            attr(ATTR_PRIORITY, &[5]),
            attr(ATTR_PROGRAMMATIC_STREAM_SERIALIZATION, &[1]),
            attr(ATTR_ACCESS_POLICY_WINDOW, &[1, 2, 3]),
            attr(ATTR_COOPERATIVE, &[0]),
            attr(ATTR_CLUSTER_DIMENSION, &[1, 1, 1]),
            attr(ATTR_IGNORE, &[]),
        ];
        assert_eq!(check_attributes(&attrs), Ok(LaunchMode::default()));
        assert_eq!(check_attributes(&[]), Ok(LaunchMode::default()));
    }

    #[test]
    fn the_cooperative_attribute_makes_a_cooperative_launch() {
        let mode = check_attributes(&[
            attr(ATTR_COOPERATIVE, &[1]),
            attr(ATTR_CLUSTER_DIMENSION, &[2, 1, 1]),
        ]);
        assert_eq!(
            mode,
            Ok(LaunchMode {
                cluster: Some([2, 1, 1]),
                cooperative: true,
            })
        );
    }

    #[test]
    fn event_attributes_are_not_supported() {
        for a in [
            attr(ATTR_PROGRAMMATIC_EVENT, &[0]),
            attr(ATTR_LAUNCH_COMPLETION_EVENT, &[0]),
        ] {
            assert_eq!(check_attributes(&[a]), Err(Status::NOT_SUPPORTED), "{a:?}");
        }
    }

    #[test]
    fn cluster_dimensions_above_one_block_are_launched_as_clusters() {
        let clusters = |dims| LaunchMode {
            cluster: Some(dims),
            cooperative: false,
        };
        assert_eq!(
            check_attributes(&[attr(ATTR_CLUSTER_DIMENSION, &[2, 1, 1])]),
            Ok(clusters([2, 1, 1]))
        );
        assert_eq!(
            check_attributes(&[attr(ATTR_CLUSTER_DIMENSION, &[1, 1, 4])]),
            Ok(clusters([1, 1, 4]))
        );
        assert_eq!(
            check_attributes(&[attr(ATTR_CLUSTER_DIMENSION, &[0, 1, 1])]),
            Err(Status::INVALID_VALUE)
        );
    }

    #[test]
    fn unknown_attribute_is_invalid_value() {
        assert_eq!(
            check_attributes(&[attr(99, &[])]),
            Err(Status::INVALID_VALUE)
        );
    }

    #[test]
    fn launch_ex_with_null_config_is_invalid_value() {
        // SAFETY: null is rejected before use.
        let rc = unsafe {
            cuLaunchKernelEx(
                std::ptr::null(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            )
        };
        assert_eq!(rc, Status::INVALID_VALUE.0);
    }
}
