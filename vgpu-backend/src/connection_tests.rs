//! Tests of request handling: sessions, handle tables, memory validation
//! and accounting, over the emulated executor.

use vgpu_spec::wire::*;
use vgpu_spec::{Request, Response, Status, CONTROL_QUEUE, SUBMISSION_QUEUE};
use vm_memory::{Bytes, GuestAddress};
use zerocopy::{FromBytes, IntoBytes};

use crate::testutil::*;

const MIB: u64 = 1 << 20;

fn module(t: &mut Harness, s: u64, c: u64) -> u64 {
    let image = PTX.as_bytes();
    t.handle(
        s,
        c,
        Request::ModuleLoad(
            ModuleLoadReq {
                image_len: (image.len() as u64).into(),
                kind: image::PTX.into(),
                _pad: 0.into(),
            },
            image,
        ),
    )
}

fn symbol(module: u64, name: &str) -> ModuleSymbolReq {
    ModuleSymbolReq {
        module: module.into(),
        name_len: (name.len() as u32).into(),
        _pad: 0.into(),
    }
}

fn launch(function: u64, stream: u64, param_bytes: usize) -> LaunchReq {
    LaunchReq {
        function: function.into(),
        stream: stream.into(),
        grid: [1.into(), 1.into(), 1.into()],
        block: [32.into(), 1.into(), 1.into()],
        shared_mem: 0.into(),
        param_bytes: (param_bytes as u32).into(),
    }
}

#[test]
fn session_open_with_wrong_version_returns_not_supported() {
    let mut t = Harness::new(MIB);
    let req = Request::SessionOpen(SessionOpenReq {
        pid: 1.into(),
        version: 99.into(),
    });
    assert_eq!(t.status(0, 0, req), Status::NOT_SUPPORTED);
}

#[test]
fn session_ids_are_not_reused_and_the_limit_is_enforced() {
    let mut t = Harness::new(MIB);
    let first = t.open();
    assert_eq!(t.status(first, 0, Request::SessionClose), Status::SUCCESS);
    let mut ids = vec![];
    for _ in 0..64 {
        ids.push(t.open());
    }
    assert!(!ids.contains(&first));
    let req = Request::SessionOpen(SessionOpenReq {
        pid: 1.into(),
        version: vgpu_spec::PROTOCOL_VERSION.into(),
    });
    assert_eq!(t.status(0, 0, req), Status::DEVICE_UNAVAILABLE);
    assert_eq!(
        t.status(first, 0, Request::SessionClose),
        Status::INVALID_HANDLE
    );
}

#[test]
fn unknown_session_returns_invalid_handle() {
    let mut t = Harness::new(MIB);
    assert_eq!(
        t.status(12345, 0, Request::MemGetInfo),
        Status::INVALID_HANDLE
    );
    assert_eq!(
        t.status(12345, 0, Request::CtxCreate(CtxCreateReq::default())),
        Status::INVALID_HANDLE
    );
}

#[test]
fn opcodes_on_the_wrong_queue_return_invalid_value() {
    let mut t = Harness::new(MIB);
    let s = t.open();
    let out = t.raw(
        SUBMISSION_QUEUE,
        &encode(&Request::GetDeviceInfo, 0, 0, 0, 5),
    );
    let resp = Response::decode(&out).unwrap();
    assert_eq!(resp.status(), Status::INVALID_VALUE);
    assert_eq!(resp.header.request_id.get(), 5);
    let out = t.raw(CONTROL_QUEUE, &encode(&Request::MemGetInfo, s, 0, 0, 6));
    assert_eq!(
        Response::decode(&out).unwrap().status(),
        Status::INVALID_VALUE
    );
    let out = t.raw(
        vgpu_spec::EVENT_QUEUE,
        &encode(&Request::MemGetInfo, s, 0, 0, 7),
    );
    assert_eq!(
        Response::decode(&out).unwrap().status(),
        Status::INVALID_VALUE
    );
}

