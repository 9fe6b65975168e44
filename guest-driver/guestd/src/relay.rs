//! The local vhost-user server that re-serves the device to guest
//! processes: one `VhostUserDaemon` per accepted client (as the host
//! backend does), offering exactly what the host backend offers, so the
//! unchanged guest library connects as it would on a bare host. Each
//! request chain is gathered from the client's memory, relayed through a
//! [`Client`], and answered into the chain's writable descriptors.

use std::collections::HashMap;
use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;

use thiserror::Error;
use vgpu_spec::{
    response, Status, VgpuConfig, CONFIG_WINDOW, EVENT_QUEUE, MAX_QUEUE_SIZE, MAX_REQUEST_BYTES,
    NUM_QUEUES,
};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{
    Error as DaemonError, VhostUserBackend, VhostUserDaemon, VringRwLock, VringT,
};
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::device_queue::DeviceLink;
use crate::forward::{request_id_of, Classifier, Client, GuestMemoryMmap};
use crate::stats::Stats;

/// The client memory handle shared with the vhost-user handler.
pub type ClientMemory = GuestMemoryAtomic<GuestMemoryMmap>;
type Vring = VringRwLock<ClientMemory>;

const RESP_HEADER: usize = std::mem::size_of::<vgpu_spec::wire::RespHeader>();
/// Consecutive accept failures after which the server gives up.
const MAX_ACCEPT_FAILURES: u32 = 100;

/// Server failures.
#[derive(Debug, Error)]
pub enum RelayError {
    /// The socket's directory could not be created.
    #[error("Cannot create the socket directory {}: {source}", path.display())]
    SocketDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The socket could not be bound.
    #[error("Cannot listen on {}: {source}", path.display())]
    Listen {
        /// The socket.
        path: PathBuf,
        /// The cause.
        source: VhostUserError,
    },
    /// The vhost-user daemon failed.
    #[error("vhost-user daemon failed: {0}")]
    Daemon(String),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Default)]
struct Scratch {
    request: Vec<u8>,
    response: Vec<u8>,
    writable: Vec<(GuestAddress, usize)>,
}

/// The vhost-user device one client sees.
pub struct RelayDevice<L: ?Sized> {
    client: Client<L>,
    mem: ClientMemory,
    config: VgpuConfig,
    scratch: Mutex<Scratch>,
}

impl<L: DeviceLink + ?Sized> RelayDevice<L> {
    /// A device for one client; `mem` must be the handle the daemon gets.
    pub fn new(client: Client<L>, mem: ClientMemory, config: VgpuConfig) -> Self {
        RelayDevice {
            client,
            mem,
            config,
            scratch: Mutex::new(Scratch::default()),
        }
    }

    /// The client behind the device.
    pub fn client(&self) -> &Client<L> {
        &self.client
    }

    /// Handles every chain available on a queue. The rings and descriptor
    /// table are read through the memory table loaded when the pass starts
    /// (they lie in memory the client set up before the queue), but what a
    /// chain names (its buffers, the sg entries of a copy) is looked up in the
    /// table loaded after the chain was popped: a client may add a region
    /// (ADD_MEM_REG, acknowledged before it goes on) and post a chain naming
    /// it while this pass is still running, and the pass picks that chain up.
    fn process_queue(&self, index: u16, vring: &Vring) -> io::Result<()> {
        let ring_guard = self.mem.memory();
        let ring: &GuestMemoryMmap = &ring_guard;
        let mut state = vring.get_mut();
        let mut scratch = lock(&self.scratch);
        let mut idle_rounds = 0;
        loop {
            let queue = state.get_queue_mut();
            queue.disable_notification(ring).map_err(io::Error::other)?;
            let mut handled = 0;
            while let Some(chain) = state.get_queue_mut().pop_descriptor_chain(ring) {
                let head = chain.head_index();
                // Loaded after the chain was popped, so it holds every region
                // the client had added before posting it.
                let used = self.process_chain(index, chain, &self.mem.memory(), &mut scratch);
                let queue = state.get_queue_mut();
                queue.add_used(ring, head, used).map_err(io::Error::other)?;
                if queue.needs_notification(ring).map_err(io::Error::other)? {
                    state.signal_used_queue()?;
                }
                handled += 1;
            }
            if !state
                .get_queue_mut()
                .enable_notification(ring)
                .map_err(io::Error::other)?
            {
                return Ok(());
            }
            // More arrived; a corrupt available index would make this spin.
            idle_rounds = if handled == 0 { idle_rounds + 1 } else { 0 };
            if idle_rounds >= 2 {
                tracing::warn!(queue = index, "Client's available ring index is invalid");
                return Ok(());
            }
        }
    }

