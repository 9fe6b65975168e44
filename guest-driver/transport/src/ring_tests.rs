//! Tests of the split-ring driver against plain memory (a hand-written device
//! model) and against virtio-queue, the device-side implementation the backend
//! uses.

use super::*;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Page-aligned zeroed memory standing in for the shared mapping.
struct Mem {
    buf: Vec<u64>,
}

impl Mem {
    fn new(bytes: usize) -> Mem {
        Mem {
            buf: vec![0u64; bytes.div_ceil(8)],
        }
    }

    fn ptr(&mut self) -> *mut u8 {
        self.buf.as_mut_ptr() as *mut u8
    }
}

/// A minimal device: reads the avail ring, writes the used ring.
struct MockDevice {
    base: *mut u8,
    layout: RingLayout,
    next_avail: u16,
    next_used: u16,
}

impl MockDevice {
    fn new(ring: &SplitRing) -> MockDevice {
        MockDevice {
            base: ring.desc_host() as *mut u8,
            layout: ring.layout(),
            next_avail: 0,
            next_used: 0,
        }
    }

    fn read<T: Copy>(&self, off: usize) -> T {
        // SAFETY: tests only pass offsets of naturally aligned fields inside
        // the ring, whose memory outlives the device model.
        unsafe { std::ptr::read_volatile(self.base.wrapping_add(off) as *const T) }
    }

    fn write<T: Copy>(&self, off: usize, v: T) {
        // SAFETY: as in `read`.
        unsafe { std::ptr::write_volatile(self.base.wrapping_add(off) as *mut T, v) }
    }

    fn read_u16(&self, off: usize) -> u16 {
        self.read(off)
    }

    fn write_u16(&self, off: usize, v: u16) {
        self.write(off, v)
    }

    fn desc(&self, i: u16) -> (u64, u32, u16, u16) {
        let d = self.layout.desc + 16 * usize::from(i);
        (
            self.read(d),
            self.read(d + 8),
            self.read(d + 12),
            self.read(d + 14),
        )
    }

    /// Pops one chain: (head, segments).
    fn pop(&mut self) -> Option<(u16, Vec<Segment>)> {
        let idx = self.read_u16(self.layout.avail + 2);
        if idx == self.next_avail {
            return None;
        }
        let slot = usize::from(self.next_avail % self.layout.size);
        let head = self.read_u16(self.layout.avail + 4 + 2 * slot);
        self.next_avail = self.next_avail.wrapping_add(1);
        let mut segs = Vec::new();
        let mut i = head;
        loop {
            let (gpa, len, flags, next) = self.desc(i);
            segs.push(Segment {
                gpa,
                len,
                writable: flags & VRING_DESC_F_WRITE != 0,
            });
            if flags & VRING_DESC_F_NEXT == 0 {
                break;
            }
            assert!(segs.len() <= usize::from(self.layout.size), "chain loops");
            i = next;
        }
        Some((head, segs))
    }

    fn push_used(&mut self, head: u16, len: u32) {
        let slot = usize::from(self.next_used % self.layout.size);
        let e = self.layout.used + 4 + 8 * slot;
        self.write(e, u32::from(head));
        self.write(e + 4, len);
        self.next_used = self.next_used.wrapping_add(1);
        self.write_u16(self.layout.used + 2, self.next_used);
    }

    fn set_no_notify(&self, on: bool) {
        self.write_u16(self.layout.used, u16::from(on));
    }

    fn avail_flags(&self) -> u16 {
        self.read_u16(self.layout.avail)
    }
}

fn ring_in(mem: &mut Mem, gpa: u64, size: u16) -> SplitRing {
    // SAFETY: `mem` is at least one ring's size and outlives the ring in
    // every test.
    unsafe { SplitRing::new(mem.ptr(), gpa, size).unwrap() }
}

#[test]
fn layout_respects_split_ring_alignment() {
    for size in [1u16, 2, 8, 256, 1024, 32768] {
        let l = RingLayout::new(size).unwrap();
        assert_eq!(l.desc % 16, 0);
        assert_eq!(l.avail % 2, 0);
        assert_eq!(l.used % 4, 0);
        assert!(l.avail >= l.desc + 16 * usize::from(size));
        assert!(l.used >= l.avail + 6 + 2 * usize::from(size));
        assert_eq!(l.bytes, l.used + 6 + 8 * usize::from(size));
    }
}

#[test]
fn non_power_of_two_size_is_rejected() {
    assert_eq!(RingLayout::new(0), Err(RingError::BadSize(0)));
    assert_eq!(RingLayout::new(3), Err(RingError::BadSize(3)));
    assert_eq!(RingLayout::new(1000), Err(RingError::BadSize(1000)));
}

#[test]
fn misaligned_base_is_rejected() {
    let mut mem = Mem::new(4096);
    // SAFETY: 4096 bytes hold a 4-entry ring even 8 bytes in (it is rejected anyway).
    let r = unsafe { SplitRing::new(mem.ptr().add(8), 0, 4) };
    assert!(matches!(r, Err(RingError::Misaligned)));
}

