//! The relay end to end over a real vhost-user socket: the unchanged guest
//! transport (`vgpu-transport`) connects to it, with a fake device behind.

use std::time::{Duration, Instant};

use super::*;
use crate::testutil::FakeLink;
use vgpu_spec::wire::{
    op, MemcpyHostReq, ReqHeader, SessionOpenReq, SessionOpenResp, SgEntry, FLAG_ASYNC,
};
use vgpu_spec::{Request, CONTROL_QUEUE, SUBMISSION_QUEUE};
use vgpu_transport::{Device, Options, Staging, PINNED_BASE_GPA};
use vm_memory::GuestMemoryRegion;
use zerocopy::FromBytes;

struct Served {
    link: Arc<FakeLink>,
    stats: Arc<Stats>,
    stop: StopHandle,
    dir: PathBuf,
    socket: PathBuf,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.stop.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A relay on a fresh socket; pinned regions (at or above the transport's
/// pinned base) count as huge-page memory (with 4 KiB "huge" pages: the
/// real classifier only accepts mappings aligned to their page size).
fn serve(name: &str) -> Served {
    let dir = std::env::temp_dir().join(format!("vgpu-guestd-relay-{}-{name}", std::process::id()));
    let socket = dir.join("vgpu0.sock");
    let link = FakeLink::new(256, 64 << 10);
    let stats = Arc::new(Stats::default());
    let classify: Arc<Classifier> = Arc::new(|r: &vm_memory::GuestRegionMmap<()>| {
        (r.start_addr().0 >= PINNED_BASE_GPA).then_some(4096)
    });
    let relay = Relay::bind(&socket, Arc::clone(&link), Arc::clone(&stats), classify).unwrap();
    let stop = relay.stop_handle();
    std::thread::spawn(move || relay.serve());
    Served {
        link,
        stats,
        stop,
        dir,
        socket,
    }
}

fn connect(s: &Served) -> Device {
    Device::connect(&Options {
        socket: s.socket.clone(),
        guest_mem_bytes: 2 << 20,
        queue_size: 64,
    })
    .unwrap()
}

fn header(session: u64) -> ReqHeader {
    ReqHeader {
        opcode: 0.into(),
        flags: 0.into(),
        session: session.into(),
        request_id: 0.into(),
        context: 1.into(),
    }
}

fn open_session(dev: &Device) -> u64 {
    let mut body = Vec::new();
    let req = Request::SessionOpen(SessionOpenReq {
        pid: std::process::id().into(),
        version: 1.into(),
    });
    let status = dev.call(CONTROL_QUEUE, header(0), &req, &mut body).unwrap();
    assert_eq!(status, Status::SUCCESS);
    SessionOpenResp::read_from_prefix(&body)
        .unwrap()
        .0
        .session
        .get()
}

fn copy(dev: &Device, session: u64, htod: bool, dptr: u64, gpa: u64, len: u64) -> Status {
    let seg = [SgEntry {
        gpa: gpa.into(),
        len: len.into(),
    }];
    let body = MemcpyHostReq {
        device_ptr: dptr.into(),
        stream: 0.into(),
        total_len: len.into(),
        nsegs: 1.into(),
        _pad: 0.into(),
    };
    let req = if htod {
        Request::MemcpyHtoD(body, &seg)
    } else {
        Request::MemcpyDtoH(body, &seg)
    };
    let mut out = Vec::new();
    dev.call(SUBMISSION_QUEUE, header(session), &req, &mut out)
        .unwrap()
}

/// Queues an asynchronous host-to-device copy without waiting for it.
fn submit_htod(
    dev: &Device,
    session: u64,
    dptr: u64,
    (gpa, len): (u64, u64),
    staging: Option<Staging>,
) {
    let seg = [SgEntry {
        gpa: gpa.into(),
        len: len.into(),
    }];
    let body = MemcpyHostReq {
        device_ptr: dptr.into(),
        stream: 0.into(),
        total_len: len.into(),
        nsegs: 1.into(),
        _pad: 0.into(),
    };
    let mut h = header(session);
    h.flags = FLAG_ASYNC.into();
    dev.submit(
        SUBMISSION_QUEUE,
        h,
        &Request::MemcpyHtoD(body, &seg),
        staging,
    )
    .unwrap();
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn unchanged_transport_connects_and_sees_the_devices_config() {
    let s = serve("config");
    let dev = connect(&s);
    assert_eq!(dev.config().slice_name(), "fake-slice");
    assert_eq!(dev.config().memory_limit.get(), 1 << 30);
}

#[test]
fn staging_copies_are_bounced_and_pinned_copies_go_direct() {
    let s = serve("copies");
    let dev = connect(&s);
    let session = open_session(&dev);
    // Pageable path: staging in the client's ordinary guest memory.
    let mut st = dev.staging(5000).unwrap();
    for (i, b) in st.as_mut_slice().iter_mut().enumerate() {
        *b = i as u8;
    }
    assert_eq!(
        copy(&dev, session, true, 0x100, st.gpa(), 5000),
        Status::SUCCESS
    );
    st.as_mut_slice().fill(0);
    assert_eq!(
        copy(&dev, session, false, 0x100, st.gpa(), 5000),
        Status::SUCCESS
    );
    assert!(st.as_slice().iter().enumerate().all(|(i, b)| *b == i as u8));
    let snap = s.stats.snapshot();
    assert_eq!((snap.zero_copy_bytes, snap.bounced_bytes), (0, 10_000));
    // Pinned memory: the classifier calls it huge pages, so no bounce.
    let p = dev.alloc_pinned(8192).unwrap();
    let gpa = dev.translate(p, 8192).unwrap();
    // SAFETY: `p` is an 8 KiB pinned allocation of this test.
    let pinned = unsafe { std::slice::from_raw_parts_mut(p, 8192) };
    pinned.fill(0x5a);
    assert_eq!(
        copy(&dev, session, true, 0x9000, gpa, 8192),
        Status::SUCCESS
    );
    pinned.fill(0);
    assert_eq!(
        copy(&dev, session, false, 0x9000, gpa, 8192),
        Status::SUCCESS
    );
    assert!(pinned.iter().all(|b| *b == 0x5a));
    let snap = s.stats.snapshot();
    assert_eq!((snap.zero_copy_bytes, snap.bounced_bytes), (16_384, 10_000));
    dev.free_pinned(p).unwrap();
}

#[test]
fn copy_from_a_region_added_while_the_relay_is_busy_sees_the_region() {
    let s = serve("added-mid-pass");
    let dev = connect(&s);
    let session = open_session(&dev);
    // The relay's worker is held inside a copy...
    s.link.gate.hold(0x100);
    let mut st = dev.staging(64).unwrap();
    st.as_mut_slice().fill(1);
    let st_gpa = st.gpa();
    submit_htod(&dev, session, 0x100, (st_gpa, 64), Some(st));
    wait_until("the relay to be inside the first copy", || {
        s.link.gate.holding()
    });
    // ...while the client adds a region and queues a copy from it, which the
    // worker finds in the same pass once the first copy is done.
    let p = dev.alloc_pinned(4096).unwrap();
    let gpa = dev.translate(p, 4096).unwrap();
    // SAFETY: `p` is a 4 KiB pinned allocation of this test.
    unsafe { std::ptr::write_bytes(p, 0x5a, 4096) };
    submit_htod(&dev, session, 0x9000, (gpa, 4096), None);
    dev.flush().unwrap();
    s.link.gate.release();
    let mut out = Vec::new();
    let status = dev
        .call(
            SUBMISSION_QUEUE,
            header(session),
            &Request::CtxSynchronize,
            &mut out,
        )
        .unwrap();
    assert_eq!(status, Status::SUCCESS);
    assert_eq!(dev.take_async_error(), None);
    let fake = s.link.state.lock().unwrap();
    assert!((0x100..0x100 + 64).all(|a| fake.memory.get(&a) == Some(&1)));
    assert!((0x9000..0x9000 + 4096).all(|a| fake.memory.get(&a) == Some(&0x5a)));
    drop(fake);
    assert_eq!(s.stats.snapshot().zero_copy_bytes, 4096);
    dev.free_pinned(p).unwrap();
}

#[test]
fn client_that_disconnects_has_its_sessions_closed_on_the_device() {
    let s = serve("disconnect");
    let dev = connect(&s);
    let (a, b) = (open_session(&dev), open_session(&dev));
    wait_until("the client to be counted", || {
        s.stats.snapshot().clients_now == 1
    });
    drop(dev);
    wait_until("the sessions to close", || {
        s.link.state.lock().unwrap().closed.len() == 2
    });
    let st = s.link.state.lock().unwrap();
    assert_eq!(st.closed, [a, b]);
    assert!(st.open.is_empty());
    drop(st);
    wait_until("the stats to follow", || {
        let snap = s.stats.snapshot();
        snap.sessions_closed == 2 && snap.clients_now == 0
    });
}

#[test]
fn two_clients_get_separate_sessions_and_cannot_use_each_others() {
    let s = serve("two");
    let (d1, d2) = (connect(&s), connect(&s));
    let (s1, s2) = (open_session(&d1), open_session(&d2));
    assert_ne!(s1, s2);
    let mut out = Vec::new();
    let status = d2
        .call(
            SUBMISSION_QUEUE,
            header(s1),
            &Request::CtxSynchronize,
            &mut out,
        )
        .unwrap();
    assert_eq!(status, Status::INVALID_HANDLE);
    let status = d1
        .call(
            SUBMISSION_QUEUE,
            header(s1),
            &Request::CtxSynchronize,
            &mut out,
        )
        .unwrap();
    assert_eq!(status, Status::SUCCESS);
    let ops = s.link.state.lock().unwrap().opcodes.clone();
    assert_eq!(ops.iter().filter(|o| **o == op::CTX_SYNCHRONIZE).count(), 1);
}

#[test]
fn stopping_the_relay_closes_the_sessions_of_connected_clients() {
    let s = serve("stop");
    let dev = connect(&s);
    let session = open_session(&dev);
    wait_until("the client to be counted", || {
        s.stats.snapshot().clients_now == 1
    });
    assert_eq!(s.stop.close_all_sessions(), 1);
    assert_eq!(s.link.state.lock().unwrap().closed, [session]);
    // The client's session is gone: its next request is refused.
    let mut out = Vec::new();
    let status = dev
        .call(
            SUBMISSION_QUEUE,
            header(session),
            &Request::CtxSynchronize,
            &mut out,
        )
        .unwrap();
    assert_eq!(status, Status::INVALID_HANDLE);
}
