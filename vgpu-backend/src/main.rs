//! `vgpu-backend`: serves one GPU slice on a vhost-user socket.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;
use vgpu_backend::config::parse_size;
use vgpu_backend::{
    Backend, BackendConfig, DeviceSpec, Isolation, SliceUuid, WorkerPool, WorkerRole,
};

/// Serves one GPU slice to guests over a vhost-user socket.
#[derive(Debug, Parser)]
#[command(name = "vgpu-backend", version)]
struct Cli {
    /// The vhost-user socket to listen on (a stale file is replaced).
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// The device: "emulated" or "cuda:N".
    #[arg(long, value_name = "cuda:N|emulated")]
    device: DeviceSpec,
    /// The slice name shown to guests.
    #[arg(long, value_name = "NAME", default_value = vgpu_backend::config::DEFAULT_SLICE_NAME)]
    slice: String,
    /// The slice's memory limit in bytes (K, M, G, T suffixes accepted);
    /// defaults to the device's memory.
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    memory_limit: Option<u64>,
    /// The slice UUID; random by default.
    #[arg(long, value_name = "UUID")]
    uuid: Option<SliceUuid>,
    /// The largest virtqueue size accepted.
    #[arg(long, value_name = "N", default_value_t = vgpu_spec::MAX_QUEUE_SIZE)]
    max_queue_size: u16,
    /// Microseconds to keep polling a queue after a batch before sleeping
    /// (0 disables polling: less CPU, slower back-to-back calls).
    #[arg(long, value_name = "US", default_value_t = 50, env = "VGPU_POLL_US")]
    poll_us: u64,
    /// Milliseconds the backend keeps serving after a kernel faulted (which costs the process
    /// its CUDA state on a real GPU) before it stops so that its supervisor starts a clean one.
    #[arg(
        long,
        value_name = "MS",
        default_value_t = 200,
        env = "VGPU_FAULT_RESTART_MS"
    )]
    fault_restart_ms: u64,
    /// The grant board file shared with the scheduler (with --board-slot).
    #[arg(long, value_name = "PATH", requires = "board_slot")]
    board: Option<PathBuf>,
    /// This backend's slot on the grant board (with --board).
    #[arg(long, value_name = "N", requires = "board")]
    board_slot: Option<usize>,
    /// Emulated device only: a lock file standing for one physical GPU,
    /// held while a timed kernel runs.
    #[arg(long, value_name = "PATH")]
    emulated_gpu_lock: Option<PathBuf>,
    /// Emulated device only (with --emulated-gpu-lock): the emulated GPU's memory, shared by
    /// every backend on it (a file next to the lock), so that it can be full for all of them.
    #[arg(long, value_name = "BYTES", value_parser = parse_size, requires = "emulated_gpu_lock")]
    emulated_gpu_memory: Option<u64>,
    /// CUDA only: pin host memory for swapping ahead of need, as large as the device memory the
    /// slice holds, so that reclaiming its memory copies without pinning (the scheduler asks
    /// for it for slices whose memory guarantee is below their limit).
    #[arg(long)]
    swap_reserve: bool,
    /// The bound on queued GPU work, in microseconds (with a board): a slice that loses its grant
    /// hands the GPU over once this much work has drained.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 500,
        env = "VGPU_MAX_INFLIGHT_US"
    )]
    max_inflight_us: u64,
    /// The scheduler's API socket: every session's usage (GPU time, memory,
    /// copies, kernels) is reported there once a second (with --tenant).
    #[arg(long, value_name = "PATH", requires = "tenant")]
    scheduler_socket: Option<PathBuf>,
    /// The tenant the slice's usage is billed to (with --scheduler-socket).
    #[arg(long, value_name = "NAME", requires = "scheduler_socket")]
    tenant: Option<String>,
    /// How often usage is reported, in milliseconds (with --scheduler-socket).
    #[arg(long, value_name = "MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    usage_interval_ms: u64,
    /// How connections are isolated: "process" serves each connection from its own worker
    /// process (a kernel fault reaches only that connection); "thread" serves all of them from
    /// this process.
    #[arg(long, value_enum, default_value_t = Isolation::Process, env = "VGPU_ISOLATION")]
    isolation: Isolation,
    /// With process isolation: worker processes kept ready (device opened) for the next
    /// connections.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=64))]
    warm_workers: u64,
    /// Internal: run as worker N of a process-isolated backend (started by the backend itself).
    #[arg(long, value_name = "N", hide = true)]
    worker: Option<usize>,
}

fn watch_signals(stop: impl FnOnce() + Send + 'static) {
    if let Err(e) = vgpu_backend::signals::stop_on_signal(stop) {
        tracing::error!(error = %e, "Cannot start the signal thread; SIGTERM will not stop the backend cleanly");
    }
}

/// The main process of a process-isolated backend: its workers are this binary, with the same
/// arguments, the slice's UUID fixed, and `--worker N`.
fn run_pool(
    mut config: BackendConfig,
    add_uuid: bool,
    warm: u64,
) -> Result<(), vgpu_backend::Error> {
    let exe = std::env::current_exe().map_err(vgpu_backend::Error::Worker)?;
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let uuid = *config
        .uuid
        .get_or_insert_with(|| SliceUuid::generate(&config.slice_name));
    let command = move |index: usize| {
        let mut cmd = std::process::Command::new(&exe);
        cmd.args(&args);
        if add_uuid {
            cmd.arg("--uuid").arg(uuid.to_string());
        }
        cmd.arg("--worker").arg(index.to_string());
        cmd
    };
    let pool = WorkerPool::new(&config, warm as usize, Box::new(command))?;
    let stop = pool.stop_handle();
    watch_signals(move || stop.stop());
    pool.run()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Before any thread starts: SIGTERM and SIGINT go to the signal thread.
    if let Err(e) = vgpu_backend::signals::block_stop_signals() {
        eprintln!("vgpu-backend: cannot block the stop signals: {e}");
        return ExitCode::FAILURE;
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let mut config = BackendConfig::new(cli.socket, cli.device).slice_name(cli.slice);
    config.memory_limit = cli.memory_limit;
    config.uuid = cli.uuid;
    config.max_queue_size = cli.max_queue_size;
    config.poll_after_work = std::time::Duration::from_micros(cli.poll_us);
    config.fault_restart_after = std::time::Duration::from_millis(cli.fault_restart_ms);
    if let (Some(path), Some(slot)) = (cli.board, cli.board_slot) {
        config = config.board(path, slot);
    }
    config.emulated_gpu_lock = cli.emulated_gpu_lock;
    config.emulated_gpu_memory = cli.emulated_gpu_memory;
    config.swap_reserve = cli.swap_reserve;
    config = config.max_inflight_us(cli.max_inflight_us);
    if let (Some(socket), Some(tenant)) = (cli.scheduler_socket, cli.tenant) {
        config = config
            .scheduler(socket, tenant)
            .metering_interval(std::time::Duration::from_millis(cli.usage_interval_ms));
    }
    config.worker = cli.worker.map(|index| WorkerRole { index });
    let result = if cli.worker.is_none() && cli.isolation == Isolation::Process {
        run_pool(config, cli.uuid.is_none(), cli.warm_workers)
    } else {
        Backend::new(config).and_then(|backend| {
            let stop = backend.stop_handle();
            watch_signals(move || stop.stop());
            backend.serve()
        })
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vgpu-backend: {e}");
            ExitCode::FAILURE
        }
    }
}