#[test]
fn undecodable_requests_get_the_decoder_status_and_their_request_id() {
    let mut t = Harness::new(MIB);
    let mut bytes = encode(&Request::MemGetInfo, 1, 0, 0, 77);
    bytes.push(0);
    let resp_bytes = t.raw(SUBMISSION_QUEUE, &bytes);
    let resp = Response::decode(&resp_bytes).unwrap();
    assert_eq!(resp.status(), Status::INVALID_VALUE);
    assert_eq!(resp.header.request_id.get(), 77);
    bytes.truncate(32);
    bytes[0..4].copy_from_slice(&0x7777u32.to_le_bytes());
    let resp_bytes = t.raw(SUBMISSION_QUEUE, &bytes);
    assert_eq!(
        Response::decode(&resp_bytes).unwrap().status(),
        Status::NOT_SUPPORTED
    );
    let resp_bytes = t.raw(SUBMISSION_QUEUE, &[1, 2, 3]);
    let resp = Response::decode(&resp_bytes).unwrap();
    assert_eq!(resp.status(), Status::INVALID_VALUE);
    assert_eq!(resp.header.request_id.get(), 0);
}

#[test]
fn header_context_must_belong_to_the_session() {
    let mut t = Harness::new(MIB);
    let a = t.open();
    let b = t.open();
    let ca = t.context(a);
    let req = || Request::MemAlloc(MemAllocReq { size: 16.into() });
    assert_eq!(t.status(b, ca, req()), Status::INVALID_CONTEXT);
    assert_eq!(t.status(b, 0, req()), Status::INVALID_CONTEXT);
    assert_eq!(t.status(a, ca, req()), Status::SUCCESS);
}

#[test]
fn foreign_handles_from_another_session_return_invalid_handle() {
    let mut t = Harness::new(MIB);
    let a = t.open();
    let b = t.open();
    let ca = t.context(a);
    let cb = t.context(b);
    let stream = t.handle(a, ca, Request::StreamCreate(StreamCreateReq::default()));
    let event = t.handle(a, ca, Request::EventCreate(EventCreateReq::default()));
    let m = module(&mut t, a, ca);
    assert_eq!(
        t.status(b, cb, Request::StreamSynchronize(h(stream))),
        Status::INVALID_HANDLE
    );
    assert_eq!(
        t.status(b, cb, Request::StreamDestroy(h(stream))),
        Status::INVALID_HANDLE
    );
    assert_eq!(
        t.status(b, cb, Request::EventQuery(h(event))),
        Status::INVALID_HANDLE
    );
    assert_eq!(
        t.status(b, cb, Request::ModuleUnload(h(m))),
        Status::INVALID_HANDLE
    );
    assert_eq!(
        t.status(b, cb, Request::GetFunction(symbol(m, "saxpy"), b"saxpy")),
        Status::INVALID_HANDLE
    );
    assert_eq!(
        t.status(b, 0, Request::CtxDestroy(h(ca))),
        Status::INVALID_CONTEXT
    );
    // The owner still can use them.
    assert_eq!(
        t.status(a, ca, Request::StreamSynchronize(h(stream))),
        Status::SUCCESS
    );
    assert_eq!(
        t.status(a, ca, Request::EventQuery(h(event))),
        Status::SUCCESS
    );
}

#[test]
fn foreign_device_pointers_return_invalid_value() {
    let mut t = Harness::new(MIB);
    let a = t.open();
    let b = t.open();
    let ca = t.context(a);
    let cb = t.context(b);
    let p = t.alloc(a, ca, 256);
    assert_eq!(
        t.status(b, cb, Request::MemFree(h(p))),
        Status::INVALID_VALUE
    );
    let segs = [sg(0x1000, 16)];
    assert_eq!(
        t.status(b, cb, Request::MemcpyHtoD(copy(p, 0, &segs), &segs)),
        Status::INVALID_VALUE
    );
}

