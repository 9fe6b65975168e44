//! Tests of `cuda.rs`.

use super::*;
use crate::gpu::ptx;
use crate::testutil::host;

#[test]
fn open_without_driver_library_fails_cleanly() {
    // SAFETY: only probes dlopen.
    let present = unsafe { cu::is_culib_present() };
    let result = CudaGpu::open(0);
    if present {
        // A driver (or a stand-in on the library path) is loadable: open
        // may succeed or fail, but must have returned rather than panic.
        return;
    }
    match result {
        Err(CudaError::LibraryNotFound) => {}
        Err(other) => panic!("unexpected error: {other}"),
        Ok(_) => panic!("opened a CUDA device without a driver library"),
    }
    let message = CudaError::LibraryNotFound.to_string();
    assert!(message.starts_with("No CUDA driver library"));
}

#[test]
fn open_with_huge_ordinal_is_rejected_before_loading() {
    let result = CudaGpu::open(usize::MAX);
    assert!(matches!(
        result,
        Err(CudaError::InvalidOrdinal {
            ordinal: usize::MAX
        })
    ));
}

#[test]
fn aligned_image_is_nul_terminated_and_aligned() {
    let ptx = b".version 8.0\n.target sm_90\n";
    let image = aligned_image(ptx);
    assert_eq!(image.as_ptr() as usize % 8, 0);
    let bytes = image.as_bytes();
    assert_eq!(&bytes[..ptx.len()], ptx);
    assert_eq!(bytes[ptx.len()], 0);
    // An exact multiple of 8 still gets a terminator.
    let eight = aligned_image(b"12345678");
    assert_eq!(eight.as_bytes().len(), 16);
    assert_eq!(eight.as_bytes()[8], 0);
}

#[test]
fn params_outside_the_block_are_rejected() {
    let layout = [
        ParamLayout { offset: 0, size: 8 },
        ParamLayout { offset: 8, size: 4 },
    ];
    let params = [7u8; 12];
    let mut storage = Vec::new();
    aligned_params(&mut storage, &params, &layout).unwrap();
    assert_eq!(&storage.as_bytes()[..12], &params);
    assert_eq!(
        aligned_params(&mut storage, &params[..11], &layout),
        Err(Status::INVALID_VALUE)
    );
    let overflow = [ParamLayout {
        offset: u32::MAX,
        size: u32::MAX,
    }];
    assert_eq!(
        aligned_params(&mut storage, &params, &overflow),
        Err(Status::INVALID_VALUE)
    );
}

#[test]
fn null_stream_ref_is_the_legacy_stream() {
    assert!(stream_ptr(None).is_null());
    assert_eq!(to_handle(stream_ptr(Some(0x1234))), 0x1234);
}

/// Hand-written PTX, so the test needs no nvcc: `add_one` adds 1 to `n`
/// u32s; `layout_probe` exercises the parameter packing rules.
pub(crate) const PTX: &str = "\
.version 7.0
.target sm_80
.address_size 64

.visible .global .align 4 .u32 counter;

.visible .entry add_one(
    .param .u64 .ptr .global .align 1 add_one_p,
    .param .u32 add_one_n
)
{
    .reg .pred %p<2>;
    .reg .b32 %r<8>;
    .reg .b64 %rd<5>;

    ld.param.u64 %rd1, [add_one_p];
    ld.param.u32 %r1, [add_one_n];
    mov.u32 %r2, %ctaid.x;
    mov.u32 %r3, %ntid.x;
    mov.u32 %r4, %tid.x;
    mad.lo.s32 %r5, %r2, %r3, %r4;
    setp.ge.u32 %p1, %r5, %r1;
    @%p1 bra DONE;
    cvta.to.global.u64 %rd2, %rd1;
    mul.wide.u32 %rd3, %r5, 4;
    add.s64 %rd4, %rd2, %rd3;
    ld.global.u32 %r6, [%rd4];
    add.s32 %r7, %r6, 1;
    st.global.u32 [%rd4], %r7;
DONE:
    ret;
}

.visible .entry layout_probe(
    .param .u8 a,
    .param .align 8 .b8 s[24],
    .param .u16 b,
    .param .u64 .ptr .align 16 c,
    .param .align 16 .b8 d[4],
    .param .f64 e
)
{
    ret;
}
";

