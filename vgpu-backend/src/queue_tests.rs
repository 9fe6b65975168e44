//! Queue processing over virtio-queue's mock split queue: well-formed and
//! malformed chains, and what the driver sees in the used ring.

use vgpu_spec::wire::{DeviceInfoResp, HandleReq};
use vgpu_spec::{Request, Response, Status, CONTROL_QUEUE, SUBMISSION_QUEUE};
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};

use super::QueueWorker;
use crate::connection::Connection;
use crate::guest::GuestMemoryMmap;
use crate::testutil::{encode, guest_memory, shared, GUEST_RAM};

const QSIZE: u16 = 16;
/// Size of a full GET_DEVICE_INFO response.
const DEVICE_INFO_BYTES: u32 = 16 + 16 + 4 * vgpu_spec::DEVICE_ATTRIBUTE_SLOTS;

/// One descriptor of a chain: guest address, length, device-writable.
#[derive(Clone, Copy)]
struct D(u64, u32, bool);

struct Rig<'a> {
    mem: &'a GuestMemoryMmap,
    mq: MockSplitQueue<'a, GuestMemoryMmap>,
    queue: Queue,
    next_desc: u16,
    used_seen: u16,
}

impl<'a> Rig<'a> {
    fn new(mem: &'a GuestMemoryMmap) -> Rig<'a> {
        let mq = MockSplitQueue::create(mem, GuestAddress(0), QSIZE);
        let queue = mq.create_queue().unwrap();
        Rig {
            mem,
            mq,
            queue,
            next_desc: 0,
            used_seen: 0,
        }
    }

    /// Publishes a chain; returns its head index.
    fn add(&mut self, parts: &[D]) -> u16 {
        let head = self.next_desc;
        let descs: Vec<RawDescriptor> = parts
            .iter()
            .enumerate()
            .map(|(i, D(addr, len, write))| {
                let last = i + 1 == parts.len();
                let mut flags = if *write { VRING_DESC_F_WRITE } else { 0 };
                if !last {
                    flags |= VRING_DESC_F_NEXT;
                }
                RawDescriptor::from(SplitDescriptor::new(
                    *addr,
                    *len,
                    flags as u16,
                    head + i as u16 + 1,
                ))
            })
            .collect();
        self.mq.add_desc_chains(&descs, head).unwrap();
        self.next_desc += parts.len() as u16;
        head
    }

    fn run(&mut self, queue: u16, conn: &mut Connection, worker: &mut QueueWorker) -> bool {
        worker
            .process(
                queue,
                &mut self.queue,
                self.mem,
                &|| std::sync::Arc::new(self.mem.clone()),
                conn,
            )
            .unwrap()
            .notify
    }

    /// The next used element: (head, len).
    fn next_used(&mut self) -> (u32, u32) {
        let idx = self.mq.used().idx().load();
        assert!(self.used_seen < idx, "no new used entry");
        let elem = self
            .mq
            .used()
            .ring()
            .ref_at(usize::from(self.used_seen % QSIZE))
            .unwrap()
            .load();
        self.used_seen += 1;
        (elem.id(), elem.len())
    }

    fn no_more_used(&self) -> bool {
        self.mq.used().idx().load() == self.used_seen
    }
}

/// Runs `f` with guest memory, a mock queue over it, a connection and a
/// worker.
fn with_rig(f: impl FnOnce(&GuestMemoryMmap, &mut Rig<'_>, &mut Connection, &mut QueueWorker)) {
    let mem = guest_memory();
    let mut rig = Rig::new(&mem);
    let mut conn = Connection::new(shared(1 << 30, 1 << 20));
    let mut worker = QueueWorker::new();
    f(&mem, &mut rig, &mut conn, &mut worker);
}

/// Reads `len` bytes spread over the writable descriptors.
fn read_across(mem: &GuestMemoryMmap, parts: &[D], len: u32) -> Vec<u8> {
    let mut out = Vec::new();
    for D(addr, dlen, write) in parts {
        if !write || out.len() as u32 >= len {
            continue;
        }
        let n = (*dlen).min(len - out.len() as u32) as usize;
        let mut buf = vec![0u8; n];
        mem.read_slice(&mut buf, GuestAddress(*addr)).unwrap();
        out.extend_from_slice(&buf);
    }
    out
}

fn put(mem: &GuestMemoryMmap, addr: u64, bytes: &[u8]) {
    mem.write_slice(bytes, GuestAddress(addr)).unwrap();
}

fn device_info_request(id: u64) -> Vec<u8> {
    encode(&Request::GetDeviceInfo, 0, 0, 0, id)
}

#[test]
fn valid_request_split_across_descriptors_gets_its_response_and_a_notification() {
    with_rig(|mem, rig, conn, worker| {
        let req = device_info_request(41);
        put(mem, 0x10000, &req[..10]);
        put(mem, 0x11000, &req[10..]);
        let parts = [
            D(0x10000, 10, false),
            D(0x11000, 22, false),
            D(0x20000, 100, true),
            D(0x21000, 4096, true),
        ];
        let head = rig.add(&parts);
        assert!(rig.run(CONTROL_QUEUE, conn, worker));
        let (id, len) = rig.next_used();
        assert_eq!(id, u32::from(head));
        assert_eq!(len, DEVICE_INFO_BYTES);
        let bytes = read_across(mem, &parts, len);
        let resp = Response::decode(&bytes).unwrap();
        assert_eq!(resp.status(), Status::SUCCESS);
        assert_eq!(resp.header.request_id.get(), 41);
        let (info, _) = resp.fixed::<DeviceInfoResp>().unwrap();
        assert_eq!(info.total_mem.get(), 1 << 20);
        assert!(rig.no_more_used());
    });
}

#[test]
fn malformed_chains_get_error_responses_and_later_requests_are_served() {
    with_rig(|mem, rig, conn, worker| {
        let req = device_info_request(7);
        put(mem, 0x10000, &req);
        // 1: truncated header.
        let truncated = [D(0x10000, 20, false), D(0x20000, 64, true)];
        // 2: a readable descriptor outside guest memory.
        let outside = [
            D(0x10000, 32, false),
            D(GUEST_RAM + 0x100, 8, false),
            D(0x21000, 64, true),
        ];
        // 3: readable after writable.
        let misordered = [
            D(0x10000, 16, false),
            D(0x22000, 64, true),
            D(0x10010, 16, false),
        ];
        // 4: unknown opcode.
        let mut unknown = req.clone();
        unknown[0..4].copy_from_slice(&0x0abcu32.to_le_bytes());
        put(mem, 0x12000, &unknown);
        let unknown_chain = [D(0x12000, 32, false), D(0x23000, 64, true)];
        // 5: over the request size limit (never read).
        let huge = [D(0, 0x2000_0000, false), D(0x24000, 64, true)];
        // 6: a good one last.
        let good = [D(0x10000, 32, false), D(0x25000, 4096, true)];
        let chains: [&[D]; 6] = [
            &truncated,
            &outside,
            &misordered,
            &unknown_chain,
            &huge,
            &good,
        ];
        let heads: Vec<u16> = chains.iter().map(|c| rig.add(c)).collect();
        assert!(rig.run(CONTROL_QUEUE, conn, worker));
        let expected = [
            Status::INVALID_VALUE,
            Status::INVALID_VALUE,
            Status::INVALID_VALUE,
            Status::NOT_SUPPORTED,
            Status::INVALID_VALUE,
            Status::SUCCESS,
        ];
        for ((chain, head), want) in chains.iter().zip(&heads).zip(expected) {
            let (id, len) = rig.next_used();
            assert_eq!(id, u32::from(*head));
            let bytes = read_across(mem, chain, len);
            let resp = Response::decode(&bytes).unwrap();
            assert_eq!(resp.status(), want);
        }
        assert!(rig.no_more_used());
    });
}

#[test]
fn chains_with_nowhere_to_answer_get_a_zero_length_used_entry() {
    with_rig(|mem, rig, conn, worker| {
        let req = device_info_request(9);
        put(mem, 0x10000, &req);
        // No writable descriptor at all.
        let a = rig.add(&[D(0x10000, 32, false)]);
        // The only writable descriptor lies outside guest memory.
        let b = rig.add(&[D(0x10000, 32, false), D(GUEST_RAM - 4, 64, true)]);
        // Too small for a response header.
        let c = rig.add(&[D(0x10000, 32, false), D(0x20000, 8, true)]);
        // Too small for the whole response: the header and what fits.
        let d = rig.add(&[D(0x10000, 32, false), D(0x21000, 20, true)]);
        rig.run(CONTROL_QUEUE, conn, worker);
        assert_eq!(rig.next_used(), (u32::from(a), 0));
        assert_eq!(rig.next_used(), (u32::from(b), 0));
        assert_eq!(rig.next_used(), (u32::from(c), 0));
        assert_eq!(rig.next_used(), (u32::from(d), 20));
        let bytes = read_across(mem, &[D(0x21000, 20, true)], 20);
        assert_eq!(Response::decode(&bytes).unwrap().status(), Status::SUCCESS);
    });
}

#[test]
fn bad_writable_descriptor_after_a_good_one_gets_an_error_in_the_good_one() {
    with_rig(|mem, rig, conn, worker| {
        let req = device_info_request(3);
        put(mem, 0x10000, &req);
        let parts = [
            D(0x10000, 32, false),
            D(0x20000, 64, true),
            D(GUEST_RAM + 0x1000, 64, true),
        ];
        rig.add(&parts);
        rig.run(CONTROL_QUEUE, conn, worker);
        let (_, len) = rig.next_used();
        assert_eq!(len, 16);
        let resp_bytes = read_across(mem, &parts, len);
        let resp = Response::decode(&resp_bytes).unwrap();
        assert_eq!(resp.status(), Status::INVALID_VALUE);
        assert_eq!(resp.header.request_id.get(), 3);
    });
}

#[test]
fn submission_requests_are_served_on_queue_one_only() {
    with_rig(|mem, rig, conn, worker| {
        let req = encode(&Request::CtxDestroy(HandleReq::default()), 5, 0, 0, 11);
        put(mem, 0x10000, &req);
        let chain = [D(0x10000, req.len() as u32, false), D(0x20000, 64, true)];
        rig.add(&chain);
        rig.run(CONTROL_QUEUE, conn, worker);
        let (_, len) = rig.next_used();
        let r = read_across(mem, &chain, len);
        assert_eq!(
            Response::decode(&r).unwrap().status(),
            Status::INVALID_VALUE
        );
        rig.add(&chain);
        rig.run(SUBMISSION_QUEUE, conn, worker);
        let (_, len) = rig.next_used();
        let r = read_across(mem, &chain, len);
        // Reaches the session table: session 5 does not exist.
        assert_eq!(
            Response::decode(&r).unwrap().status(),
            Status::INVALID_HANDLE
        );
    });
}

#[test]
fn corrupt_available_index_does_not_hang_or_panic() {
    with_rig(|_mem, rig, conn, worker| {
        rig.mq.avail().idx().store(1000);
        assert!(!rig.run(CONTROL_QUEUE, conn, worker));
        assert!(rig.no_more_used());
    });
}

#[test]
fn empty_queue_needs_no_notification() {
    with_rig(|_mem, rig, conn, worker| {
        assert!(!rig.run(CONTROL_QUEUE, conn, worker));
    });
}

#[test]
fn polling_after_work_sees_a_new_chain_and_gives_up_when_idle() {
    with_rig(|mem, rig, conn, worker| {
        let budget = std::time::Duration::from_millis(2);
        // Nothing new: the poll runs out and notifications are back on.
        let start = std::time::Instant::now();
        assert!(!QueueWorker::poll_for_more(CONTROL_QUEUE, &mut rig.queue, mem, budget).unwrap());
        assert!(start.elapsed() >= budget);
        // A chain published before the poll is seen at once.
        put(mem, 0x10000, &device_info_request(7));
        rig.add(&[D(0x10000, 32, false), D(0x20000, 4096, true)]);
        assert!(QueueWorker::poll_for_more(CONTROL_QUEUE, &mut rig.queue, mem, budget).unwrap());
        // And it is then served normally.
        assert!(rig.run(CONTROL_QUEUE, conn, worker));
        assert_eq!(rig.next_used().1, DEVICE_INFO_BYTES);
    });
}

#[test]
fn chain_buffers_in_a_region_added_during_the_pass_are_read_through_the_latest_table() {
    // The frontend adds a region (ADD_MEM_REG is acknowledged first) and then
    // posts a chain that uses it, while the worker still holds the table it
    // loaded when the pass began: the chain must be served from the new one.
    const EXTRA: u64 = 64 << 20;
    let mem = guest_memory();
    let region =
        vm_memory::GuestRegionMmap::<()>::from_range(GuestAddress(EXTRA), 0x10000, None).unwrap();
    let latest = std::sync::Arc::new(mem.insert_region(std::sync::Arc::new(region)).unwrap());
    let mut rig = Rig::new(&mem);
    let mut conn = Connection::new(shared(1 << 30, 1 << 20));
    let mut worker = QueueWorker::new();
    put(&latest, EXTRA, &device_info_request(9));
    rig.add(&[D(EXTRA, 32, false), D(0x20000, 4096, true)]);
    let done = worker
        .process(
            CONTROL_QUEUE,
            &mut rig.queue,
            &mem,
            &|| std::sync::Arc::clone(&latest),
            &mut conn,
        )
        .unwrap();
    assert_eq!(done.handled, 1);
    let (_, len) = rig.next_used();
    assert_eq!(
        len, DEVICE_INFO_BYTES,
        "served from the region added mid-pass"
    );
}