#[test]
fn destroyed_handles_are_stale() {
    let mut t = Harness::new(MIB);
    let s = t.open();
    let c = t.context(s);
    let stream = t.handle(s, c, Request::StreamCreate(StreamCreateReq::default()));
    let event = t.handle(s, c, Request::EventCreate(EventCreateReq::default()));
    assert_eq!(
        t.status(s, c, Request::StreamDestroy(h(stream))),
        Status::SUCCESS
    );
    assert_eq!(
        t.status(s, c, Request::EventDestroy(h(event))),
        Status::SUCCESS
    );
    assert_eq!(
        t.status(s, c, Request::StreamQuery(h(stream))),
        Status::INVALID_HANDLE
    );
    assert_eq!(
        t.status(s, c, Request::EventSynchronize(h(event))),
        Status::INVALID_HANDLE
    );
    // A new object never gets the old handle.
    let again = t.handle(s, c, Request::StreamCreate(StreamCreateReq::default()));
    assert_ne!(again, stream);
    assert_eq!(t.status(s, c, Request::CtxDestroy(h(c))), Status::SUCCESS);
    assert_eq!(
        t.status(s, c, Request::StreamQuery(h(again))),
        Status::INVALID_CONTEXT
    );
    let c2 = t.context(s);
    assert_eq!(
        t.status(s, c2, Request::StreamQuery(h(again))),
        Status::INVALID_HANDLE
    );
    assert_eq!(
        t.status(s, 0, Request::CtxDestroy(h(c))),
        Status::INVALID_CONTEXT
    );
}

#[test]
fn context_destroy_frees_its_allocations_and_accounting() {
    let mut t = Harness::new(MIB);
    let s = t.open();
    let c1 = t.context(s);
    let c2 = t.context(s);
    let p1 = t.alloc(s, c1, 1000);
    let _p2 = t.alloc(s, c2, 24);
    assert_eq!(t.slice().used(), 1024);
    assert_eq!(t.status(s, c2, Request::CtxDestroy(h(c1))), Status::SUCCESS);
    assert_eq!(t.slice().used(), 24);
    assert_eq!(
        t.status(s, c2, Request::MemFree(h(p1))),
        Status::INVALID_VALUE
    );
    let session = t.conn.session(s).unwrap();
    assert_eq!(session.allocated_bytes(), 24);
    assert_eq!(session.context_count(), 1);
}

#[test]
fn session_close_frees_everything_it_held() {
    let mut t = Harness::new(MIB);
    let s = t.open();
    let c = t.context(s);
    t.alloc(s, c, 4096);
    module(&mut t, s, c);
    assert_eq!(t.slice().used(), 4096);
    assert_eq!(t.status(s, 0, Request::SessionClose), Status::SUCCESS);
    assert_eq!(t.slice().used(), 0);
    assert_eq!(t.conn.session_count(), 0);
    assert_eq!(
        t.status(s, c, Request::CtxSynchronize),
        Status::INVALID_HANDLE
    );
}

#[test]
fn allocation_respects_the_slice_limit_and_mem_get_info_sees_all_sessions() {
    let mut t = Harness::new(MIB);
    let a = t.open();
    let b = t.open();
    let ca = t.context(a);
    let cb = t.context(b);
    let zero = Request::MemAlloc(MemAllocReq { size: 0.into() });
    assert_eq!(t.status(a, ca, zero), Status::INVALID_VALUE);
    let pa = t.alloc(a, ca, 600 * 1024);
    let big = Request::MemAlloc(MemAllocReq {
        size: (500 * 1024).into(),
    });
    assert_eq!(t.status(b, cb, big), Status::OUT_OF_MEMORY);
    t.alloc(b, cb, 100 * 1024);
    let (status, body) = t.call(b, cb, Request::MemGetInfo);
    assert_eq!(status, Status::SUCCESS);
    let info = MemInfoResp::read_from_bytes(&body).unwrap();
    assert_eq!(info.total.get(), MIB);
    assert_eq!(info.free.get(), MIB - 700 * 1024);
    assert_eq!(
        t.status(a, ca, Request::MemFree(h(pa + 1))),
        Status::INVALID_VALUE
    );
    assert_eq!(t.status(a, ca, Request::MemFree(h(pa))), Status::SUCCESS);
    assert_eq!(
        t.status(a, ca, Request::MemFree(h(pa))),
        Status::INVALID_VALUE
    );
    assert_eq!(t.slice().used(), 100 * 1024);
}

