//! The daemon over its socket, driven by a raw vhost-user frontend: the
//! message sequence cloud-hypervisor's generic vhost-user device uses, and
//! hostile requests that must each get an error while the daemon keeps
//! serving.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use vgpu_spec::wire::*;
use vgpu_spec::{Request, Response, Status, VgpuConfig};
use vgpu_tests::raw::{RawFrontend, RAW_GPA};
use vgpu_tests::{poll_until, BackendProcess};
use vgpu_transport::ring::Segment;
use zerocopy::FromBytes;

const LIMIT: u64 = 256 << 20;

const SAXPY_PTX: &str = r#"
.version 8.0
.target sm_90
.address_size 64

.visible .entry saxpy(
	.param .u64 saxpy_param_0,
	.param .u64 saxpy_param_1,
	.param .f32 saxpy_param_2,
	.param .u32 saxpy_param_3
)
{
	ret;
}
"#;

fn h(v: u64) -> HandleReq {
    HandleReq { handle: v.into() }
}

fn handle_of(done: &vgpu_tests::raw::Completion) -> u64 {
    assert_eq!(done.status(), Status::SUCCESS);
    HandleResp::read_from_prefix(done.body())
        .unwrap()
        .0
        .handle
        .get()
}

struct Tenant {
    session: u64,
    ctx: u64,
}

fn open_tenant(fe: &mut RawFrontend) -> Tenant {
    let open = fe.send(
        0,
        0,
        0,
        &Request::SessionOpen(SessionOpenReq {
            pid: std::process::id().into(),
            version: vgpu_spec::PROTOCOL_VERSION.into(),
        }),
    );
    assert_eq!(open.status(), Status::SUCCESS);
    let session = SessionOpenResp::read_from_prefix(open.body())
        .unwrap()
        .0
        .session
        .get();
    let ctx = handle_of(&fe.send(session, 0, 0, &Request::CtxCreate(CtxCreateReq::default())));
    Tenant { session, ctx }
}

fn mem_info(fe: &mut RawFrontend, t: &Tenant) -> (u64, u64) {
    let done = fe.send(t.session, t.ctx, 0, &Request::MemGetInfo);
    assert_eq!(done.status(), Status::SUCCESS);
    let info = MemInfoResp::read_from_prefix(done.body()).unwrap().0;
    (info.free.get(), info.total.get())
}

fn copy_req(dptr: u64, gpa: u64, len: u64) -> (MemcpyHostReq, [SgEntry; 1]) {
    (
        MemcpyHostReq {
            device_ptr: dptr.into(),
            stream: 0.into(),
            total_len: len.into(),
            nsegs: 1.into(),
            _pad: 0.into(),
        },
        [SgEntry {
            gpa: gpa.into(),
            len: len.into(),
        }],
    )
}

