//! A Rust CUDA client on cudarc's safe driver API.
//!
//! cudarc loads `libcuda.so` / `libcuda.so.1` at run time, so with
//! `LD_LIBRARY_PATH` pointing at our guest library this is an unmodified
//! cudarc program talking to a vGPU. It checks device queries, copies,
//! memsets, streams, events and a kernel launch, verifies every result, and
//! prints one PASS/FAIL line per check. Exit status 0 only if all passed.
//!
//! Usage: `cudarc_client [--shared]` (`--shared`: other clients use the
//! slice concurrently, so exact free-memory checks become range checks).
//! Env: `VGPU_EXPECT_EXECUTION=1|0`, whether kernels really run (default:
//! unless the device name says it is emulated).

use std::ffi::{c_void, CString};
use std::process::ExitCode;
use std::sync::Arc;

use cudarc::driver::{result, sys, CudaContext, CudaStream, DevicePtr, DriverError};

const N: usize = 1 << 20;
const SAXPY_N: u32 = 4096;

/// saxpy: `y[i] = a * x[i] + y[i]` for `i < n`.
const SAXPY_PTX: &str = r#".version 7.0
.target sm_75
.address_size 64

.visible .entry saxpy(
    .param .u32 saxpy_n,
    .param .f32 saxpy_a,
    .param .u64 saxpy_x,
    .param .u64 saxpy_y
)
{
    .reg .pred %p<2>;
    .reg .b32 %r<6>;
    .reg .f32 %f<5>;
    .reg .b64 %rd<8>;

    ld.param.u32 %r1, [saxpy_n];
    ld.param.f32 %f1, [saxpy_a];
    ld.param.u64 %rd1, [saxpy_x];
    ld.param.u64 %rd2, [saxpy_y];
    mov.u32 %r2, %ctaid.x;
    mov.u32 %r3, %ntid.x;
    mov.u32 %r4, %tid.x;
    mad.lo.s32 %r5, %r2, %r3, %r4;
    setp.ge.u32 %p1, %r5, %r1;
    @%p1 bra DONE;
    cvta.to.global.u64 %rd3, %rd1;
    cvta.to.global.u64 %rd4, %rd2;
    mul.wide.u32 %rd5, %r5, 4;
    add.s64 %rd6, %rd3, %rd5;
    add.s64 %rd7, %rd4, %rd5;
    ld.global.f32 %f2, [%rd6];
    ld.global.f32 %f3, [%rd7];
    fma.rn.f32 %f4, %f1, %f2, %f3;
    st.global.f32 [%rd7], %f4;
DONE:
    ret;
}
"#;

/// A failure that makes the remaining checks meaningless.
type Abort = String;

#[derive(Default)]
struct Checks {
    total: usize,
    failed: usize,
}

impl Checks {
    fn check(&mut self, ok: bool, what: &str, detail: impl FnOnce() -> String) -> bool {
        self.total += 1;
        if ok {
            println!("PASS {what}");
        } else {
            self.failed += 1;
            println!("FAIL {what}: {}", detail());
        }
        ok
    }

    /// Records a driver call's result; `Some` on success.
    fn ok<T>(&mut self, result: Result<T, DriverError>, what: &str) -> Option<T> {
        match result {
            Ok(v) => {
                self.check(true, what, String::new);
                Some(v)
            }
            Err(e) => {
                self.check(false, what, || format!("{e:?}"));
                None
            }
        }
    }

    /// Like [`Checks::ok`], but a failure aborts the run.
    fn need<T>(&mut self, result: Result<T, DriverError>, what: &str) -> Result<T, Abort> {
        self.ok(result, what)
            .ok_or_else(|| format!("{what} is required for the remaining checks"))
    }

    fn finish(self) -> ExitCode {
        if self.failed == 0 {
            println!("RESULT: PASS ({} checks)", self.total);
            ExitCode::SUCCESS
        } else {
            println!(
                "RESULT: FAIL ({} of {} checks failed)",
                self.failed, self.total
            );
            ExitCode::FAILURE
        }
    }
}

fn pattern(seed: u32) -> Vec<u32> {
    (0..N as u32)
        .map(|i| i.wrapping_mul(2_654_435_761) ^ seed)
        .collect()
}

fn first_mismatch<T: PartialEq>(got: &[T], want: &[T]) -> Option<usize> {
    if got.len() != want.len() {
        return Some(got.len().min(want.len()));
    }
    got.iter().zip(want).position(|(a, b)| a != b)
}

fn expect_execution(device_name: &str) -> bool {
    match std::env::var("VGPU_EXPECT_EXECUTION") {
        Ok(v) if !v.is_empty() => v != "0",
        _ => !device_name.contains("mulated"),
    }
}

