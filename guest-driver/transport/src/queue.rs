//! One request queue: placing requests, kicking, reaping and waiting.
//!
//! Every request is a two-descriptor chain, `[readable: request bytes,
//! writable: response area]`. Small requests and responses live in the
//! queue's slot area (one slot per possible in-flight chain); larger ones in
//! the staging heap, and requests larger than the whole heap in a temporary
//! region added with ADD_MEM_REG for the request's lifetime.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vgpu_spec::wire::{op, DeviceInfoResp, FunctionResp, ParamInfo, ReqHeader, RespHeader};
use vgpu_spec::{Request, Status};
use vmm_sys_util::eventfd::EventFd;
use zerocopy::FromBytes;

use crate::async_errors::AsyncErrors;
use crate::mem::{MemLayout, SharedMem, GUEST_BASE_GPA, SLOT_REQ_BYTES, SLOT_RESP_BYTES};
use crate::pinned::{Pinned, Region};
use crate::ring::{Segment, SplitRing};
use crate::staging::{Staging, StagingPool};
use crate::vhost::Control;
use crate::TransportError;

/// How long a waiter spins on the used ring before blocking.
const SPIN: Duration = Duration::from_micros(20);

const RESP_HEADER: usize = std::mem::size_of::<RespHeader>();

/// Response bytes to provide for a request of `opcode`.
pub fn response_capacity(opcode: u32) -> usize {
    match opcode {
        op::GET_DEVICE_INFO => {
            RESP_HEADER
                + std::mem::size_of::<DeviceInfoResp>()
                + 4 * vgpu_spec::DEVICE_ATTRIBUTE_SLOTS as usize
        }
        op::MODULE_GET_FUNCTION => {
            RESP_HEADER
                + std::mem::size_of::<FunctionResp>()
                + std::mem::size_of::<ParamInfo>() * vgpu_spec::MAX_PARAMS as usize
        }
        _ => SLOT_RESP_BYTES,
    }
}

/// Counters behind [`crate::Stats`].
#[derive(Default)]
pub struct Counters {
    pub requests: AtomicU64,
    pub kicks: AtomicU64,
    pub sync_calls: AtomicU64,
    pub bytes_staged: AtomicU64,
}

/// State shared by all queues of a device.
pub struct Ctx {
    pub mem: Arc<SharedMem>,
    pub layout: MemLayout,
    pub pool: Arc<StagingPool>,
    pub control: Mutex<Control>,
    pub pinned: Mutex<Pinned>,
    pub sock_fd: RawFd,
    pub dead: AtomicBool,
    /// Failed async requests not yet reported, per context.
    pub async_errors: AsyncErrors,
    pub next_id: AtomicU64,
    pub stats: Counters,
}

/// Locks a mutex, ignoring poisoning (nothing here panics while holding one).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Ctx {
    pub fn check_alive(&self) -> Result<(), TransportError> {
        if self.dead.load(Ordering::Acquire) {
            Err(TransportError::Disconnected)
        } else {
            Ok(())
        }
    }

    fn mark_dead(&self) {
        if !self.dead.swap(true, Ordering::AcqRel) {
            tracing::warn!("vGPU backend disconnected");
        }
    }

    /// Maps an error that means the backend is gone, so later calls fail fast.
    pub fn note(&self, e: TransportError) -> TransportError {
        if matches!(e, TransportError::Disconnected) {
            self.mark_dead();
        }
        e
    }

    /// A temporary region for a buffer too large for staging.
    pub fn add_region(&self, len: usize) -> Result<Region, TransportError> {
        let mut pinned = lock(&self.pinned);
        let gpa = pinned.reserve(len)?;
        let added = SharedMem::new(c"vgpu-pinned", len)
            .and_then(|mem| lock(&self.control).add_region(&mem, gpa).map(|_| mem));
        match added {
            Ok(mem) => Ok(Region { mem, gpa }),
            Err(e) => {
                pinned.release_slot();
                Err(self.note(e))
            }
        }
    }

    /// Withdraws a region from the device and unmaps it.
    pub fn remove_region(&self, region: Region) -> Result<(), TransportError> {
        let mut pinned = lock(&self.pinned);
        pinned.release_slot();
        if self.dead.load(Ordering::Acquire) {
            return Ok(());
        }
        let r = lock(&self.control).remove_region(&region.mem, region.gpa);
        r.map_err(|e| self.note(e))
    }
}

/// Where one half of a request lives.
enum Buf {
    /// At this offset of guest memory (a slot).
    Slot(usize),
    Staging(Staging),
    Region(Region),
}

/// A request the device has not answered yet.
struct InFlight {
    id: u64,
    /// The context named in the request's header.
    context: u64,
    slot: usize,
    sync: bool,
    req: Buf,
    resp: Buf,
    resp_cap: usize,
    /// A caller's staging buffer released on completion (`submit`).
    data: Option<Staging>,
}

