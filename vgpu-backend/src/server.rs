//! The socket server: one vhost-user daemon per accepted frontend, each on
//! its own threads, all sharing one executor and one slice.

use std::collections::HashMap;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};

use thiserror::Error;
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{Error as DaemonError, ShutdownHandle, VhostUserDaemon};
use vm_memory::GuestMemoryAtomic;

use crate::config::{BackendConfig, DeviceSpec, SliceUuid, DEFAULT_EMULATED_MEMORY};
use crate::device::VgpuDevice;
use crate::gpu::emulated::EmulatedGpu;
use crate::gpu::timed::EmulatedClock;
use crate::gpu::Gpu;
use crate::guest::GuestMemoryMmap;
use crate::memctl::{spawn_watcher, LimitFollower, MemoryWatcher, Publish};
use crate::metering::MeterRegistry;
use crate::reporting::UsageReporting;
use crate::shared::DeviceShared;
use crate::slice::SliceMemory;
use crate::throttle::{Monitor, Throttle};
use crate::workers::WorkerLink;

/// Why a backend could not start or stopped serving.
#[derive(Debug, Error)]
pub enum Error {
    /// A kernel faulted and the process's CUDA state is lost: the backend must be restarted.
    #[error("A kernel faulted ({0}); the backend stopped so that a clean one can take its place")]
    Poisoned(vgpu_spec::Status),
    /// The CUDA device could not be opened.
    #[error("Cannot open CUDA device {ordinal}: {message}")]
    OpenCuda {
        /// The ordinal asked for.
        ordinal: usize,
        /// What the executor said.
        message: String,
    },
    /// The memory limit is zero or above the device's memory.
    #[error("Memory limit of {limit} bytes is invalid (the device has {total} bytes)")]
    MemoryLimit {
        /// The limit asked for.
        limit: u64,
        /// The device's memory.
        total: u64,
    },
    /// The queue size limit is outside 1..=1024.
    #[error("Queue size limit {0} is invalid: it must be between 1 and 1024")]
    QueueSize(u16),
    /// The socket could not be created.
    #[error("Cannot listen on {path}: {source}")]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        source: VhostUserError,
    },
    /// The socket's directory could not be created.
    #[error("Cannot create the socket directory {path}: {source}")]
    SocketDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The vhost-user daemon failed.
    #[error("vhost-user daemon failed: {0}")]
    Daemon(String),
    /// The grant board could not be opened.
    #[error("Cannot use the grant board: {0}")]
    Board(#[from] vgpu_board::BoardError),
    /// The emulated GPU lock file could not be opened.
    #[error("Cannot open the emulated GPU lock {path}: {source}")]
    GpuLock {
        /// The lock file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The board monitor thread could not be started.
    #[error("Cannot start the board monitor thread: {0}")]
    Monitor(std::io::Error),
    /// The swap reserve thread could not be started.
    #[error("Cannot start the swap reserve thread: {0}")]
    SwapReserve(std::io::Error),
    /// The usage reporting thread could not be started.
    #[error("Cannot start the usage reporting thread: {0}")]
    Reporting(std::io::Error),
    /// A worker process could not use what its main process handed it.
    #[error("Cannot set up the worker process: {0}")]
    Worker(std::io::Error),
    /// The worker processes of a process-isolated backend failed.
    #[error("{0}")]
    Workers(String),
}

/// Consecutive accept failures after which the backend gives up.
const MAX_ACCEPT_FAILURES: u32 = 100;
/// Pause after a failed accept.
const ACCEPT_BACKOFF: std::time::Duration = std::time::Duration::from_millis(50);

fn daemon_error(e: DaemonError) -> Error {
    Error::Daemon(e.to_string())
}

/// Opens the grant board slot the config names (a disabled throttle
/// without one).
pub fn open_throttle(config: &BackendConfig) -> Result<Arc<Throttle>, Error> {
    match (&config.board, config.worker) {
        (Some(b), Some(w)) => Ok(Arc::new(Throttle::open_worker(
            &b.path,
            b.slot,
            w.index,
            config.max_inflight,
        )?)),
        (Some(b), None) => Ok(Arc::new(Throttle::open(
            &b.path,
            b.slot,
            config.max_inflight,
        )?)),
        (None, _) => Ok(Throttle::disabled()),
    }
}

/// Opens the executor a device spec names, reporting to `throttle`.
pub fn open_gpu(config: &BackendConfig, throttle: &Arc<Throttle>) -> Result<Arc<dyn Gpu>, Error> {
    match config.device {
        DeviceSpec::Emulated => {
            let total = config
                .emulated_memory
                .or(config.emulated_gpu_memory)
                .or(config.memory_limit)
                .unwrap_or(DEFAULT_EMULATED_MEMORY);
            let clock = match &config.emulated_gpu_lock {
                Some(path) => {
                    EmulatedClock::with_lock_file(path, throttle.clone()).map_err(|source| {
                        Error::GpuLock {
                            path: path.clone(),
                            source,
                        }
                    })?
                }
                None => EmulatedClock::unlocked(throttle.clone()),
            };
            // Each context's elastic heap can hold the whole device (its default), so that a
            // resize never needs a new reservation.
            let mut gpu = EmulatedGpu::with_clock(total, clock);
            if let (Some(lock), Some(bytes)) =
                (&config.emulated_gpu_lock, config.emulated_gpu_memory)
            {
                let path = lock.with_extension("mem");
                let card = crate::gpu::emulated_card::EmulatedCard::open(&path, bytes)
                    .map_err(|source| Error::GpuLock { path, source })?;
                gpu = gpu.with_card(Arc::new(card));
            }
            Ok(Arc::new(match config.worker {
                Some(w) => gpu.for_worker(w.index),
                None => gpu,
            }))
        }
        DeviceSpec::Cuda(ordinal) => match crate::gpu::cuda::CudaGpu::open(ordinal) {
            Ok(gpu) => {
                // Each context's elastic heap reserves address space for the whole device (its
                // default), so that a resize never needs a new reservation.
                let gpu = gpu.with_throttle(throttle.clone());
                let gpu = if config.swap_reserve {
                    gpu.with_swap_reserve().map_err(Error::SwapReserve)?
                } else {
                    gpu
                };
                Ok(Arc::new(gpu))
            }
            Err(e) => Err(Error::OpenCuda {
                ordinal,
                message: e.to_string(),
            }),
        },
    }
}

#[derive(Default)]
struct Connections {
    next_id: AtomicU64,
    active: Mutex<HashMap<u64, ShutdownHandle>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Connections {
    fn count(&self) -> usize {
        lock(&self.active).len()
    }

    /// Disconnects every frontend and waits for their cleanup.
    fn shutdown_all(&self) {
        for handle in lock(&self.active).values() {
            handle.shutdown();
        }
        let threads = std::mem::take(&mut *lock(&self.threads));
        for t in threads {
            if t.join().is_err() {
                tracing::error!("A connection thread panicked");
            }
        }
    }

    /// Forgets threads that have finished.
    fn reap(&self) {
        let mut threads = lock(&self.threads);
        let (done, running): (Vec<_>, Vec<_>) = std::mem::take(&mut *threads)
            .into_iter()
            .partition(|t| t.is_finished());
        *threads = running;
        drop(threads);
        for t in done {
            if t.join().is_err() {
                tracing::error!("A connection thread panicked");
            }
        }
    }
}

/// Stops a running backend from another thread.
#[derive(Clone)]
pub struct StopHandle {
    stop: Arc<AtomicBool>,
    socket: PathBuf,
    /// A worker process: set while it waits for its connection.
    accepting: Option<Arc<AtomicBool>>,
}

impl StopHandle {
    /// Asks the backend to stop: it stops accepting, disconnects every
    /// frontend, frees what they held, and `serve` returns.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        match &self.accepting {
            // A worker still waiting for its connection holds nothing: it leaves at once (a
            // wake-up connection would reach whichever process accepts next).
            Some(accepting) if accepting.load(Ordering::SeqCst) => {
                tracing::info!("Worker stopped before it was given a connection");
                std::process::exit(0);
            }
            Some(_) => {}
            // Wake the accept call; the connection is dropped unserved.
            None => {
                let _ = UnixStream::connect(&self.socket);
            }
        }
    }
}