/// Runs only where a real GPU is present: `cargo test -- --ignored`.
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn real_gpu_copies_launches_and_times() {
    let gpu = CudaGpu::open(0).expect("open device 0");
    let id = gpu.identity();
    eprintln!(
        "{} cc {:?} sms {} mem {} driver {}",
        id.name, id.compute_capability, id.sm_count, id.total_mem, id.driver_version
    );
    assert!(id.executes_kernels && !id.name.is_empty());
    assert_eq!(id.attributes[1], 1024);
    assert_eq!(id.attributes[75] as u32, id.compute_capability.0);

    // Registering guest RAM: page-aligned, idempotent.
    let layout = std::alloc::Layout::from_size_align(1 << 20, 4096).unwrap();
    // SAFETY: non-zero size; freed at the end of the test.
    let region = unsafe { std::alloc::alloc_zeroed(layout) };
    // SAFETY: region is a live 1 MiB allocation.
    let pinned = unsafe { HostBuf::new(region, 1 << 20) };
    gpu.register_host(pinned).unwrap();
    gpu.register_host(pinned).unwrap();

    let mut ctx = gpu.create_context(0).unwrap();
    let mut other = gpu.create_context(0).unwrap();
    let n = 1000usize;
    let d = ctx.mem_alloc((n * 4) as u64).unwrap();
    let o = other.mem_alloc(64).unwrap();
    assert_ne!(d, o);

    // Sync HtoD in two segments, memsets, DtoD, DtoH.
    let mut data: Vec<u8> = (0..n as u32).flat_map(|i| i.to_le_bytes()).collect();
    let (a, b) = data.split_at_mut(1000);
    ctx.memcpy_htod(d, &[host(a), host(b)], None, false, false)
        .unwrap();
    let mut back = vec![0u8; n * 4];
    ctx.memcpy_dtoh(&[host(&mut back)], d, None, false).unwrap();
    assert_eq!(back, data);

    // Kernel: add one, on a stream, with an async snapshot copy first.
    let m = ctx.module_load(PTX.as_bytes()).unwrap();
    let (f, fl) = ctx.get_function(m, "add_one").unwrap();
    assert_eq!(
        fl,
        [
            ParamLayout { offset: 0, size: 8 },
            ParamLayout { offset: 8, size: 4 }
        ]
    );
    let parsed = ptx::parse(PTX.as_bytes()).unwrap();
    for entry in &parsed.entries {
        let (_, driver) = ctx.get_function(m, &entry.name).unwrap();
        assert_eq!(
            driver, entry.params,
            "parser and driver disagree on {}",
            entry.name
        );
    }
    assert_eq!(
        ctx.get_function(m, "missing").unwrap_err(),
        Status::NOT_FOUND
    );
    assert_eq!(ctx.get_global(m, "counter").unwrap().1, 4);
    let s = ctx.stream_create(1, 0).unwrap();
    let (e0, e1) = (ctx.event_create(0).unwrap(), ctx.event_create(0).unwrap());
    let mut bounce = data.clone();
    ctx.memcpy_htod(d, &[host(&mut bounce)], Some(s), true, true)
        .unwrap();
    bounce.fill(0xff); // the guest reuses its bounce buffer at once
    ctx.event_record(e0, Some(s)).unwrap();
    let mut params = d.to_le_bytes().to_vec();
    params.extend_from_slice(&(n as u32).to_le_bytes());
    let cfg = LaunchConfig {
        grid: [(n as u32).div_ceil(256), 1, 1],
        block: [256, 1, 1],
        shared_mem: 0,
    };
    ctx.launch(f, cfg, Some(s), &params, &fl).unwrap();
    ctx.event_record(e1, Some(s)).unwrap();
    // Async DtoH into registered memory, then wait for the stream.
    // SAFETY: region has 1 MiB; n * 4 bytes fit.
    let out = unsafe { HostBuf::new(region, n * 4) };
    ctx.memcpy_dtoh(&[out], d, Some(s), true).unwrap();
    ctx.stream_synchronize(Some(s)).unwrap();
    let mut got = vec![0u8; n * 4];
    out.read_at(0, &mut got).unwrap();
    let expected: Vec<u8> = (1..=n as u32).flat_map(|i| i.to_le_bytes()).collect();
    assert_eq!(got, expected);
    ctx.event_query(e1).unwrap();
    let ms = ctx.event_elapsed(e0, e1).unwrap();
    assert!(ms >= 0.0, "elapsed {ms}");
    let not_recorded = ctx.event_create(0).unwrap();
    assert!(ctx.event_elapsed(e0, not_recorded).is_err());

    // Memsets of each width, async and sync, and DtoD.
    ctx.memset(d, 0xab, 1, 4, None, false).unwrap();
    ctx.memset(d + 4, 0xbeef, 2, 2, Some(s), true).unwrap();
    ctx.memset(d + 8, 0x0102_0304, 4, 1, None, true).unwrap();
    ctx.memcpy_dtod(d + 12, d, 12, Some(s), false).unwrap();
    ctx.synchronize().unwrap();
    let mut small = vec![0u8; 24];
    ctx.memcpy_dtoh(&[host(&mut small)], d, None, false)
        .unwrap();
    let pattern = [0xab, 0xab, 0xab, 0xab, 0xef, 0xbe, 0xef, 0xbe, 4, 3, 2, 1];
    assert_eq!(&small[..12], &pattern);
    assert_eq!(&small[12..], &pattern);

    ctx.stream_query(Some(s)).unwrap();

    // Contexts work from other threads.
    let handle = std::thread::spawn(move || {
        let p = other.mem_alloc(16).unwrap();
        other.memset(p, 7, 1, 16, None, false).unwrap();
        other.synchronize().unwrap();
        other.mem_free(p).unwrap();
        other.mem_free(o).unwrap();
    });
    handle.join().unwrap();
    ctx.module_unload(m).unwrap();
    ctx.stream_destroy(s).unwrap();
    ctx.mem_free(d).unwrap();
    drop(ctx);
    gpu.unregister_host(pinned).unwrap();
    // SAFETY: allocated above with this layout; no longer registered.
    unsafe { std::alloc::dealloc(region, layout) };
}

