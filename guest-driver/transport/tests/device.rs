//! End-to-end tests of `Device` against an in-process vhost-user backend.
#![allow(clippy::unwrap_used)]

mod mock;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use vgpu_spec::request::header;
use vgpu_spec::response::Response;
use vgpu_spec::wire::*;
use vgpu_spec::{Request, Status, CONTROL_QUEUE, SUBMISSION_QUEUE};
use vgpu_transport::{Device, Options, TransportError};
use zerocopy::FromBytes;

fn socket(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vgpu-transport-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(format!("{name}.sock"))
}

fn connect(name: &str, queue_size: u16) -> (mock::Running, Device) {
    let path = socket(name);
    let running = mock::spawn(&path);
    let dev = Device::connect(&Options {
        socket: path,
        guest_mem_bytes: 64 << 20,
        queue_size,
    })
    .unwrap();
    (running, dev)
}

fn hdr() -> ReqHeader {
    header(7, 1, 0, 0)
}

fn alloc(dev: &Device, size: u64) -> u64 {
    let mut body = Vec::new();
    let st = dev
        .call(
            SUBMISSION_QUEUE,
            hdr(),
            &Request::MemAlloc(MemAllocReq { size: size.into() }),
            &mut body,
        )
        .unwrap();
    assert_eq!(st, Status::SUCCESS);
    HandleResp::read_from_bytes(&body).unwrap().handle.get()
}

fn copy_req(dptr: u64, segs: &[SgEntry], flags: u32) -> (ReqHeader, MemcpyHostReq) {
    let total: u64 = segs.iter().map(|s| s.len.get()).sum();
    let r = MemcpyHostReq {
        device_ptr: dptr.into(),
        stream: 0.into(),
        total_len: total.into(),
        nsegs: (segs.len() as u32).into(),
        _pad: 0.into(),
    };
    (header(7, 1, 0, flags), r)
}

fn sg(gpa: u64, len: usize) -> SgEntry {
    SgEntry {
        gpa: gpa.into(),
        len: (len as u64).into(),
    }
}

#[test]
fn handshake_reads_config_and_negotiates_only_known_features() {
    let (running, dev) = connect("handshake", 1024);
    assert!(dev.config().is_valid());
    assert_eq!(dev.config().device_name(), "Mock GPU");
    let acked = running.mock.0.acked_features.load(Ordering::Relaxed);
    assert_eq!(acked, 1 << 32 | 1 << 30, "EVENT_IDX must not be acked");
}

#[test]
fn control_queue_round_trip_returns_large_response_body() {
    let (_running, dev) = connect("devinfo", 1024);
    let mut body = Vec::new();
    let st = dev
        .call(
            CONTROL_QUEUE,
            header(0, 0, 0, 0),
            &Request::GetDeviceInfo,
            &mut body,
        )
        .unwrap();
    assert_eq!(st, Status::SUCCESS);
    let (info, rest) = DeviceInfoResp::read_from_prefix(&body).unwrap();
    assert_eq!(info.attr_count.get(), 160);
    assert_eq!(rest.len(), 160 * 4);
    assert_eq!(i32::from_le_bytes(rest[4..8].try_into().unwrap()), 1024);
    let st = dev
        .call(
            CONTROL_QUEUE,
            header(0, 0, 0, 0),
            &Request::SessionOpen(SessionOpenReq {
                pid: 1.into(),
                version: 1.into(),
            }),
            &mut body,
        )
        .unwrap();
    assert_eq!(st, Status::SUCCESS);
    assert_eq!(
        SessionOpenResp::read_from_bytes(&body)
            .unwrap()
            .session
            .get(),
        7
    );
    let s = dev.stats();
    assert_eq!((s.requests, s.sync_calls), (2, 2));
    assert!(s.kicks >= 2);
}

#[test]
fn htod_and_dtoh_through_staging_round_trip_data() {
    let (_running, dev) = connect("copy", 1024);
    let n = 3 << 20;
    let dptr = alloc(&dev, n as u64);
    let mut src = dev.staging(n).unwrap();
    for (i, b) in src.as_mut_slice().iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    let segs = [sg(src.gpa(), n)];
    let (h, r) = copy_req(dptr, &segs, FLAG_TRANSIENT_SOURCE);
    let mut body = Vec::new();
    let st = dev
        .call(
            SUBMISSION_QUEUE,
            h,
            &Request::MemcpyHtoD(r, &segs),
            &mut body,
        )
        .unwrap();
    assert_eq!(st, Status::SUCCESS);
    drop(src);
    let dst = dev.staging(n).unwrap();
    let segs = [
        sg(dst.gpa(), n / 2),
        sg(dst.gpa() + (n / 2) as u64, n - n / 2),
    ];
    let (h, r) = copy_req(dptr, &segs, 0);
    let st = dev
        .call(
            SUBMISSION_QUEUE,
            h,
            &Request::MemcpyDtoH(r, &segs),
            &mut body,
        )
        .unwrap();
    assert_eq!(st, Status::SUCCESS);
    assert!(dst
        .as_slice()
        .iter()
        .enumerate()
        .all(|(i, b)| *b == (i % 251) as u8));
    assert!(dev.stats().bytes_staged >= 2 * n as u64);
}

