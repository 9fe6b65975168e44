//! `vgpu-guestd`: drives the vGPU PCI function from guest userspace and
//! re-serves it on a local vhost-user socket.

use std::path::PathBuf;

use clap::Parser;
use tracing_subscriber::EnvFilter;
use vgpu_guestd::{Config, DriverChoice};

/// Drives the vGPU PCI device in a VM and serves it to local CUDA processes.
#[derive(Debug, Parser)]
#[command(name = "vgpu-guestd", version)]
struct Cli {
    /// The vhost-user socket to serve (a stale file is replaced).
    #[arg(long, value_name = "PATH", default_value = "/run/vgpu/vgpu0.sock")]
    socket: PathBuf,
    /// The PCI function to drive, e.g. 0000:00:03.0; by default the first
    /// 1af4:1080 function found.
    #[arg(long, value_name = "BDF")]
    device: Option<String>,
    /// The userspace PCI driver.
    #[arg(long, value_enum, default_value_t = DriverChoice::Auto)]
    driver: DriverChoice,
    /// Huge-page DMA memory for rings, requests and bounce buffers, in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 16)]
    dma_mb: usize,
    /// Largest device queue size.
    #[arg(long, value_name = "N", default_value_t = 256)]
    queue_size: u16,
    /// Free 2 MiB huge pages to keep for clients' memory (VGPU_HUGEPAGES=1).
    #[arg(long, value_name = "PAGES", default_value_t = 64)]
    client_hugepages: u64,
    /// Poll only; do not use the device's interrupt.
    #[arg(long)]
    no_interrupts: bool,
    /// Where to write the stats line (default: the socket path with .stats).
    #[arg(long, value_name = "PATH")]
    stats_file: Option<PathBuf>,
}

fn main() {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let config = Config {
        socket: cli.socket,
        device: cli.device,
        driver: cli.driver,
        dma_bytes: cli.dma_mb.max(4) << 20,
        queue_size: cli.queue_size,
        client_hugepages: cli.client_hugepages,
        interrupts: !cli.no_interrupts,
        stats_file: cli.stats_file,
    };
    let code = match vgpu_guestd::run(&config) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("vgpu-guestd: error: {e}");
            1
        }
    };
    // Client threads may still be blocked on their sockets: do not wait.
    std::process::exit(code)
}