/// A bound, not yet serving backend.
pub struct Backend {
    shared: Arc<DeviceShared>,
    listener: Option<Listener>,
    /// Set in a worker process: serves one connection, then returns.
    worker: Option<WorkerLink>,
    socket: PathBuf,
    stop: Arc<AtomicBool>,
    connections: Arc<Connections>,
    monitor: Option<Monitor>,
    memory_watcher: Option<MemoryWatcher>,
    reporting: Option<UsageReporting>,
}

impl Backend {
    /// Opens the grant board (if any) and the device the config names, and
    /// binds the socket.
    pub fn new(config: BackendConfig) -> Result<Backend, Error> {
        let throttle = open_throttle(&config)?;
        let gpu = open_gpu(&config, &throttle)?;
        Self::build(config, gpu, throttle)
    }

    /// Binds the socket, serving the given executor (`config.device` is
    /// not looked at; the board, if any, gates dispatch but the executor
    /// reports no GPU time to it).
    pub fn with_gpu(config: BackendConfig, gpu: Arc<dyn Gpu>) -> Result<Backend, Error> {
        let throttle = open_throttle(&config)?;
        Self::build(config, gpu, throttle)
    }

    fn build(
        config: BackendConfig,
        gpu: Arc<dyn Gpu>,
        throttle: Arc<Throttle>,
    ) -> Result<Backend, Error> {
        let total = gpu.identity().total_mem;
        let mut limit = config.memory_limit.unwrap_or(total);
        if limit == 0 {
            return Err(Error::MemoryLimit { limit, total });
        }
        if limit > total {
            // A slice declared larger than the card (the scheduler's default GPU size is a round
            // 80 GiB; an "80 GB" H100 has 79.2 GiB) gets the whole card, not a refusal.
            tracing::warn!(
                limit,
                total,
                "The slice's memory limit exceeds the device's memory; the slice gets the device's"
            );
            limit = total;
        }
        if config.max_queue_size == 0 || config.max_queue_size > vgpu_spec::MAX_QUEUE_SIZE {
            return Err(Error::QueueSize(config.max_queue_size));
        }
        let uuid = config
            .uuid
            .unwrap_or_else(|| SliceUuid::generate(&config.slice_name));
        let (slice, worker, inherited) = match config.worker {
            Some(role) => {
                let (link, listener, slice) = WorkerLink::inherit(role).map_err(Error::Worker)?;
                slice.set_limit(limit);
                (slice, Some(link), Some(listener))
            }
            None => (SliceMemory::new(limit), None, None),
        };
        let slice = Arc::new(slice);
        let mut shared = DeviceShared::new(
            gpu,
            slice,
            &config.slice_name,
            uuid,
            config.max_sessions,
            config.max_queue_size,
        );
        shared.poll_after_work = config.poll_after_work;
        shared.fault_restart_after = config.fault_restart_after;
        shared.throttle = throttle;
        shared.claimer = config.metering.as_ref().map(|m| {
            Arc::new(crate::memctl::Claimer::new(
                &m.scheduler_socket,
                config.slice_name.clone(),
            ))
        });
        let mut meters = MeterRegistry::new(config.metering.is_some());
        if worker.is_some() {
            // Each worker numbers its sessions in its own range of 2^20.
            meters = meters.numbered_from((shared.slice.take_start_number() << 20) + 1);
        }
        shared.meters = Arc::new(meters);
        let shared = Arc::new(shared);
        let monitor = shared.throttle.spawn_monitor().map_err(Error::Monitor)?;
        let publish = if worker.is_some() {
            Publish::Worker(shared.slice.clone())
        } else {
            Publish::Board
        };
        let follower = LimitFollower {
            slice: shared.slice.clone(),
            device_total: total,
        };
        let memory_watcher = spawn_watcher(
            shared.memory.clone(),
            shared.throttle.clone(),
            publish,
            follower,
        )
        .map_err(Error::Monitor)?;
        let listener = match inherited {
            Some(listener) => listener,
            None => bind(&config.socket)?,
        };
        tracing::info!(
            slice = %config.slice_name,
            %uuid,
            device = %shared.gpu.identity().name,
            memory_limit = limit,
            "listening on {}",
            config.socket.display()
        );
        let reporting = match &config.metering {
            Some(m) => Some(
                UsageReporting::start(m, &config.slice_name, shared.meters.clone())
                    .map_err(Error::Reporting)?,
            ),
            None => None,
        };
        Ok(Backend {
            shared,
            listener: Some(listener),
            worker,
            socket: config.socket,
            stop: Arc::new(AtomicBool::new(false)),
            connections: Arc::new(Connections::default()),
            monitor,
            memory_watcher: Some(memory_watcher),
            reporting,
        })
    }