#[test]
fn async_htod_releases_staging_and_later_dtoh_sees_data() {
    let (_running, dev) = connect("async-copy", 1024);
    let dptr = alloc(&dev, 4096);
    for round in 0..50u8 {
        let mut st = dev.staging(4096).unwrap();
        st.as_mut_slice().fill(round);
        let segs = [sg(st.gpa(), 4096)];
        let (h, r) = copy_req(dptr, &segs, FLAG_ASYNC | FLAG_TRANSIENT_SOURCE);
        dev.submit(
            SUBMISSION_QUEUE,
            h,
            &Request::MemcpyHtoD(r, &segs),
            Some(st),
        )
        .unwrap();
    }
    dev.flush().unwrap();
    let dst = dev.staging(4096).unwrap();
    let segs = [sg(dst.gpa(), 4096)];
    let (h, r) = copy_req(dptr, &segs, 0);
    let mut body = Vec::new();
    let st = dev
        .call(
            SUBMISSION_QUEUE,
            h,
            &Request::MemcpyDtoH(r, &segs),
            &mut body,
        )
        .unwrap();
    assert_eq!(st, Status::SUCCESS);
    assert!(dst.as_slice().iter().all(|b| *b == 49));
    assert_eq!(dev.take_async_error(), None);
}

#[test]
fn staging_waits_for_submitted_buffers_larger_than_half_the_heap() {
    // Each buffer takes over half the heap, so every second one must wait
    // for the device to release the previous submit's buffer.
    let (_running, dev) = connect("big-staging", 1024);
    let chunk = dev.staging_capacity() / 2 + 4096;
    let dptr = alloc(&dev, chunk as u64);
    for round in 0..6u8 {
        let mut st = dev.staging(chunk).unwrap();
        st.as_mut_slice().fill(round);
        let segs = [sg(st.gpa(), chunk)];
        let (h, r) = copy_req(dptr, &segs, FLAG_ASYNC | FLAG_TRANSIENT_SOURCE);
        dev.submit(
            SUBMISSION_QUEUE,
            h,
            &Request::MemcpyHtoD(r, &segs),
            Some(st),
        )
        .unwrap();
    }
    assert_eq!(dev.take_async_error(), None);
}

#[test]
fn async_failure_is_reported_once_at_next_sync_point() {
    let (_running, dev) = connect("async-error", 1024);
    let launch = |f: u64| {
        Request::Launch(
            LaunchReq {
                function: f.into(),
                ..Default::default()
            },
            &[],
        )
    };
    dev.submit(SUBMISSION_QUEUE, hdr(), &launch(1), None)
        .unwrap();
    dev.submit(SUBMISSION_QUEUE, hdr(), &launch(mock::BAD_FUNCTION), None)
        .unwrap();
    dev.submit(SUBMISSION_QUEUE, hdr(), &launch(1), None)
        .unwrap();
    let mut body = Vec::new();
    let st = dev
        .call(SUBMISSION_QUEUE, hdr(), &Request::MemGetInfo, &mut body)
        .unwrap();
    assert_eq!(st, Status::NOT_SUPPORTED);
    assert_eq!(dev.take_async_error(), Some(Status::LAUNCH_FAILED));
    assert_eq!(dev.take_async_error(), None);
}

#[test]
fn async_failure_is_kept_for_the_context_of_the_failed_request() {
    let (_running, dev) = connect("async-error-ctx", 1024);
    let launch = Request::Launch(
        LaunchReq {
            function: mock::BAD_FUNCTION.into(),
            ..Default::default()
        },
        &[],
    );
    dev.submit(SUBMISSION_QUEUE, header(7, 2, 0, 0), &launch, None)
        .unwrap();
    let mut body = Vec::new();
    dev.call(SUBMISSION_QUEUE, hdr(), &Request::MemGetInfo, &mut body)
        .unwrap();
    assert_eq!(dev.take_async_error_of(1), None);
    assert_eq!(dev.take_async_error_of(2), Some(Status::LAUNCH_FAILED));
    assert_eq!(dev.take_async_error_of(2), None);
    assert_eq!(dev.take_async_error(), None);
}

