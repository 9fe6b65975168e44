//! Kernel launches. Parameters are packed locally into the block layout the
//! backend reported at `cuModuleGetFunction`, from either `kernelParams`
//! (one pointer per parameter) or `extra` (one caller-packed buffer), and
//! the launch is queued without waiting: its errors surface at the next
//! synchronizing call.

use std::borrow::Cow;
use std::ffi::{c_int, c_uint, c_void};

use vgpu_spec::wire::{LaunchReq, CLUSTER_DIMS_BYTES, FLAG_CLUSTER, FLAG_COOPERATIVE};
use vgpu_spec::{Request, Status};

use crate::ctx::session_ctx;
use crate::errors::{guard, non_null, write_out, CuResult};
use crate::graph::Op;
use crate::module::FunctionInfo;
use crate::state::{driver, lock};
use crate::stream::backend_stream;
use crate::types::{
    CUfunction, CUresult, CUstream, CU_LAUNCH_PARAM_BUFFER_POINTER, CU_LAUNCH_PARAM_BUFFER_SIZE,
    CU_LAUNCH_PARAM_END,
};

/// The most option keys an `extra` array may hold before its end marker.
const MAX_EXTRA_KEYS: usize = 16;

/// Packs `kernelParams`: parameter *i* is copied from `params[i]` to its
/// offset. (A wrong number of pointers cannot be detected.)
///
/// # Safety
/// `params` must hold one pointer per parameter of `info`, each readable for
/// that parameter's size.
pub(crate) unsafe fn pack_kernel_params(
    info: &FunctionInfo,
    params: *const *const c_void,
) -> CuResult<Vec<u8>> {
    let mut block = vec![0u8; info.param_bytes];
    for (i, param) in info.layout.iter().enumerate() {
        // SAFETY: the caller's contract: `params` has an entry per parameter.
        let src = unsafe { params.add(i).read_unaligned() };
        non_null(src)?;
        let dst = &mut block[param.offset..param.offset + param.size];
        // SAFETY: `src` is readable for `param.size` bytes (the caller's
        // contract) and `dst` is exactly that long, in a distinct buffer.
        unsafe {
            std::ptr::copy_nonoverlapping(src.cast::<u8>(), dst.as_mut_ptr(), param.size);
        }
    }
    Ok(block)
}

/// Reads the buffer named by an `extra` array; its size must equal the
/// function's parameter block.
///
/// # Safety
/// `extra` must be a `CU_LAUNCH_PARAM_END`-terminated array of key/value
/// pairs as the CUDA API defines it.
pub(crate) unsafe fn pack_extra(
    info: &FunctionInfo,
    extra: *const *const c_void,
) -> CuResult<Vec<u8>> {
    let mut buffer: Option<*const c_void> = None;
    let mut size: Option<usize> = None;
    let mut i = 0;
    loop {
        if i > 2 * MAX_EXTRA_KEYS {
            return Err(Status::INVALID_VALUE);
        }
        // SAFETY: the array runs to its end marker (caller's contract), and
        // each key before it is followed by its value.
        let key = unsafe { extra.add(i).read_unaligned() }.addr();
        if key == CU_LAUNCH_PARAM_END {
            break;
        }
        // SAFETY: as above; a key other than the end marker has a value.
        let value = unsafe { extra.add(i + 1).read_unaligned() };
        match key {
            CU_LAUNCH_PARAM_BUFFER_POINTER => buffer = Some(value),
            CU_LAUNCH_PARAM_BUFFER_SIZE => {
                non_null(value)?;
                // SAFETY: the value of BUFFER_SIZE points at a `size_t`.
                size = Some(unsafe { value.cast::<usize>().read_unaligned() });
            }
            _ => return Err(Status::INVALID_VALUE),
        }
        i += 2;
    }
    let (buffer, size) = match (buffer, size) {
        (Some(buffer), Some(size)) => (buffer, size),
        _ => return Err(Status::INVALID_VALUE),
    };
    if size != info.param_bytes {
        return Err(Status::INVALID_VALUE);
    }
    if size == 0 {
        return Ok(Vec::new());
    }
    non_null(buffer)?;
    // SAFETY: the BUFFER_POINTER value is readable for the BUFFER_SIZE bytes.
    Ok(unsafe { std::slice::from_raw_parts(buffer.cast::<u8>(), size) }.to_vec())
}

