//! `vgpu-scheduler`: the host's slice scheduler and backend supervisor.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;
use vgpu_scheduler::config::{Config, DeviceKind};
use vgpu_scheduler::{Scheduler, SchedulerError, DEFAULT_STATE_DIR};

/// Schedules GPU slices: admits them, runs one vgpu-backend per attached slice and arbitrates
/// compute between them.
#[derive(Debug, Parser)]
#[command(name = "vgpu-scheduler", version)]
struct Cli {
    /// The configuration file (vgpu.toml); built-in defaults without it.
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Where the API socket, the grant board, backend sockets and saved slices live.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Also serve the API on this TCP address (e.g. 127.0.0.1:7070).
    #[arg(long, value_name = "ADDR")]
    listen_tcp: Option<SocketAddr>,
    /// The vgpu-backend binary; default: next to this executable, else on PATH.
    #[arg(long, value_name = "PATH")]
    backend: Option<PathBuf>,
    /// Overrides the configuration's device: cuda or emulated.
    #[arg(long, value_name = "cuda|emulated")]
    device: Option<DeviceKind>,
    /// Log filter (tracing EnvFilter syntax); default $RUST_LOG, else "info".
    #[arg(long, value_name = "FILTER")]
    log: Option<String>,
}

async fn run(cli: Cli) -> Result<(), SchedulerError> {
    let config = match &cli.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    let mut builder = Scheduler::builder(cli.state_dir).config(config);
    if let Some(addr) = cli.listen_tcp {
        builder = builder.listen_tcp(addr);
    }
    if let Some(path) = cli.backend {
        builder = builder.backend(path);
    }
    if let Some(device) = cli.device {
        builder = builder.device(device);
    }
    builder.start().await?.run_until_signal().await
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = cli
        .log
        .as_deref()
        .map(EnvFilter::new)
        .or_else(|| EnvFilter::try_from_default_env().ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vgpu-scheduler: Cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vgpu-scheduler: {e}");
            ExitCode::FAILURE
        }
    }
}