    /// Gathers, relays and answers one chain; returns the used length.
    fn process_chain(
        &self,
        queue: u16,
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
        s: &mut Scratch,
    ) -> u32 {
        s.request.clear();
        s.response.clear();
        s.writable.clear();
        let mut fault = false;
        let mut seen_writable = false;
        for desc in chain {
            let (addr, len) = (desc.addr(), desc.len() as usize);
            let inside = GuestMemoryBackend::check_range(mem, addr, len);
            if desc.is_write_only() {
                seen_writable = true;
                if inside && !fault {
                    s.writable.push((addr, len));
                } else {
                    fault = true;
                }
                continue;
            }
            let start = s.request.len();
            if seen_writable || !inside || (start + len) as u64 > MAX_REQUEST_BYTES {
                fault = true;
                continue;
            }
            s.request.resize(start + len, 0);
            if mem.read_slice(&mut s.request[start..], addr).is_err() {
                fault = true;
            }
        }
        let capacity: usize = s.writable.iter().map(|(_, n)| n).sum();
        if fault {
            response::encode_status(
                Status::INVALID_VALUE,
                request_id_of(&s.request),
                &mut s.response,
            );
        } else {
            self.client
                .handle(queue, &s.request, capacity, mem, &mut s.response);
        }
        if capacity < RESP_HEADER.min(s.response.len()) {
            return 0;
        }
        let mut written = 0usize;
        for (addr, len) in &s.writable {
            if written == s.response.len() {
                break;
            }
            let n = (*len).min(s.response.len() - written);
            if mem
                .write_slice(&s.response[written..written + n], *addr)
                .is_err()
            {
                break;
            }
            written += n;
        }
        written as u32
    }
}

impl<L: DeviceLink + ?Sized + 'static> VhostUserBackend for RelayDevice<L> {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        usize::from(MAX_QUEUE_SIZE)
    }

    fn features(&self) -> u64 {
        vgpu_spec::VHOST_USER_FEATURES
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::from_bits_truncate(vgpu_spec::VHOST_USER_PROTOCOL_FEATURES)
    }

    fn set_event_idx(&self, enabled: bool) {
        if enabled {
            tracing::warn!("Client enabled EVENT_IDX, which the device does not offer");
        }
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        if offset >= CONFIG_WINDOW {
            tracing::debug!(offset, size, "Config read beyond the window");
        }
        self.config.read_window(offset, size)
    }

    fn update_memory(&self, _mem: ClientMemory) -> io::Result<()> {
        // Each chain reads the current table from `self.mem` once it has been
        // popped (see `process_queue`).
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)
            .map_err(|e| tracing::error!(error = %e, "Cannot create a vring exit event"))
            .ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        // Nothing is ever posted on the event queue in v1.
        if device_event == EVENT_QUEUE {
            return Ok(());
        }
        match vrings.get(usize::from(device_event)) {
            Some(vring) => self.process_queue(device_event, vring),
            None => Ok(()),
        }
    }
}

/// A connected client, as the server's registry sees it.
trait LiveClient: Send + Sync {
    /// Closes the sessions the client holds on the device.
    fn close_sessions(&self) -> usize;
}

impl<L: DeviceLink + ?Sized> LiveClient for RelayDevice<L> {
    fn close_sessions(&self) -> usize {
        self.client.close()
    }
}

/// Connected clients by id.
type LiveClients = Mutex<HashMap<u64, Arc<dyn LiveClient>>>;

/// Stops a serving relay from another thread.
#[derive(Clone)]
pub struct StopHandle {
    stop: Arc<AtomicBool>,
    socket: PathBuf,
    live: Arc<LiveClients>,
}

impl StopHandle {
    /// Stops accepting clients (connected ones keep being served).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = UnixStream::connect(&self.socket);
    }

    /// Closes, on the device, every session that connected clients hold
    /// (before the daemon exits, so the host frees them). Returns how many.
    pub fn close_all_sessions(&self) -> usize {
        let live: Vec<_> = lock(&self.live).values().cloned().collect();
        live.iter().map(|c| c.close_sessions()).sum()
    }
}