#[test]
fn cloud_hypervisor_message_sequence_is_served() {
    let backend = BackendProcess::spawn_emulated(LIMIT);
    let (mut fe, reads) = RawFrontend::connect_like_cloud_hypervisor(backend.socket());

    // GET_CONFIG: exactly the bytes asked for, zero-padded past 256.
    let full = &reads[0].2;
    assert_eq!(full.len(), 256);
    let config = VgpuConfig::read_from_bytes(full).unwrap();
    assert!(config.is_valid());
    assert_eq!(config.memory_limit.get(), LIMIT);
    assert_eq!(config.num_queues.get(), 3);
    for (offset, size, bytes) in &reads {
        assert_eq!(bytes.len(), *size as usize, "config read at {offset}");
        assert_eq!(
            *bytes,
            config.read_window(*offset, *size),
            "config read at {offset}"
        );
    }

    // Then requests on the rings the sequence set up.
    let info = fe.send(0, 0, 0, &Request::GetDeviceInfo);
    assert_eq!(info.status(), Status::SUCCESS);
    let (dev, rest) = DeviceInfoResp::read_from_prefix(info.body()).unwrap();
    assert_eq!(dev.total_mem.get(), LIMIT);
    assert_eq!(dev.attr_count.get(), vgpu_spec::DEVICE_ATTRIBUTE_SLOTS);
    assert_eq!(rest.len(), 4 * vgpu_spec::DEVICE_ATTRIBUTE_SLOTS as usize);

    let t = open_tenant(&mut fe);
    let size = 1u64 << 20;
    let dptr = handle_of(&fe.send(
        t.session,
        t.ctx,
        0,
        &Request::MemAlloc(MemAllocReq { size: size.into() }),
    ));
    assert_eq!(mem_info(&mut fe, &t), (LIMIT - size, LIMIT));

    let src_off = fe.data_offset();
    let dst_off = src_off + size as usize;
    let pattern: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
    let src_gpa = fe.mem.write(src_off, &pattern);
    let (c, s) = copy_req(dptr, src_gpa, size);
    assert_eq!(
        fe.send(t.session, t.ctx, 0, &Request::MemcpyHtoD(c, &s))
            .status(),
        Status::SUCCESS
    );
    let set = MemsetReq {
        dst: (dptr + 16).into(),
        value: 0xAB.into(),
        elem_size: 1.into(),
        count: 16.into(),
        stream: 0.into(),
    };
    assert_eq!(
        fe.send(t.session, t.ctx, FLAG_ASYNC, &Request::Memset(set))
            .status(),
        Status::SUCCESS
    );
    let dst_gpa = RAW_GPA + dst_off as u64;
    let (c, s) = copy_req(dptr, dst_gpa, size);
    assert_eq!(
        fe.send(t.session, t.ctx, 0, &Request::MemcpyDtoH(c, &s))
            .status(),
        Status::SUCCESS
    );
    let mut expect = pattern.clone();
    expect[16..32].fill(0xAB);
    assert!(
        fe.mem.read(dst_off, size as usize) == expect,
        "DtoH contents differ"
    );

    assert_eq!(
        fe.send(t.session, t.ctx, 0, &Request::MemFree(h(dptr)))
            .status(),
        Status::SUCCESS
    );
    assert_eq!(mem_info(&mut fe, &t), (LIMIT, LIMIT));
    assert_eq!(
        fe.send(t.session, 0, 0, &Request::SessionClose).status(),
        Status::SUCCESS
    );
}

