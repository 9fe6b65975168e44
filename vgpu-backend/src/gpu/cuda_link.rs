//! The JIT linker on a real GPU (`MODULE_LINK`): `cuLinkCreate_v2` with
//! the guest's forwarded options plus this module's own log buffers and
//! wall-time slot, `cuLinkAddData_v2` per input, `cuLinkComplete`, and
//! `cuLinkDestroy` on every path. The caller has made the context current,
//! so the link targets its device.

use std::ffi::{c_void, CString};
use std::ptr;

use cudarc::driver::sys::{self as cu, CUjitInputType_enum as K, CUjit_option_enum as O};
use tracing::{debug, warn};
use vgpu_spec::link::read_log;
use vgpu_spec::wire::jit_input;
use vgpu_spec::Status;
use zerocopy::IntoBytes;

use super::cuda::check;
use super::ptx;
use super::{GpuResult, LinkJob, Linked};

/// The driver functions this module calls (checked at open).
pub(super) const SYMBOLS: &[&str] = &[
    "cuLinkCreate_v2",
    "cuLinkAddData_v2",
    "cuLinkComplete",
    "cuLinkDestroy",
];

/// The driver's enum value for a forwarded option
/// ([`super::link::FORWARDED_OPTIONS`]).
fn jit_option(option: u32) -> GpuResult<cu::CUjit_option> {
    Ok(match option {
        0 => O::CU_JIT_MAX_REGISTERS,
        1 => O::CU_JIT_THREADS_PER_BLOCK,
        7 => O::CU_JIT_OPTIMIZATION_LEVEL,
        8 => O::CU_JIT_TARGET_FROM_CUCONTEXT,
        9 => O::CU_JIT_TARGET,
        10 => O::CU_JIT_FALLBACK_STRATEGY,
        11 => O::CU_JIT_GENERATE_DEBUG_INFO,
        12 => O::CU_JIT_LOG_VERBOSE,
        13 => O::CU_JIT_GENERATE_LINE_INFO,
        14 => O::CU_JIT_CACHE_MODE,
        20 => O::CU_JIT_LTO,
        21 => O::CU_JIT_FTZ,
        22 => O::CU_JIT_PREC_DIV,
        23 => O::CU_JIT_PREC_SQRT,
        24 => O::CU_JIT_FMA,
        29 => O::CU_JIT_OPTIMIZE_UNUSED_DEVICE_VARIABLES,
        30 => O::CU_JIT_POSITION_INDEPENDENT_CODE,
        31 => O::CU_JIT_MIN_CTA_PER_SM,
        32 => O::CU_JIT_MAX_THREADS_PER_BLOCK,
        33 => O::CU_JIT_OVERRIDE_DIRECTIVE_VALUES,
        _ => return Err(Status::INVALID_VALUE),
    })
}

/// The driver's enum value for an input kind.
fn input_type(kind: u32) -> GpuResult<cu::CUjitInputType> {
    Ok(match kind {
        jit_input::CUBIN => K::CU_JIT_INPUT_CUBIN,
        jit_input::PTX => K::CU_JIT_INPUT_PTX,
        jit_input::FATBINARY => K::CU_JIT_INPUT_FATBINARY,
        jit_input::OBJECT => K::CU_JIT_INPUT_OBJECT,
        jit_input::LIBRARY => K::CU_JIT_INPUT_LIBRARY,
        jit_input::NVVM => K::CU_JIT_INPUT_NVVM,
        _ => return Err(Status::INVALID_VALUE),
    })
}

/// An option value of integer type, as the driver takes it: cast to
/// `void *`.
fn int_value(value: u32) -> *mut c_void {
    ptr::without_provenance_mut(value as usize)
}

/// The options `cuLinkCreate` gets and where the outputs come back.
struct Options {
    keys: Vec<cu::CUjit_option>,
    values: Vec<*mut c_void>,
    info_size_at: Option<usize>,
    error_size_at: Option<usize>,
    wall_at: usize,
    /// What the wall-time slot points at. The header documents that the
    /// driver overwrites the slot; programs in the wild (NVIDIA's ptxjit
    /// sample) pass a pointer to a float there instead, so the slot holds
    /// one, and whichever the driver writes is read back.
    wall: Box<f32>,
}

