//! [`Device`]: one connection to a vGPU backend, shared by all threads.
//!
//! Locking: each request queue has its own mutex. A sync [`Device::call`]
//! holds its queue's lock from placing the request until the answer is in,
//! so sync calls on one queue are serialized (correct, simple; v1). Lock order
//! is queue → pinned table → vhost-user control; nothing takes a queue lock
//! while holding one of the others, and no code path holds two queue locks.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use vgpu_spec::wire::ReqHeader;
use vgpu_spec::{Request, Status, VgpuConfig, MAX_QUEUE_SIZE, NUM_QUEUES};
use vmm_sys_util::eventfd::EventFd;

use crate::async_errors::AsyncErrors;
use crate::mem::{MemLayout, SharedMem, GUEST_BASE_GPA, REQUEST_QUEUES};
use crate::pinned::{Pinned, Region};
use crate::queue::{lock, Counters, Ctx, Queue};
use crate::ring::SplitRing;
use crate::staging::{Staging, StagingPool};
use crate::vhost::Control;
use crate::{Options, Stats, TransportError};

/// A connected vGPU device. `Send + Sync`; all methods take `&self`.
pub struct Device {
    config: VgpuConfig,
    ctx: Ctx,
    /// Control and submission queues.
    queues: Vec<Mutex<Queue>>,
    /// The event queue: set up for the device, unused by the driver in v1.
    _event_queue: (SplitRing, EventFd, EventFd),
}

fn eventfd() -> Result<EventFd, TransportError> {
    EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(|source| TransportError::System {
        what: "eventfd",
        source,
    })
}

/// The largest power of two not above `want`, the device's limit and the spec's.
fn pick_queue_size(want: u16, device_max: u16) -> Result<u16, TransportError> {
    let limit = want.min(device_max).min(MAX_QUEUE_SIZE);
    if limit < 2 {
        return Err(TransportError::Protocol(format!(
            "Queue size {want} (device maximum {device_max}) leaves no room for a request"
        )));
    }
    Ok(1 << (15 - limit.leading_zeros()))
}

impl Device {
    /// Connects to the backend, runs the vhost-user handshake, reads the
    /// config space and sets up guest memory and the three queues.
    pub fn connect(opts: &Options) -> Result<Device, TransportError> {
        let mut control = Control::connect(&opts.socket)?;
        let facts = control.negotiate()?;
        let config = facts.config;
        let queue_size = pick_queue_size(opts.queue_size, config.max_queue_size.get())?;
        let layout = MemLayout::new(opts.guest_mem_bytes, queue_size)?;
        let mem = Arc::new(SharedMem::new(c"vgpu-guest-mem", layout.total)?);
        control.set_mem_table(&mem, GUEST_BASE_GPA)?;

        let mut rings = Vec::with_capacity(NUM_QUEUES);
        for (index, &off) in layout.rings.iter().enumerate() {
            // SAFETY: `off` + ring bytes lies inside the guest memory mapping
            // (MemLayout), which `ctx.mem` keeps alive for the Device's life;
            // only this ring and the device touch those bytes.
            let ring = unsafe {
                SplitRing::new(mem.ptr().add(off), GUEST_BASE_GPA + off as u64, queue_size)
            }
            .map_err(|e| TransportError::InvalidArgument(e.to_string()))?;
            let call = eventfd()?;
            let kick = eventfd()?;
            control.setup_queue(index, &ring, &call, &kick)?;
            rings.push((ring, kick, call));
        }
        let event = rings
            .pop()
            .ok_or_else(|| TransportError::Protocol("Event queue was not set up".into()))?;
        let queues = rings
            .into_iter()
            .enumerate()
            .map(|(i, (ring, kick, call))| {
                Mutex::new(Queue::new(
                    i as u16,
                    ring,
                    kick,
                    call,
                    layout.slots_per_queue,
                ))
            })
            .collect();
        let pool = Arc::new(StagingPool::new(
            Arc::clone(&mem),
            layout.staging,
            layout.staging_len,
            GUEST_BASE_GPA + layout.staging as u64,
        ));
        tracing::debug!(
            socket = %opts.socket.display(),
            queue_size,
            staging = layout.staging_len,
            device = %config.device_name(),
            "Connected to vGPU backend"
        );
        let sock_fd = control.raw_fd();
        Ok(Device {
            config,
            ctx: Ctx {
                mem,
                layout,
                pool,
                control: Mutex::new(control),
                pinned: Mutex::new(Pinned::new(facts.max_mem_slots.saturating_sub(1))),
                sock_fd,
                dead: AtomicBool::new(false),
                async_errors: AsyncErrors::default(),
                next_id: AtomicU64::new(1),
                stats: Counters::default(),
            },
            queues,
            _event_queue: event,
        })
    }