    /// The grant board slot's local view: usage counters, preemption
    /// latency.
    pub fn throttle(&self) -> Arc<Throttle> {
        self.shared.throttle.clone()
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The slice's memory accounting (shared by all connections).
    pub fn slice(&self) -> Arc<SliceMemory> {
        self.shared.slice.clone()
    }

    /// The config space the device presents.
    pub fn config_space(&self) -> vgpu_spec::VgpuConfig {
        self.shared.config
    }

    /// A handle that stops [`Backend::serve`] from another thread.
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle {
            stop: self.stop.clone(),
            socket: self.socket.clone(),
            accepting: self.worker.as_ref().map(WorkerLink::accepting),
        }
    }

    /// Runs [`Backend::serve`] on a thread.
    pub fn spawn(self) -> Result<RunningBackend, Error> {
        let stop = self.stop_handle();
        let slice = self.slice();
        let throttle = self.throttle();
        let connections = self.connections.clone();
        let socket = self.socket.clone();
        let thread = thread::Builder::new()
            .name("vgpu-accept".into())
            .spawn(move || self.serve())
            .map_err(|e| Error::Daemon(format!("Cannot start the accept thread: {e}")))?;
        Ok(RunningBackend {
            stop,
            slice,
            throttle,
            connections,
            socket,
            thread: Some(thread),
        })
    }

