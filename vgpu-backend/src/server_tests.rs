//! In-process end-to-end tests: a backend on a thread, real vhost-user
//! frontends (vhost's `Frontend` plus a minimal split-ring driver over a
//! shared file mapping), several connections at once, and cleanup on
//! disconnect and stop.

use std::fs::OpenOptions;
use std::path::PathBuf;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use vgpu_spec::wire::*;
use vgpu_spec::{Request, Response, Status, VgpuConfig, CONTROL_QUEUE, SUBMISSION_QUEUE};
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;
use zerocopy::FromBytes;

use super::*;
use crate::testutil::{copy, encode, sg};

const QSIZE: u16 = 16;
const MEM_BYTES: usize = 1 << 20;
const REQ_GPA: u64 = 0x8000;
const RESP_GPA: u64 = 0xc000;
const DATA_GPA: u64 = 0x20000;
const MIB: u64 = 1 << 20;

fn socket_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "vgpu-backend-test-{}-{name}.sock",
        std::process::id()
    ))
}

/// Polls `cond` until it holds or ten seconds pass.
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A split ring driven by hand: one request in flight at a time.
struct Ring {
    base: u64,
    kick: EventFd,
    call: EventFd,
    avail_idx: u16,
    used_idx: u16,
}

impl Ring {
    fn avail(&self) -> u64 {
        self.base + 16 * u64::from(QSIZE)
    }
    fn used(&self) -> u64 {
        (self.avail() + 4 + 2 * u64::from(QSIZE) + 2 + 3) & !3
    }
}

/// A frontend: vhost-user connection, shared memory and two rings.
struct TestFrontend {
    fe: Frontend,
    mem: crate::guest::GuestMemoryMmap,
    rings: Vec<Ring>,
    next_id: u64,
}