impl Options {
    /// The guest's options, then the log buffers (when their size is not
    /// 0) and the wall-time slot. The buffers must outlive the link state.
    fn new(job: &LinkJob<'_>, info: &mut [u8], error: &mut [u8]) -> GpuResult<Options> {
        let mut keys = Vec::with_capacity(job.options.len() + 5);
        let mut values = Vec::with_capacity(job.options.len() + 5);
        for &(option, value) in &job.options {
            keys.push(jit_option(option)?);
            values.push(int_value(value));
        }
        let mut log = |buffer: &mut [u8], key: O, size_key: O| -> GpuResult<Option<usize>> {
            if buffer.is_empty() {
                return Ok(None);
            }
            let size = u32::try_from(buffer.len()).map_err(|_| Status::INVALID_VALUE)?;
            keys.push(key);
            values.push(buffer.as_mut_ptr().cast());
            keys.push(size_key);
            values.push(int_value(size));
            Ok(Some(values.len() - 1))
        };
        let info_size_at = log(
            info,
            O::CU_JIT_INFO_LOG_BUFFER,
            O::CU_JIT_INFO_LOG_BUFFER_SIZE_BYTES,
        )?;
        let error_size_at = log(
            error,
            O::CU_JIT_ERROR_LOG_BUFFER,
            O::CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES,
        )?;
        let mut wall = Box::new(0.0f32);
        keys.push(O::CU_JIT_WALL_TIME);
        values.push(ptr::from_mut::<f32>(&mut wall).cast());
        Ok(Options {
            wall_at: values.len() - 1,
            keys,
            values,
            info_size_at,
            error_size_at,
            wall,
        })
    }

    /// The wall time the driver reported: in the slot if it overwrote it,
    /// else through the pointer the slot held.
    fn wall_ms(&self) -> f32 {
        let ours: *const c_void = ptr::from_ref::<f32>(&self.wall).cast();
        match self.values.get(self.wall_at) {
            Some(slot) if slot.cast_const() != ours => {
                f32::from_bits(self.output(Some(self.wall_at)))
            }
            _ => *self.wall,
        }
    }

    /// The low 32 bits of an option slot, where the driver writes an
    /// output (an `unsigned int`, or a `float` for the wall time).
    fn output(&self, at: Option<usize>) -> u32 {
        // Truncation intended: the value is 32 bits wide.
        at.and_then(|i| self.values.get(i))
            .map_or(0, |v| v.addr() as u32)
    }
}

/// A link state, destroyed when dropped.
struct State(cu::CUlinkState);

impl Drop for State {
    fn drop(&mut self) {
        // SAFETY: a state cuLinkCreate returned, destroyed only here.
        if let Err(status) = check(unsafe { cu::cuLinkDestroy(self.0) }) {
            warn!(%status, "cuLinkDestroy failed");
        }
    }
}

/// `bytes` in 8-byte aligned storage followed by at least 8 zero bytes, so
/// PTX text always ends in a NUL.
fn aligned_copy(bytes: &[u8]) -> Vec<u64> {
    let mut words = vec![0u64; bytes.len() / 8 + 1];
    words.as_mut_bytes()[..bytes.len()].copy_from_slice(bytes);
    words
}

/// Adds every input and completes the link; returns the image.
fn add_and_complete(state: &State, job: &LinkJob<'_>) -> GpuResult<Vec<u8>> {
    for input in &job.inputs {
        if ptx::is_fatbin_wrapper(input.data) || !ptx::binary_fits(input.data) {
            warn!("Rejected a link input whose headers reach past its end");
            return Err(Status::INVALID_IMAGE);
        }
        let kind = input_type(input.kind)?;
        let data = aligned_copy(input.data);
        let name_bytes = input.name.split(|b| *b == 0).next().unwrap_or_default();
        let name = CString::new(name_bytes).map_err(|_| Status::INVALID_VALUE)?;
        let name_ptr = if name_bytes.is_empty() {
            ptr::null()
        } else {
            name.as_ptr()
        };
        // SAFETY: `data` holds the input's bytes (plus zero padding) and
        // outlives the call, which copies what it keeps; the name is
        // NUL-terminated or NULL; no per-input options.
        check(unsafe {
            cu::cuLinkAddData_v2(
                state.0,
                kind,
                data.as_ptr().cast_mut().cast(),
                input.data.len(),
                name_ptr,
                0,
                ptr::null_mut(),
                ptr::null_mut(),
            )
        })?;
    }
    let mut cubin: *mut c_void = ptr::null_mut();
    let mut size = 0usize;
    // SAFETY: both out-pointers are valid; the state is live.
    check(unsafe { cu::cuLinkComplete(state.0, &mut cubin, &mut size) })?;
    if cubin.is_null() {
        return Err(Status::UNKNOWN);
    }
    // SAFETY: the driver returned an image of `size` bytes owned by the
    // state, which is alive until `state` is dropped after this copy.
    Ok(unsafe { std::slice::from_raw_parts(cubin.cast::<u8>(), size) }.to_vec())
}

