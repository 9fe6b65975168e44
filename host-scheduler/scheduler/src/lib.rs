//! The vGPU host scheduler (`vgpu-scheduler`): one per host.
//!
//! It owns the slices (shares of one physical GPU with compute and memory guarantees), admits
//! them, starts and supervises one `vgpu-backend` per attached slice, and arbitrates compute
//! between the backends through the shared-memory grant board (`vgpu-board`): every tick a pure
//! policy ([`policy::SharePolicy`]) decides who may dispatch. A REST API on
//! `$STATE_DIR/api.sock` (and optionally TCP) manages it all. Backends report their usage to
//! it ([`usage`]); it keeps the durable ledger `$STATE_DIR/ledger.sqlite3` (`vgpu-ledger`) and
//! serves OpenMetrics at `/metrics` ([`metrics`]).
//!
//! ```no_run
//! # async fn run() -> Result<(), vgpu_scheduler::SchedulerError> {
//! use vgpu_scheduler::{config::DeviceKind, Scheduler};
//! let scheduler = Scheduler::builder("/tmp/vgpu-state")
//!     .device(DeviceKind::Emulated)
//!     .backend("/usr/local/bin/vgpu-backend")
//!     .start()
//!     .await?;
//! println!("API on {}", scheduler.api_socket().display());
//! scheduler.run_until_signal().await
//! # }
//! ```
pub mod admission;
pub mod api;
pub mod arbiter;
pub mod config;
pub mod memory;
pub mod metrics;
pub mod policy;
pub mod preempt;
pub mod registry;
pub mod service;
pub mod slice;
pub mod supervisor;
pub mod timespec;
pub mod usage;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use vgpu_board::{Board, BoardError};

use crate::arbiter::{Arbiter, Roster, UtilTable};
use crate::config::{Config, ConfigError, DeviceKind};
use crate::policy::{Policy, SharePolicy, SharePolicyConfig};
use crate::registry::{Registry, RegistryError};
use crate::service::{Core, Launcher};
use crate::usage::{Metering, MeteringError};

/// The default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/vgpu";

/// How long shutdown waits for open API connections.
const SERVER_DRAIN: Duration = Duration::from_secs(5);

/// Errors starting or running the scheduler.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The saved slices are unusable.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The grant board could not be created.
    #[error(transparent)]
    Board(#[from] BoardError),
    /// The usage ledger could not be opened.
    #[error(transparent)]
    Metering(#[from] MeteringError),
    /// A file or socket operation failed.
    #[error("Cannot {what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// On what.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A TCP listener could not be bound.
    #[error("Cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Another scheduler serves this state directory.
    #[error("Another scheduler is serving {}; stop it or use another state directory.", .0.display())]
    AlreadyRunning(PathBuf),
}

/// Builds and starts a [`Scheduler`].
pub struct SchedulerBuilder {
    state_dir: PathBuf,
    config: Config,
    listen_tcp: Option<SocketAddr>,
    backend: Option<PathBuf>,
    device: Option<DeviceKind>,
    policy: Option<Box<dyn Policy>>,
}

impl std::fmt::Debug for SchedulerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SchedulerBuilder")
            .field("state_dir", &self.state_dir)
            .field("config", &self.config)
            .field("listen_tcp", &self.listen_tcp)
            .field("backend", &self.backend)
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

impl SchedulerBuilder {
    /// The configuration (default: [`Config::default`], the embedded defaults).
    pub fn config(mut self, config: Config) -> SchedulerBuilder {
        self.config = config;
        self
    }

    /// Also serve the API on this TCP address.
    pub fn listen_tcp(mut self, addr: SocketAddr) -> SchedulerBuilder {
        self.listen_tcp = Some(addr);
        self
    }

    /// The `vgpu-backend` binary (default: next to this executable, else on `PATH`).
    pub fn backend(mut self, path: impl Into<PathBuf>) -> SchedulerBuilder {
        self.backend = Some(path.into());
        self
    }

    /// Overrides the configuration's device kind.
    pub fn device(mut self, device: DeviceKind) -> SchedulerBuilder {
        self.device = Some(device);
        self
    }

    /// Replaces the default policy.
    pub fn policy(mut self, policy: Box<dyn Policy>) -> SchedulerBuilder {
        self.policy = Some(policy);
        self
    }

    /// Creates the state directory, board and API sockets, starts the arbiter and the backends
    /// of attached slices. Must run inside a multi-threaded tokio runtime.
    pub async fn start(self) -> Result<Scheduler, SchedulerError> {
        let dir = self.state_dir;
        let io_err = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| SchedulerError::Io { what, path, source }
        };
        let sockets = dir.join("slices");
        std::fs::create_dir_all(&sockets).map_err(io_err("create", &sockets))?;
        let api_socket = dir.join("api.sock");
        if std::os::unix::net::UnixStream::connect(&api_socket).is_ok() {
            return Err(SchedulerError::AlreadyRunning(api_socket));
        }
        match std::fs::remove_file(&api_socket) {
            Ok(()) => tracing::info!("removed the stale socket {}", api_socket.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("remove", &api_socket)(e)),
        }
        let registry = Registry::open(&dir, &self.config)?;
        let metering = Arc::new(Metering::open(&dir).await?);
        let board = Arc::new(Board::create(&dir.join("board"))?);
        let roster = Arc::new(Roster::default());
        let util = Arc::new(UtilTable::default());
        let launcher = Launcher {
            program: self.backend.unwrap_or_else(default_backend),
            device: self.device.unwrap_or(self.config.device),
            state_dir: dir.clone(),
            gpu_memory: self
                .config
                .gpus
                .iter()
                .map(|g| (g.index, g.memory))
                .collect(),
        };
        tracing::info!(backend = %launcher.program.display(), device = ?launcher.device, state_dir = %dir.display(), "starting");
        let core = Arc::new(Core::new(
            registry,
            Arc::clone(&board),
            launcher,
            Arc::clone(&roster),
            Arc::clone(&util),
        ));
        let policy = self.policy.unwrap_or_else(|| {
            let defaults = SharePolicyConfig::default();
            Box::new(SharePolicy::new(SharePolicyConfig {
                window_ns: self.config.window_ms * 1_000_000,
                // The holder may run ahead by at least two ticks, so grants move at most every
                // other tick.
                switch_slack_ns: defaults.switch_slack_ns.max(2_000 * self.config.tick_us),
            }))
        });
        let arbiter = Arbiter::start(
            board,
            roster,
            util,
            Duration::from_micros(self.config.tick_us),
            policy,
        )
        .map_err(io_err("start the arbiter thread for", &dir))?;

        let (shutdown, _) = watch::channel(false);
        let app = api::router(Arc::clone(&core))
            .merge(usage::router(Arc::clone(&metering)))
            .merge(metrics::router(Arc::clone(&core), Arc::clone(&metering)));
        let mut servers = Vec::new();
        let unix = tokio::net::UnixListener::bind(&api_socket)
            .map_err(io_err("listen on", &api_socket))?;
        servers.push(serve(unix, app.clone(), &shutdown));
        let mut tcp_addr = None;
        if let Some(addr) = self.listen_tcp {
            let tcp = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| SchedulerError::Listen { addr, source })?;
            tcp_addr = tcp.local_addr().ok();
            servers.push(serve(tcp, app, &shutdown));
        }
        tracing::info!(socket = %api_socket.display(), tcp = ?tcp_addr, "API listening");
        core.attach_marked();
        servers.push(restore_loop(Arc::clone(&core), &shutdown));
        Ok(Scheduler {
            core,
            metering,
            arbiter: Some(arbiter),
            servers,
            shutdown,
            api_socket,
            tcp_addr,
        })
    }
}