#[test]
fn host_copies_round_trip_through_guest_memory() {
    let mut t = Harness::new(MIB);
    let s = t.open();
    let c = t.context(s);
    let p = t.alloc(s, c, 64);
    let data: Vec<u8> = (0..48u8).collect();
    t.mem
        .write_slice(&data[..32], GuestAddress(0x1000))
        .unwrap();
    t.mem
        .write_slice(&data[32..], GuestAddress(GUEST_HIGH))
        .unwrap();
    let src = [sg(0x1000, 32), sg(GUEST_HIGH, 16)];
    let st = t.call_flags(
        s,
        c,
        FLAG_ASYNC | FLAG_TRANSIENT_SOURCE,
        Request::MemcpyHtoD(copy(p + 8, 0, &src), &src),
    );
    assert_eq!(st.0, Status::SUCCESS);
    let dst = [sg(0x8000, 48)];
    assert_eq!(
        t.status(s, c, Request::MemcpyDtoH(copy(p + 8, 0, &dst), &dst)),
        Status::SUCCESS
    );
    let mut back = vec![0u8; 48];
    t.mem.read_slice(&mut back, GuestAddress(0x8000)).unwrap();
    assert_eq!(back, data);
    // Memset and device-to-device copies stay inside the allocation.
    let set = MemsetReq {
        dst: p.into(),
        value: 0xab.into(),
        elem_size: 1.into(),
        count: 8.into(),
        stream: 0.into(),
    };
    assert_eq!(t.status(s, c, Request::Memset(set)), Status::SUCCESS);
    let d2d = MemcpyDtoDReq {
        dst: (p + 56).into(),
        src: p.into(),
        size: 8.into(),
        stream: 0.into(),
    };
    assert_eq!(t.status(s, c, Request::MemcpyDtoD(d2d)), Status::SUCCESS);
    let all = [sg(0x9000, 64)];
    assert_eq!(
        t.status(s, c, Request::MemcpyDtoH(copy(p, 0, &all), &all)),
        Status::SUCCESS
    );
    let mut back = vec![0u8; 64];
    t.mem.read_slice(&mut back, GuestAddress(0x9000)).unwrap();
    assert_eq!(&back[..8], &[0xab; 8]);
    assert_eq!(&back[56..], &[0xab; 8]);
}

#[test]
fn copies_outside_an_allocation_or_guest_memory_return_invalid_value() {
    let mut t = Harness::new(MIB);
    let s = t.open();
    let c = t.context(s);
    let p = t.alloc(s, c, 64);
    let cases: Vec<Vec<SgEntry>> = vec![
        vec![sg(0x1000, 65)],                 // past the allocation end
        vec![sg(GUEST_RAM - 8, 16)],          // crosses out of guest RAM
        vec![sg(GUEST_RAM + 0x1000, 8)],      // in the hole between regions
        vec![sg(GUEST_HIGH + (64 << 10), 1)], // after the last region
        vec![sg(0, 8), sg(u64::MAX - 3, 4)],  // wraps around
    ];
    for segs in &cases {
        assert_eq!(
            t.status(s, c, Request::MemcpyHtoD(copy(p, 0, segs), segs)),
            Status::INVALID_VALUE,
            "{segs:?}"
        );
        assert_eq!(
            t.status(s, c, Request::MemcpyDtoH(copy(p, 0, segs), segs)),
            Status::INVALID_VALUE,
            "{segs:?}"
        );
    }
    let set = MemsetReq {
        dst: (p + 60).into(),
        value: 0.into(),
        elem_size: 4.into(),
        count: 2.into(),
        stream: 0.into(),
    };
    assert_eq!(t.status(s, c, Request::Memset(set)), Status::INVALID_VALUE);
    let d2d = MemcpyDtoDReq {
        dst: p.into(),
        src: (p + 32).into(),
        size: 33.into(),
        stream: 0.into(),
    };
    assert_eq!(
        t.status(s, c, Request::MemcpyDtoD(d2d)),
        Status::INVALID_VALUE
    );
}