impl InFlight {
    fn holds_staging(&self) -> bool {
        self.data.is_some()
            || !matches!(self.req, Buf::Slot(_))
            || !matches!(self.resp, Buf::Slot(_))
    }
}

/// A finished request, handed to the waiter.
pub struct Completion {
    rec: InFlight,
    used_len: u32,
}

/// The driver state of one queue.
pub struct Queue {
    pub index: u16,
    ring: SplitRing,
    kick: EventFd,
    call: EventFd,
    inflight: Vec<Option<InFlight>>,
    free_slots: Vec<usize>,
    /// Published chains the device has not been kicked for.
    unkicked: bool,
    /// In-flight requests holding staging or regions.
    staged: usize,
    scratch: Vec<u8>,
    /// The answered sync request, until its waiter takes it.
    done: Option<(u16, Completion)>,
}

impl Queue {
    /// A queue over `ring` with `slots` request slots.
    pub fn new(index: u16, ring: SplitRing, kick: EventFd, call: EventFd, slots: usize) -> Queue {
        let size = usize::from(ring.size());
        Queue {
            index,
            ring,
            kick,
            call,
            inflight: (0..size).map(|_| None).collect(),
            free_slots: (0..slots).rev().collect(),
            unkicked: false,
            staged: 0,
            scratch: Vec::with_capacity(SLOT_REQ_BYTES),
            done: None,
        }
    }

    /// True if in-flight requests hold staging memory.
    pub fn holds_staging(&self) -> bool {
        self.staged > 0
    }

    fn host(ctx: &Ctx, buf: &mut Buf) -> (*mut u8, u64) {
        match buf {
            Buf::Slot(off) => (
                ctx.mem.ptr().wrapping_add(*off),
                GUEST_BASE_GPA + *off as u64,
            ),
            Buf::Staging(st) => (st.as_mut_slice().as_mut_ptr(), st.gpa()),
            Buf::Region(r) => (r.mem.ptr(), r.gpa),
        }
    }

    /// A buffer of `len` bytes outside the slot area: staging if it fits
    /// (waiting for this queue's own staged requests to finish if needed),
    /// else a temporary region.
    fn alloc_buf(&mut self, ctx: &Ctx, len: usize) -> Result<Buf, TransportError> {
        if len <= ctx.pool.capacity() {
            loop {
                if let Some(st) = ctx.pool.try_alloc(len) {
                    return Ok(Buf::Staging(st));
                }
                if !self.holds_staging() {
                    break;
                }
                self.kick_pending(ctx)?;
                self.wait_used(ctx)?;
                self.reap(ctx)?;
            }
        }
        tracing::debug!(len, "Request buffer does not fit staging; using a region");
        Ok(Buf::Region(ctx.add_region(len)?))
    }

    fn release_buf(ctx: &Ctx, buf: Buf) {
        if let Buf::Region(region) = buf {
            if let Err(e) = ctx.remove_region(region) {
                tracing::warn!("Removing a temporary region failed: {e}");
            }
        }
    }

    fn release(&mut self, ctx: &Ctx, rec: InFlight) {
        self.free_slots.push(rec.slot);
        if rec.holds_staging() {
            self.staged -= 1;
        }
        Self::release_buf(ctx, rec.req);
        Self::release_buf(ctx, rec.resp);
    }

    /// Places a request in the ring and publishes it; returns its head.
    pub fn enqueue(
        &mut self,
        ctx: &Ctx,
        mut header: ReqHeader,
        req: &Request<'_>,
        sync: bool,
        data: Option<Staging>,
    ) -> Result<u16, TransportError> {
        while self.free_slots.is_empty() || self.ring.num_free() < 2 {
            if self.reap(ctx)? == 0 {
                self.kick_pending(ctx)?;
                self.wait_used(ctx)?;
            }
        }
        let id = ctx.next_id.fetch_add(1, Ordering::Relaxed);
        header.request_id = id.into();
        let context = header.context.get();
        // A module image is copied once, straight into place.
        let (prefix, tail): (Request<'_>, &[u8]) = match req {
            Request::ModuleLoad(r, image) => (Request::ModuleLoad(*r, &[]), image),
            other => (other.clone(), &[]),
        };
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        prefix.encode(header, &mut scratch);
        let total = scratch.len() + tail.len();
        let result = self.place(
            ctx,
            (id, context),
            &scratch,
            tail,
            total,
            req.opcode(),
            sync,
            data,
        );
        self.scratch = scratch;
        result
    }