#[test]
fn hostile_input_gets_error_responses_and_the_daemon_keeps_serving() {
    let backend = BackendProcess::spawn_emulated(LIMIT);
    let (mut fe, _) = RawFrontend::connect_like_cloud_hypervisor(backend.socket());
    let a = open_tenant(&mut fe);
    let b = open_tenant(&mut fe);
    let still_serving = |fe: &mut RawFrontend, t: &Tenant| {
        assert_eq!(mem_info(fe, t).1, LIMIT);
    };

    // Truncated header.
    let bytes =
        RawFrontend::header_bytes(&RawFrontend::raw_header(op::MEM_GET_INFO, a.session, a.ctx));
    let done = fe.send_bytes(vgpu_spec::SUBMISSION_QUEUE, &bytes[..20]);
    assert_eq!(done.status(), Status::INVALID_VALUE);
    still_serving(&mut fe, &a);

    // Overlong body.
    let mut bytes = Vec::new();
    Request::MemAlloc(MemAllocReq { size: 64.into() }).encode(
        vgpu_spec::request::header(a.session, a.ctx, 5, 0),
        &mut bytes,
    );
    bytes.extend_from_slice(&[0u8; 9]);
    assert_eq!(
        fe.send_bytes(vgpu_spec::SUBMISSION_QUEUE, &bytes).status(),
        Status::INVALID_VALUE
    );
    still_serving(&mut fe, &a);

    // Unknown opcode.
    let bytes = RawFrontend::header_bytes(&RawFrontend::raw_header(0x7777, a.session, a.ctx));
    assert_eq!(
        fe.send_bytes(vgpu_spec::SUBMISSION_QUEUE, &bytes).status(),
        Status::NOT_SUPPORTED
    );
    still_serving(&mut fe, &a);

    // A control opcode on the submission queue.
    let bytes = RawFrontend::header_bytes(&RawFrontend::raw_header(op::GET_DEVICE_INFO, 0, 0));
    assert_eq!(
        fe.send_bytes(vgpu_spec::SUBMISSION_QUEUE, &bytes).status(),
        Status::INVALID_VALUE
    );
    still_serving(&mut fe, &a);

    // A readable descriptor outside guest memory: an error answer or an
    // empty used entry, never a crash.
    let resp_off = fe.data_offset();
    let outside = RAW_GPA + (64 << 20);
    let done = fe.chain(
        vgpu_spec::SUBMISSION_QUEUE,
        &[
            Segment::readable(outside, 64),
            Segment::writable(RAW_GPA + resp_off as u64, 256),
        ],
        (resp_off, 256),
    );
    assert!(done.used_len == 0 || done.status() == Status::INVALID_VALUE);
    still_serving(&mut fe, &a);

    // A chain with no writable part at all.
    let gpa = fe.mem.write(
        resp_off,
        &RawFrontend::header_bytes(&RawFrontend::raw_header(op::MEM_GET_INFO, a.session, a.ctx)),
    );
    let done = fe.chain(
        vgpu_spec::SUBMISSION_QUEUE,
        &[Segment::readable(gpa, 32)],
        (resp_off, 0),
    );
    assert_eq!(done.used_len, 0);
    still_serving(&mut fe, &a);

    // A scatter-gather entry outside guest memory.
    let dptr = handle_of(&fe.send(
        a.session,
        a.ctx,
        0,
        &Request::MemAlloc(MemAllocReq { size: 4096.into() }),
    ));
    let (c, s) = copy_req(dptr, outside, 4096);
    assert_eq!(
        fe.send(a.session, a.ctx, 0, &Request::MemcpyHtoD(c, &s))
            .status(),
        Status::INVALID_VALUE
    );
    // A device range past the allocation.
    let (c, s) = copy_req(dptr + 2048, RAW_GPA + fe.data_offset() as u64, 4096);
    assert_eq!(
        fe.send(a.session, a.ctx, 0, &Request::MemcpyDtoH(c, &s))
            .status(),
        Status::INVALID_VALUE
    );
    still_serving(&mut fe, &a);

    // Foreign handles: B may not use A's context, stream or memory.
    let stream = handle_of(&fe.send(
        a.session,
        a.ctx,
        0,
        &Request::StreamCreate(StreamCreateReq::default()),
    ));
    assert_ne!(
        fe.send(
            b.session,
            a.ctx,
            0,
            &Request::MemAlloc(MemAllocReq { size: 64.into() })
        )
        .status(),
        Status::SUCCESS,
        "B used A's context"
    );
    assert_eq!(
        fe.send(b.session, b.ctx, 0, &Request::StreamSynchronize(h(stream)))
            .status(),
        Status::INVALID_HANDLE
    );
    assert_ne!(
        fe.send(b.session, b.ctx, 0, &Request::MemFree(h(dptr)))
            .status(),
        Status::SUCCESS,
        "B freed A's memory"
    );
    // An unknown session.
    assert_ne!(
        fe.send(0xdead_beef, a.ctx, 0, &Request::MemGetInfo)
            .status(),
        Status::SUCCESS
    );

    // Stale handles: after destroy and free.
    assert_eq!(
        fe.send(a.session, a.ctx, 0, &Request::StreamDestroy(h(stream)))
            .status(),
        Status::SUCCESS
    );
    assert_eq!(
        fe.send(a.session, a.ctx, 0, &Request::StreamSynchronize(h(stream)))
            .status(),
        Status::INVALID_HANDLE
    );
    assert_eq!(
        fe.send(a.session, a.ctx, 0, &Request::MemFree(h(dptr)))
            .status(),
        Status::SUCCESS
    );
    assert_ne!(
        fe.send(a.session, a.ctx, 0, &Request::MemFree(h(dptr)))
            .status(),
        Status::SUCCESS,
        "double free accepted"
    );

    // Launches with the wrong parameter size.
    let image = SAXPY_PTX.as_bytes();
    let module = handle_of(&fe.send(
        a.session,
        a.ctx,
        0,
        &Request::ModuleLoad(
            ModuleLoadReq {
                image_len: (image.len() as u64).into(),
                kind: image::PTX.into(),
                _pad: 0.into(),
            },
            image,
        ),
    ));
    let name = b"saxpy";
    let func = fe.send(
        a.session,
        a.ctx,
        0,
        &Request::GetFunction(
            ModuleSymbolReq {
                module: module.into(),
                name_len: (name.len() as u32).into(),
                _pad: 0.into(),
            },
            name,
        ),
    );
    assert_eq!(func.status(), Status::SUCCESS);
    let (f, rest) = Response::decode(&func.written[..func.used_len as usize])
        .unwrap()
        .fixed::<FunctionResp>()
        .unwrap();
    assert_eq!(f.param_count.get(), 4);
    assert_eq!(f.param_bytes.get(), 24, "u64,u64,f32,u32 packs to 24 bytes");
    let params = Response::array::<ParamInfo>(rest, 4).unwrap();
    assert_eq!(params[2].offset.get(), 16);
    assert_eq!(params[3].offset.get(), 20);
    let launch = |param_bytes: u32| LaunchReq {
        function: f.function,
        stream: 0.into(),
        grid: [1.into(), 1.into(), 1.into()],
        block: [32.into(), 1.into(), 1.into()],
        shared_mem: 0.into(),
        param_bytes: param_bytes.into(),
    };
    assert_eq!(
        fe.send(
            a.session,
            a.ctx,
            0,
            &Request::Launch(launch(16), &[0u8; 16])
        )
        .status(),
        Status::INVALID_VALUE
    );
    assert_eq!(
        fe.send(
            a.session,
            a.ctx,
            0,
            &Request::Launch(launch(32), &[0u8; 32])
        )
        .status(),
        Status::INVALID_VALUE
    );
    assert_eq!(
        fe.send(
            a.session,
            a.ctx,
            0,
            &Request::Launch(launch(24), &[0u8; 24])
        )
        .status(),
        Status::SUCCESS
    );
    still_serving(&mut fe, &a);
    still_serving(&mut fe, &b);
}

