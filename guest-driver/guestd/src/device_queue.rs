//! The vGPU PCI function, driven from userspace: set-up (BARs, virtio-pci
//! initialisation, rings and a DMA heap in huge pages), and request
//! round trips on its control and submission queues.
//!
//! A request is one chain: the readable request bytes, then the writable
//! response area, both in one [`DmaBuf`], split where huge pages end. Any
//! number of threads may have requests in flight; whoever waits reaps the
//! used ring under the queue's lock and leaves other waiters' completions
//! in a table for them. Waiting spins briefly, then sleeps with a backoff
//! of up to 1 ms, and where the binding offers the device's interrupt (the
//! uio node, or a VFIO INTx eventfd) sleeps in `poll` on it so the
//! interrupt wakes it early.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use thiserror::Error;
use vgpu_spec::{VgpuConfig, CONTROL_QUEUE, NUM_QUEUES, SUBMISSION_QUEUE};
use vgpu_transport::ring::{RingError, RingLayout, Segment, SplitRing};

use crate::dma::{DmaError, DmaMemory, Pagemap, PhysLookup, HUGE_PAGE};
use crate::heap::{DmaBuf, Heap, HeapError};
use crate::irq::{self, Interrupts};
use crate::pci::{cap, virtio_caps, Bar, PciAccess, PciError, VirtioCap, Window};
use crate::virtio::{pick_size, QueueInfo, RingAddrs, VirtioError, VirtioPci};

/// How long a waiter spins before it sleeps.
const SPIN: Duration = Duration::from_micros(20);
/// First and longest sleep of a waiter.
const FIRST_SLEEP: Duration = Duration::from_micros(10);
const MAX_SLEEP: Duration = Duration::from_millis(1);
/// How often a long wait checks the device status.
const HEALTH_EVERY: Duration = Duration::from_secs(1);
/// Largest bounce buffer one request uses.
const MAX_BOUNCE: usize = 4 << 20;

