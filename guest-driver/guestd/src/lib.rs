//! `vgpu-guestd`: the in-guest userspace driver of the vGPU device.
//!
//! In a VM the VMM is the vhost-user frontend of the host backend, and the
//! device appears as PCI function 1af4:1080 (virtio type 64, which Linux's
//! `virtio_pci` leaves alone). This daemon binds it to `uio_pci_generic`
//! ([`pci`]), initialises it as a modern virtio-pci device ([`virtio`]),
//! puts its rings and a DMA heap in huge pages with physical addresses from
//! pagemap ([`dma`], [`heap`], [`device_queue`]), and re-serves it on a
//! local vhost-user socket ([`relay`]) so the unchanged guest
//! `libcuda.so.1` connects to it as it would to the host backend.
//! Requests are relayed per client ([`forward`]); copies from and to
//! huge-page client memory go by physical address, others are bounced
//! ([`sg`]); [`stats`] counts which.

pub mod device_queue;
pub mod dma;
pub mod forward;
pub mod heap;
pub mod pci;
pub mod relay;
pub mod sg;
pub mod stats;
#[cfg(test)]
mod testutil;
pub mod virtio;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

use crate::device_queue::{DeviceError, DeviceLink, DeviceOptions, VgpuPci};
use crate::pci::{PciDevice, PciError, SYSFS_PCI, UIO_DRIVER};
use crate::relay::{Relay, RelayError};
use crate::stats::Stats;

/// Which userspace PCI driver to bind the device to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DriverChoice {
    /// VFIO no-IOMMU where the kernel has it, `uio_pci_generic` otherwise.
    Auto,
    /// `uio_pci_generic`.
    Uio,
    /// `vfio-pci` in no-IOMMU mode.
    Vfio,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// The local vhost-user socket to serve.
    pub socket: PathBuf,
    /// The PCI function (`dddd:bb:dd.f`); the first vGPU found if unset.
    pub device: Option<String>,
    /// The userspace driver.
    pub driver: DriverChoice,
    /// Huge-page DMA memory for rings, requests and bounce buffers.
    pub dma_bytes: usize,
    /// Largest device queue size.
    pub queue_size: u16,
    /// Free 2 MiB huge pages to keep in the pool for clients' memory.
    pub client_hugepages: u64,
    /// Wake waiters with the device's interrupt (uio) besides polling.
    pub interrupts: bool,
    /// Where to write the stats line (default: the socket path with a
    /// `.stats` extension).
    pub stats_file: Option<PathBuf>,
}