#[test]
fn many_async_requests_on_a_small_ring_wait_for_space() {
    let (running, dev) = connect("small-ring", 8);
    // Each launch keeps the device busy for a while, so the guest outruns it and the ring
    // fills however fast or loaded the machine is.
    running.mock.0.launch_busy_us.store(20, Ordering::Relaxed);
    for i in 0..2000u64 {
        let req = Request::Launch(
            LaunchReq {
                function: (i + 1).into(),
                param_bytes: 8.into(),
                ..Default::default()
            },
            &[0u8; 8],
        );
        dev.submit(SUBMISSION_QUEUE, hdr(), &req, None).unwrap();
    }
    dev.flush().unwrap();
    let mut body = Vec::new();
    dev.call(SUBMISSION_QUEUE, hdr(), &Request::MemGetInfo, &mut body)
        .unwrap();
    assert_eq!(running.mock.0.requests.load(Ordering::Relaxed), 2001);
    let s = dev.stats();
    assert_eq!(s.requests, 2001);
    assert!(
        s.kicks < 2001,
        "kicks {} should be suppressed while busy",
        s.kicks
    );
    assert_eq!(dev.take_async_error(), None);
}

#[test]
fn module_images_larger_than_a_slot_or_all_of_staging_are_delivered() {
    let (_running, dev) = connect("module", 1024);
    let cap = dev.staging_capacity();
    for len in [10_000usize, cap + (8 << 20)] {
        let mut image = vec![0x11u8; len];
        image[0] = 0xab;
        image[len - 1] = 0xcd;
        let req = Request::ModuleLoad(
            ModuleLoadReq {
                image_len: (len as u64).into(),
                kind: image::PTX.into(),
                _pad: 0.into(),
            },
            &image,
        );
        let mut body = Vec::new();
        let st = dev.call(SUBMISSION_QUEUE, hdr(), &req, &mut body).unwrap();
        assert_eq!(st, Status::SUCCESS, "image of {len} bytes");
        let h = HandleResp::read_from_bytes(&body).unwrap().handle.get();
        assert_eq!(h, (len as u64) << 16 | 0xab << 8 | 0xcd);
    }
    // Temporary regions were withdrawn: staging is whole again.
    assert!(dev.staging(cap).is_ok());
}

#[test]
fn function_lookup_response_with_param_table_is_decoded() {
    let (_running, dev) = connect("function", 1024);
    let req = Request::GetFunction(
        ModuleSymbolReq {
            module: 1.into(),
            name_len: 5.into(),
            _pad: 0.into(),
        },
        b"saxpy",
    );
    let mut body = Vec::new();
    let st = dev.call(SUBMISSION_QUEUE, hdr(), &req, &mut body).unwrap();
    assert_eq!(st, Status::SUCCESS);
    let mut full = vec![0u8; 16];
    full.extend_from_slice(&body);
    let resp = Response::decode(&full).unwrap();
    let (f, rest) = resp.fixed::<FunctionResp>().unwrap();
    assert_eq!(f.param_count.get(), 2);
    let params = Response::array::<ParamInfo>(rest, 2).unwrap();
    assert_eq!(params[1].size.get(), 5);
}

#[test]
fn pinned_memory_is_zero_copy_and_translates_until_freed() {
    let (_running, dev) = connect("pinned", 1024);
    let len = 1 << 20;
    let p = dev.alloc_pinned(len).unwrap();
    assert_eq!(p as usize % 4096, 0);
    // SAFETY: `p` is a fresh mapping of `len` bytes owned by this test.
    let host = unsafe { std::slice::from_raw_parts_mut(p, len) };
    host.fill(0x5a);
    let gpa = dev.translate(p, len).unwrap();
    assert!(gpa >= vgpu_transport::PINNED_BASE_GPA);
    assert_eq!(dev.translate(p.wrapping_add(10), 100), Some(gpa + 10));
    assert_eq!(dev.translate(p, len + 1), None);
    let dptr = alloc(&dev, len as u64);
    let bytes_before = dev.stats().bytes_staged;
    let segs = [sg(gpa, len)];
    let (h, r) = copy_req(dptr, &segs, 0);
    let mut body = Vec::new();
    let st = dev
        .call(
            SUBMISSION_QUEUE,
            h,
            &Request::MemcpyHtoD(r, &segs),
            &mut body,
        )
        .unwrap();
    assert_eq!(st, Status::SUCCESS);
    host.fill(0);
    let (h, r) = copy_req(dptr, &segs, 0);
    let st = dev
        .call(
            SUBMISSION_QUEUE,
            h,
            &Request::MemcpyDtoH(r, &segs),
            &mut body,
        )
        .unwrap();
    assert_eq!(st, Status::SUCCESS);
    assert!(host.iter().all(|b| *b == 0x5a));
    assert_eq!(
        dev.stats().bytes_staged,
        bytes_before,
        "pinned copies bounce nothing"
    );
    dev.free_pinned(p).unwrap();
    assert_eq!(dev.translate(p, 1), None);
    assert!(matches!(
        dev.free_pinned(p),
        Err(TransportError::InvalidArgument(_))
    ));
    // The region is gone on the device side too: the old GPA is rejected.
    let st = dev
        .call(
            SUBMISSION_QUEUE,
            h,
            &Request::MemcpyDtoH(r, &segs),
            &mut body,
        )
        .unwrap();
    assert_eq!(st, Status::INVALID_VALUE);
}