    #[allow(clippy::too_many_arguments)]
    fn place(
        &mut self,
        ctx: &Ctx,
        (id, context): (u64, u64),
        prefix: &[u8],
        tail: &[u8],
        total: usize,
        opcode: u32,
        sync: bool,
        data: Option<Staging>,
    ) -> Result<u16, TransportError> {
        let total_u32 = u32::try_from(total).map_err(|_| {
            TransportError::InvalidArgument(format!("Request of {total} bytes is too large"))
        })?;
        let Some(slot) = self.free_slots.pop() else {
            return Err(TransportError::NoMemory("No free request slot".into()));
        };
        let q = usize::from(self.index);
        let req = if total <= SLOT_REQ_BYTES {
            Ok(Buf::Slot(ctx.layout.slot_req(q, slot)))
        } else {
            ctx.stats
                .bytes_staged
                .fetch_add(total as u64, Ordering::Relaxed);
            self.alloc_buf(ctx, total)
        };
        let resp_cap = response_capacity(opcode);
        let (mut req, mut resp) = match req {
            Ok(req) if resp_cap <= SLOT_RESP_BYTES => {
                (req, Buf::Slot(ctx.layout.slot_resp(q, slot)))
            }
            Ok(req) => match self.alloc_buf(ctx, resp_cap) {
                Ok(resp) => (req, resp),
                Err(e) => {
                    Self::release_buf(ctx, req);
                    self.free_slots.push(slot);
                    return Err(e);
                }
            },
            Err(e) => {
                self.free_slots.push(slot);
                return Err(e);
            }
        };
        let (req_ptr, req_gpa) = Self::host(ctx, &mut req);
        let (resp_ptr, resp_gpa) = Self::host(ctx, &mut resp);
        // SAFETY: `req_ptr` addresses at least `total` bytes (a slot when
        // total <= SLOT_REQ_BYTES, else a buffer allocated for `total`) and
        // `resp_ptr` at least `resp_cap` >= RESP_HEADER bytes, all inside live
        // shared mappings that no in-flight request uses.
        unsafe {
            std::ptr::copy_nonoverlapping(prefix.as_ptr(), req_ptr, prefix.len());
            std::ptr::copy_nonoverlapping(tail.as_ptr(), req_ptr.add(prefix.len()), tail.len());
            std::ptr::write_bytes(resp_ptr, 0, RESP_HEADER);
        }
        let segs = [
            Segment::readable(req_gpa, total_u32),
            Segment::writable(resp_gpa, resp_cap as u32),
        ];
        let rec = InFlight {
            id,
            context,
            slot,
            sync,
            req,
            resp,
            resp_cap,
            data,
        };
        self.staged += usize::from(rec.holds_staging());
        let head = match self.ring.add_chain(&segs) {
            Ok(h) => h,
            Err(e) => {
                // Unreachable: enqueue made sure two descriptors are free.
                self.release(ctx, rec);
                return Err(TransportError::NoMemory(e.to_string()));
            }
        };
        self.inflight[usize::from(head)] = Some(rec);
        self.ring.publish();
        ctx.stats.requests.fetch_add(1, Ordering::Relaxed);
        Ok(head)
    }