impl TestFrontend {
    fn connect(path: &std::path::Path, name: &str) -> TestFrontend {
        let file_path =
            std::env::temp_dir().join(format!("vgpu-mem-{}-{name}", std::process::id()));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&file_path)
            .unwrap();
        std::fs::remove_file(&file_path).unwrap();
        file.set_len(MEM_BYTES as u64).unwrap();
        let mem = crate::guest::GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            MEM_BYTES,
            Some(FileOffset::new(file, 0)),
        )])
        .unwrap();
        let mut fe = Frontend::connect(path, vgpu_spec::NUM_QUEUES as u64).unwrap();
        fe.set_owner().unwrap();
        let features = fe.get_features().unwrap();
        fe.set_features(features).unwrap();
        let proto = fe.get_protocol_features().unwrap();
        assert!(!proto.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD));
        fe.set_protocol_features(
            VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
                | VhostUserProtocolFeatures::REPLY_ACK,
        )
        .unwrap();
        let region = mem.iter().next().unwrap();
        let info = VhostUserMemoryRegionInfo::from_guest_region(region).unwrap();
        fe.set_mem_table(&[info]).unwrap();
        let host = region.as_ptr() as u64;
        let mut rings = Vec::new();
        for q in 0..2u16 {
            let ring = Ring {
                base: u64::from(q) * 0x1000,
                kick: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
                call: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
                avail_idx: 0,
                used_idx: 0,
            };
            let q = usize::from(q);
            fe.set_vring_num(q, QSIZE).unwrap();
            let config = VringConfigData {
                queue_max_size: QSIZE,
                queue_size: QSIZE,
                flags: 0,
                desc_table_addr: host + ring.base,
                used_ring_addr: host + ring.used(),
                avail_ring_addr: host + ring.avail(),
                log_addr: None,
            };
            fe.set_vring_addr(q, &config).unwrap();
            fe.set_vring_base(q, 0).unwrap();
            fe.set_vring_call(q, &ring.call).unwrap();
            fe.set_vring_kick(q, &ring.kick).unwrap();
            fe.set_vring_enable(q, true).unwrap();
            rings.push(ring);
        }
        TestFrontend {
            fe,
            mem,
            rings,
            next_id: 1,
        }
    }

    fn config(&mut self) -> VgpuConfig {
        let size = vgpu_spec::CONFIG_SPACE_SIZE as u32;
        let (_, payload) = self
            .fe
            .get_config(
                0,
                size,
                VhostUserConfigFlags::WRITABLE,
                &vec![0u8; size as usize],
            )
            .unwrap();
        VgpuConfig::read_from_bytes(&payload).unwrap()
    }

    /// Sends one request and waits for its response: (status, body).
    fn call(&mut self, session: u64, context: u64, req: Request<'_>) -> (Status, Vec<u8>) {
        let queue = if op::is_control(req.opcode()) {
            CONTROL_QUEUE
        } else {
            SUBMISSION_QUEUE
        };
        let id = self.next_id;
        self.next_id += 1;
        let bytes = encode(&req, session, context, 0, id);
        self.mem.write_slice(&bytes, GuestAddress(REQ_GPA)).unwrap();
        let ring = &mut self.rings[usize::from(queue)];
        let desc = |i: u64, addr: u64, len: u32, flags: u16, next: u16| {
            let at = GuestAddress(ring.base + 16 * i);
            self.mem.write_obj(addr, at).unwrap();
            self.mem.write_obj(len, GuestAddress(at.0 + 8)).unwrap();
            self.mem.write_obj(flags, GuestAddress(at.0 + 12)).unwrap();
            self.mem.write_obj(next, GuestAddress(at.0 + 14)).unwrap();
        };
        desc(0, REQ_GPA, bytes.len() as u32, 1, 1);
        desc(1, RESP_GPA, 4096, 2, 0);
        let slot = ring.avail() + 4 + 2 * u64::from(ring.avail_idx % QSIZE);
        self.mem.write_obj(0u16, GuestAddress(slot)).unwrap();
        fence(Ordering::SeqCst);
        ring.avail_idx = ring.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(ring.avail_idx, GuestAddress(ring.avail() + 2))
            .unwrap();
        fence(Ordering::SeqCst);
        ring.kick.write(1).unwrap();
        let used_idx_at = GuestAddress(ring.used() + 2);
        let want = ring.used_idx.wrapping_add(1);
        let mem = &self.mem;
        wait_for("a used entry", || {
            fence(Ordering::SeqCst);
            mem.read_obj::<u16>(used_idx_at).unwrap() == want
        });
        let elem = ring.used() + 4 + 8 * u64::from(ring.used_idx % QSIZE);
        ring.used_idx = want;
        let len: u32 = self.mem.read_obj(GuestAddress(elem + 4)).unwrap();
        let _ = ring.call.read();
        let mut out = vec![0u8; len as usize];
        self.mem
            .read_slice(&mut out, GuestAddress(RESP_GPA))
            .unwrap();
        let resp = Response::decode(&out).unwrap();
        assert_eq!(resp.header.request_id.get(), id);
        (resp.status(), resp.body.to_vec())
    }

    fn handle(&mut self, session: u64, context: u64, req: Request<'_>) -> u64 {
        let (status, body) = self.call(session, context, req);
        assert_eq!(status, Status::SUCCESS);
        u64::from_le_bytes(body[..8].try_into().unwrap())
    }

    fn session_with_context(&mut self) -> (u64, u64) {
        let s = self.handle(
            0,
            0,
            Request::SessionOpen(SessionOpenReq {
                pid: 7.into(),
                version: vgpu_spec::PROTOCOL_VERSION.into(),
            }),
        );
        let c = self.handle(s, 0, Request::CtxCreate(CtxCreateReq::default()));
        (s, c)
    }

    fn free_memory(&mut self, s: u64, c: u64) -> u64 {
        let (status, body) = self.call(s, c, Request::MemGetInfo);
        assert_eq!(status, Status::SUCCESS);
        MemInfoResp::read_from_bytes(&body).unwrap().free.get()
    }
}

fn alloc(size: u64) -> Request<'static> {
    Request::MemAlloc(MemAllocReq { size: size.into() })
}