fn serve<L>(listener: L, app: axum::Router, shutdown: &watch::Sender<bool>) -> JoinHandle<()>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    let mut rx = shutdown.subscribe();
    tokio::spawn(async move {
        let stopped = async move {
            // An error means the sender is gone: stop as well.
            let _ = rx.wait_for(|stop| *stop).await;
        };
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(stopped)
            .await
        {
            tracing::error!("API server failed: {e}");
        }
    })
}

/// Every 100 ms, gives slices reclaimed for a claim their memory back once it fits again.
fn restore_loop(core: Arc<Core>, shutdown: &watch::Sender<bool>) -> JoinHandle<()> {
    let mut rx = shutdown.subscribe();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = rx.wait_for(|stop| *stop) => return,
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
            core.restore_when_room();
        }
    })
}

/// `vgpu-backend` next to this executable if there is one, else the bare name (found on PATH).
fn default_backend() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("vgpu-backend")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("vgpu-backend"))
}

/// A running scheduler.
#[derive(Debug)]
pub struct Scheduler {
    core: Arc<Core>,
    metering: Arc<Metering>,
    arbiter: Option<Arbiter>,
    servers: Vec<JoinHandle<()>>,
    shutdown: watch::Sender<bool>,
    api_socket: PathBuf,
    tcp_addr: Option<SocketAddr>,
}

impl Scheduler {
    /// A builder for a scheduler keeping its state in `state_dir`.
    pub fn builder(state_dir: impl Into<PathBuf>) -> SchedulerBuilder {
        SchedulerBuilder {
            state_dir: state_dir.into(),
            config: Config::default(),
            listen_tcp: None,
            backend: None,
            device: None,
            policy: None,
        }
    }

    /// The API's Unix socket.
    pub fn api_socket(&self) -> &Path {
        &self.api_socket
    }

    /// The API's TCP address, if it listens on TCP.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp_addr
    }

    /// The operations behind the API.
    pub fn core(&self) -> &Arc<Core> {
        &self.core
    }

    /// The usage ledger and its per-slice summaries.
    pub fn metering(&self) -> &Arc<Metering> {
        &self.metering
    }

    /// Stops serving the API, stops every backend (SIGTERM, then SIGKILL) and the arbiter.
    /// Attached slices stay marked attached and come back with the next start.
    pub async fn shutdown(mut self) {
        tracing::info!("shutting down");
        // Backends first, while the API still serves: each reports its last interval to the
        // ledger as it stops.
        self.core.stop_all().await;
        let _ = self.shutdown.send(true);
        for s in self.servers.drain(..) {
            let abort = s.abort_handle();
            if tokio::time::timeout(SERVER_DRAIN, s).await.is_err() {
                abort.abort();
            }
        }
        if let Some(a) = self.arbiter.take() {
            a.stop();
        }
        if let Err(e) = std::fs::remove_file(&self.api_socket) {
            tracing::warn!("cannot remove {}: {e}", self.api_socket.display());
        }
        tracing::info!("stopped");
    }

    /// Runs until SIGTERM or SIGINT, then shuts down.
    pub async fn run_until_signal(self) -> Result<(), SchedulerError> {
        use tokio::signal::unix::{signal, SignalKind};
        let sig_err = |source| SchedulerError::Io {
            what: "install a signal handler for",
            path: self.api_socket.clone(),
            source,
        };
        let mut term = signal(SignalKind::terminate()).map_err(sig_err)?;
        let mut int = signal(SignalKind::interrupt()).map_err(sig_err)?;
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
        self.shutdown().await;
        Ok(())
    }
}