    /// The sessions' usage meters.
    pub fn meters(&self) -> Arc<MeterRegistry> {
        self.shared.meters.clone()
    }

    /// Accepts frontends until stopped, serving each on its own threads.
    /// On stop, every frontend is disconnected and everything freed, and
    /// the last usage report is sent.
    pub fn serve(mut self) -> Result<(), Error> {
        let watcher = self.watch_for_poison();
        let result = if self.worker.is_some() {
            self.serve_one()
        } else {
            self.accept_loop()
        };
        drop(watcher);
        // Held connections stop waiting for a grant or for their memory, so they can close.
        self.shared.throttle.stop();
        self.shared.memory.stop();
        drop(self.memory_watcher.take());
        self.connections.shutdown_all();
        // Every session is closed: their final figures go out now.
        if let Some(reporting) = self.reporting.take() {
            reporting.stop();
        }
        drop(self.monitor.take());
        let result = match (result, self.shared.poisoned()) {
            (Ok(()), Some(status)) => Err(Error::Poisoned(status)),
            (result, _) => result,
        };
        if let Err(e) = &result {
            tracing::error!(error = %e, "Backend stopped on an error");
        } else {
            tracing::info!("Backend stopped");
        }
        result
    }

    /// A thread that stops the backend [`POISON_GRACE`] after a request met a sticky fault:
    /// the faulting guest gets its sticky error first, then every guest of this backend is
    /// disconnected (`CUDA_ERROR_DEVICE_UNAVAILABLE`) and the process exits, so its supervisor
    /// starts a clean one. Other slices, in other processes, never notice.
    fn watch_for_poison(&self) -> Option<PoisonWatcher> {
        let shared = self.shared.clone();
        let stop = self.stop_handle();
        let done = Arc::new(AtomicBool::new(false));
        let finished = done.clone();
        let thread = thread::Builder::new()
            .name("vgpu-poison".into())
            .spawn(move || {
                while !finished.load(Ordering::Acquire) {
                    if shared.poisoned().is_some() {
                        thread::sleep(shared.fault_restart_after);
                        stop.stop();
                        return;
                    }
                    thread::sleep(POISON_POLL);
                }
            });
        match thread {
            Ok(thread) => Some(PoisonWatcher {
                done,
                thread: Some(thread),
            }),
            Err(e) => {
                tracing::error!(error = %e, "Cannot start the fault watcher thread");
                None
            }
        }
    }

