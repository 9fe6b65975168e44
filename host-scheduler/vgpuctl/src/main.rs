//! `vgpuctl`: manages vGPU slices through the vgpu scheduler and attaches them to VMs.

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;
use vgpuctl::client::SCHEDULER_ENV;
use vgpuctl::Cli;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let env = std::env::var(SCHEDULER_ENV).ok();
    let mut stdout = std::io::stdout().lock();
    match vgpuctl::run(cli, env.as_deref(), &mut stdout) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is_broken_pipe() => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vgpuctl: {e}");
            ExitCode::FAILURE
        }
    }
}