#[test]
fn copies_on_a_stream_of_another_context_return_invalid_handle() {
    let mut t = Harness::new(MIB);
    let s = t.open();
    let c1 = t.context(s);
    let c2 = t.context(s);
    let p = t.alloc(s, c1, 64);
    let other = t.handle(s, c2, Request::StreamCreate(StreamCreateReq::default()));
    let segs = [sg(0x1000, 8)];
    assert_eq!(
        t.status(s, c1, Request::MemcpyHtoD(copy(p, other, &segs), &segs)),
        Status::INVALID_HANDLE
    );
    let own = t.handle(s, c1, Request::StreamCreate(StreamCreateReq::default()));
    assert_eq!(
        t.status(s, c1, Request::MemcpyHtoD(copy(p, own, &segs), &segs)),
        Status::SUCCESS
    );
}

#[test]
fn functions_carry_their_layout_and_launches_check_the_parameter_size() {
    let mut t = Harness::new(MIB);
    let s = t.open();
    let c = t.context(s);
    let m = module(&mut t, s, c);
    let (status, body) = t.call(s, c, Request::GetFunction(symbol(m, "saxpy"), b"saxpy"));
    assert_eq!(status, Status::SUCCESS);
    let resp = Response {
        header: RespHeader::default(),
        body: &body,
    };
    let (f, rest) = resp.fixed::<FunctionResp>().unwrap();
    assert_eq!(f.param_count.get(), 4);
    assert_eq!(f.param_bytes.get(), 24);
    let params = Response::array::<ParamInfo>(rest, 4).unwrap();
    assert_eq!(params[2].offset.get(), 16);
    let function = f.function.get();
    // Looking it up again gives the same handle.
    let (_, again) = t.call(s, c, Request::GetFunction(symbol(m, "saxpy"), b"saxpy"));
    assert_eq!(&again[..8], function.as_bytes());
    assert_eq!(
        t.status(s, c, Request::GetFunction(symbol(m, "nope"), b"nope")),
        Status::NOT_FOUND
    );
    let short = [0u8; 16];
    assert_eq!(
        t.status(s, c, Request::Launch(launch(function, 0, 16), &short)),
        Status::INVALID_VALUE
    );
    let ok = [0u8; 24];
    assert_eq!(
        t.status(s, c, Request::Launch(launch(function, 0, 24), &ok)),
        Status::SUCCESS
    );
    assert_eq!(
        t.status(
            s,
            c,
            Request::Launch(launch(function + 999_999, 0, 24), &ok)
        ),
        Status::INVALID_HANDLE
    );
    assert_eq!(t.status(s, c, Request::ModuleUnload(h(m))), Status::SUCCESS);
    assert_eq!(
        t.status(s, c, Request::Launch(launch(function, 0, 24), &ok)),
        Status::INVALID_HANDLE
    );
}

#[test]
fn cooperative_launches_are_validated_against_what_fits_on_the_device_at_once() {
    let mut t = Harness::new(MIB);
    let s = t.open();
    let c = t.context(s);
    let m = module(&mut t, s, c);
    let (_, body) = t.call(s, c, Request::GetFunction(symbol(m, "saxpy"), b"saxpy"));
    let function = u64::from_le_bytes(body[..8].try_into().unwrap());
    let params = [0u8; 24];
    let mut req = launch(function, 0, 24);
    req.grid = [132.into(), 1.into(), 1.into()];
    let coop = |t: &mut Harness, req: LaunchReq| {
        t.call_flags(s, c, FLAG_COOPERATIVE, Request::Launch(req, &params))
            .0
    };
    assert_eq!(coop(&mut t, req), Status::SUCCESS);
    // 32 threads per block: at most 32 blocks on each of 132 SMs.
    req.grid = [132 * 32 + 1, 1, 1].map(Into::into);
    assert_eq!(coop(&mut t, req), Status::COOPERATIVE_LAUNCH_TOO_LARGE);
    assert_eq!(
        t.status(s, c, Request::Launch(req, &params)),
        Status::SUCCESS,
        "the same grid launches without the flag"
    );
}