/// The bound server.
pub struct Relay<L: ?Sized> {
    link: Arc<L>,
    stats: Arc<Stats>,
    classify: Arc<Classifier>,
    listener: Listener,
    socket: PathBuf,
    stop: Arc<AtomicBool>,
    next_id: AtomicU64,
    live: Arc<LiveClients>,
}

impl<L: DeviceLink + ?Sized + 'static> Relay<L> {
    /// Binds `socket` (replacing a stale file, creating its directory).
    pub fn bind(
        socket: &Path,
        link: Arc<L>,
        stats: Arc<Stats>,
        classify: Arc<Classifier>,
    ) -> Result<Relay<L>, RelayError> {
        if let Some(dir) = socket.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| RelayError::SocketDir {
                path: dir.to_owned(),
                source,
            })?;
        }
        let listener = Listener::new(socket, true).map_err(|source| RelayError::Listen {
            path: socket.to_owned(),
            source,
        })?;
        Ok(Relay {
            link,
            stats,
            classify,
            listener,
            socket: socket.to_owned(),
            stop: Arc::new(AtomicBool::new(false)),
            next_id: AtomicU64::new(1),
            live: Arc::new(Mutex::new(HashMap::new())),
        })
    }

    /// A handle that stops [`serve`](Self::serve).
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle {
            stop: Arc::clone(&self.stop),
            socket: self.socket.clone(),
            live: Arc::clone(&self.live),
        }
    }

    /// Accepts clients until stopped, each on its own threads. When a
    /// client goes away, the sessions it still held are closed on the device.
    pub fn serve(mut self) -> Result<(), RelayError> {
        let mut failures = 0u32;
        while !self.stop.load(Ordering::SeqCst) {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
            let client = Client::new(
                id,
                Arc::clone(&self.link),
                Arc::clone(&self.stats),
                Arc::clone(&self.classify),
            );
            let device = Arc::new(RelayDevice::new(client, mem.clone(), self.link.config()));
            let mut daemon =
                VhostUserDaemon::new(format!("vgpu-guestd-{id}"), Arc::clone(&device), mem)
                    .map_err(|e| RelayError::Daemon(e.to_string()))?;
            if let Err(e) = daemon.start(&mut self.listener) {
                if self.stop.load(Ordering::SeqCst) {
                    break;
                }
                failures += 1;
                tracing::error!(error = %e, failures, "Cannot accept a client");
                if failures >= MAX_ACCEPT_FAILURES {
                    return Err(RelayError::Daemon(e.to_string()));
                }
                thread::sleep(std::time::Duration::from_millis(50));
                continue;
            }
            failures = 0;
            if self.stop.load(Ordering::SeqCst) {
                // The wake-up connection of StopHandle::stop.
                daemon.request_shutdown();
                finish(daemon, &device);
                break;
            }
            self.stats.client_connected();
            tracing::info!(client = id, "Client connected");
            lock(&self.live).insert(id, Arc::clone(&device) as Arc<dyn LiveClient>);
            let live = Arc::clone(&self.live);
            let stats = Arc::clone(&self.stats);
            let spawned = thread::Builder::new()
                .name(format!("vgpu-guestd-{id}"))
                .spawn(move || {
                    match daemon.wait() {
                        Ok(())
                        | Err(DaemonError::HandleRequest(
                            VhostUserError::Disconnected | VhostUserError::PartialMessage,
                        )) => {}
                        Err(e) => tracing::warn!(client = id, error = %e, "Client connection failed"),
                    }
                    lock(&live).remove(&id);
                    let held = device.client().sessions().len();
                    let closed = finish(daemon, &device);
                    stats.client_gone(closed as u64);
                    eprintln!(
                        "vgpu-guestd: client {id} disconnected; closed {closed} of its {held} sessions"
                    );
                });
            if let Err(e) = spawned {
                tracing::error!(client = id, error = %e, "Cannot start a client thread");
            }
        }
        Ok(())
    }
}

/// Stops a finished client's vring workers, then closes the sessions it
/// still held; returns how many were closed.
fn finish<L: DeviceLink + ?Sized + 'static>(
    daemon: VhostUserDaemon<Arc<RelayDevice<L>>>,
    device: &RelayDevice<L>,
) -> usize {
    for handler in daemon.get_epoll_handlers() {
        handler.send_exit_event();
    }
    // Dropping the daemon joins its workers: no request is in progress after.
    drop(daemon);
    // `device` still maps the client's memory, so work the device may still
    // do on it (async copies) lands in live pages until the sessions close.
    device.client().close()
}

#[cfg(test)]
#[path = "relay_tests.rs"]
mod tests;
