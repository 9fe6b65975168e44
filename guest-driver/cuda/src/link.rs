//! The JIT linker entry points: `cuLinkCreate`, `cuLinkAddData`,
//! `cuLinkAddFile` (plain and `_v2`, the same ABI), `cuLinkComplete` and
//! `cuLinkDestroy`. Runtime-compiled code (cuDNN's fused engines, Numba,
//! CuPy) links through them.
//!
//! The state lives here ([`crate::link_state`]); `cuLinkComplete` sends
//! every input in one `MODULE_LINK` request, with a guest-memory output
//! buffer for the logs and the image (staging, or a pinned region when it
//! is large), and keeps the image until `cuLinkDestroy`. The buffer is
//! sized from the inputs; if the image does not fit, the device says how
//! large it is and the link is sent once more with room for it.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::sync::OnceLock;
use std::time::Instant;

use vgpu_spec::link::{read_log, LinkParts};
use vgpu_spec::wire::{LinkReq, LinkResp, SgEntry};
use vgpu_spec::{Request, Status};
use vgpu_transport::Staging;

use crate::ctx::session_ctx;
use crate::errors::{guard, non_null, write_out, CuResult};
use crate::link_state::{parse_options, LinkState, LinkTable};
use crate::state::{driver, lock, parse, Driver};
use crate::types::CUresult;

/// `CUlinkState`: this library's id of a link state.
pub type CUlinkState = *mut c_void;

/// The smallest image area asked for.
const MIN_IMAGE_AREA: usize = 256 << 10;

fn table() -> &'static LinkTable {
    static TABLE: OnceLock<LinkTable> = OnceLock::new();
    TABLE.get_or_init(LinkTable::default)
}

/// The output buffer of one request: staging, or a pinned region when it
/// would take more than half the staging heap.
enum OutBuf {
    Staging(Staging),
    Pinned { ptr: *mut u8, len: usize },
}

impl OutBuf {
    fn new(drv: &Driver, len: usize) -> CuResult<OutBuf> {
        if len <= drv.staging_capacity() / 2 {
            Ok(OutBuf::Staging(drv.staging(len)?))
        } else {
            Ok(OutBuf::Pinned {
                ptr: drv.alloc_pinned(len)?,
                len,
            })
        }
    }

    fn gpa(&self, drv: &Driver) -> CuResult<u64> {
        match self {
            OutBuf::Staging(st) => Ok(st.gpa()),
            OutBuf::Pinned { ptr, len } => drv.translate(*ptr, *len).ok_or(Status::UNKNOWN),
        }
    }

    fn bytes(&mut self) -> &mut [u8] {
        match self {
            OutBuf::Staging(st) => st.as_mut_slice(),
            // SAFETY: a pinned region of `len` bytes, mapped until
            // `release`, and only this buffer uses it.
            OutBuf::Pinned { ptr, len } => unsafe { std::slice::from_raw_parts_mut(*ptr, *len) },
        }
    }

    fn release(self, drv: &Driver) {
        if let OutBuf::Pinned { ptr, .. } = self {
            if let Err(status) = drv.free_pinned(ptr) {
                tracing::warn!(?status, "freeing a link output region failed");
            }
        }
    }
}

/// What one request brought back.
struct Answer {
    status: Status,
    resp: Option<LinkResp>,
    info: Vec<u8>,
    error: Vec<u8>,
    image: Option<Vec<u8>>,
}

