//! Process isolation: every frontend connection is served by its own worker process.
//!
//! On a real GPU a faulting kernel costs its whole process its CUDA state (measured on the
//! H100: every later call in every context of the process fails). So that a fault reaches only
//! the session that caused it, a process-isolated backend's main process (the [`WorkerPool`])
//! opens no device at all. It binds the slice's socket, creates the slice's shared memory
//! counters ([`SliceMemory::create_shared`]) and keeps one *warm* worker ready: a copy of the
//! backend binary, started with `--worker N`, that has already opened its device and waits in
//! `accept` on the inherited listening socket. The worker takes exactly one connection, tells
//! the main process so (which starts the next warm worker), stops listening, serves that
//! connection, and exits when it ends. A fault poisons that worker only; it gives its guest the
//! sticky error, exits, and the guest opens a new session on a fresh worker. Nothing else on
//! the slice notices.
//!
//! What the workers share lives outside them, so a worker's death loses nothing: the slice's
//! memory counters (each worker's row is recounted by the main process when it dies) and the
//! grant board slot (each worker owns one bit of its busy and waiting masks, cleared when it
//! dies). Workers get SIGTERM when the main process stops, and SIGKILL when it dies
//! (`PR_SET_PDEATHSIG`).
//!
//! Inherited descriptors: [`LISTEN_FD`], [`SLICE_FD`], [`NOTIFY_FD`]. Notifications are single
//! bytes on a pipe (atomic below `PIPE_BUF`): [`READY`] or [`ACCEPTED`], or-ed with the index.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vgpu_board::Board;
use vhost::vhost_user::Listener;

use crate::config::{BackendConfig, WorkerRole};
use crate::server::Error;
use crate::slice::{SliceMemory, MAX_WORKERS};

/// The listening socket, in a worker.
pub const LISTEN_FD: RawFd = 3;
/// The slice's shared memory counters, in a worker.
pub const SLICE_FD: RawFd = 4;
/// The write end of the notification pipe, in a worker.
pub const NOTIFY_FD: RawFd = 5;

/// "Worker N has opened its device and waits for a connection."
pub const READY: u8 = 0x40;
/// "Worker N has taken a connection."
pub const ACCEPTED: u8 = 0x80;
const INDEX_MASK: u8 = 0x3f;
const _: () = assert!(MAX_WORKERS == INDEX_MASK as usize + 1);

/// Consecutive workers that may fail to start before the backend gives up.
const MAX_START_FAILURES: u32 = 5;
/// The first pause after a worker failed to start (doubling up to [`MAX_BACKOFF`]).
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long stopping workers get before SIGKILL (within the 2 s the scheduler gives the backend).
const STOP_GRACE: Duration = Duration::from_millis(1500);
/// The main loop's longest sleep.
const TICK: Duration = Duration::from_millis(20);

/// A worker's end of its link to the main process.
pub struct WorkerLink {
    index: usize,
    notify: File,
    accepting: Arc<AtomicBool>,
}

static INHERITED: AtomicBool = AtomicBool::new(false);

impl WorkerLink {
    /// Takes the descriptors the main process handed this worker: the link, the listening
    /// socket, and the slice's counters (mapped as row `role.index`). Only once per process.
    pub(crate) fn inherit(role: WorkerRole) -> io::Result<(WorkerLink, Listener, SliceMemory)> {
        if INHERITED.swap(true, Ordering::SeqCst) {
            return Err(io::Error::other(
                "The worker descriptors were already taken",
            ));
        }
        for fd in [LISTEN_FD, SLICE_FD, NOTIFY_FD] {
            // SAFETY: F_GETFD only reads the descriptor's flags.
            if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
                return Err(io::Error::other(format!(
                    "Descriptor {fd} was not inherited: a worker is started by its backend, not by hand"
                )));
            }
        }
        // SAFETY: the main process placed these descriptors for this process alone (checked
        // open above), and the swap above makes this the only place that takes them.
        let (listener, slice_fd, notify) = unsafe {
            (
                Listener::from_raw_fd(LISTEN_FD),
                OwnedFd::from_raw_fd(SLICE_FD),
                File::from_raw_fd(NOTIFY_FD),
            )
        };
        // The mapping outlives the descriptor, which closes here.
        let slice = SliceMemory::open_shared(&slice_fd, role.index)?;
        let link = WorkerLink {
            index: role.index,
            notify,
            accepting: Arc::new(AtomicBool::new(true)),
        };
        Ok((link, listener, slice))
    }

    /// The worker's index.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Set while the worker waits for its connection.
    pub(crate) fn accepting(&self) -> Arc<AtomicBool> {
        self.accepting.clone()
    }

    fn send(&self, what: u8) {
        let byte = what | (self.index as u8 & INDEX_MASK);
        if let Err(e) = (&self.notify).write_all(&[byte]) {
            tracing::warn!(error = %e, "Cannot notify the backend's main process");
        }
    }

    /// Tells the main process this worker is ready for a connection.
    pub(crate) fn ready(&self) {
        self.send(READY);
    }

    /// Tells the main process this worker has its connection (or failed to accept one).
    pub(crate) fn accepted(&self) {
        self.accepting.store(false, Ordering::SeqCst);
        self.send(ACCEPTED);
    }
}

