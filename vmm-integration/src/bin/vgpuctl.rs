//! `vgpuctl`: attaches vGPU slices to running VMs and detaches them.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use vgpu_vmm::attach::{self, Options};
use vgpu_vmm::cloud_hypervisor::AddOutcome;
use vgpu_vmm::target::{resolve_slice, VmTarget};

/// Attaches vGPU slices to running VMs.
#[derive(Debug, Parser)]
#[command(name = "vgpuctl", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Hotplugs a slice into a running VM and prints the device's id and PCI address.
    Attach {
        /// The slice: a name (its backend listens on /run/vgpu/NAME.sock) or an absolute path to
        /// the backend's socket.
        slice: String,
        /// The VM, as cloud-hypervisor:/path/to/api.sock (its --api-socket).
        #[arg(long, value_name = "cloud-hypervisor:API_SOCKET")]
        vm: VmTarget,
        /// The device id in the VM; the VMM picks one when absent.
        #[arg(long, value_name = "ID")]
        id: Option<String>,
        /// Seconds to wait for each answer from the VMM.
        #[arg(long, value_name = "SECONDS", default_value_t = 30)]
        timeout: u64,
    },
    /// Unplugs a device (by the id attach printed) from a running VM.
    Detach {
        /// The device id.
        id: String,
        /// The VM, as cloud-hypervisor:/path/to/api.sock (its --api-socket).
        #[arg(long, value_name = "cloud-hypervisor:API_SOCKET")]
        vm: VmTarget,
        /// Seconds to wait for each answer from the VMM.
        #[arg(long, value_name = "SECONDS", default_value_t = 30)]
        timeout: u64,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("vgpuctl: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<(), String> {
    match command {
        Command::Attach {
            slice,
            vm,
            id,
            timeout,
        } => {
            let socket = resolve_slice(&slice).map_err(|e| e.to_string())?;
            let options = Options {
                timeout: Duration::from_secs(timeout),
            };
            match attach::attach(&vm, &socket, id.as_deref(), options) {
                Ok(AddOutcome::Hotplugged(info)) => {
                    println!("id={} bdf={}", info.id, info.bdf);
                    Ok(())
                }
                Ok(AddOutcome::AddedToConfig) => {
                    println!(
                        "id={} bdf=none (the VM is not booted: the device appears when it boots)",
                        id.as_deref().unwrap_or("none")
                    );
                    Ok(())
                }
                Err(e) => Err(e.to_string()),
            }
        }
        Command::Detach { id, vm, timeout } => {
            let options = Options {
                timeout: Duration::from_secs(timeout),
            };
            attach::detach(&vm, &id, options).map_err(|e| e.to_string())?;
            println!("detached {id}");
            Ok(())
        }
    }
}