/// Sends the link with an image area of `image_area` bytes.
fn send(drv: &Driver, state: &LinkState, image_area: usize) -> CuResult<Answer> {
    let info_area = state.options.info.area() as usize;
    let error_area = state.options.error.area() as usize;
    let logs = info_area + error_area;
    let out_len = logs + image_area;
    let mut out = OutBuf::new(drv, out_len)?;
    out.bytes()[..logs].fill(0);
    let segs = [SgEntry {
        gpa: out.gpa(drv)?.into(),
        len: (out_len as u64).into(),
    }];
    let req = LinkReq {
        input_count: (state.inputs.len() as u32).into(),
        option_count: (state.options.forwarded.len() as u32).into(),
        data_len: (state.data.len() as u64).into(),
        out_len: (out_len as u64).into(),
        info_log_len: (info_area as u32).into(),
        error_log_len: (error_area as u32).into(),
        nsegs: 1.into(),
        _pad: 0.into(),
    };
    let parts = LinkParts {
        options: &state.options.forwarded,
        inputs: &state.inputs,
        segs: &segs,
        data: &state.data,
    };
    let mut body = Vec::new();
    let sent = drv.call(state.ctx, 0, &Request::ModuleLink(req, parts), &mut body);
    let bytes = out.bytes();
    let mut answer = Answer {
        status: sent.err().unwrap_or(Status::SUCCESS),
        resp: None,
        info: read_log(&bytes[..info_area]).to_vec(),
        error: read_log(&bytes[info_area..logs]).to_vec(),
        image: None,
    };
    if answer.status == Status::SUCCESS {
        let (resp, _) = parse::<LinkResp>(&body, "MODULE_LINK")?;
        let len = usize::try_from(resp.image_len.get()).map_err(|_| Status::UNKNOWN)?;
        if len <= image_area {
            answer.image = Some(bytes[logs..logs + len].to_vec());
        }
        answer.resp = Some(resp);
    }
    out.release(drv);
    Ok(answer)
}

/// The image area to ask for first: twice the inputs, at least 256 KiB, at most the largest
/// module image (the device refuses a larger output buffer).
fn first_image_area(state: &LinkState) -> usize {
    let most = usize::try_from(vgpu_spec::MAX_MODULE_IMAGE).unwrap_or(usize::MAX);
    (state.data.len().saturating_mul(2)).clamp(MIN_IMAGE_AREA, most)
}

/// `cuLinkComplete`: links, retrying once with the size the device
/// reported; fills the logs and output options whatever the outcome.
///
/// # Safety
/// `cubin_out` writable or NULL; `size_out` writable or NULL; the option
/// buffers and slots given to `cuLinkCreate` still valid.
unsafe fn complete(
    state: CUlinkState,
    cubin_out: *mut *mut c_void,
    size_out: *mut usize,
) -> CuResult<()> {
    let drv = driver()?;
    non_null(cubin_out)?;
    let entry = table().get(state.addr())?;
    let mut state = lock(&entry);
    let started = Instant::now();
    let mut answer = send(drv, &state, first_image_area(&state))?;
    if let (Some(resp), None) = (answer.resp, &answer.image) {
        let needed = usize::try_from(resp.image_len.get()).map_err(|_| Status::UNKNOWN)?;
        if needed as u64 > vgpu_spec::MAX_MODULE_IMAGE {
            return Err(Status::OUT_OF_MEMORY);
        }
        tracing::debug!(needed, "linked image larger than its area: linking again");
        answer = send(drv, &state, needed)?;
    }
    let (info_used, error_used, wall_ms) = match answer.resp {
        Some(r) => (
            r.info_log_used.get(),
            r.error_log_used.get(),
            f32::from_bits(r.wall_ms_bits.get()),
        ),
        // A failed link reports no sizes: the text and its NUL.
        None => (
            used(&answer.info),
            used(&answer.error),
            started.elapsed().as_secs_f32() * 1e3,
        ),
    };
    let options = state.options.clone();
    // SAFETY: the caller's contract for the buffers and slots.
    unsafe {
        options.info.deliver(&answer.info, info_used);
        options.error.deliver(&answer.error, error_used);
        if let Some(slot) = options.wall_slot {
            slot.write(wall_ms.to_bits() as usize);
        }
    }
    answer.status.into_result()?;
    let image = answer.image.ok_or(Status::UNKNOWN)?;
    let (ptr, len) = (image.as_ptr().cast_mut().cast::<c_void>(), image.len());
    // The image keeps its address while it stays in the state.
    state.images.push(image);
    // SAFETY: non-null, and per the API a writable pointer slot.
    unsafe { write_out(cubin_out, ptr) }?;
    if !size_out.is_null() {
        // SAFETY: non-null, and per the API a writable `size_t`.
        unsafe { write_out(size_out, len) }?;
    }
    Ok(())
}