    /// A worker process: accepts one connection, tells its main process (which starts the next
    /// worker), stops listening, and serves the connection until it ends or the worker is
    /// stopped.
    fn serve_one(&mut self) -> Result<(), Error> {
        let (Some(mut listener), Some(link)) = (self.listener.take(), self.worker.as_ref()) else {
            return Ok(());
        };
        link.ready();
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let device = Arc::new(VgpuDevice::new(self.shared.clone(), mem.clone()));
        let mut daemon =
            VhostUserDaemon::new("vgpu-conn".into(), device.clone(), mem).map_err(daemon_error)?;
        let accepted = daemon.start(&mut listener);
        link.accepted();
        drop(listener);
        accepted.map_err(daemon_error)?;
        tracing::info!(worker = link.index(), "Frontend connected");
        self.start_connection(0, daemon, device);
        while !self.stop.load(Ordering::SeqCst) && self.connections.count() > 0 {
            thread::sleep(WORKER_POLL);
        }
        Ok(())
    }

    fn accept_loop(&mut self) -> Result<(), Error> {
        let Some(mut listener) = self.listener.take() else {
            return Ok(());
        };
        let mut failures = 0u32;
        while !self.stop.load(Ordering::SeqCst) {
            let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
            let device = Arc::new(VgpuDevice::new(self.shared.clone(), mem.clone()));
            let mut daemon = VhostUserDaemon::new("vgpu-conn".into(), device.clone(), mem)
                .map_err(daemon_error)?;
            if let Err(e) = daemon.start(&mut listener) {
                if self.stop.load(Ordering::SeqCst) {
                    break;
                }
                // Accept can fail transiently (out of descriptors): back off
                // and retry, but give up if it keeps failing.
                failures += 1;
                tracing::error!(error = %e, failures, "Cannot accept a frontend");
                if failures >= MAX_ACCEPT_FAILURES {
                    return Err(daemon_error(e));
                }
                thread::sleep(ACCEPT_BACKOFF);
                continue;
            }
            failures = 0;
            if self.stop.load(Ordering::SeqCst) {
                // The wake-up connection from StopHandle::stop.
                daemon.request_shutdown();
                if let Err(e) = daemon.wait() {
                    tracing::debug!(error = %e, "Wake-up connection ended");
                }
                finish_connection(daemon, &device);
                break;
            }
            self.connections.reap();
            let id = self.connections.next_id.fetch_add(1, Ordering::Relaxed);
            tracing::info!(connection = id, "Frontend connected");
            self.start_connection(id, daemon, device);
        }
        Ok(())
    }