fn main() -> ExitCode {
    let shared = match std::env::args().nth(1).as_deref() {
        None => false,
        Some("--shared") => true,
        Some(other) => {
            eprintln!("unknown argument {other:?}; usage: cudarc_client [--shared]");
            return ExitCode::from(2);
        }
    };
    let mut checks = Checks::default();
    if let Err(why) = run(&mut checks, shared) {
        println!("ABORT: {why}");
    }
    checks.finish()
}

fn run(c: &mut Checks, shared: bool) -> Result<(), Abort> {
    let count = c.need(CudaContext::device_count(), "device_count")?;
    c.check(count >= 1, "at least one device", || {
        format!("count is {count}")
    });
    let ctx = c.need(CudaContext::new(0), "CudaContext::new(0)")?;

    let name = c.ok(ctx.name(), "name").unwrap_or_default();
    c.check(!name.is_empty(), "device name is not empty", String::new);
    println!("INFO device 0: {name:?}");
    if let Some((major, minor)) = c.ok(ctx.compute_capability(), "compute_capability") {
        c.check(
            (3..=20).contains(&major) && (0..=9).contains(&minor),
            "compute capability is plausible",
            || format!("{major}.{minor}"),
        );
    }
    let sms = c.ok(
        ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT),
        "attribute(MULTIPROCESSOR_COUNT)",
    );
    c.check(
        sms.is_some_and(|n| n >= 1),
        "SM count is at least 1",
        || format!("{sms:?}"),
    );
    let total_mem = c.ok(ctx.total_mem(), "total_mem").unwrap_or(0);
    let (free0, total0) = c.need(ctx.mem_get_info(), "mem_get_info")?;
    c.check(
        free0 <= total0 && total0 == total_mem,
        "mem_get_info agrees with total_mem",
        || format!("free {free0} total {total0} total_mem {total_mem}"),
    );
    let executes = expect_execution(&name);

    let stream = ctx.default_stream();
    copies_on_one_stream(c, &stream)?;
    two_streams_and_events(c, &ctx, &stream)?;
    module_and_launch(c, &stream, executes)?;

    c.ok(ctx.synchronize(), "synchronize");
    c.ok(ctx.check_err(), "no errors were recorded by drops");
    let (free1, total1) = c.need(ctx.mem_get_info(), "mem_get_info at the end")?;
    if shared {
        c.check(
            free1 <= total1 && total1 == total0,
            "free <= total at the end",
            || format!("free {free1} total {total1}"),
        );
    } else {
        c.check(
            free1 == free0 && total1 == total0,
            "free memory is back to its start value",
            || format!("started at {free0} of {total0}, ended at {free1} of {total1}"),
        );
    }
    Ok(())
}

fn copies_on_one_stream(c: &mut Checks, stream: &Arc<CudaStream>) -> Result<(), Abort> {
    let data = pattern(0x5eed_0101);
    let mut dev = c.need(stream.clone_htod(&data), "clone_htod 4 MiB")?;
    let back = c.need(stream.clone_dtoh(&dev), "clone_dtoh 4 MiB")?;
    let bad = first_mismatch(&back, &data);
    c.check(bad.is_none(), "round trip returns the pattern", || {
        format!("word {bad:?} differs")
    });

    c.ok(stream.memset_zeros(&mut dev), "memset_zeros");
    let back = c.need(stream.clone_dtoh(&dev), "clone_dtoh after memset_zeros")?;
    let bad = back.iter().position(|w| *w != 0);
    c.check(bad.is_none(), "memset_zeros zeroes every word", || {
        format!("word {bad:?} is not zero")
    });

    let zeros = c.need(stream.alloc_zeros::<f32>(N), "alloc_zeros")?;
    let back = c.need(stream.clone_dtoh(&zeros), "clone_dtoh of alloc_zeros")?;
    c.check(
        back.iter().all(|v| *v == 0.0),
        "alloc_zeros returns zeros",
        String::new,
    );

    let mut other = c.need(stream.alloc_zeros::<u32>(N), "alloc_zeros (dtod target)")?;
    let src = c.need(stream.clone_htod(&data), "clone_htod (dtod source)")?;
    c.ok(stream.memcpy_dtod(&src, &mut other), "memcpy_dtod");
    let back = c.need(stream.clone_dtoh(&other), "clone_dtoh after memcpy_dtod")?;
    let bad = first_mismatch(&back, &data);
    c.check(bad.is_none(), "memcpy_dtod copies the pattern", || {
        format!("word {bad:?} differs")
    });
    Ok(())
}