/// Device failures.
#[derive(Debug, Error)]
pub enum DeviceError {
    /// PCI access failed.
    #[error(transparent)]
    Pci(#[from] PciError),
    /// virtio-pci initialisation or the device failed.
    #[error(transparent)]
    Virtio(#[from] VirtioError),
    /// DMA memory failed.
    #[error(transparent)]
    Dma(#[from] DmaError),
    /// The DMA heap cannot hold a request.
    #[error(transparent)]
    Heap(#[from] HeapError),
    /// A virtqueue is broken.
    #[error("Device queue {queue} failed: {source}")]
    Ring {
        /// The queue.
        queue: u16,
        /// What went wrong.
        source: RingError,
    },
    /// A request has more pieces than the queue has descriptors.
    #[error("A request needs {need} descriptors, queue {queue} has {size}")]
    TooManySegments {
        /// The queue.
        queue: u16,
        /// Descriptors needed.
        need: usize,
        /// Queue size.
        size: u16,
    },
    /// A virtio capability is missing.
    #[error("The device has no virtio {0} capability")]
    MissingCap(&'static str),
    /// Not a request queue.
    #[error("Queue {0} does not take requests")]
    BadQueue(u16),
}

/// What the relay needs from the device; a fake implements it in tests.
pub trait DeviceLink: Send + Sync {
    /// The device's config space.
    fn config(&self) -> VgpuConfig;
    /// A zeroed DMA buffer of at least `len` bytes (blocks while the heap
    /// is full).
    fn alloc(&self, len: usize) -> Result<DmaBuf, DeviceError>;
    /// Sends `buf[req.0..req.0 + req.1]` as a request on `queue` with
    /// `buf[resp.0..resp.0 + resp.1]` as the response area, and waits for
    /// the answer; returns the bytes the device wrote.
    fn transact(
        &self,
        queue: u16,
        buf: &DmaBuf,
        req: (usize, usize),
        resp: (usize, usize),
    ) -> Result<u32, DeviceError>;
    /// The physical address of the byte at `vaddr` of this process.
    fn phys(&self, vaddr: usize) -> Result<u64, DmaError>;
    /// Most bytes one request should bounce.
    fn bounce_limit(&self) -> usize;
}

/// How to set the device up.
#[derive(Debug, Clone)]
pub struct DeviceOptions {
    /// Largest queue size to use.
    pub queue_size: u16,
    /// Bytes of huge-page DMA memory (rings and heap).
    pub dma_bytes: usize,
    /// Use the function's interrupt (if its binding has one) to wake
    /// waiters.
    pub interrupts: bool,
}

struct QueueState {
    ring: SplitRing,
    /// In-flight chains: head descriptor to ticket.
    waiting: HashMap<u16, u64>,
    /// Answered tickets not yet collected: used length.
    done: HashMap<u64, u32>,
}

struct DevQueue {
    index: u16,
    info: QueueInfo,
    state: Mutex<QueueState>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Backoff state of one wait.
struct Waiter {
    start: Instant,
    sleep: Duration,
    last_health: Instant,
}

impl Waiter {
    fn new() -> Waiter {
        let now = Instant::now();
        Waiter {
            start: now,
            sleep: FIRST_SLEEP,
            last_health: now,
        }
    }
}

/// What `init` sets up.
struct Parts {
    config: VgpuConfig,
    queues: Vec<DevQueue>,
    event: SplitRing,
    heap: Arc<Heap>,
    irq: Option<Box<dyn Interrupts>>,
    mem: Arc<DmaMemory>,
}

/// The vGPU function, initialised and running.
pub struct VgpuPci {
    virtio: VirtioPci<Window>,
    config: VgpuConfig,
    queues: Vec<DevQueue>,
    /// The event queue's ring: set up for the device, unused in v1.
    _event: SplitRing,
    heap: Arc<Heap>,
    pagemap: Pagemap,
    irq: Option<Box<dyn Interrupts>>,
    next_ticket: AtomicU64,
    mem: Arc<DmaMemory>,
    /// The binding: kept so its descriptors (VFIO container, group and
    /// device) stay open while the device runs.
    _pci: Arc<dyn PciAccess>,
}

fn find_cap(
    caps: &[VirtioCap],
    cfg_type: u8,
    name: &'static str,
) -> Result<VirtioCap, DeviceError> {
    caps.iter()
        .find(|c| c.cfg_type == cfg_type)
        .copied()
        .ok_or(DeviceError::MissingCap(name))
}

/// Where each ring goes in DMA memory: 4 KiB-aligned, never across a huge
/// page. Returns the offsets and the first byte after the rings.
pub fn place_rings(sizes: &[u16]) -> Result<(Vec<usize>, usize), RingError> {
    let mut at = 0usize;
    let mut offsets = Vec::with_capacity(sizes.len());
    for &size in sizes {
        let bytes = RingLayout::new(size)?.bytes;
        if at / HUGE_PAGE != (at + bytes - 1) / HUGE_PAGE {
            at = at.next_multiple_of(HUGE_PAGE);
        }
        offsets.push(at);
        at = (at + bytes).next_multiple_of(4096);
    }
    Ok((offsets, at))
}

impl VgpuPci {
    /// Initialises the function `pci` (bound to a userspace driver): maps
    /// its BARs, resets and negotiates, reads the config space, lays out the
    /// rings and the heap in huge pages, and sets DRIVER_OK.
    pub fn open(pci: Arc<dyn PciAccess>, opts: &DeviceOptions) -> Result<VgpuPci, DeviceError> {
        let dev = pci.as_ref();
        let config_space = dev.config()?;
        config_space.enable_bus_master()?;
        let caps = virtio_caps(&config_space.read_all()?)?;
        let mut bars: HashMap<u8, Arc<Bar>> = HashMap::new();
        let mut window = |c: VirtioCap| -> Result<Window, DeviceError> {
            let bar = match bars.get(&c.bar) {
                Some(b) => Arc::clone(b),
                None => {
                    let b = dev.map_bar(c.bar)?;
                    bars.insert(c.bar, Arc::clone(&b));
                    b
                }
            };
            Ok(Window::new(bar, c.offset as usize, c.length as usize)?)
        };
        let notify_cap = find_cap(&caps, cap::NOTIFY, "notify")?;
        let virtio = VirtioPci::new(
            window(find_cap(&caps, cap::COMMON, "common")?)?,
            window(notify_cap)?,
            notify_cap.notify_off_multiplier,
            window(find_cap(&caps, cap::ISR, "ISR")?)?,
            window(find_cap(&caps, cap::DEVICE, "device")?)?,
        )?;
        virtio.reset()?;
        let pagemap = Pagemap::open()?;
        let parts = match Self::init(&virtio, &pagemap, dev, opts) {
            Ok(parts) => parts,
            Err(e) => {
                virtio.fail();
                return Err(e);
            }
        };
        Ok(VgpuPci {
            virtio,
            config: parts.config,
            queues: parts.queues,
            _event: parts.event,
            heap: parts.heap,
            pagemap,
            irq: parts.irq,
            next_ticket: AtomicU64::new(1),
            mem: parts.mem,
            _pci: pci,
        })
    }

    /// Negotiates, reads the config, lays out DMA memory and enables the
    /// queues; DRIVER_OK at the end.
    fn init(
        virtio: &VirtioPci<Window>,
        pagemap: &Pagemap,
        pci: &dyn PciAccess,
        opts: &DeviceOptions,
    ) -> Result<Parts, DeviceError> {
        virtio.negotiate()?;
        let config = virtio.read_config()?;
        let have = virtio.num_queues();
        if usize::from(have) < NUM_QUEUES {
            return Err(VirtioError::TooFewQueues {
                have,
                need: NUM_QUEUES,
            }
            .into());
        }
        let mut sizes = Vec::with_capacity(NUM_QUEUES);
        for q in 0..NUM_QUEUES as u16 {
            let max = virtio.queue_max_size(q);
            sizes.push(pick_size(max, opts.queue_size).ok_or(VirtioError::NoQueue(q))?);
        }
        let (offsets, rings_end) =
            place_rings(&sizes).map_err(|source| DeviceError::Ring { queue: 0, source })?;
        let mem = Arc::new(DmaMemory::hugepages(
            opts.dma_bytes.max(rings_end + (1 << 20)),
            pagemap,
        )?);
        let irq = if opts.interrupts {
            pci.interrupts().unwrap_or_else(|e| {
                tracing::warn!(error = %e, "Cannot set up the device's interrupt; polling only");
                None
            })
        } else {
            None
        };
        let mut rings = Vec::with_capacity(NUM_QUEUES);
        for (q, (&off, &size)) in offsets.iter().zip(&sizes).enumerate() {
            let q = q as u16;
            let gpa = mem.phys_at(off)?;
            // SAFETY: `off` + the ring's bytes lies inside the DMA mapping
            // (place_rings kept it below rings_end <= mem.len()), which
            // `mem` keeps alive as long as the VgpuPci holds the rings; only
            // the ring and the device touch those bytes.
            let ring = unsafe { SplitRing::new(mem.ptr().add(off), gpa, size) };
            let mut ring = ring.map_err(|source| DeviceError::Ring { queue: q, source })?;
            if irq.is_some() && q != vgpu_spec::EVENT_QUEUE {
                ring.set_interrupts(true);
            }
            let addrs = RingAddrs {
                desc: ring.desc_gpa(),
                driver: ring.avail_gpa(),
                device: ring.used_gpa(),
            };
            let info = virtio.enable_queue(q, size, addrs)?;
            rings.push((ring, info));
        }
        let heap = Heap::new(Arc::clone(&mem), rings_end, mem.len() - rings_end)?;
        let mut rings = rings.into_iter();
        let mut queues = Vec::with_capacity(2);
        for index in [CONTROL_QUEUE, SUBMISSION_QUEUE] {
            let (ring, info) = rings.next().ok_or(DeviceError::BadQueue(index))?;
            queues.push(DevQueue {
                index,
                info,
                state: Mutex::new(QueueState {
                    ring,
                    waiting: HashMap::new(),
                    done: HashMap::new(),
                }),
            });
        }
        let (event, _) = rings
            .next()
            .ok_or(DeviceError::BadQueue(vgpu_spec::EVENT_QUEUE))?;
        virtio.driver_ok();
        virtio.check_health()?;
        tracing::info!(
            queue_sizes = ?sizes,
            dma_bytes = mem.len(),
            heap = heap.capacity(),
            interrupts = irq.is_some(),
            "Device initialised"
        );
        Ok(Parts {
            config,
            queues,
            event,
            heap,
            irq,
            mem,
        })
    }

    /// Bytes of DMA memory in use by the driver (rings and heap).
    pub fn dma_bytes(&self) -> usize {
        self.mem.len()
    }

    /// Resets the device, so it stops using the rings and DMA memory.
    pub fn shutdown(&self) {
        if let Err(e) = self.virtio.reset() {
            tracing::warn!(error = %e, "Device did not reset on shutdown");
        }
    }

    /// Moves finished chains of `q` from the used ring to the done table.
    fn reap(&self, q: &DevQueue, st: &mut QueueState) -> Result<(), DeviceError> {
        while let Some(used) = st.ring.pop_used().map_err(|source| DeviceError::Ring {
            queue: q.index,
            source,
        })? {
            match st.waiting.remove(&used.head) {
                Some(ticket) => {
                    st.done.insert(ticket, used.len);
                }
                None => tracing::warn!(queue = q.index, head = used.head, "Unexpected used chain"),
            }
        }
        Ok(())
    }

    fn pause(&self, w: &mut Waiter) -> Result<(), DeviceError> {
        if w.start.elapsed() < SPIN {
            for _ in 0..64 {
                std::hint::spin_loop();
            }
            return Ok(());
        }
        if w.last_health.elapsed() >= HEALTH_EVERY {
            w.last_health = Instant::now();
            self.virtio.check_health()?;
        }
        match &self.irq {
            Some(irq) => irq::wait(irq.as_ref(), w.sleep, || self.virtio.ack_interrupt()),
            None => std::thread::sleep(w.sleep),
        }
        w.sleep = (w.sleep * 2).min(MAX_SLEEP);
        Ok(())
    }
}

impl DeviceLink for VgpuPci {
    fn config(&self) -> VgpuConfig {
        self.config
    }

    fn alloc(&self, len: usize) -> Result<DmaBuf, DeviceError> {
        if len <= self.heap.capacity() {
            return Ok(self.heap.alloc(len)?);
        }
        // Larger than the whole heap (a big module image): huge pages of its
        // own, unmapped when the buffer is dropped.
        tracing::debug!(
            len,
            "Request larger than the DMA heap; mapping huge pages for it"
        );
        let mem = Arc::new(DmaMemory::hugepages(len, &self.pagemap)?);
        let size = mem.len();
        Ok(Heap::new(mem, 0, size)?.alloc(len)?)
    }

    fn transact(
        &self,
        queue: u16,
        buf: &DmaBuf,
        req: (usize, usize),
        resp: (usize, usize),
    ) -> Result<u32, DeviceError> {
        let q = self
            .queues
            .get(usize::from(queue))
            .ok_or(DeviceError::BadQueue(queue))?;
        let mut segs = Vec::new();
        buf.segments(req.0, req.1, &mut segs)?;
        let readable = segs.len();
        buf.segments(resp.0, resp.1, &mut segs)?;
        let chain: Vec<Segment> = segs
            .iter()
            .enumerate()
            .map(|(i, &(gpa, len))| Segment {
                gpa,
                len: len as u32,
                writable: i >= readable,
            })
            .collect();
        let ring_err = |source| DeviceError::Ring {
            queue: q.index,
            source,
        };
        let mut waiter = Waiter::new();
        let ticket = loop {
            let mut st = lock(&q.state);
            if chain.len() > usize::from(st.ring.size()) {
                return Err(DeviceError::TooManySegments {
                    queue: q.index,
                    need: chain.len(),
                    size: st.ring.size(),
                });
            }
            self.reap(q, &mut st)?;
            if st.ring.num_free() >= chain.len() {
                let head = st.ring.add_chain(&chain).map_err(ring_err)?;
                let ticket = self.next_ticket.fetch_add(1, Ordering::Relaxed);
                st.waiting.insert(head, ticket);
                st.ring.publish();
                if st.ring.needs_kick() {
                    self.virtio.notify(&q.info, q.index);
                }
                break ticket;
            }
            drop(st);
            self.pause(&mut waiter)?;
        };
        let mut waiter = Waiter::new();
        loop {
            let mut st = lock(&q.state);
            self.reap(q, &mut st)?;
            if let Some(len) = st.done.remove(&ticket) {
                return Ok(len);
            }
            drop(st);
            self.pause(&mut waiter)?;
        }
    }

    fn phys(&self, vaddr: usize) -> Result<u64, DmaError> {
        self.pagemap.phys(vaddr)
    }

    fn bounce_limit(&self) -> usize {
        (self.heap.capacity() / 4).clamp(4096, MAX_BOUNCE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rings_are_page_aligned_and_never_cross_a_huge_page() {
        let (offsets, end) = place_rings(&[1024, 1024, 1024]).unwrap();
        let bytes = RingLayout::new(1024).unwrap().bytes;
        assert_eq!(offsets[0], 0);
        for (i, off) in offsets.iter().enumerate() {
            assert_eq!(off % 4096, 0);
            assert_eq!(off / HUGE_PAGE, (off + bytes - 1) / HUGE_PAGE);
            if i > 0 {
                assert!(offsets[i - 1] + bytes <= *off);
            }
        }
        assert!(end >= offsets[2] + bytes);
        assert_eq!(end % 4096, 0);
        assert!(place_rings(&[3]).is_err());
    }

    #[test]
    fn ring_that_would_straddle_a_huge_page_moves_to_the_next() {
        // 80 rings of 1024 entries (~27 KiB each) pass the first 2 MiB.
        let sizes = vec![1024u16; 80];
        let (offsets, _) = place_rings(&sizes).unwrap();
        let bytes = RingLayout::new(1024).unwrap().bytes;
        let moved = offsets.iter().find(|o| **o >= HUGE_PAGE).unwrap();
        assert_eq!(*moved, HUGE_PAGE);
        for off in offsets {
            assert_eq!(off / HUGE_PAGE, (off + bytes - 1) / HUGE_PAGE);
        }
    }
}