/// The packed parameter block from whichever of the two forms was given.
///
/// # Safety
/// As [`pack_kernel_params`] and [`pack_extra`] for the non-null one.
pub(crate) unsafe fn param_block(
    info: &FunctionInfo,
    kernel_params: *const *const c_void,
    extra: *const *const c_void,
) -> CuResult<Vec<u8>> {
    match (kernel_params.is_null(), extra.is_null()) {
        // SAFETY: the caller's contract for `kernel_params`.
        (false, true) => unsafe { pack_kernel_params(info, kernel_params) },
        // SAFETY: the caller's contract for `extra`.
        (true, false) => unsafe { pack_extra(info, extra) },
        (true, true) if info.layout.is_empty() => Ok(vec![0u8; info.param_bytes]),
        _ => Err(Status::INVALID_VALUE),
    }
}

fn dims(x: c_uint, y: c_uint, z: c_uint) -> CuResult<[u32; 3]> {
    if x == 0 || y == 0 || z == 0 {
        return Err(Status::INVALID_VALUE);
    }
    Ok([x, y, z])
}

/// Launches `f` on `h_stream`, or records the launch if the stream is
/// capturing (the packed parameters are a copy either way).
///
/// # Safety
/// As [`param_block`] for `kernel_params` / `extra`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn launch(
    f: CUfunction,
    grid: [c_uint; 3],
    block: [c_uint; 3],
    shared_mem_bytes: c_uint,
    h_stream: CUstream,
    kernel_params: *const *const c_void,
    extra: *const *const c_void,
) -> CuResult<()> {
    // SAFETY: the caller's contract.
    unsafe {
        launch_in(
            f,
            grid,
            block,
            LaunchMode::default(),
            shared_mem_bytes,
            h_stream,
            kernel_params,
            extra,
        )
    }
}

/// How a launch runs beyond its geometry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct LaunchMode {
    /// In thread block clusters of this many blocks.
    pub cluster: Option<[u32; 3]>,
    /// Cooperative: every block resident at once.
    pub cooperative: bool,
}

/// The flags and packed trailing bytes of a launch: with cluster
/// dimensions, those (`FLAG_CLUSTER`) and then the parameters;
/// `FLAG_COOPERATIVE` for a cooperative launch.
fn launch_payload(mode: LaunchMode, params: &[u8]) -> (u32, Cow<'_, [u8]>) {
    let cooperative = if mode.cooperative {
        FLAG_COOPERATIVE
    } else {
        0
    };
    match mode.cluster {
        None => (cooperative, Cow::Borrowed(params)),
        Some(dims) => {
            let mut bytes = Vec::with_capacity(CLUSTER_DIMS_BYTES + params.len());
            for d in dims {
                bytes.extend_from_slice(&d.to_le_bytes());
            }
            bytes.extend_from_slice(params);
            (FLAG_CLUSTER | cooperative, Cow::Owned(bytes))
        }
    }
}

/// [`launch`], in thread block clusters and/or cooperative as `mode` says
/// (a capture records neither: such a launch is refused there).
///
/// # Safety
/// As [`param_block`] for `kernel_params` / `extra`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn launch_in(
    f: CUfunction,
    grid: [c_uint; 3],
    block: [c_uint; 3],
    mode: LaunchMode,
    shared_mem_bytes: c_uint,
    h_stream: CUstream,
    kernel_params: *const *const c_void,
    extra: *const *const c_void,
) -> CuResult<()> {
    let (drv, ctx) = session_ctx()?;
    if mode != LaunchMode::default() && crate::capture::record_all(h_stream, Vec::new)? {
        crate::logging::warn_once(
            "capturing thread block cluster or cooperative launches is not supported",
        );
        return Err(Status::NOT_SUPPORTED);
    }
    let f = crate::library::as_function(f)?;
    let grid = dims(grid[0], grid[1], grid[2])?;
    let block = dims(block[0], block[1], block[2])?;
    let stream = backend_stream(drv, h_stream)?;
    let (function, params) = {
        let table = lock(&drv.modules);
        let info = table.function(f).ok_or(Status::INVALID_HANDLE)?;
        // SAFETY: the caller's contract.
        let params = unsafe { param_block(info, kernel_params, extra) }?;
        (info.handle, params)
    };
    let recorded = crate::capture::record(h_stream, ctx, || Op::Launch {
        function,
        grid,
        block,
        shared_mem: shared_mem_bytes,
        params: params.clone(),
    })?;
    if recorded {
        return Ok(());
    }
    let (flags, payload) = launch_payload(mode, &params);
    let req = LaunchReq {
        function: function.into(),
        stream: stream.into(),
        grid: grid.map(Into::into),
        block: block.map(Into::into),
        shared_mem: shared_mem_bytes.into(),
        param_bytes: (payload.len() as u32).into(),
    };
    let launch = Request::Launch(req, &payload);
    if mode.cooperative {
        // As natively, a grid that cannot be resident at once fails at the
        // launch itself (COOPERATIVE_LAUNCH_TOO_LARGE): wait for the
        // device's answer, which comes once the kernel is queued.
        return drv.call(ctx, flags, &launch, &mut Vec::new());
    }
    drv.submit(ctx, flags, &launch, None)
}