#[test]
fn published_chain_is_seen_by_device_with_flags() {
    let mut mem = Mem::new(RingLayout::new(8).unwrap().bytes);
    let mut ring = ring_in(&mut mem, 0x4000_0000, 8);
    let mut dev = MockDevice::new(&ring);
    let segs = [
        Segment::readable(0x1000, 32),
        Segment::readable(0x2000, 100),
        Segment::writable(0x3000, 16),
    ];
    let head = ring.add_chain(&segs).unwrap();
    assert!(dev.pop().is_none(), "unpublished chain must be invisible");
    assert!(ring.has_unpublished());
    ring.publish();
    assert!(!ring.has_unpublished());
    let (h, got) = dev.pop().unwrap();
    assert_eq!(h, head);
    assert_eq!(got, segs);
    assert_eq!(ring.num_free(), 5);
    assert_eq!(ring.in_flight(), 3);
    assert!(!ring.has_used());
    dev.push_used(h, 16);
    assert!(ring.has_used());
    assert_eq!(ring.pop_used().unwrap(), Some(Used { head, len: 16 }));
    assert_eq!(ring.pop_used().unwrap(), None);
    assert_eq!(ring.num_free(), 8);
}

#[test]
fn full_ring_rejects_chain_until_used_entries_are_reaped() {
    let mut mem = Mem::new(RingLayout::new(4).unwrap().bytes);
    let mut ring = ring_in(&mut mem, 0, 4);
    let mut dev = MockDevice::new(&ring);
    let pair = [Segment::readable(1, 1), Segment::writable(2, 2)];
    let a = ring.add_chain(&pair).unwrap();
    let b = ring.add_chain(&pair).unwrap();
    assert_eq!(
        ring.add_chain(&pair),
        Err(RingError::Full { need: 2, free: 0 })
    );
    ring.publish();
    // The device completes out of order.
    let _ = dev.pop().unwrap();
    let (hb, _) = dev.pop().unwrap();
    assert_eq!(hb, b);
    dev.push_used(b, 0);
    assert_eq!(ring.pop_used().unwrap().unwrap().head, b);
    let c = ring.add_chain(&pair).unwrap();
    ring.publish();
    assert_eq!(dev.pop().unwrap().0, c);
    dev.push_used(a, 0);
    dev.push_used(c, 0);
    assert_eq!(ring.pop_used().unwrap().unwrap().head, a);
    assert_eq!(ring.pop_used().unwrap().unwrap().head, c);
    assert_eq!(ring.num_free(), 4);
}

#[test]
fn invalid_chains_are_rejected() {
    let mut mem = Mem::new(RingLayout::new(4).unwrap().bytes);
    let mut ring = ring_in(&mut mem, 0, 4);
    assert_eq!(ring.add_chain(&[]), Err(RingError::EmptyChain));
    assert_eq!(
        ring.add_chain(&[Segment::writable(1, 1), Segment::readable(2, 2)]),
        Err(RingError::ReadableAfterWritable)
    );
    assert_eq!(ring.num_free(), 4);
}

#[test]
fn used_entry_for_unknown_head_is_an_error() {
    let mut mem = Mem::new(RingLayout::new(4).unwrap().bytes);
    let mut ring = ring_in(&mut mem, 0, 4);
    let mut dev = MockDevice::new(&ring);
    dev.push_used(3, 0);
    assert_eq!(ring.pop_used(), Err(RingError::BadUsedId(3)));
    // A failed pop consumes nothing; a fresh ring sees an out-of-range id.
    let mut mem2 = Mem::new(RingLayout::new(4).unwrap().bytes);
    let mut ring = ring_in(&mut mem2, 0, 4);
    let mut dev2 = MockDevice::new(&ring);
    dev2.push_used(400, 0);
    assert_eq!(ring.pop_used(), Err(RingError::BadUsedId(400)));
}

#[test]
fn ring_survives_many_wraparounds_with_mixed_chain_lengths() {
    let size = 8u16;
    let mut mem = Mem::new(RingLayout::new(size).unwrap().bytes);
    let mut ring = ring_in(&mut mem, 0x1000, size);
    let mut dev = MockDevice::new(&ring);
    let mut expected: std::collections::HashMap<u16, Vec<Segment>> = Default::default();
    let mut at_device: std::collections::VecDeque<u16> = Default::default();
    let mut seed = 0x1234_5678u32;
    let mut rand = move || {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        seed
    };
    let drain_avail = |dev: &mut MockDevice,
                       expected: &mut std::collections::HashMap<u16, Vec<Segment>>,
                       at_device: &mut std::collections::VecDeque<u16>| {
        while let Some((h, got)) = dev.pop() {
            assert_eq!(expected.remove(&h).unwrap(), got);
            at_device.push_back(h);
        }
    };
    // 70_000 chains: the 16-bit avail and used indices wrap.
    let mut completed = 0u32;
    for n in 0..70_000u32 {
        let len = 1 + (rand() % 3) as usize;
        let segs: Vec<Segment> = (0..len)
            .map(|k| Segment {
                gpa: u64::from(n) << 8 | k as u64,
                len: n,
                writable: k + 1 == len && len > 1,
            })
            .collect();
        while ring.num_free() < len {
            ring.publish();
            drain_avail(&mut dev, &mut expected, &mut at_device);
            let done = 1 + rand() as usize % at_device.len();
            for _ in 0..done {
                dev.push_used(at_device.pop_front().unwrap(), 7);
            }
            while let Some(u) = ring.pop_used().unwrap() {
                assert_eq!(u.len, 7);
                completed += 1;
            }
        }
        let head = ring.add_chain(&segs).unwrap();
        assert!(expected.insert(head, segs).is_none());
        if rand() % 4 == 0 {
            ring.publish();
            drain_avail(&mut dev, &mut expected, &mut at_device);
        }
    }
    ring.publish();
    drain_avail(&mut dev, &mut expected, &mut at_device);
    assert!(expected.is_empty());
    for head in at_device.drain(..) {
        dev.push_used(head, 7);
    }
    while ring.pop_used().unwrap().is_some() {
        completed += 1;
    }
    assert_eq!(completed, 70_000);
    assert_eq!(ring.num_free(), usize::from(size));
    assert_eq!(ring.in_flight(), 0);
}