    /// Notifies the device.
    pub fn kick(&mut self, ctx: &Ctx) -> Result<(), TransportError> {
        self.kick
            .write(1)
            .map_err(|source| TransportError::System {
                what: "Kicking the device",
                source,
            })?;
        self.unkicked = false;
        ctx.stats.kicks.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Kicks if the device wants it, else remembers that a kick is owed.
    pub fn kick_if_wanted(&mut self, ctx: &Ctx) -> Result<(), TransportError> {
        if self.ring.needs_kick() {
            self.kick(ctx)
        } else {
            self.unkicked = true;
            Ok(())
        }
    }

    /// Kicks if chains were published without one.
    pub fn kick_pending(&mut self, ctx: &Ctx) -> Result<(), TransportError> {
        if self.unkicked {
            self.kick(ctx)?;
        }
        Ok(())
    }

    /// Processes every used entry. Async answers record their failure under
    /// the context of their request and release their buffers; a sync answer
    /// is parked for its waiter ([`take_done`](Self::take_done)). Returns the
    /// number of entries.
    pub fn reap(&mut self, ctx: &Ctx) -> Result<usize, TransportError> {
        let mut n = 0;
        loop {
            let used = match self.ring.pop_used() {
                Ok(Some(u)) => u,
                Ok(None) => break,
                Err(e) => {
                    ctx.mark_dead();
                    return Err(TransportError::BadResponse(e.to_string()));
                }
            };
            n += 1;
            let Some(rec) = self.inflight[usize::from(used.head)].take() else {
                ctx.mark_dead();
                return Err(TransportError::BadResponse(format!(
                    "Used descriptor {} has no request",
                    used.head
                )));
            };
            if rec.sync {
                // The waiter holds this queue's lock from enqueue to finish,
                // so at most one sync request per queue is in flight.
                let done = Completion {
                    rec,
                    used_len: used.len,
                };
                if let Some((_, stale)) = self.done.replace((used.head, done)) {
                    // Left behind by a call that failed before collecting it.
                    self.release(ctx, stale.rec);
                }
                continue;
            }
            match self.response(ctx, &rec, used.len) {
                Ok((status, _)) if !status.is_success() => {
                    tracing::debug!(
                        id = rec.id,
                        context = rec.context,
                        ?status,
                        "Async request failed"
                    );
                    ctx.async_errors.record(rec.context, status);
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(id = rec.id, "{e}");
                    ctx.async_errors.record(rec.context, Status::UNKNOWN);
                }
            }
            self.release(ctx, rec);
        }
        Ok(n)
    }

    /// The completion of the sync request with chain head `head`, if reaped.
    pub fn take_done(&mut self, head: u16) -> Option<Completion> {
        match &self.done {
            Some((h, _)) if *h == head => self.done.take().map(|(_, c)| c),
            _ => None,
        }
    }

    /// The status and body of a completed request.
    fn response<'a>(
        &self,
        ctx: &'a Ctx,
        rec: &'a InFlight,
        used_len: u32,
    ) -> Result<(Status, &'a [u8]), TransportError> {
        let len = used_len as usize;
        if len < RESP_HEADER || len > rec.resp_cap {
            return Err(TransportError::BadResponse(format!(
                "Response to request {} is {len} bytes (capacity {})",
                rec.id, rec.resp_cap
            )));
        }
        let ptr = match &rec.resp {
            Buf::Slot(off) => ctx.mem.ptr().wrapping_add(*off) as *const u8,
            Buf::Staging(st) => st.as_slice().as_ptr(),
            Buf::Region(r) => r.mem.ptr() as *const u8,
        };
        // SAFETY: the response buffer has `resp_cap` >= len bytes inside a
        // live mapping, and the device is done with it (its chain was used).
        let bytes = unsafe { std::slice::from_raw_parts(ptr, len) };
        let (header, body) = RespHeader::read_from_prefix(bytes).map_err(|_| {
            TransportError::BadResponse(format!("Response to request {} is truncated", rec.id))
        })?;
        if header.request_id.get() != rec.id {
            return Err(TransportError::BadResponse(format!(
                "Response carries request id {}, expected {}",
                header.request_id.get(),
                rec.id
            )));
        }
        Ok((Status(header.status.get()), body))
    }

    /// Consumes a completion: copies the body out and releases its buffers.
    pub fn finish(
        &mut self,
        ctx: &Ctx,
        done: Completion,
        body: &mut Vec<u8>,
    ) -> Result<Status, TransportError> {
        body.clear();
        let result = self
            .response(ctx, &done.rec, done.used_len)
            .map(|(status, b)| {
                body.extend_from_slice(b);
                status
            });
        self.release(ctx, done.rec);
        result
    }

    /// Waits until the device has returned at least one chain: spins briefly,
    /// then enables used-buffer notifications and blocks in poll(2) on the
    /// call eventfd and the vhost-user socket (hang-up = backend died).
    pub fn wait_used(&mut self, ctx: &Ctx) -> Result<(), TransportError> {
        ctx.check_alive()?;
        if self.ring.in_flight() == 0 {
            // Nothing could ever complete; never block forever.
            return Err(TransportError::NoMemory(format!(
                "Queue {} is out of request slots with nothing in flight",
                self.index
            )));
        }
        let start = Instant::now();
        while start.elapsed() < SPIN {
            if self.ring.has_used() {
                return Ok(());
            }
            for _ in 0..64 {
                std::hint::spin_loop();
            }
        }
        self.ring.set_interrupts(true);
        let result = self.block(ctx);
        self.ring.set_interrupts(false);
        result
    }

    fn block(&mut self, ctx: &Ctx) -> Result<(), TransportError> {
        loop {
            if self.ring.has_used() {
                return Ok(());
            }
            // Clear stale notifications, then re-check before sleeping: the
            // device writes the used index before it signals.
            let _ = self.call.read();
            if self.ring.has_used() {
                return Ok(());
            }
            let mut fds = [
                libc::pollfd {
                    fd: self.call.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: ctx.sock_fd,
                    events: libc::POLLRDHUP,
                    revents: 0,
                },
            ];
            // SAFETY: `fds` is a valid array of two pollfd for the call.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if rc < 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(TransportError::System {
                    what: "poll",
                    source: err,
                });
            }
            let hup = libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR | libc::POLLNVAL;
            if fds[1].revents & hup != 0 {
                ctx.mark_dead();
                return Err(TransportError::Disconnected);
            }
        }
    }
}