#[test]
fn concurrent_frontends_share_the_slice_and_disconnects_free_their_memory() {
    let path = socket_path("concurrent");
    let config = BackendConfig::new(&path, DeviceSpec::Emulated)
        .slice_name("e2e")
        .memory_limit(64 * MIB);
    let running = Backend::new(config).unwrap().spawn().unwrap();
    wait_for("the socket", || path.exists());

    let mut a = TestFrontend::connect(&path, "a");
    let mut b = TestFrontend::connect(&path, "b");
    let cfg = a.config();
    assert!(cfg.is_valid());
    assert_eq!(cfg.memory_limit.get(), 64 * MIB);
    assert_eq!(cfg.slice_name(), "e2e");
    wait_for("two connections", || running.connection_count() == 2);

    let (sa, ca) = a.session_with_context();
    let (sb, cb) = b.session_with_context();
    let pa = a.handle(sa, ca, alloc(MIB));
    b.handle(sb, cb, alloc(2 * MIB));
    assert_eq!(b.free_memory(sb, cb), 61 * MIB);
    // Session ids are per connection; handles of one connection mean nothing
    // in the other.
    assert_eq!(b.call(sb, ca, alloc(16)).0, Status::INVALID_CONTEXT);

    // A round trip through guest memory shared with the backend.
    let data: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
    a.mem.write_slice(&data, GuestAddress(DATA_GPA)).unwrap();
    let src = [sg(DATA_GPA, 4096)];
    assert_eq!(
        a.call(sa, ca, Request::MemcpyHtoD(copy(pa, 0, &src), &src))
            .0,
        Status::SUCCESS
    );
    let dst = [sg(DATA_GPA + 0x2000, 1000), sg(DATA_GPA + 0x4000, 3096)];
    assert_eq!(
        a.call(sa, ca, Request::MemcpyDtoH(copy(pa, 0, &dst), &dst))
            .0,
        Status::SUCCESS
    );
    let mut back = vec![0u8; 4096];
    a.mem
        .read_slice(&mut back[..1000], GuestAddress(DATA_GPA + 0x2000))
        .unwrap();
    a.mem
        .read_slice(&mut back[1000..], GuestAddress(DATA_GPA + 0x4000))
        .unwrap();
    assert_eq!(back, data);
    // A guest range outside the shared memory is refused.
    let outside = [sg(MEM_BYTES as u64 - 8, 16)];
    assert_eq!(
        a.call(sa, ca, Request::MemcpyHtoD(copy(pa, 0, &outside), &outside))
            .0,
        Status::INVALID_VALUE
    );

    // A disconnects without closing anything: its megabyte comes back.
    drop(a);
    wait_for("A's cleanup", || {
        running.connection_count() == 1 && running.slice().used() == 2 * MIB
    });
    assert_eq!(b.free_memory(sb, cb), 62 * MIB);

    // Stopping disconnects B and frees the rest.
    running.stop().unwrap();
    assert!(!path.exists(), "the socket file is removed on stop");
    drop(b);
}

#[test]
fn stale_socket_files_are_replaced_and_stop_frees_connected_clients() {
    let path = socket_path("stale");
    std::fs::write(&path, b"stale").unwrap();
    let backend = Backend::new(BackendConfig::new(&path, DeviceSpec::Emulated)).unwrap();
    assert_eq!(
        backend.config_space().memory_limit.get(),
        crate::config::DEFAULT_EMULATED_MEMORY
    );
    let slice = backend.slice();
    let running = backend.spawn().unwrap();
    let mut f = TestFrontend::connect(&path, "stale");
    let (s, c) = f.session_with_context();
    f.handle(s, c, alloc(MIB));
    assert_eq!(slice.used(), MIB);
    running.stop().unwrap();
    assert_eq!(slice.used(), 0);
}

#[test]
fn bad_memory_limits_are_refused_and_oversized_ones_clamped() {
    let path = socket_path("limits");
    let mut config = BackendConfig::new(&path, DeviceSpec::Emulated);
    config.emulated_memory = Some(MIB);
    config.memory_limit = Some(2 * MIB);
    let backend = Backend::new(config.clone()).unwrap();
    assert_eq!(backend.slice().limit(), MIB);
    drop(backend);
    config.memory_limit = Some(0);
    assert!(matches!(
        Backend::new(config.clone()),
        Err(Error::MemoryLimit { .. })
    ));
    config.memory_limit = None;
    config.max_queue_size = 2048;
    assert!(matches!(Backend::new(config), Err(Error::QueueSize(2048))));
}