/// Loads nvcc's PTX, cubin and fatbin of one program (in the directory
/// `VGPU_TEST_IMAGES`: k.ptx, k.cubin, k.fatbin) and checks that the
/// parser's layouts and global sizes match the driver's for every kernel.
#[test]
#[ignore = "needs an NVIDIA GPU and nvcc-built images"]
fn real_gpu_agrees_with_the_parser_on_nvcc_images() {
    let dir =
        std::path::PathBuf::from(std::env::var("VGPU_TEST_IMAGES").expect("VGPU_TEST_IMAGES"));
    let ptx_text = std::fs::read(dir.join("k.ptx")).unwrap();
    let parsed = ptx::parse(&ptx_text).unwrap();
    assert!(parsed.entries.len() >= 4, "{parsed:?}");
    let gpu = CudaGpu::open(0).unwrap();
    let mut ctx = gpu.create_context(0).unwrap();
    for file in ["k.ptx", "k.cubin", "k.fatbin"] {
        let image = std::fs::read(dir.join(file)).unwrap();
        assert!(ptx::binary_fits(&image), "{file} rejected by binary_fits");
        eprintln!(
            "{file}: {:?}, {} bytes",
            ptx::image_kind(&image),
            image.len()
        );
        let m = ctx.module_load(&image).unwrap();
        for entry in &parsed.entries {
            let (_, layout) = ctx.get_function(m, &entry.name).unwrap();
            eprintln!("  {} {:?}", entry.name, layout);
            assert_eq!(layout, entry.params, "{file}: {}", entry.name);
        }
        for (name, size) in &parsed.globals {
            assert_eq!(ctx.get_global(m, name).unwrap().1, *size, "{file}: {name}");
        }
        ctx.module_unload(m).unwrap();
    }
    // Truncated binaries are refused before they reach the driver.
    for file in ["k.cubin", "k.fatbin"] {
        let image = std::fs::read(dir.join(file)).unwrap();
        let cut = &image[..image.len() - 1];
        assert_eq!(
            ctx.module_load(cut).unwrap_err(),
            Status::INVALID_IMAGE,
            "{file}"
        );
    }
}