#[test]
fn kick_is_needed_unless_device_sets_no_notify() {
    let mut mem = Mem::new(RingLayout::new(4).unwrap().bytes);
    let mut ring = ring_in(&mut mem, 0, 4);
    let dev = MockDevice::new(&ring);
    ring.add_chain(&[Segment::readable(0, 1)]).unwrap();
    ring.publish();
    assert!(ring.needs_kick());
    dev.set_no_notify(true);
    assert!(!ring.needs_kick());
    dev.set_no_notify(false);
    assert!(ring.needs_kick());
}

#[test]
fn interrupts_start_suppressed_and_can_be_toggled() {
    let mut mem = Mem::new(RingLayout::new(4).unwrap().bytes);
    let mut ring = ring_in(&mut mem, 0, 4);
    let dev = MockDevice::new(&ring);
    assert_eq!(dev.avail_flags(), VRING_AVAIL_F_NO_INTERRUPT);
    ring.set_interrupts(true);
    assert_eq!(dev.avail_flags(), 0);
    ring.set_interrupts(false);
    assert_eq!(dev.avail_flags(), VRING_AVAIL_F_NO_INTERRUPT);
}

#[test]
fn virtio_queue_device_reads_chains_and_returns_them() {
    let size = 16u16;
    let gpa = 0x4000_0000u64;
    let mem: GuestMemoryMmap<()> =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(gpa), 0x10_0000)]).unwrap();
    let host = mem.get_host_address(GuestAddress(gpa)).unwrap();
    // SAFETY: the guest memory region is 1 MiB and outlives the ring.
    let mut ring = unsafe { SplitRing::new(host, gpa, size).unwrap() };

    let mut q = Queue::new(size).unwrap();
    q.try_set_desc_table_address(GuestAddress(ring.desc_gpa()))
        .unwrap();
    q.try_set_avail_ring_address(GuestAddress(ring.avail_gpa()))
        .unwrap();
    q.try_set_used_ring_address(GuestAddress(ring.used_gpa()))
        .unwrap();
    q.set_ready(true);
    assert!(q.is_valid(&mem));

    let req = gpa + 0x8000;
    let resp = gpa + 0x9000;
    mem.write_slice(b"hello device", GuestAddress(req)).unwrap();
    for round in 0..100u32 {
        let mut heads = Vec::new();
        for _ in 0..3 {
            heads.push(
                ring.add_chain(&[Segment::readable(req, 12), Segment::writable(resp, 64)])
                    .unwrap(),
            );
        }
        ring.publish();
        // The device side, as vhost-user-backend code drives it.
        q.disable_notification(&mem).unwrap();
        assert!(!ring.needs_kick());
        let mut seen = Vec::new();
        while let Some(chain) = q.pop_descriptor_chain(&mem) {
            let head = chain.head_index();
            let descs: Vec<_> = chain.collect();
            assert_eq!(descs.len(), 2);
            assert!(!descs[0].is_write_only());
            assert_eq!(descs[0].len(), 12);
            assert!(descs[1].is_write_only());
            let mut buf = [0u8; 12];
            mem.read_slice(&mut buf, descs[0].addr()).unwrap();
            assert_eq!(&buf, b"hello device");
            mem.write_obj(round, descs[1].addr()).unwrap();
            q.add_used(&mem, head, 4).unwrap();
            seen.push(head);
        }
        assert!(!q.enable_notification(&mem).unwrap());
        assert!(ring.needs_kick());
        assert_eq!(seen, heads);
        let mut got = Vec::new();
        while let Some(u) = ring.pop_used().unwrap() {
            assert_eq!(u.len, 4);
            got.push(u.head);
        }
        assert_eq!(got, heads);
        assert_eq!(mem.read_obj::<u32>(GuestAddress(resp)).unwrap(), round);
    }
    assert_eq!(ring.num_free(), usize::from(size));
}