    /// The device config space read at connect.
    pub fn config(&self) -> &VgpuConfig {
        &self.config
    }

    fn queue(&self, queue: u16) -> Result<MutexGuard<'_, Queue>, TransportError> {
        let q = self
            .queues
            .get(usize::from(queue))
            .filter(|_| usize::from(queue) < REQUEST_QUEUES)
            .ok_or_else(|| {
                TransportError::InvalidArgument(format!("Queue {queue} does not take requests"))
            })?;
        Ok(lock(q))
    }

    /// Sends a request and waits for its response. Returns the response
    /// status and copies the response body (bytes after `RespHeader`) into
    /// `body` (cleared first). The request id is assigned here. Holds the
    /// queue's lock while waiting, so sync calls on one queue run one at a
    /// time. Fails with `Disconnected` if the backend dies (never hangs).
    pub fn call(
        &self,
        queue: u16,
        header: ReqHeader,
        req: &Request<'_>,
        body: &mut Vec<u8>,
    ) -> Result<Status, TransportError> {
        self.ctx.check_alive()?;
        let mut q = self.queue(queue)?;
        let ctx = &self.ctx;
        let head = q.enqueue(ctx, header, req, true, None)?;
        ctx.stats.sync_calls.fetch_add(1, Ordering::Relaxed);
        q.kick(ctx).map_err(|e| ctx.note(e))?;
        loop {
            q.reap(ctx)?;
            if let Some(done) = q.take_done(head) {
                return q.finish(ctx, done, body);
            }
            q.wait_used(ctx)?;
        }
    }

    /// Queues a request without waiting. `staging` (if any) is released when
    /// the device has answered. A non-success answer is remembered under the
    /// context named in `header`; the first one of each context is returned
    /// (and cleared) by [`take_async_error_of`](Self::take_async_error_of).
    /// Kicks only if the device has not set `VRING_USED_F_NO_NOTIFY`.
    pub fn submit(
        &self,
        queue: u16,
        header: ReqHeader,
        req: &Request<'_>,
        staging: Option<Staging>,
    ) -> Result<(), TransportError> {
        self.ctx.check_alive()?;
        let mut q = self.queue(queue)?;
        let ctx = &self.ctx;
        q.reap(ctx)?;
        q.enqueue(ctx, header, req, false, staging)?;
        q.kick_if_wanted(ctx)
    }

    /// The earliest pending failure of an async request, whatever its
    /// context, cleared.
    pub fn take_async_error(&self) -> Option<Status> {
        self.ctx.async_errors.take_any()
    }

    /// The first failure of an async request of `context` (the header's
    /// context field) not yet taken, cleared. Other contexts' failures stay
    /// pending.
    pub fn take_async_error_of(&self, context: u64) -> Option<Status> {
        self.ctx.async_errors.take(context)
    }

    /// Makes sure everything submitted has been made visible to the device:
    /// kicks every queue that has chains published without a kick.
    pub fn flush(&self) -> Result<(), TransportError> {
        self.ctx.check_alive()?;
        for q in &self.queues {
            lock(q).kick_pending(&self.ctx)?;
        }
        Ok(())
    }

    /// A bounce buffer in guest memory. Blocks (reaping completions) while
    /// requests in flight hold staging; fails with `NoMemory` if `len` exceeds
    /// [`staging_capacity`](Self::staging_capacity), or if the space is held
    /// by buffers the caller has not dropped (waiting could never end).
    pub fn staging(&self, len: usize) -> Result<Staging, TransportError> {
        let ctx = &self.ctx;
        if len > ctx.pool.capacity() {
            return Err(TransportError::NoMemory(format!(
                "{len} bytes exceed the staging capacity of {} bytes",
                ctx.pool.capacity()
            )));
        }
        loop {
            if let Some(st) = ctx.pool.try_alloc(len) {
                ctx.stats
                    .bytes_staged
                    .fetch_add(len as u64, Ordering::Relaxed);
                return Ok(st);
            }
            ctx.check_alive()?;
            let mut progressed = false;
            for q in self.queues.iter().rev() {
                let mut q = lock(q);
                if q.reap(ctx)? > 0 {
                    progressed = true;
                    break;
                }
                if q.holds_staging() {
                    q.kick_pending(ctx)?;
                    q.wait_used(ctx)?;
                    q.reap(ctx)?;
                    progressed = true;
                    break;
                }
            }
            if !progressed && ctx.pool.try_alloc(len).is_none() {
                return Err(TransportError::NoMemory(format!(
                    "{len} bytes of staging are not free: {} of {} bytes are held by buffers \
                     not handed to the device",
                    ctx.pool.used(),
                    ctx.pool.capacity()
                )));
            }
        }
    }

    /// Largest staging allocation possible.
    pub fn staging_capacity(&self) -> usize {
        self.ctx.pool.capacity()
    }

    /// Pinned host memory shared with the device: a new memfd region
    /// announced with ADD_MEM_REG. Page-aligned, zero-filled.
    pub fn alloc_pinned(&self, len: usize) -> Result<*mut u8, TransportError> {
        if len == 0 {
            return Err(TransportError::InvalidArgument(
                "Pinned allocation of 0 bytes".into(),
            ));
        }
        self.ctx.check_alive()?;
        let region = self.ctx.add_region(len)?;
        let ptr = region.mem.ptr();
        lock(&self.ctx.pinned).insert(region);
        Ok(ptr)
    }

    /// Withdraws a region from [`alloc_pinned`](Self::alloc_pinned)
    /// (REM_MEM_REG) and unmaps it. The caller must make sure no request still
    /// uses it (cuMemFreeHost synchronizes first).
    pub fn free_pinned(&self, ptr: *mut u8) -> Result<(), TransportError> {
        let region: Option<Region> = lock(&self.ctx.pinned).remove(ptr);
        let region = region.ok_or_else(|| {
            TransportError::InvalidArgument(format!("{ptr:p} is not a pinned allocation"))
        })?;
        self.ctx.remove_region(region)
    }

    /// If host range `[ptr, ptr+len)` lies inside one pinned region or the
    /// staging heap, its guest-physical address.
    pub fn translate(&self, ptr: *const u8, len: usize) -> Option<u64> {
        self.ctx
            .pool
            .translate(ptr, len)
            .or_else(|| lock(&self.ctx.pinned).translate(ptr, len))
    }

    /// Counters for tests and benchmarks.
    pub fn stats(&self) -> Stats {
        let c = &self.ctx.stats;
        Stats {
            requests: c.requests.load(Ordering::Relaxed),
            kicks: c.kicks.load(Ordering::Relaxed),
            sync_calls: c.sync_calls.load(Ordering::Relaxed),
            bytes_staged: c.bytes_staged.load(Ordering::Relaxed),
        }
    }
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("device", &self.config.device_name())
            .field("socket_fd", &self.ctx.sock_fd)
            .field("dead", &self.ctx.dead.load(Ordering::Relaxed))
            .finish()
    }
}