/// The in-flight tracker on a real GPU: busy time as a union over streams,
/// the bound on queued work, and the preemption latency.
/// Runs only where a real GPU is present: `cargo test -- --ignored`.
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn real_gpu_bounds_inflight_work_and_counts_busy_time_once() {
    use crate::gpu::timed::{TIMED_SPIN_ENTRY, TIMED_SPIN_PTX};
    use crate::throttle::Throttle;
    use std::time::{Duration, Instant};
    use vgpu_board::{Board, Class, Grant};

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("board");
    let board = Board::create(&path).unwrap();
    board.slot(0).unwrap().assign(0, Class::BestEffort);
    let throttle = Arc::new(Throttle::open(&path, 0, Duration::from_micros(2000)).unwrap());
    let _monitor = throttle.spawn_monitor().unwrap();
    let gpu = CudaGpu::open(0).unwrap().with_throttle(throttle.clone());
    let mut ctx = gpu.create_context(0).unwrap();
    let module = ctx.module_load(TIMED_SPIN_PTX.as_bytes()).unwrap();
    let (spin, layout) = ctx.get_function(module, TIMED_SPIN_ENTRY).unwrap();
    let one = LaunchConfig {
        grid: [1, 1, 1],
        block: [1, 1, 1],
        shared_mem: 0,
    };
    let launch = |ctx: &mut Box<dyn GpuContext>, stream: StreamRef, ns: u64| {
        ctx.launch(spin, one, stream, &ns.to_le_bytes(), &layout)
            .unwrap();
    };
    let busy = || throttle.usage().busy_ns;
    let settle = |ctx: &mut Box<dyn GpuContext>| {
        ctx.synchronize().unwrap();
        ctx.end_batch();
        assert_eq!(throttle.inflight(), 0);
    };

    // Warm up (module load, first launch).
    launch(&mut ctx, None, 1000);
    settle(&mut ctx);

    // Two 2 ms spins on two streams at once: about 2 ms of GPU time, not 4.
    let a = ctx.stream_create(1, 0).unwrap();
    let b = ctx.stream_create(1, 0).unwrap();
    let before = busy();
    launch(&mut ctx, Some(a), 2_000_000);
    launch(&mut ctx, Some(b), 2_000_000);
    ctx.end_batch();
    settle(&mut ctx);
    let overlapped = busy() - before;
    eprintln!("two overlapping 2 ms spins counted {overlapped} ns");
    assert!((1_900_000..3_000_000).contains(&overlapped), "{overlapped}");

    // Ten 1 ms spins in a row: about 10 ms.
    let before = busy();
    for _ in 0..10 {
        launch(&mut ctx, Some(a), 1_000_000);
    }
    ctx.end_batch();
    settle(&mut ctx);
    let sequential = busy() - before;
    eprintln!("ten 1 ms spins counted {sequential} ns");
    assert!(
        (9_500_000..11_500_000).contains(&sequential),
        "{sequential}"
    );

    // Queued work is bounded: enqueueing 40 x 500 us spins with a 2 ms
    // bound takes most of their 20 ms.
    let start = Instant::now();
    for _ in 0..40 {
        launch(&mut ctx, Some(a), 500_000);
        assert!(throttle.inflight() <= 8, "inflight {}", throttle.inflight());
    }
    let enqueue = start.elapsed();
    eprintln!("enqueueing 40 x 500 us took {enqueue:?}");
    assert!(enqueue >= Duration::from_millis(14), "{enqueue:?}");

    // Withdrawing the grant: the in-flight work drains within about the
    // bound, and the monitor measures it.
    board.slot(0).unwrap().set_grant(Grant {
        run: false,
        yield_to_lc: true,
        evict: false,
    });
    ctx.end_batch();
    let deadline = Instant::now() + Duration::from_secs(5);
    while throttle.preemption_ns().0 == 0 {
        assert!(Instant::now() < deadline, "no preemption measured");
        board.tick();
        std::thread::sleep(Duration::from_micros(100));
    }
    let (last, max) = throttle.preemption_ns();
    eprintln!(
        "preemption latency {} us (max {} us)",
        last / 1000,
        max / 1000
    );
    assert!(last <= 4_000_000, "{last}");
    assert_eq!(board.slot(0).unwrap().snapshot().preempt_last_ns, last);
    settle(&mut ctx);
}

/// Launch overhead with and without a board (in-flight tracking on).
/// Runs only where a real GPU is present: `cargo test -- --ignored`.
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn real_gpu_launch_overhead_with_a_board_stays_small() {
    use crate::gpu::timed::{TIMED_SPIN_ENTRY, TIMED_SPIN_PTX};
    use crate::throttle::Throttle;
    use std::time::{Duration, Instant};
    use vgpu_board::{Board, Class};

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("board");
    let board = Board::create(&path).unwrap();
    board.slot(0).unwrap().assign(0, Class::LatencyCritical);
    let with_board = Arc::new(Throttle::open(&path, 0, Duration::from_micros(2000)).unwrap());
    let _monitor = with_board.spawn_monitor().unwrap();
    let mut per_launch = Vec::new();
    for throttle in [Throttle::disabled(), with_board.clone()] {
        let gpu = CudaGpu::open(0).unwrap().with_throttle(throttle.clone());
        let mut ctx = gpu.create_context(0).unwrap();
        let module = ctx.module_load(TIMED_SPIN_PTX.as_bytes()).unwrap();
        let (spin, layout) = ctx.get_function(module, TIMED_SPIN_ENTRY).unwrap();
        let one = LaunchConfig {
            grid: [1, 1, 1],
            block: [1, 1, 1],
            shared_mem: 0,
        };
        let mut best = Duration::MAX;
        for _round in 0..5 {
            let _batch = throttle.batch();
            let start = Instant::now();
            for i in 0..2000 {
                throttle.gate();
                ctx.launch(spin, one, None, &0u64.to_le_bytes(), &layout)
                    .unwrap();
                if i % 64 == 63 {
                    ctx.end_batch();
                }
            }
            ctx.synchronize().unwrap();
            ctx.end_batch();
            best = best.min(start.elapsed());
        }
        per_launch.push(best.as_secs_f64() / 2000.0 * 1e6);
    }
    eprintln!(
        "per launch: {:.2} us without a board, {:.2} us with one",
        per_launch[0], per_launch[1]
    );
    assert!(per_launch[1] < per_launch[0] * 1.5 + 1.0, "{per_launch:?}");
}