fn two_streams_and_events(
    c: &mut Checks,
    ctx: &Arc<CudaContext>,
    stream: &Arc<CudaStream>,
) -> Result<(), Abort> {
    let data = pattern(0x5eed_0202);
    let second = c.need(ctx.new_stream(), "new_stream")?;
    let timing = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
    let start = c.need(second.record_event(timing), "record_event (start)")?;
    // Written on the default stream, copied on the second: cudarc orders the
    // two through the slices' events (cuEventRecord + cuStreamWaitEvent).
    let src = c.need(stream.clone_htod(&data), "clone_htod on the default stream")?;
    let marker = c.need(stream.record_event(None), "record_event (after upload)")?;
    c.ok(second.wait(&marker), "wait (second stream on the upload)");
    let mut dst = c.need(
        second.alloc_zeros::<u32>(N),
        "alloc_zeros on the second stream",
    )?;
    c.ok(
        second.memcpy_dtod(&src, &mut dst),
        "memcpy_dtod on the second stream",
    );
    let end = c.need(second.record_event(timing), "record_event (end)")?;
    c.ok(end.synchronize(), "event synchronize");
    let done = c.ok(end.try_is_complete(), "event query after synchronize");
    c.check(
        done == Some(true),
        "event is complete after synchronize",
        || format!("{done:?}"),
    );
    if let Some(ms) = c.ok(start.elapsed_ms(&end), "elapsed_ms") {
        c.check(ms >= 0.0, "elapsed time is not negative", || {
            format!("{ms} ms")
        });
    }
    let back = c.need(second.clone_dtoh(&dst), "clone_dtoh on the second stream")?;
    let bad = first_mismatch(&back, &data);
    c.check(
        bad.is_none(),
        "cross-stream copy returns the pattern",
        || format!("word {bad:?} differs"),
    );
    c.ok(second.synchronize(), "second stream synchronize");
    Ok(())
}

fn module_and_launch(
    c: &mut Checks,
    stream: &Arc<CudaStream>,
    executes: bool,
) -> Result<(), Abort> {
    // cudarc's safe load_module needs its nvrtc feature; load through the
    // result layer instead, as a program with a prebuilt PTX would.
    let ptx = CString::new(SAXPY_PTX).map_err(|e| format!("PTX has a NUL: {e}"))?;
    // SAFETY: `ptx` is a NUL-terminated PTX image that outlives the call.
    let module = c.need(
        unsafe { result::module::load_data(ptx.as_ptr().cast::<c_void>()) },
        "cuModuleLoadData (saxpy PTX)",
    )?;
    let name = CString::new("saxpy").map_err(|e| e.to_string())?;
    // SAFETY: `module` was just loaded and is not unloaded before the end.
    let func = c.need(
        unsafe { result::module::get_function(module, name) },
        "cuModuleGetFunction(saxpy)",
    )?;
    let missing = CString::new("no_such_kernel").map_err(|e| e.to_string())?;
    // SAFETY: as above.
    let lookup = unsafe { result::module::get_function(module, missing) };
    c.check(
        matches!(
            lookup,
            Err(DriverError(sys::CUresult::CUDA_ERROR_NOT_FOUND))
        ),
        "a missing kernel name is NOT_FOUND",
        || format!("{lookup:?}"),
    );

    let hx: Vec<f32> = (0..SAXPY_N).map(|i| i as f32).collect();
    let hy = vec![1.0f32; SAXPY_N as usize];
    let x = c.need(stream.clone_htod(&hx), "clone_htod (saxpy x)")?;
    let y = c.need(stream.clone_htod(&hy), "clone_htod (saxpy y)")?;
    {
        let (mut xp, _x_guard) = x.device_ptr(stream);
        let (mut yp, _y_guard) = y.device_ptr(stream);
        let mut n = SAXPY_N;
        let mut a = 2.0f32;
        let mut params: [*mut c_void; 4] = [
            (&raw mut n).cast(),
            (&raw mut a).cast(),
            (&raw mut xp).cast(),
            (&raw mut yp).cast(),
        ];
        // SAFETY: `func` is a live kernel whose parameters are (u32, f32,
        // u64, u64), matching `params`, which point at locals that outlive
        // the call; x and y hold SAXPY_N elements each.
        let launched = unsafe {
            result::launch_kernel(
                func,
                (SAXPY_N / 256, 1, 1),
                (256, 1, 1),
                0,
                stream.cu_stream(),
                &mut params,
            )
        };
        c.ok(launched, "cuLaunchKernel(saxpy)");
    }
    c.ok(stream.synchronize(), "synchronize after launch");
    let out = c.need(stream.clone_dtoh(&y), "clone_dtoh (saxpy y)")?;
    if executes {
        let want: Vec<f32> = hx.iter().map(|x| 2.0 * x + 1.0).collect();
        let bad = first_mismatch(&out, &want);
        c.check(bad.is_none(), "saxpy computed y = a*x + y", || {
            format!("element {bad:?} differs")
        });
    } else {
        c.check(
            out == hy,
            "kernel was validated, not executed (emulated)",
            || "y changed although the device does not execute kernels".to_string(),
        );
        println!("INFO kernel results not verified: the device does not execute kernels");
    }
    // SAFETY: nothing refers to the module any more; the launch completed.
    c.ok(unsafe { result::module::unload(module) }, "cuModuleUnload");
    Ok(())
}