/// `cuLaunchKernel`.
#[no_mangle]
pub unsafe extern "C" fn cuLaunchKernel(
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
    extra: *mut *mut c_void,
) -> CUresult {
    // SAFETY: per the API, `kernel_params` / `extra` describe the function's
    // parameters.
    guard(|| unsafe {
        launch(
            f,
            [grid_x, grid_y, grid_z],
            [block_x, block_y, block_z],
            shared_mem_bytes,
            h_stream,
            kernel_params.cast_const().cast(),
            extra.cast_const().cast(),
        )
    })
}

/// `cuFuncGetAttribute`: the backend device's answer.
#[no_mangle]
pub unsafe extern "C" fn cuFuncGetAttribute(
    pi: *mut c_int,
    attrib: c_int,
    hfunc: CUfunction,
) -> CUresult {
    guard(|| {
        driver()?;
        non_null(pi)?;
        let value = crate::func_query::get_attribute(hfunc, attrib)?;
        // SAFETY: non-null, and per the API a writable `int`.
        unsafe { write_out(pi, value) }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_dimensions_precede_the_parameters_under_the_cluster_flag() {
        let (flags, payload) = launch_payload(LaunchMode::default(), &[1, 2, 3]);
        assert_eq!((flags, &payload[..]), (0, &[1u8, 2, 3][..]));
        let clusters = LaunchMode {
            cluster: Some([2, 1, 1]),
            cooperative: false,
        };
        let (flags, payload) = launch_payload(clusters, &[9]);
        assert_eq!(flags, FLAG_CLUSTER);
        assert_eq!(&payload[..], &[2, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 9]);
    }

    #[test]
    fn cooperative_launches_carry_the_cooperative_flag_with_or_without_clusters() {
        let coop = LaunchMode {
            cluster: None,
            cooperative: true,
        };
        let (flags, payload) = launch_payload(coop, &[7]);
        assert_eq!((flags, &payload[..]), (FLAG_COOPERATIVE, &[7u8][..]));
        let both = LaunchMode {
            cluster: Some([2, 1, 1]),
            cooperative: true,
        };
        let (flags, payload) = launch_payload(both, &[7]);
        assert_eq!(flags, FLAG_CLUSTER | FLAG_COOPERATIVE);
        assert_eq!(payload.len(), CLUSTER_DIMS_BYTES + 1);
    }
    use crate::module::Param;

    fn info(layout: &[(usize, usize)], param_bytes: usize) -> FunctionInfo {
        FunctionInfo {
            handle: 1,
            layout: layout
                .iter()
                .map(|(offset, size)| Param {
                    offset: *offset,
                    size: *size,
                })
                .collect(),
            param_bytes,
        }
    }

    fn ptr<T>(value: &T) -> *const c_void {
        std::ptr::from_ref(value).cast()
    }

    #[test]
    fn kernel_params_are_packed_at_layout_offsets() {
        let f = info(&[(0, 8), (8, 4), (16, 8)], 24);
        let a: u64 = 0x1111_2222_3333_4444;
        let n: u32 = 7;
        let b: u64 = 0xdead_beef;
        let params = [ptr(&a), ptr(&n), ptr(&b)];
        // SAFETY: one readable pointer per parameter, each of its size.
        let block = unsafe { pack_kernel_params(&f, params.as_ptr()) }.unwrap();
        assert_eq!(block.len(), 24);
        assert_eq!(&block[0..8], &a.to_le_bytes());
        assert_eq!(&block[8..12], &n.to_le_bytes());
        assert_eq!(&block[12..16], &[0; 4]);
        assert_eq!(&block[16..24], &b.to_le_bytes());
    }

    #[test]
    fn null_kernel_param_pointer_is_invalid_value() {
        let f = info(&[(0, 4)], 4);
        let params = [std::ptr::null::<c_void>()];
        // SAFETY: one entry for the one parameter (null is rejected).
        let rc = unsafe { pack_kernel_params(&f, params.as_ptr()) };
        assert_eq!(rc, Err(Status::INVALID_VALUE));
    }

    fn extra_array(buffer: &[u8], size: &usize) -> [*const c_void; 5] {
        [
            std::ptr::without_provenance(CU_LAUNCH_PARAM_BUFFER_POINTER),
            buffer.as_ptr().cast(),
            std::ptr::without_provenance(CU_LAUNCH_PARAM_BUFFER_SIZE),
            ptr(size),
            std::ptr::without_provenance(CU_LAUNCH_PARAM_END),
        ]
    }

    #[test]
    fn extra_buffer_of_the_right_size_is_used_as_is() {
        let f = info(&[(0, 8), (8, 4)], 12);
        let buffer: Vec<u8> = (0..12).collect();
        let size = 12usize;
        let extra = extra_array(&buffer, &size);
        // SAFETY: a well-formed, END-terminated extra array.
        let block = unsafe { param_block(&f, std::ptr::null(), extra.as_ptr()) }.unwrap();
        assert_eq!(block, buffer);
    }

    #[test]
    fn launch_with_wrong_extra_buffer_size_returns_invalid_value() {
        let f = info(&[(0, 8), (8, 4)], 12);
        let buffer = [0u8; 16];
        let size = 16usize;
        let extra = extra_array(&buffer, &size);
        // SAFETY: a well-formed, END-terminated extra array.
        let rc = unsafe { param_block(&f, std::ptr::null(), extra.as_ptr()) };
        assert_eq!(rc, Err(Status::INVALID_VALUE));
    }

    #[test]
    fn extra_without_size_or_with_unknown_key_is_invalid_value() {
        let f = info(&[(0, 4)], 4);
        let buffer = [0u8; 4];
        let no_size = [
            std::ptr::without_provenance(CU_LAUNCH_PARAM_BUFFER_POINTER),
            buffer.as_ptr().cast(),
            std::ptr::without_provenance::<c_void>(CU_LAUNCH_PARAM_END),
        ];
        // SAFETY: a well-formed, END-terminated extra array.
        let rc = unsafe { pack_extra(&f, no_size.as_ptr()) };
        assert_eq!(rc, Err(Status::INVALID_VALUE));
        let unknown = [
            std::ptr::without_provenance(0x77),
            buffer.as_ptr().cast(),
            std::ptr::without_provenance::<c_void>(CU_LAUNCH_PARAM_END),
        ];
        // SAFETY: as above.
        let rc = unsafe { pack_extra(&f, unknown.as_ptr()) };
        assert_eq!(rc, Err(Status::INVALID_VALUE));
    }

    #[test]
    fn both_or_neither_parameter_forms_are_checked() {
        let f = info(&[(0, 4)], 4);
        let x = 1u32;
        let params = [ptr(&x)];
        let buffer = [0u8; 4];
        let size = 4usize;
        let extra = extra_array(&buffer, &size);
        // SAFETY: both arrays are well-formed.
        let both = unsafe { param_block(&f, params.as_ptr(), extra.as_ptr()) };
        assert_eq!(both, Err(Status::INVALID_VALUE));
        // SAFETY: null arrays are not read.
        let neither = unsafe { param_block(&f, std::ptr::null(), std::ptr::null()) };
        assert_eq!(neither, Err(Status::INVALID_VALUE));
        let empty = info(&[], 0);
        // SAFETY: as above.
        let none_needed = unsafe { param_block(&empty, std::ptr::null(), std::ptr::null()) };
        assert_eq!(none_needed, Ok(Vec::new()));
    }

    #[test]
    fn zero_dimensions_are_invalid_value() {
        assert_eq!(dims(1, 0, 1), Err(Status::INVALID_VALUE));
        assert_eq!(dims(2, 3, 4), Ok([2, 3, 4]));
    }
}