#[test]
fn disconnect_mid_work_frees_everything_and_a_new_frontend_connects() {
    let backend = BackendProcess::spawn_emulated(LIMIT);
    {
        let (mut fe, _) = RawFrontend::connect_like_cloud_hypervisor(backend.socket());
        let t = open_tenant(&mut fe);
        for _ in 0..8 {
            let dptr = handle_of(&fe.send(
                t.session,
                t.ctx,
                0,
                &Request::MemAlloc(MemAllocReq {
                    size: (8u64 << 20).into(),
                }),
            ));
            let set = MemsetReq {
                dst: dptr.into(),
                value: 1.into(),
                elem_size: 4.into(),
                count: (2u64 << 20).into(),
                stream: 0.into(),
            };
            assert_eq!(
                fe.send(t.session, t.ctx, FLAG_ASYNC, &Request::Memset(set))
                    .status(),
                Status::SUCCESS
            );
        }
        assert_eq!(mem_info(&mut fe, &t).0, LIMIT - (64 << 20));
        // The frontend goes away with its session, context and memory held.
    }
    let (mut fe, _) = RawFrontend::connect_like_cloud_hypervisor(backend.socket());
    let t = open_tenant(&mut fe);
    poll_until(
        Duration::from_secs(10),
        "memory returned to the slice",
        || (mem_info(&mut fe, &t) == (LIMIT, LIMIT)).then_some(()),
    );
}
