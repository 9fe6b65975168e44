//! The vhost-user device of one frontend connection.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use vgpu_spec::{CONFIG_WINDOW, EVENT_QUEUE, NUM_QUEUES};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::connection::Connection;
use crate::guest::{GuestMemoryMmap, RegionRegistry};
use crate::queue::{QueueWorker, RequestHandler};
use crate::shared::DeviceShared;

/// The guest memory handle shared with the vhost-user handler.
pub type GuestMemory = GuestMemoryAtomic<GuestMemoryMmap>;

/// The vring type the device uses.
pub type Vring = VringRwLock<GuestMemory>;

impl RequestHandler for Connection {
    fn handle(&mut self, queue: u16, request: &[u8], mem: &GuestMemoryMmap, out: &mut Vec<u8>) {
        Connection::handle(self, queue, request, mem, out);
    }
}

struct Work {
    connection: Connection,
    worker: QueueWorker,
}

/// A vGPU device for one frontend connection: its own sessions, sharing
/// the executor and slice accounting with every other connection.
pub struct VgpuDevice {
    shared: Arc<DeviceShared>,
    mem: GuestMemory,
    work: Mutex<Work>,
    regions: Mutex<RegionRegistry>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not wedge the connection's cleanup.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl VgpuDevice {
    /// A device with no sessions. `mem` must be the same handle the
    /// daemon is given, so the device sees the frontend's memory table.
    pub fn new(shared: Arc<DeviceShared>, mem: GuestMemory) -> Self {
        VgpuDevice {
            work: Mutex::new(Work {
                connection: Connection::new(shared.clone()),
                worker: QueueWorker::new(),
            }),
            shared,
            mem,
            regions: Mutex::new(RegionRegistry::default()),
        }
    }

    /// Number of open sessions.
    pub fn session_count(&self) -> usize {
        lock(&self.work).connection.session_count()
    }

    /// Number of guest memory regions registered with the GPU.
    pub fn registered_regions(&self) -> usize {
        lock(&self.regions).len()
    }

    /// Frees everything the connection held: its sessions first (contexts
    /// are destroyed, allocations returned to the slice), then the GPU
    /// registration of guest memory. Called once the frontend is gone and
    /// the vring workers have stopped.
    pub fn close(&self) {
        lock(&self.work).connection.close_all();
        lock(&self.regions).clear(self.shared.gpu.as_ref());
    }

    /// Reclaim: drains every context's work and swaps the connection's device memory out;
    /// bytes moved. Requests wait meanwhile (they need the connection).
    pub fn swap_out(&self) -> Result<u64, vgpu_spec::Status> {
        let mut work = lock(&self.work);
        work.connection.synchronize_all();
        work.connection.swap_out_all()
    }

    /// Swaps the connection's device memory back in; bytes moved.
    pub fn swap_in(&self) -> Result<u64, vgpu_spec::Status> {
        lock(&self.work).connection.swap_in_all()
    }

    /// The connection's device memory, resident and swapped out.
    pub fn memory_usage(&self) -> crate::gpu::MemoryUsage {
        lock(&self.work).connection.memory_usage()
    }

    /// The connection's work, once the slice is not frozen. A slice whose memory is reclaimed
    /// is frozen: nothing runs until its memory is back. Checked with the lock held, before
    /// every batch (a queue being polled between batches must stop too): a reclaim freezes
    /// first and then waits for this lock to swap out, so no batch runs on swapped memory.
    fn work_unfrozen(&self) -> MutexGuard<'_, Work> {
        loop {
            self.shared.memory.wait_while_frozen();
            let work = lock(&self.work);
            if !self.shared.memory.frozen() {
                return work;
            }
        }
    }

    fn process_queue(&self, index: u16, vring: &Vring) -> io::Result<()> {
        let mem = self.mem.memory();
        let mut state = vring.get_mut();
        let throttle = &self.shared.throttle;
        // The slot stays busy while a batch is processed (and after, while
        // its work is in flight).
        let _batch = throttle.batch();
        loop {
            let done = {
                let mut work = self.work_unfrozen();
                let Work { connection, worker } = &mut *work;
                let latest = || self.mem.memory().into_inner();
                let done = worker
                    .process(index, state.get_queue_mut(), &mem, &latest, connection)
                    .map_err(io::Error::other)?;
                if throttle.enabled() && done.handled > 0 {
                    connection.end_batch();
                }
                done
            };
            if done.notify {
                state.signal_used_queue()?;
            }
            // After a small batch, poll briefly before going back to sleep:
            // a guest waiting on its answer usually sends the next request
            // within microseconds, and catching it here saves the kick and
            // the wake-up (most of a round trip). After a large batch the
            // guest is streaming asynchronous work and keeps the ring full
            // by itself; polling there measured slower launches (see
            // bench/results/README.md).
            if done.handled == 0
                || done.handled > POLL_MAX_BATCH
                || self.shared.poll_after_work.is_zero()
                || !QueueWorker::poll_for_more(
                    index,
                    state.get_queue_mut(),
                    &mem,
                    self.shared.poll_after_work,
                )
                .map_err(io::Error::other)?
            {
                return Ok(());
            }
        }
    }
}