    /// Serves an accepted connection on its own thread.
    fn start_connection(
        &self,
        id: u64,
        mut daemon: VhostUserDaemon<Arc<VgpuDevice>>,
        device: Arc<VgpuDevice>,
    ) {
        if let Some(handle) = daemon.shutdown_handle() {
            lock(&self.connections.active).insert(id, handle);
        }
        self.shared.memory.register(&device);
        let connections = self.connections.clone();
        let thread = thread::Builder::new()
            .name(format!("vgpu-conn-{id}"))
            .spawn(move || {
                match daemon.wait() {
                    Ok(()) => {}
                    Err(DaemonError::HandleRequest(
                        VhostUserError::Disconnected | VhostUserError::PartialMessage,
                    )) => {}
                    Err(e) => {
                        tracing::warn!(connection = id, error = %e, "Frontend connection failed")
                    }
                }
                finish_connection(daemon, &device);
                lock(&connections.active).remove(&id);
                tracing::info!(
                    connection = id,
                    "Frontend disconnected; its sessions are freed"
                );
            });
        match thread {
            Ok(t) => lock(&self.connections.threads).push(t),
            Err(e) => {
                lock(&self.connections.active).remove(&id);
                tracing::error!(error = %e, "Cannot start a connection thread");
            }
        }
    }
}

/// Binds the socket, creating its directory.
pub(crate) fn bind(socket: &Path) -> Result<Listener, Error> {
    if let Some(dir) = socket.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| Error::SocketDir {
            path: dir.to_owned(),
            source,
        })?;
    }
    Listener::new(socket, true).map_err(|source| Error::Listen {
        path: socket.to_owned(),
        source,
    })
}

/// How often a worker looks whether its connection has ended.
const WORKER_POLL: std::time::Duration = std::time::Duration::from_millis(20);

/// How long a poisoned backend keeps serving before it stops, by default
/// (`--fault-restart-ms`): its guests collect the sticky error of the work they had queued.
pub const POISON_GRACE: std::time::Duration = std::time::Duration::from_millis(200);

/// How often the fault watcher looks.
const POISON_POLL: std::time::Duration = std::time::Duration::from_millis(5);

/// Stops the fault watcher thread when dropped.
struct PoisonWatcher {
    done: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for PoisonWatcher {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Stops the vring workers of a finished daemon, then frees the
/// connection's sessions and memory registrations.
fn finish_connection(daemon: VhostUserDaemon<Arc<VgpuDevice>>, device: &VgpuDevice) {
    for handler in daemon.get_epoll_handlers() {
        handler.send_exit_event();
    }
    // Dropping the daemon joins its vring workers, so no request is being
    // processed once it returns.
    drop(daemon);
    device.close();
}

/// A backend serving on a thread; for in-process tests and embedding.
pub struct RunningBackend {
    stop: StopHandle,
    slice: Arc<SliceMemory>,
    throttle: Arc<Throttle>,
    connections: Arc<Connections>,
    socket: PathBuf,
    thread: Option<JoinHandle<Result<(), Error>>>,
}

impl RunningBackend {
    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The slice's memory accounting.
    pub fn slice(&self) -> &SliceMemory {
        &self.slice
    }

    /// The grant board slot's local view (usage, preemption latency).
    pub fn throttle(&self) -> &Throttle {
        &self.throttle
    }

    /// Number of frontends connected right now.
    pub fn connection_count(&self) -> usize {
        self.connections.count()
    }

    /// A handle that stops the backend.
    pub fn stop_handle(&self) -> StopHandle {
        self.stop.clone()
    }

    /// Stops the backend and waits for it: every frontend is disconnected
    /// and everything they held is freed.
    pub fn stop(mut self) -> Result<(), Error> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> Result<(), Error> {
        self.stop.stop();
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| Error::Daemon("The accept thread panicked".into()))?,
            None => Ok(()),
        }
    }
}

impl Drop for RunningBackend {
    fn drop(&mut self) {
        if let Err(e) = self.stop_and_join() {
            tracing::error!(error = %e, "Backend did not stop cleanly");
        }
    }
}

#[cfg(test)]
#[path = "server_tests.rs"]
mod tests;