#[test]
#[ignore = "needs an NVIDIA GPU: run with --ignored where one is present"]
fn cuda_device_serves_a_frontend_end_to_end() {
    let path = socket_path("cuda");
    let config = BackendConfig::new(&path, DeviceSpec::Cuda(0)).memory_limit(256 * MIB);
    let running = Backend::new(config).unwrap().spawn().unwrap();
    let mut f = TestFrontend::connect(&path, "cuda");
    let cfg = f.config();
    assert_ne!(
        cfg.capabilities.get() & vgpu_spec::config::CAP_EXECUTES_KERNELS,
        0
    );
    assert_eq!(cfg.memory_limit.get(), 256 * MIB);
    let (s, c) = f.session_with_context();
    let p = f.handle(s, c, alloc(MIB));
    assert_eq!(running.slice().used(), MIB);
    let data: Vec<u8> = (0..=255u8).cycle().take(65536).collect();
    f.mem.write_slice(&data, GuestAddress(DATA_GPA)).unwrap();
    let src = [sg(DATA_GPA, 32768), sg(DATA_GPA + 32768, 32768)];
    assert_eq!(
        f.call(s, c, Request::MemcpyHtoD(copy(p, 0, &src), &src)).0,
        Status::SUCCESS
    );
    let set = MemsetReq {
        dst: (p + 16).into(),
        value: 0xee.into(),
        elem_size: 1.into(),
        count: 16.into(),
        stream: 0.into(),
    };
    assert_eq!(f.call(s, c, Request::Memset(set)).0, Status::SUCCESS);
    let dst = [sg(DATA_GPA + 0x20000, 65536)];
    assert_eq!(
        f.call(s, c, Request::MemcpyDtoH(copy(p, 0, &dst), &dst)).0,
        Status::SUCCESS
    );
    let mut back = vec![0u8; 65536];
    f.mem
        .read_slice(&mut back, GuestAddress(DATA_GPA + 0x20000))
        .unwrap();
    let mut want = data.clone();
    want[16..32].fill(0xee);
    assert_eq!(back, want);
    assert_eq!(f.call(s, c, Request::CtxSynchronize).0, Status::SUCCESS);
    drop(f);
    wait_for("cleanup", || {
        running.connection_count() == 0 && running.slice().used() == 0
    });
    running.stop().unwrap();
}

#[test]
fn a_held_board_slot_holds_timed_launches_until_granted_and_counts_them() {
    use crate::gpu::timed::{TIMED_SPIN_ENTRY, TIMED_SPIN_PTX};
    use vgpu_board::{Board, Class, Grant};
    let dir = tempfile::tempdir().unwrap();
    let board_path = dir.path().join("board");
    let board = Board::create(&board_path).unwrap();
    board.slot(4).unwrap().assign(0, Class::BestEffort);
    let path = socket_path("board");
    let config = BackendConfig::new(&path, DeviceSpec::Emulated)
        .board(&board_path, 4)
        .emulated_gpu_lock(dir.path().join("gpu0.lock"))
        .max_inflight_us(500);
    let running = Backend::new(config).unwrap().spawn().unwrap();
    assert!(running.throttle().enabled());
    let slot = board.slot(4).unwrap();
    assert_eq!(slot.snapshot().pid, std::process::id());

    let mut f = TestFrontend::connect(&path, "board");
    let (s, c) = f.session_with_context();
    let image = TIMED_SPIN_PTX.as_bytes();
    let module = f.handle(
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
    );
    let name = TIMED_SPIN_ENTRY.as_bytes();
    let symbol = ModuleSymbolReq {
        module: module.into(),
        name_len: (name.len() as u32).into(),
        _pad: 0.into(),
    };
    let function = f.handle(s, c, Request::GetFunction(symbol, name));
    slot.set_grant(Grant {
        run: false,
        yield_to_lc: true,
        evict: false,
    });
    let launcher = std::thread::spawn(move || {
        let req = LaunchReq {
            function: function.into(),
            stream: 0.into(),
            grid: [1.into(), 1.into(), 1.into()],
            block: [1.into(), 1.into(), 1.into()],
            shared_mem: 0.into(),
            param_bytes: 8.into(),
        };
        let params = 2_000_000u64.to_le_bytes();
        let (status, _) = f.call(s, c, Request::Launch(req, &params));
        (status, f)
    });
    wait_for("the launch to be held", || slot.snapshot().waiting);
    board.tick();
    assert_eq!(slot.snapshot().launches, 0);
    assert!(slot.snapshot().busy);
    slot.set_grant(Grant {
        run: true,
        yield_to_lc: true,
        evict: false,
    });
    let (status, f) = launcher.join().unwrap();
    assert_eq!(status, Status::SUCCESS);
    let snap = slot.snapshot();
    assert_eq!(snap.launches, 1);
    assert!(snap.busy_ns >= 2_000_000, "busy {} ns", snap.busy_ns);
    assert!(snap.throttled_ns > 0);
    wait_for("the slot to go idle", || !slot.snapshot().busy);
    drop(f);
    running.stop().unwrap();
}