/// The size output for a log the device did not measure: its text and
/// NUL, or 0 for none.
fn used(text: &[u8]) -> u32 {
    if text.is_empty() {
        0
    } else {
        u32::try_from(text.len() + 1).unwrap_or(u32::MAX)
    }
}

/// # Safety
/// As `cuLinkCreate`.
unsafe fn create(
    num_options: c_uint,
    options: *mut c_int,
    option_values: *mut *mut c_void,
    state_out: *mut CUlinkState,
) -> CuResult<()> {
    let (_, ctx) = session_ctx()?;
    non_null(state_out)?;
    // SAFETY: the caller's contract for the option arrays.
    let parsed = unsafe { parse_options(num_options, options, option_values) }?;
    let id = table().insert(LinkState::new(ctx, parsed));
    // SAFETY: non-null, and per the API a writable `CUlinkState`.
    unsafe { write_out(state_out, std::ptr::without_provenance_mut(id)) }
}

/// # Safety
/// As `cuLinkAddData`.
unsafe fn add_data(
    state: CUlinkState,
    kind: c_int,
    data: *mut c_void,
    size: usize,
    name: *const c_char,
) -> CuResult<()> {
    driver()?;
    let entry = table().get(state.addr())?;
    non_null(data)?;
    if size == 0 {
        return Err(Status::INVALID_VALUE);
    }
    // SAFETY: per the API `data` holds `size` readable bytes.
    let bytes = unsafe { std::slice::from_raw_parts(data.cast::<u8>(), size) };
    let name = if name.is_null() {
        &[][..]
    } else {
        // SAFETY: non-null, and per the API a NUL-terminated string.
        unsafe { CStr::from_ptr(name) }.to_bytes()
    };
    let added = lock(&entry).add(kind, bytes, name);
    added
}

/// # Safety
/// As `cuLinkAddFile`.
unsafe fn add_file(state: CUlinkState, kind: c_int, path: *const c_char) -> CuResult<()> {
    driver()?;
    let entry = table().get(state.addr())?;
    non_null(path)?;
    // SAFETY: non-null, and per the API a NUL-terminated path.
    let path = OsStr::from_bytes(unsafe { CStr::from_ptr(path) }.to_bytes());
    let added = lock(&entry).add_file(kind, path.as_ref());
    added
}

fn ignore_input_options(num_options: c_uint) {
    if num_options > 0 {
        crate::logging::warn_once("per-input JIT options of cuLinkAddData are ignored");
    }
}

/// `cuLinkCreate_v2`: needs a current context, whose device the link
/// targets.
#[no_mangle]
pub unsafe extern "C" fn cuLinkCreate_v2(
    num_options: c_uint,
    options: *mut c_int,
    option_values: *mut *mut c_void,
    state_out: *mut CUlinkState,
) -> CUresult {
    // SAFETY: forwards the caller's pointers under the same contract.
    guard(|| unsafe { create(num_options, options, option_values, state_out) })
}

/// `cuLinkCreate` (CUDA 5.5 name; the same ABI as `_v2`).
#[no_mangle]
pub unsafe extern "C" fn cuLinkCreate(
    num_options: c_uint,
    options: *mut c_int,
    option_values: *mut *mut c_void,
    state_out: *mut CUlinkState,
) -> CUresult {
    // SAFETY: forwards the caller's pointers under the same contract.
    guard(|| unsafe { create(num_options, options, option_values, state_out) })
}