#[test]
fn module_globals_are_copyable_until_unload() {
    let mut t = Harness::new(MIB);
    let s = t.open();
    let c = t.context(s);
    let m = module(&mut t, s, c);
    let (status, body) = t.call(s, c, Request::GetGlobal(symbol(m, "gdata"), b"gdata"));
    assert_eq!(status, Status::SUCCESS);
    let g = GlobalResp::read_from_bytes(&body).unwrap();
    assert_eq!(g.size.get(), 64);
    let segs = [sg(0x1000, 64)];
    let req = || Request::MemcpyHtoD(copy(g.dptr.get(), 0, &segs), &segs);
    assert_eq!(t.status(s, c, req()), Status::SUCCESS);
    // Globals are not charged to the slice, and cannot be freed.
    assert_eq!(t.slice().used(), 0);
    assert_eq!(
        t.status(s, c, Request::MemFree(h(g.dptr.get()))),
        Status::INVALID_VALUE
    );
    assert_eq!(t.status(s, c, Request::ModuleUnload(h(m))), Status::SUCCESS);
    assert_eq!(t.status(s, c, req()), Status::INVALID_VALUE);
}

#[test]
fn device_info_reports_the_slice_limit_and_identity_attributes() {
    let mut t = Harness::new(MIB);
    let (status, body) = t.call(0, 0, Request::GetDeviceInfo);
    assert_eq!(status, Status::SUCCESS);
    let resp = Response {
        header: RespHeader::default(),
        body: &body,
    };
    let (info, rest) = resp.fixed::<DeviceInfoResp>().unwrap();
    assert_eq!(info.total_mem.get(), MIB);
    assert_eq!(info.driver_version.get(), 13000);
    assert_eq!(info.attr_count.get(), vgpu_spec::DEVICE_ATTRIBUTE_SLOTS);
    let attrs = Response::array::<zerocopy::little_endian::I32>(rest, 160).unwrap();
    assert_eq!(attrs[75].get(), 9);
    assert_eq!(attrs[76].get(), 0);
    assert_eq!(attrs[16].get(), 132);
}

#[test]
fn events_time_work_and_must_share_a_context() {
    let mut t = Harness::new(MIB);
    let s = t.open();
    let c1 = t.context(s);
    let c2 = t.context(s);
    let e1 = t.handle(s, c1, Request::EventCreate(EventCreateReq::default()));
    let e2 = t.handle(s, c1, Request::EventCreate(EventCreateReq::default()));
    let e3 = t.handle(s, c2, Request::EventCreate(EventCreateReq::default()));
    let rec = |e: u64| {
        Request::EventRecord(EventRecordReq {
            event: e.into(),
            stream: 0.into(),
        })
    };
    assert_eq!(t.status(s, c1, rec(e1)), Status::SUCCESS);
    assert_eq!(t.status(s, c1, rec(e2)), Status::SUCCESS);
    let elapsed = |a: u64, b: u64| {
        Request::EventElapsed(EventElapsedReq {
            start: a.into(),
            end: b.into(),
        })
    };
    let (status, body) = t.call(s, c1, elapsed(e1, e2));
    assert_eq!(status, Status::SUCCESS);
    let ms = f32::from_bits(
        ElapsedResp::read_from_bytes(&body)
            .unwrap()
            .millis_bits
            .get(),
    );
    assert!(ms >= 0.0);
    assert_eq!(t.status(s, c1, elapsed(e1, e3)), Status::INVALID_HANDLE);
    let wait = StreamWaitEventReq {
        stream: 0.into(),
        event: e3.into(),
        flags: 0.into(),
        _pad: 0.into(),
    };
    assert_eq!(
        t.status(s, c1, Request::StreamWaitEvent(wait)),
        Status::INVALID_HANDLE
    );
    assert_eq!(
        t.status(s, c2, Request::StreamWaitEvent(wait)),
        Status::SUCCESS
    );
}