#[test]
fn staging_held_by_the_caller_is_reported_not_waited_for() {
    let (_running, dev) = connect("staging-full", 1024);
    let cap = dev.staging_capacity();
    assert!(matches!(
        dev.staging(cap + 1),
        Err(TransportError::NoMemory(_))
    ));
    let held = dev.staging(cap).unwrap();
    let start = Instant::now();
    assert!(matches!(dev.staging(64), Err(TransportError::NoMemory(_))));
    assert!(start.elapsed() < Duration::from_secs(1));
    drop(held);
    assert!(dev.staging(cap).is_ok());
    assert_eq!(dev.translate(std::ptr::null(), 1), None);
}

#[test]
fn concurrent_threads_share_one_device() {
    let (running, dev) = connect("threads", 64);
    let dev = std::sync::Arc::new(dev);
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let dev = dev.clone();
            std::thread::spawn(move || {
                let dptr = alloc(&dev, 256);
                for i in 0..200u32 {
                    let mut st = dev.staging(256).unwrap();
                    st.as_mut_slice().fill((t * 50 + i % 50) as u8);
                    let segs = [sg(st.gpa(), 256)];
                    let (h, r) = copy_req(dptr, &segs, FLAG_ASYNC | FLAG_TRANSIENT_SOURCE);
                    dev.submit(
                        SUBMISSION_QUEUE,
                        h,
                        &Request::MemcpyHtoD(r, &segs),
                        Some(st),
                    )
                    .unwrap();
                    let dst = dev.staging(256).unwrap();
                    let segs = [sg(dst.gpa(), 256)];
                    let (h, r) = copy_req(dptr, &segs, 0);
                    let mut body = Vec::new();
                    let s = dev
                        .call(
                            SUBMISSION_QUEUE,
                            h,
                            &Request::MemcpyDtoH(r, &segs),
                            &mut body,
                        )
                        .unwrap();
                    assert_eq!(s, Status::SUCCESS);
                    let want = (t * 50 + i % 50) as u8;
                    assert!(dst.as_slice().iter().all(|b| *b == want));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(running.mock.0.requests.load(Ordering::Relaxed), 4 + 4 * 400);
    assert_eq!(dev.take_async_error(), None);
}

#[test]
fn backend_dying_mid_call_returns_disconnected_and_later_calls_fail_fast() {
    let (running, dev) = connect("die", 1024);
    let dev = std::sync::Arc::new(dev);
    let waiter = {
        let dev = dev.clone();
        std::thread::spawn(move || {
            let mut body = Vec::new();
            dev.call(SUBMISSION_QUEUE, hdr(), &Request::CtxSynchronize, &mut body)
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !running.mock.0.hung.load(Ordering::Acquire) {
        assert!(Instant::now() < deadline, "backend never saw the request");
        std::thread::yield_now();
    }
    running.shutdown.recv().unwrap().shutdown();
    let r = waiter.join().unwrap();
    assert!(matches!(r, Err(TransportError::Disconnected)), "{r:?}");
    let mut body = Vec::new();
    let start = Instant::now();
    let r = dev.call(CONTROL_QUEUE, hdr(), &Request::GetDeviceInfo, &mut body);
    assert!(matches!(r, Err(TransportError::Disconnected)));
    assert!(matches!(
        dev.submit(SUBMISSION_QUEUE, hdr(), &Request::CtxSynchronize, None),
        Err(TransportError::Disconnected)
    ));
    assert!(matches!(
        dev.alloc_pinned(4096),
        Err(TransportError::Disconnected)
    ));
    assert!(start.elapsed() < Duration::from_millis(100));
    assert_eq!(
        TransportError::Disconnected.status(),
        Status::DEVICE_UNAVAILABLE
    );
}

#[test]
fn requests_on_the_event_queue_are_rejected() {
    let (_running, dev) = connect("eventq", 1024);
    let mut body = Vec::new();
    let r = dev.call(
        vgpu_spec::EVENT_QUEUE,
        hdr(),
        &Request::MemGetInfo,
        &mut body,
    );
    assert!(matches!(r, Err(TransportError::InvalidArgument(_))));
}