/// One worker process, seen from the main process.
struct Worker {
    child: Child,
    ready: bool,
    accepted: bool,
}

/// Stops a [`WorkerPool`] from another thread.
#[derive(Clone)]
pub struct PoolStopHandle(Arc<AtomicBool>);

impl PoolStopHandle {
    /// Asks the pool to stop its workers and return.
    pub fn stop(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Builds the command line of worker `index` (the backend binary with `--worker index`).
pub type WorkerCommand = Box<dyn Fn(usize) -> Command + Send>;

/// The main process of a process-isolated backend.
pub struct WorkerPool {
    socket: PathBuf,
    listener: Listener,
    slice: SliceMemory,
    slice_fd: OwnedFd,
    notify_rx: File,
    notify_tx: OwnedFd,
    board: Option<(Board, usize)>,
    command: WorkerCommand,
    warm: usize,
    workers: HashMap<usize, Worker>,
    stop: Arc<AtomicBool>,
    failures: u32,
    next_spawn: Instant,
    ever_ready: bool,
    full_warned: bool,
}

impl WorkerPool {
    /// Binds the socket, creates the slice's counters and the notification pipe, and records
    /// this process on the board slot (if any). Starts no worker yet.
    pub fn new(config: &BackendConfig, warm: usize, command: WorkerCommand) -> Result<Self, Error> {
        let listener = crate::server::bind(&config.socket)?;
        // The workers set the limit they clamp to their device; until then, the configured one.
        let (slice, slice_fd) = SliceMemory::create_shared(config.memory_limit.unwrap_or(u64::MAX))
            .map_err(Error::Worker)?;
        let (notify_rx, notify_tx) = pipe().map_err(Error::Worker)?;
        let board = match &config.board {
            Some(b) => {
                let board = Board::open(&b.path)?;
                let slot = board.slot(b.slot)?;
                slot.set_pid(std::process::id());
                slot.heartbeat();
                Some((board, b.slot))
            }
            None => None,
        };
        tracing::info!(
            slice = %config.slice_name,
            warm,
            "Listening on {}; each connection gets its own worker process",
            config.socket.display()
        );
        Ok(WorkerPool {
            socket: config.socket.clone(),
            listener,
            slice,
            slice_fd,
            notify_rx,
            notify_tx,
            board,
            command,
            warm: warm.clamp(1, MAX_WORKERS),
            workers: HashMap::new(),
            stop: Arc::new(AtomicBool::new(false)),
            failures: 0,
            next_spawn: Instant::now(),
            ever_ready: false,
            full_warned: false,
        })
    }

    /// A handle that stops [`WorkerPool::run`].
    pub fn stop_handle(&self) -> PoolStopHandle {
        PoolStopHandle(self.stop.clone())
    }

    /// The slice's counters (all workers').
    pub fn slice(&self) -> &SliceMemory {
        &self.slice
    }

    /// Keeps a warm worker ready and reaps finished ones until stopped; then stops every
    /// worker (SIGTERM, SIGKILL after [`STOP_GRACE`]). Fails when workers keep failing to start
    /// (the first one failing fails at once: the device cannot be opened).
    pub fn run(mut self) -> Result<(), Error> {
        let result = self.run_until_stopped();
        self.stop_workers();
        match &result {
            Ok(()) => tracing::info!("Backend stopped"),
            Err(e) => tracing::error!(error = %e, "Backend stopped on an error"),
        }
        result
    }

    fn run_until_stopped(&mut self) -> Result<(), Error> {
        while !self.stop.load(Ordering::SeqCst) {
            self.reap();
            self.read_notifications();
            if self.failures > 0 && !self.ever_ready {
                return Err(Error::Workers(
                    "The first worker process failed to start (its error is above)".into(),
                ));
            }
            if self.failures >= MAX_START_FAILURES {
                return Err(Error::Workers(format!(
                    "{} worker processes in a row failed to start",
                    self.failures
                )));
            }
            if let Some((board, slot)) = &self.board {
                if let Ok(slot) = board.slot(*slot) {
                    let (resident, swapped) = self.slice.residency();
                    slot.set_memory(resident, swapped);
                }
            }
            let warm = self.workers.values().filter(|w| !w.accepted).count();
            if warm < self.warm && Instant::now() >= self.next_spawn {
                self.spawn_next();
            }
            self.wait_for_notification(TICK);
        }
        Ok(())
    }

    fn spawn_next(&mut self) {
        let Some(index) = (0..MAX_WORKERS).find(|i| !self.workers.contains_key(i)) else {
            if !self.full_warned {
                tracing::warn!(
                    "All {MAX_WORKERS} worker processes serve connections; new ones wait"
                );
                self.full_warned = true;
            }
            return;
        };
        self.full_warned = false;
        match self.spawn(index) {
            Ok(child) => {
                tracing::debug!(worker = index, pid = child.id(), "Worker started");
                self.workers.insert(
                    index,
                    Worker {
                        child,
                        ready: false,
                        accepted: false,
                    },
                );
            }
            Err(e) => {
                tracing::error!(worker = index, error = %e, "Cannot start a worker process");
                self.start_failed();
            }
        }
    }

    fn spawn(&self, index: usize) -> io::Result<Child> {
        let mut cmd = (self.command)(index);
        let sources = [
            self.listener.as_raw_fd(),
            self.slice_fd.as_raw_fd(),
            self.notify_tx.as_raw_fd(),
        ];
        let parent = std::process::id();
        // SAFETY: the closure runs in the child between fork and exec and calls only
        // async-signal-safe functions (fcntl, dup2, prctl, getppid) on descriptors it owns.
        unsafe {
            cmd.pre_exec(move || place_descriptors(sources, parent));
        }
        cmd.spawn()
    }

    fn start_failed(&mut self) {
        self.failures += 1;
        let backoff = FIRST_BACKOFF
            .saturating_mul(1 << self.failures.min(8).saturating_sub(1))
            .min(MAX_BACKOFF);
        self.next_spawn = Instant::now() + backoff;
    }

    /// Collects finished workers and gives back what they held.
    fn reap(&mut self) {
        let mut done = Vec::new();
        for (&index, worker) in &mut self.workers {
            match worker.child.try_wait() {
                Ok(Some(status)) => done.push((index, status)),
                Ok(None) => {}
                Err(e) => tracing::warn!(worker = index, error = %e, "Cannot wait for a worker"),
            }
        }
        // Notifications sent just before exiting count.
        if !done.is_empty() {
            self.read_notifications();
        }
        for (index, status) in done {
            let Some(worker) = self.workers.remove(&index) else {
                continue;
            };
            self.forget(index);
            if worker.accepted {
                log_end(index, status);
            } else if !worker.ready || !status.success() {
                tracing::error!(worker = index, %status, "A worker process failed before it got a connection");
                self.start_failed();
            }
        }
    }

    /// Gives back a dead worker's slice memory and board flags.
    fn forget(&self, index: usize) {
        self.slice.forget_worker(index);
        if let Some((board, slot)) = &self.board {
            if let Ok(slot) = board.worker_slot(*slot, index) {
                slot.clear_worker();
            }
        }
    }

    fn read_notifications(&mut self) {
        let mut buf = [0u8; 64];
        loop {
            match (&self.notify_rx).read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    for &byte in &buf[..n] {
                        self.note(byte);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::warn!(error = %e, "Cannot read worker notifications");
                    return;
                }
            }
        }
    }

    fn note(&mut self, byte: u8) {
        let index = usize::from(byte & INDEX_MASK);
        let Some(worker) = self.workers.get_mut(&index) else {
            return;
        };
        if byte & ACCEPTED != 0 {
            worker.accepted = true;
            tracing::info!(
                worker = index,
                pid = worker.child.id(),
                "A worker took a connection"
            );
        } else if byte & READY != 0 {
            worker.ready = true;
            self.ever_ready = true;
            self.failures = 0;
        }
    }

    fn wait_for_notification(&self, timeout: Duration) {
        let mut pfd = libc::pollfd {
            fd: self.notify_rx.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd; the call only writes its revents.
        unsafe { libc::poll(&mut pfd, 1, ms) };
    }

    fn stop_workers(&mut self) {
        for worker in self.workers.values() {
            signal(&worker.child, libc::SIGTERM);
        }
        let deadline = Instant::now() + STOP_GRACE;
        while !self.workers.is_empty() && Instant::now() < deadline {
            self.reap();
            std::thread::sleep(Duration::from_millis(5));
        }
        for (index, worker) in &mut self.workers {
            tracing::warn!(worker = index, "A worker did not stop in time; killing it");
            signal(&worker.child, libc::SIGKILL);
            let _ = worker.child.wait();
        }
        let indices: Vec<usize> = self.workers.drain().map(|(i, _)| i).collect();
        for index in indices {
            self.forget(index);
        }
        tracing::debug!(socket = %self.socket.display(), "Workers stopped");
    }
}

fn log_end(index: usize, status: ExitStatus) {
    if status.success() {
        tracing::info!(worker = index, "Frontend disconnected; its worker ended");
    } else if let Some(sig) = status.signal() {
        tracing::warn!(
            worker = index,
            signal = sig,
            "A worker was killed; only its connection is lost"
        );
    } else {
        tracing::warn!(worker = index, %status, "A worker stopped on an error (a kernel fault poisons only its own process)");
    }
}

fn signal(child: &Child, sig: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill has no memory effects; the pid is our unreaped child.
        unsafe { libc::kill(pid, sig) };
    }
}

/// A pipe whose read end does not block; both ends close on exec.
fn pipe() -> io::Result<(File, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors are new and owned by nothing else.
    let (rx, tx) = unsafe { (File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // The write end blocks (a worker's single byte always fits).
    // SAFETY: F_SETFL on our own descriptor.
    unsafe { libc::fcntl(tx.as_raw_fd(), libc::F_SETFL, 0) };
    Ok((rx, tx))
}

/// In the child, between fork and exec: puts the three descriptors at [`LISTEN_FD`],
/// [`SLICE_FD`], [`NOTIFY_FD`] (without close-on-exec) and asks for SIGKILL when the main
/// process dies: a killed backend takes its workers with it, as it would were it one process
/// (a stopped one stops them with SIGTERM first).
fn place_descriptors(sources: [RawFd; 3], parent: u32) -> io::Result<()> {
    let mut high = [0 as RawFd; 3];
    for (h, src) in high.iter_mut().zip(sources) {
        // Copies above the targets first, so that a source already at 3..5 is not clobbered.
        // SAFETY: F_DUPFD_CLOEXEC duplicates a descriptor we own.
        *h = unsafe { libc::fcntl(src, libc::F_DUPFD_CLOEXEC, 10) };
        if *h < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    for (target, h) in [LISTEN_FD, SLICE_FD, NOTIFY_FD].into_iter().zip(high) {
        // SAFETY: dup2 onto a fixed number; the new descriptor has close-on-exec cleared.
        if unsafe { libc::dup2(h, target) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // SAFETY: PR_SET_PDEATHSIG takes a signal number; getppid has no effects.
    unsafe {
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
            return Err(io::Error::last_os_error());
        }
        if u32::try_from(libc::getppid()).ok() != Some(parent) {
            // The main process died before the request took effect.
            return Err(io::Error::other("The backend's main process is gone"));
        }
    }
    Ok(())
}

#[cfg(test)]
#[path = "workers_tests.rs"]
mod tests;