/// `cuLinkAddData_v2`: per-input options are ignored.
#[no_mangle]
pub unsafe extern "C" fn cuLinkAddData_v2(
    state: CUlinkState,
    kind: c_int,
    data: *mut c_void,
    size: usize,
    name: *const c_char,
    num_options: c_uint,
    _options: *mut c_int,
    _option_values: *mut *mut c_void,
) -> CUresult {
    ignore_input_options(num_options);
    // SAFETY: forwards the caller's pointers under the same contract.
    guard(|| unsafe { add_data(state, kind, data, size, name) })
}

/// `cuLinkAddData` (CUDA 5.5 name; the same ABI as `_v2`).
#[no_mangle]
pub unsafe extern "C" fn cuLinkAddData(
    state: CUlinkState,
    kind: c_int,
    data: *mut c_void,
    size: usize,
    name: *const c_char,
    num_options: c_uint,
    options: *mut c_int,
    option_values: *mut *mut c_void,
) -> CUresult {
    // SAFETY: forwards the caller's arguments under the same contract.
    unsafe {
        cuLinkAddData_v2(
            state,
            kind,
            data,
            size,
            name,
            num_options,
            options,
            option_values,
        )
    }
}

/// `cuLinkAddFile_v2`: per-input options are ignored.
#[no_mangle]
pub unsafe extern "C" fn cuLinkAddFile_v2(
    state: CUlinkState,
    kind: c_int,
    path: *const c_char,
    num_options: c_uint,
    _options: *mut c_int,
    _option_values: *mut *mut c_void,
) -> CUresult {
    ignore_input_options(num_options);
    // SAFETY: forwards the caller's pointers under the same contract.
    guard(|| unsafe { add_file(state, kind, path) })
}

/// `cuLinkAddFile` (CUDA 5.5 name; the same ABI as `_v2`).
#[no_mangle]
pub unsafe extern "C" fn cuLinkAddFile(
    state: CUlinkState,
    kind: c_int,
    path: *const c_char,
    num_options: c_uint,
    options: *mut c_int,
    option_values: *mut *mut c_void,
) -> CUresult {
    // SAFETY: forwards the caller's arguments under the same contract.
    unsafe { cuLinkAddFile_v2(state, kind, path, num_options, options, option_values) }
}

/// `cuLinkComplete`: the image stays valid until `cuLinkDestroy`.
#[no_mangle]
pub unsafe extern "C" fn cuLinkComplete(
    state: CUlinkState,
    cubin_out: *mut *mut c_void,
    size_out: *mut usize,
) -> CUresult {
    // SAFETY: forwards the caller's pointers under the same contract.
    guard(|| unsafe { complete(state, cubin_out, size_out) })
}

/// `cuLinkDestroy`: frees the state and its images.
#[no_mangle]
pub unsafe extern "C" fn cuLinkDestroy(state: CUlinkState) -> CUresult {
    guard(|| {
        driver()?;
        table().remove(state.addr())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link_state::LinkOptions;

    #[test]
    fn the_first_image_area_is_twice_the_inputs_and_at_least_256_kib() {
        let mut state = LinkState::new(1, LinkOptions::default());
        assert_eq!(first_image_area(&state), MIN_IMAGE_AREA);
        state.add(1, &vec![b'x'; 1 << 20], b"").unwrap();
        assert_eq!(first_image_area(&state), 2 << 20);
    }

    #[test]
    fn a_log_the_device_did_not_measure_counts_its_nul() {
        assert_eq!(used(b""), 0);
        assert_eq!(used(b"error"), 6);
    }

    #[test]
    fn link_calls_before_init_are_not_initialized() {
        let mut state: CUlinkState = std::ptr::null_mut();
        // SAFETY: a valid out-pointer and no options.
        let rc = unsafe { cuLinkCreate(0, std::ptr::null_mut(), std::ptr::null_mut(), &mut state) };
        assert_eq!(rc, Status::NOT_INITIALIZED.0);
        // SAFETY: the state is not dereferenced.
        assert_eq!(unsafe { cuLinkDestroy(state) }, Status::NOT_INITIALIZED.0);
    }
}
