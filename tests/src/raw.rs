//! A raw vhost-user frontend for protocol tests: it speaks the vhost-user
//! control messages itself (in the order a given VMM does) and places
//! arbitrary, possibly malformed, descriptor chains on the device's rings.
//! Unlike `vgpu-transport`, it never validates what it sends.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Duration;

use vgpu_spec::request::header;
use vgpu_spec::wire::{ReqHeader, RespHeader};
use vgpu_spec::{Request, Response, Status};
use vgpu_transport::ring::{RingLayout, Segment, SplitRing};
use vgpu_transport::SharedMem;
use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;
use zerocopy::IntoBytes;

/// Guest-physical base of the raw frontend's memory.
pub const RAW_GPA: u64 = 0x8000_0000;
const MEM_BYTES: usize = 8 << 20;
const QUEUE_SIZE: u16 = 64;
/// Offset of the scratch area (after the three rings).
const SCRATCH: usize = 1 << 20;

/// The memfd that plays guest RAM (the transport's own shared mapping).
pub struct RawMemory {
    shared: SharedMem,
}

impl RawMemory {
    fn new(len: usize) -> RawMemory {
        RawMemory {
            shared: SharedMem::new(c"vgpu-raw", len).expect("guest memory memfd"),
        }
    }

    fn ptr(&self) -> *mut u8 {
        self.shared.ptr()
    }

    /// Writes `bytes` at `offset` and returns its guest-physical address.
    pub fn write(&self, offset: usize, bytes: &[u8]) -> u64 {
        assert!(offset + bytes.len() <= self.shared.len());
        // SAFETY: bounds checked above; the mapping lives as long as self.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr().add(offset), bytes.len())
        };
        RAW_GPA + offset as u64
    }

    /// Reads `len` bytes at `offset`.
    pub fn read(&self, offset: usize, len: usize) -> Vec<u8> {
        assert!(offset + len <= self.shared.len());
        let mut out = vec![0u8; len];
        // SAFETY: bounds checked above; the mapping lives as long as self.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr().add(offset), out.as_mut_ptr(), len) };
        out
    }
}

/// What one completed chain returned.
#[derive(Debug, Clone)]
pub struct Completion {
    /// Bytes the device said it wrote.
    pub used_len: u32,
    /// The writable area, as long as it was offered.
    pub written: Vec<u8>,
}

impl Completion {
    /// The response status; panics if the device wrote no header.
    pub fn status(&self) -> Status {
        let resp = Response::decode(&self.written[..self.used_len as usize])
            .expect("device wrote a response header");
        resp.status()
    }

    /// The response body after the header.
    pub fn body(&self) -> &[u8] {
        &self.written[std::mem::size_of::<RespHeader>()..self.used_len as usize]
    }
}

/// A connected raw frontend with three running queues.
pub struct RawFrontend {
    /// The vhost-user connection.
    pub frontend: Frontend,
    /// Guest memory.
    pub mem: RawMemory,
    rings: Vec<SplitRing>,
    kicks: Vec<EventFd>,
    calls: Vec<EventFd>,
    next_id: u64,
}

/// Config-space reads cloud-hypervisor may issue: (offset, size).
pub const ODD_CONFIG_READS: &[(u32, u32)] = &[
    (0, 256),
    (0, 4),
    (3, 5),
    (17, 3),
    (250, 20),
    (255, 1),
    (256, 8),
    (1000, 13),
    (4000, 96),
];

