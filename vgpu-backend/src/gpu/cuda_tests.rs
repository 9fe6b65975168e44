//! Tests of `cuda.rs`.

use super::*;
use crate::gpu::ptx;

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
const PTX: &str = "\
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

fn host(v: &mut [u8]) -> HostBuf {
    // SAFETY: the test keeps `v` alive and untouched while the buffer is used.
    unsafe { HostBuf::new(v.as_mut_ptr(), v.len()) }
}

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