/// Runs the link of `job` in the current context.
pub(super) fn link(job: &LinkJob<'_>) -> Linked {
    let mut info = vec![0u8; job.info_log_cap];
    let mut error = vec![0u8; job.error_log_cap];
    let mut options = match Options::new(job, &mut info, &mut error) {
        Ok(options) => options,
        Err(status) => return Linked::failed(status),
    };
    let mut raw: cu::CUlinkState = ptr::null_mut();
    // The option arrays and the log buffers outlive the state (dropped
    // before them, at the end of this function).
    // SAFETY: `keys` and `values` have the same length; every pointer value
    // is a log buffer of the size given with it, or an integer option; the
    // out-pointer is valid.
    let created = check(unsafe {
        cu::cuLinkCreate_v2(
            options.keys.len() as u32,
            options.keys.as_mut_ptr(),
            options.values.as_mut_ptr(),
            &mut raw,
        )
    });
    let result = created.and_then(|()| {
        let state = State(raw);
        add_and_complete(&state, job)
    });
    debug!(
        inputs = job.inputs.len(),
        result = ?result.as_ref().map(Vec::len),
        "JIT link"
    );
    Linked {
        result,
        info_log: read_log(&info).to_vec(),
        error_log: read_log(&error).to_vec(),
        info_used: options.output(options.info_size_at),
        error_used: options.output(options.error_size_at),
        wall_ms: options.wall_ms(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::LaunchMode;

    #[test]
    fn every_forwarded_option_has_a_driver_enum_value() {
        for &option in super::super::link::FORWARDED_OPTIONS {
            assert_eq!(jit_option(option).map(|o| o as u32), Ok(option));
        }
        assert_eq!(jit_option(3), Err(Status::INVALID_VALUE));
        for kind in 0..=5 {
            assert_eq!(input_type(kind).map(|k| k as u32), Ok(kind));
        }
        assert_eq!(input_type(6), Err(Status::INVALID_VALUE));
    }

    #[test]
    fn log_buffers_and_the_wall_time_slot_follow_the_guest_options() {
        let job = LinkJob {
            inputs: Vec::new(),
            options: vec![(7, 2)],
            info_log_cap: 0,
            error_log_cap: 16,
        };
        let (mut info, mut error) = (Vec::new(), vec![0u8; 16]);
        let options = Options::new(&job, &mut info, &mut error).unwrap();
        assert_eq!(
            options.keys,
            vec![
                O::CU_JIT_OPTIMIZATION_LEVEL,
                O::CU_JIT_ERROR_LOG_BUFFER,
                O::CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES,
                O::CU_JIT_WALL_TIME
            ]
        );
        assert_eq!(options.info_size_at, None);
        assert_eq!(options.error_size_at, Some(2));
        assert_eq!(options.output(options.error_size_at), 16);
        assert_eq!(options.wall_at, 3);
        assert_eq!(options.values[1], error.as_mut_ptr().cast());
    }

    #[test]
    fn the_wall_time_is_read_from_the_slot_or_through_it() {
        let job = LinkJob {
            inputs: Vec::new(),
            options: Vec::new(),
            info_log_cap: 0,
            error_log_cap: 0,
        };
        let mut options = Options::new(&job, &mut [], &mut []).unwrap();
        // A driver that writes through the pointer.
        *options.wall = 2.5;
        assert_eq!(options.wall_ms(), 2.5);
        // A driver that overwrites the slot.
        options.values[options.wall_at] = int_value(1.5f32.to_bits());
        assert_eq!(options.wall_ms(), 1.5);
    }

    /// Two relocatable units: `twice_plus` calls `vgpu_twice`, defined in
    /// the other.
    const CALLER: &str = ".version 7.0\n.target sm_75\n.address_size 64\n\
        .extern .func (.param .b32 func_retval0) vgpu_twice(.param .b32 x);\n\
        .visible .entry twice_plus(.param .u64 out)\n{\n\
        .reg .b32 %r<3>;\n.reg .b64 %rd<2>;\n\
        ld.param.u64 %rd1, [out];\ncvta.to.global.u64 %rd1, %rd1;\nmov.u32 %r1, 20;\n\
        {\n.param .b32 p0;\nst.param.b32 [p0], %r1;\n.param .b32 r0;\n\
        call.uni (r0), vgpu_twice, (p0);\nld.param.b32 %r2, [r0];\n}\n\
        add.s32 %r2, %r2, 2;\nst.global.u32 [%rd1], %r2;\nret;\n}\n\0";
    const CALLEE: &str = ".version 7.0\n.target sm_75\n.address_size 64\n\
        .visible .func (.param .b32 func_retval0) vgpu_twice(.param .b32 x)\n{\n\
        .reg .b32 %r<3>;\nld.param.u32 %r1, [x];\nshl.b32 %r2, %r1, 1;\n\
        st.param.b32 [func_retval0], %r2;\nret;\n}\n\0";

    fn ptx(name: &'static [u8], text: &'static str) -> vgpu_spec::link::InputData<'static> {
        vgpu_spec::link::InputData {
            kind: jit_input::PTX,
            name,
            data: text.as_bytes(),
        }
    }

    /// Runs only where a real GPU is present: `cargo test -- --ignored`.
    #[test]
    #[ignore = "needs an NVIDIA GPU"]
    fn real_gpu_links_two_units_runs_them_and_reports_bad_ptx() {
        use crate::gpu::{Gpu, HostBuf, LaunchConfig};
        let gpu = super::super::cuda::CudaGpu::open(0).expect("open device 0");
        let mut ctx = gpu.create_context(0).unwrap();
        let job = LinkJob {
            inputs: vec![ptx(b"caller", CALLER), ptx(b"callee", CALLEE)],
            options: vec![(12, 1)],
            info_log_cap: 4096,
            error_log_cap: 4096,
        };
        let linked = ctx.link(&job);
        eprintln!(
            "info log: {}; wall {} ms",
            String::from_utf8_lossy(&linked.info_log),
            linked.wall_ms
        );
        assert!(linked.error_log.is_empty());
        let image = linked.result.unwrap();
        assert!(image.starts_with(b"\x7fELF"), "a cubin");
        let module = ctx.module_load(&image).unwrap();
        let (f, layout) = ctx.get_function(module, "twice_plus").unwrap();
        let out = ctx.mem_alloc(4).unwrap();
        let config = LaunchConfig {
            grid: [1, 1, 1],
            block: [1, 1, 1],
            shared_mem: 0,
        };
        ctx.launch_ex(
            f,
            config,
            LaunchMode::COOPERATIVE,
            None,
            &out.to_le_bytes(),
            &layout,
        )
        .unwrap();
        let mut back = [0u8; 4];
        // SAFETY: `back` outlives the synchronous copy.
        let dst = unsafe { HostBuf::new(back.as_mut_ptr(), 4) };
        ctx.memcpy_dtoh(&[dst], out, None, false).unwrap();
        assert_eq!(u32::from_le_bytes(back), 42);

        let huge = LaunchConfig {
            grid: [1 << 20, 1, 1],
            block: [1024, 1, 1],
            shared_mem: 0,
        };
        assert_eq!(
            ctx.launch_ex(
                f,
                huge,
                LaunchMode::COOPERATIVE,
                None,
                &out.to_le_bytes(),
                &layout
            ),
            Err(Status::COOPERATIVE_LAUNCH_TOO_LARGE)
        );

        let bad = LinkJob {
            inputs: vec![ptx(b"bad", ".version 7.0\n.target sm_75\n.entry k(\n\0")],
            options: Vec::new(),
            info_log_cap: 0,
            error_log_cap: 4096,
        };
        let failed = ctx.link(&bad);
        assert_eq!(failed.result, Err(Status::INVALID_PTX));
        assert!(!failed.error_log.is_empty());
        assert!(failed.error_used > 0);
        eprintln!("error log: {}", String::from_utf8_lossy(&failed.error_log));
    }
}