impl RawFrontend {
    /// Connects and performs cloud-hypervisor's generic vhost-user sequence:
    /// SET_OWNER, GET_FEATURES, GET/SET_PROTOCOL_FEATURES (with NEED_REPLY
    /// once REPLY_ACK is acked), GET_QUEUE_NUM, GET_CONFIG at odd offsets and
    /// sizes, SET_FEATURES, SET_MEM_TABLE, SET_VRING_NUM for every queue,
    /// then SET_VRING_ADDR/BASE/CALL/KICK per queue and SET_VRING_ENABLE.
    /// Returns the frontend and every config read (offset, size, bytes).
    pub fn connect_like_cloud_hypervisor(socket: &Path) -> (RawFrontend, Vec<(u32, u32, Vec<u8>)>) {
        let mut frontend =
            Frontend::connect(socket, vgpu_spec::NUM_QUEUES as u64).expect("connect");
        frontend.set_owner().expect("SET_OWNER");
        let backend_features = frontend.get_features().expect("GET_FEATURES");
        // What cloud-hypervisor offers: VERSION_1 | PROTOCOL_FEATURES among others.
        let avail = (1u64 << 32) | (1u64 << 30) | (1u64 << 28) | (1u64 << 29);
        let acked = avail & backend_features;
        assert!(
            acked & (1 << 30) != 0,
            "backend lacks VHOST_USER_F_PROTOCOL_FEATURES"
        );
        assert!(acked & (1 << 32) != 0, "backend lacks VIRTIO_F_VERSION_1");
        let ch_protocol = VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
            | VhostUserProtocolFeatures::LOG_SHMFD
            | VhostUserProtocolFeatures::DEVICE_STATE
            | VhostUserProtocolFeatures::BACKEND_REQ;
        let offered = frontend
            .get_protocol_features()
            .expect("GET_PROTOCOL_FEATURES");
        let acked_protocol = ch_protocol & offered;
        frontend
            .set_protocol_features(acked_protocol)
            .expect("SET_PROTOCOL_FEATURES");
        if acked_protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let queues = frontend.get_queue_num().expect("GET_QUEUE_NUM");
        assert!(
            queues >= vgpu_spec::NUM_QUEUES as u64,
            "only {queues} queues"
        );

        let mut reads = Vec::new();
        for &(offset, size) in ODD_CONFIG_READS {
            let buf = vec![0u8; size as usize];
            let (_, payload) = frontend
                .get_config(
                    offset,
                    size,
                    vhost::vhost_user::message::VhostUserConfigFlags::empty(),
                    &buf,
                )
                .unwrap_or_else(|e| panic!("GET_CONFIG({offset}, {size}): {e}"));
            reads.push((offset, size, payload));
        }

        frontend.set_features(acked).expect("SET_FEATURES");
        let mem = RawMemory::new(MEM_BYTES);
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: RAW_GPA,
            memory_size: MEM_BYTES as u64,
            userspace_addr: mem.ptr() as u64,
            mmap_offset: 0,
            mmap_handle: mem.shared.fd(),
        };
        frontend.set_mem_table(&[region]).expect("SET_MEM_TABLE");
        for q in 0..vgpu_spec::NUM_QUEUES {
            frontend
                .set_vring_num(q, QUEUE_SIZE)
                .expect("SET_VRING_NUM");
        }
        let ring_bytes = RingLayout::new(QUEUE_SIZE).expect("layout").bytes;
        let ring_stride = ring_bytes.next_multiple_of(4096);
        let mut rings = Vec::new();
        let mut kicks = Vec::new();
        let mut calls = Vec::new();
        for q in 0..vgpu_spec::NUM_QUEUES {
            let offset = q * ring_stride;
            // SAFETY: the ring area lies inside `mem` (below SCRATCH) and is
            // used by this ring only; `mem` outlives the rings (same struct,
            // dropped after them).
            let ring = unsafe {
                SplitRing::new(mem.ptr().add(offset), RAW_GPA + offset as u64, QUEUE_SIZE)
            }
            .expect("ring");
            assert!(offset + ring_bytes <= SCRATCH);
            let config = VringConfigData {
                queue_max_size: QUEUE_SIZE,
                queue_size: QUEUE_SIZE,
                flags: 0,
                desc_table_addr: ring.desc_host(),
                used_ring_addr: ring.used_host(),
                avail_ring_addr: ring.avail_host(),
                log_addr: None,
            };
            frontend.set_vring_addr(q, &config).expect("SET_VRING_ADDR");
            frontend.set_vring_base(q, 0).expect("SET_VRING_BASE");
            let call = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
            let kick = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
            frontend.set_vring_call(q, &call).expect("SET_VRING_CALL");
            frontend.set_vring_kick(q, &kick).expect("SET_VRING_KICK");
            rings.push(ring);
            kicks.push(kick);
            calls.push(call);
        }
        for q in 0..vgpu_spec::NUM_QUEUES {
            frontend
                .set_vring_enable(q, true)
                .expect("SET_VRING_ENABLE");
        }
        (
            RawFrontend {
                frontend,
                mem,
                rings,
                kicks,
                calls,
                next_id: 1,
            },
            reads,
        )
    }

    /// Places one chain of `segs` on `queue`, kicks, and waits (polling the
    /// used ring, bounded) for the device to return it. `resp_offset` and
    /// `resp_len` say where the chain's writable part is, to read back.
    pub fn chain(&mut self, queue: u16, segs: &[Segment], resp: (usize, usize)) -> Completion {
        let ring = &mut self.rings[queue as usize];
        let head = ring.add_chain(segs).expect("add chain");
        ring.publish();
        self.kicks[queue as usize].write(1).expect("kick");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let ring = &mut self.rings[queue as usize];
            if let Some(used) = ring.pop_used().expect("used ring") {
                assert_eq!(used.head, head, "device completed another chain");
                let _ = self.calls[queue as usize].read();
                return Completion {
                    used_len: used.len,
                    written: self.mem.read(resp.0, resp.1),
                };
            }
            assert!(
                std::time::Instant::now() < deadline,
                "device did not complete the chain within 10 s"
            );
            let mut pfd = libc::pollfd {
                fd: self.calls[queue as usize].as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, bounded timeout.
            unsafe { libc::poll(&mut pfd, 1, 20) };
        }
    }

    /// Sends raw request bytes as one readable descriptor plus a 64 KiB
    /// writable one, and returns the completion.
    pub fn send_bytes(&mut self, queue: u16, bytes: &[u8]) -> Completion {
        let req_off = SCRATCH;
        let resp_off = SCRATCH + (1 << 20);
        let gpa = self.mem.write(req_off, bytes);
        let resp_len = 64 << 10;
        self.mem.write(resp_off, &vec![0xEEu8; resp_len]);
        let segs = [
            Segment::readable(gpa, bytes.len() as u32),
            Segment::writable(RAW_GPA + resp_off as u64, resp_len as u32),
        ];
        self.chain(queue, &segs, (resp_off, resp_len))
    }

    /// Encodes and sends a request; the queue is chosen by opcode.
    pub fn send(
        &mut self,
        session: u64,
        context: u64,
        flags: u32,
        req: &Request<'_>,
    ) -> Completion {
        let id = self.next_id;
        self.next_id += 1;
        let mut bytes = Vec::new();
        req.encode(header(session, context, id, flags), &mut bytes);
        let queue = if vgpu_spec::wire::op::is_control(req.opcode()) {
            vgpu_spec::CONTROL_QUEUE
        } else {
            vgpu_spec::SUBMISSION_QUEUE
        };
        let done = self.send_bytes(queue, &bytes);
        let resp = Response::decode(&done.written[..done.used_len as usize]).expect("response");
        assert_eq!(
            resp.header.request_id.get(),
            id,
            "response echoes request id"
        );
        done
    }

    /// Guest memory offset usable for data buffers (2 MiB, after scratch).
    pub fn data_offset(&self) -> usize {
        SCRATCH + (2 << 20)
    }

    /// A header with arbitrary fields, for hand-made requests.
    pub fn raw_header(opcode: u32, session: u64, context: u64) -> ReqHeader {
        let mut h = header(session, context, 0xabc, 0);
        h.opcode = opcode.into();
        h
    }

    /// Header bytes of a request.
    pub fn header_bytes(h: &ReqHeader) -> Vec<u8> {
        h.as_bytes().to_vec()
    }
}