/// Why the daemon stopped.
#[derive(Debug, Error)]
pub enum Error {
    /// PCI discovery or binding failed.
    #[error(transparent)]
    Pci(#[from] PciError),
    /// The device could not be initialised.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// DMA memory could not be reserved.
    #[error(transparent)]
    Dma(#[from] dma::DmaError),
    /// The local socket could not be served.
    #[error(transparent)]
    Relay(#[from] RelayError),
    /// The requested driver is not supported here.
    #[error("{0}")]
    Unsupported(String),
    /// Signal handlers could not be installed.
    #[error("Cannot install signal handlers: {0}")]
    Signals(std::io::Error),
}

static TERMINATE: AtomicBool = AtomicBool::new(false);
static DUMP_STATS: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(signal: libc::c_int) {
    if signal == libc::SIGUSR1 {
        DUMP_STATS.store(true, Ordering::SeqCst);
    } else {
        TERMINATE.store(true, Ordering::SeqCst);
    }
}

fn install_signal_handlers() -> Result<(), Error> {
    for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGUSR1] {
        // SAFETY: sigaction is plain data; zeroed is a valid empty mask.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        action.sa_flags = libc::SA_RESTART;
        // SAFETY: the handler only stores to atomics (async-signal-safe).
        if unsafe { libc::sigaction(signal, &action, std::ptr::null_mut()) } != 0 {
            return Err(Error::Signals(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

fn vfio_noiommu_available() -> bool {
    std::fs::read_to_string("/sys/module/vfio/parameters/enable_unsafe_noiommu_mode").is_ok()
}

fn find_device(sysfs: &Path, bdf: Option<&str>) -> Result<PciDevice, Error> {
    if let Some(bdf) = bdf {
        return Ok(PciDevice::open(sysfs, bdf)?);
    }
    let mut found = PciDevice::scan(sysfs)?;
    if found.len() > 1 {
        tracing::info!(
            count = found.len(),
            "Several vGPU functions found; using the first (pass --device for another)"
        );
    }
    if found.is_empty() {
        return Err(PciError::NotFound(sysfs.to_owned()).into());
    }
    Ok(found.remove(0))
}

/// The stats file for a socket path.
pub fn stats_path(socket: &Path) -> PathBuf {
    socket.with_extension("stats")
}

fn reserve_hugepages(cfg: &Config) -> Result<(), Error> {
    let own = cfg.dma_bytes.div_ceil(dma::HUGE_PAGE) as u64 + 1;
    dma::ensure_free_hugepages(own)?;
    if let Err(e) = dma::ensure_free_hugepages(own + cfg.client_hugepages) {
        tracing::warn!(error = %e, "Clients' memory may not get huge pages, so it will be bounced");
    }
    Ok(())
}

/// Finds, binds and initialises the device, then serves the socket until
/// SIGTERM or SIGINT.
pub fn run(cfg: &Config) -> Result<(), Error> {
    let sysfs = Path::new(SYSFS_PCI);
    let dev = find_device(sysfs, cfg.device.as_deref())?;
    eprintln!("vgpu-guestd: found vGPU at {}", dev.bdf);
    match cfg.driver {
        DriverChoice::Vfio => {
            return Err(Error::Unsupported(
                "VFIO no-IOMMU is not implemented in this version; use --driver uio".into(),
            ))
        }
        DriverChoice::Auto if vfio_noiommu_available() => tracing::info!(
            "VFIO no-IOMMU is available but not implemented in this version; using uio_pci_generic"
        ),
        DriverChoice::Auto | DriverChoice::Uio => {}
    }
    dev.bind(sysfs, UIO_DRIVER)?;
    eprintln!("vgpu-guestd: bound {} to {UIO_DRIVER}", dev.bdf);
    let uio = dev.uio_node();
    if uio.is_none() {
        tracing::warn!("No /dev/uioN node for the device; polling without interrupts");
    }
    reserve_hugepages(cfg)?;
    let opts = DeviceOptions {
        queue_size: cfg.queue_size,
        dma_bytes: cfg.dma_bytes,
        interrupts: cfg.interrupts,
    };
    let device = Arc::new(VgpuPci::open(&dev, uio.as_deref(), &opts)?);
    let config = device.config();
    eprintln!(
        "vgpu-guestd: device ready: {} {} MiB ({}, {} DMA MiB)",
        config.slice_name(),
        config.memory_limit.get() >> 20,
        config.device_name(),
        device.dma_bytes() >> 20
    );
    install_signal_handlers()?;
    let result = serve(cfg, Arc::clone(&device));
    device.shutdown();
    result
}

fn serve(cfg: &Config, device: Arc<VgpuPci>) -> Result<(), Error> {
    let stats = Arc::new(Stats::default());
    let relay = Relay::bind(
        &cfg.socket,
        device,
        Arc::clone(&stats),
        Arc::new(forward::hugetlb_page_size),
    )?;
    let stop = relay.stop_handle();
    let server = std::thread::Builder::new()
        .name("vgpu-guestd-accept".into())
        .spawn(move || relay.serve())
        .map_err(|e| Error::Relay(RelayError::Daemon(e.to_string())))?;
    let stats_file = cfg
        .stats_file
        .clone()
        .unwrap_or_else(|| stats_path(&cfg.socket));
    let write_stats = || {
        if let Err(e) = stats.write_file(&stats_file) {
            tracing::warn!(path = %stats_file.display(), error = %e, "Cannot write the stats file");
        }
    };
    write_stats();
    eprintln!("vgpu-guestd: ready: serving {}", cfg.socket.display());
    let mut written = stats.version();
    let mut result = Ok(());
    while !TERMINATE.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(50));
        if DUMP_STATS.swap(false, Ordering::SeqCst) {
            eprintln!("vgpu-guestd: stats {}", stats.snapshot().line());
        }
        let version = stats.version();
        if version != written {
            written = version;
            write_stats();
        }
        if server.is_finished() {
            result = match server.join() {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(e.into()),
                Err(_) => Err(RelayError::Daemon("The accept thread panicked".into()).into()),
            };
            break;
        }
    }
    stop.stop();
    let closed = stop.close_all_sessions();
    if closed > 0 {
        eprintln!("vgpu-guestd: closed {closed} sessions of connected clients");
    }
    write_stats();
    eprintln!("vgpu-guestd: stats {}", stats.snapshot().line());
    let _ = std::fs::remove_file(&cfg.socket);
    result
}