// The brief requires these to cross threads.
const _: () = {
    fn is<T: Send + Sync>() {}
    #[allow(dead_code)]
    fn check() {
        is::<Device>();
        is::<Staging>();
    }
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_size_is_clamped_to_a_power_of_two_within_limits() {
        assert_eq!(pick_queue_size(1024, 1024).unwrap(), 1024);
        assert_eq!(pick_queue_size(1024, 300).unwrap(), 256);
        assert_eq!(pick_queue_size(100, 1024).unwrap(), 64);
        assert_eq!(pick_queue_size(4096, 4096).unwrap(), MAX_QUEUE_SIZE);
        assert!(pick_queue_size(1, 1024).is_err());
        assert!(pick_queue_size(1024, 0).is_err());
    }

    #[test]
    fn connect_to_missing_socket_fails_fast_with_no_device() {
        let opts = Options {
            socket: "/nonexistent/vgpu/socket.sock".into(),
            ..Options::default()
        };
        let start = std::time::Instant::now();
        let err = Device::connect(&opts).unwrap_err();
        assert!(start.elapsed() < std::time::Duration::from_millis(500));
        assert!(matches!(err, TransportError::Connect { .. }), "{err}");
        assert_eq!(err.status(), Status::NO_DEVICE);
        assert!(err.to_string().contains("/nonexistent/vgpu/socket.sock"));
    }

    #[test]
    fn connect_to_socket_nobody_listens_on_fails_fast() {
        let dir = std::env::temp_dir().join(format!("vgpu-dead-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("stale.sock");
        let _ = std::fs::remove_file(&path);
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let start = std::time::Instant::now();
        let err = Device::connect(&Options {
            socket: path.clone(),
            ..Options::default()
        })
        .unwrap_err();
        assert!(start.elapsed() < std::time::Duration::from_secs(1));
        assert!(matches!(err, TransportError::Connect { .. }), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