/// Batches larger than this are not followed by polling.
const POLL_MAX_BATCH: usize = 8;

impl VhostUserBackend for VgpuDevice {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.shared.max_queue_size)
    }

    fn features(&self) -> u64 {
        vgpu_spec::VHOST_USER_FEATURES
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::from_bits_truncate(vgpu_spec::VHOST_USER_PROTOCOL_FEATURES)
    }

    fn set_event_idx(&self, enabled: bool) {
        if enabled {
            tracing::warn!("Frontend enabled EVENT_IDX, which the device does not offer");
        }
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        if offset >= CONFIG_WINDOW {
            tracing::debug!(offset, size, "Config read beyond the window");
        }
        let mut config = self.shared.config;
        config.memory_limit = self.shared.slice.limit().into();
        config.read_window(offset, size)
    }

    fn update_memory(&self, mem: GuestMemory) -> io::Result<()> {
        let snapshot = mem.memory();
        let mut regions = lock(&self.regions);
        let diff = regions.diff(&snapshot);
        if diff.removes_regions() {
            // Work queued on streams may still read or write a region that
            // is going away: wait for it first.
            lock(&self.work).connection.synchronize_all();
        }
        regions.apply(self.shared.gpu.as_ref(), diff);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok(pair) => Some(pair),
            Err(e) => {
                tracing::error!(error = %e, "Cannot create the vring worker's exit event");
                None
            }
        }
    }

    /// The frontend stops a ring when the guest driver resets the device or
    /// goes away without closing the connection (a VM whose in-guest driver
    /// was killed and restarted). Stopping the submission queue means no one
    /// is left to use the sessions opened through it, so they are freed.
    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        if queue_index == u32::from(vgpu_spec::SUBMISSION_QUEUE) {
            let mut work = lock(&self.work);
            if work.connection.session_count() > 0 {
                tracing::info!("Submission queue stopped; freeing this connection's sessions");
                work.connection.close_all();
            }
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            tracing::debug!(device_event, ?evset, "Unexpected event set");
        }
        // The event queue carries device-to-driver buffers: nothing to do
        // with them in this version, so they stay available.
        if device_event == EVENT_QUEUE {
            return Ok(());
        }
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            tracing::warn!(device_event, "Event for an unknown queue");
            return Ok(());
        };
        self.process_queue(device_event, vring)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vgpu_spec::config::{CAP_ADD_MEM_REGION, CAP_EXECUTES_KERNELS, CAP_ZERO_COPY};
    use vgpu_spec::VgpuConfig;
    use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
    use vm_memory::GuestAddress;
    use zerocopy::FromBytes;

    use crate::testutil::{encode, shared};

    fn device() -> VgpuDevice {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        VgpuDevice::new(shared(1 << 30, 256 << 20), mem)
    }

    #[test]
    fn stopping_the_submission_queue_frees_the_connections_sessions() {
        use vgpu_spec::wire::{
            CtxCreateReq, HandleResp, MemAllocReq, SessionOpenReq, SessionOpenResp,
        };
        use vgpu_spec::{Request, Response, Status, CONTROL_QUEUE, SUBMISSION_QUEUE};

        let d = device();
        let mem = GuestMemoryMmap::new();
        let mut out = Vec::new();
        let mut call = |d: &VgpuDevice, queue: u16, bytes: Vec<u8>| -> Vec<u8> {
            out.clear();
            lock(&d.work)
                .connection
                .handle(queue, &bytes, &mem, &mut out);
            let resp = Response::decode(&out).unwrap();
            assert_eq!(resp.status(), Status::SUCCESS);
            resp.body.to_vec()
        };
        let open = Request::SessionOpen(SessionOpenReq {
            pid: 1.into(),
            version: vgpu_spec::PROTOCOL_VERSION.into(),
        });
        let body = call(&d, CONTROL_QUEUE, encode(&open, 0, 0, 0, 1));
        let session = SessionOpenResp::read_from_bytes(&body)
            .unwrap()
            .session
            .get();
        let create = Request::CtxCreate(CtxCreateReq::default());
        let body = call(&d, SUBMISSION_QUEUE, encode(&create, session, 0, 0, 2));
        let ctx = HandleResp::read_from_bytes(&body).unwrap().handle.get();
        let alloc = Request::MemAlloc(MemAllocReq {
            size: (8u64 << 20).into(),
        });
        call(&d, SUBMISSION_QUEUE, encode(&alloc, session, ctx, 0, 3));
        assert_eq!(d.shared.slice.used(), 8 << 20);

        // The control queue stopping alone frees nothing.
        d.stop_vring(u32::from(CONTROL_QUEUE)).unwrap();
        assert_eq!(d.shared.slice.used(), 8 << 20);
        d.stop_vring(u32::from(SUBMISSION_QUEUE)).unwrap();
        assert_eq!(d.shared.slice.used(), 0);
    }

    #[test]
    fn features_offer_version_1_and_protocol_features_but_not_event_idx() {
        let d = device();
        let f = d.features();
        assert_ne!(f & (1 << VIRTIO_F_VERSION_1), 0);
        assert_ne!(f & (1 << 30), 0);
        assert_eq!(f & (1 << 29), 0, "EVENT_IDX must not be offered");
        let p = d.protocol_features();
        assert!(p.contains(VhostUserProtocolFeatures::CONFIG));
        assert!(p.contains(VhostUserProtocolFeatures::MQ));
        assert!(p.contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS));
        assert!(!p.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD));
        assert_eq!(d.num_queues(), 3);
        assert_eq!(d.max_queue_size(), 1024);
    }

    #[test]
    fn config_reads_return_exactly_the_size_asked_zero_padded() {
        let d = device();
        let full = d.get_config(0, 256);
        let c = VgpuConfig::read_from_bytes(&full).unwrap();
        assert!(c.is_valid());
        assert_eq!(c.memory_limit.get(), 256 << 20);
        assert_eq!(c.capabilities.get(), CAP_ZERO_COPY | CAP_ADD_MEM_REGION);
        assert_eq!(c.capabilities.get() & CAP_EXECUTES_KERNELS, 0);
        assert_eq!(c.slice_name(), "test-slice");
        assert_eq!(c.device_name(), "vgpu emulated device");
        assert_eq!(c.uuid, [7; 16]);
        assert_eq!((c.cc_major.get(), c.cc_minor.get()), (9, 0));
        assert_eq!(c.sm_count.get(), 132);
        assert_eq!(c.max_sessions.get(), 64);
        assert_eq!(c.pci_bus_id(), "00000000:18:00.0");
        for (offset, size) in [
            (0, 4),
            (250, 20),
            (255, 1),
            (256, 8),
            (1000, 100),
            (4095, 1),
            (4096, 16),
        ] {
            let w = d.get_config(offset, size);
            assert_eq!(w.len(), size as usize);
            for (i, b) in w.iter().enumerate() {
                let at = offset as usize + i;
                let want = full.get(at).copied().unwrap_or(0);
                assert_eq!(*b, want, "offset {at}");
            }
        }
    }

    #[test]
    fn memory_updates_register_new_regions_and_unregister_removed_ones() {
        let d = device();
        let two = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x10000),
            (GuestAddress(0x100000), 0x1000),
        ])
        .unwrap();
        d.mem.lock().unwrap().replace(two.clone());
        d.update_memory(d.mem.clone()).unwrap();
        assert_eq!(d.registered_regions(), 2);
        // Same table again: nothing changes.
        d.update_memory(d.mem.clone()).unwrap();
        assert_eq!(d.registered_regions(), 2);
        let (one, _) = two.remove_region(GuestAddress(0x100000), 0x1000).unwrap();
        d.mem.lock().unwrap().replace(one);
        d.update_memory(d.mem.clone()).unwrap();
        assert_eq!(d.registered_regions(), 1);
        d.close();
        assert_eq!(d.registered_regions(), 0);
    }
}
