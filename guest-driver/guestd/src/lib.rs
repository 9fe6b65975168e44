//! `vgpu-guestd`: the in-guest userspace driver of the vGPU device.
//!
//! In a VM the VMM is the vhost-user frontend of the host backend, and the
//! device appears as PCI function 1af4:1080 (virtio type 64, which Linux's
//! `virtio_pci` leaves alone). This daemon binds it to `vfio-pci` in
//! no-IOMMU mode where the kernel has it ([`vfio`]), else to
//! `uio_pci_generic` ([`pci`]), initialises it as a modern virtio-pci device ([`virtio`]),
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
pub mod irq;
pub mod pci;
pub mod relay;
pub mod sg;
pub mod stats;
#[cfg(test)]
mod testutil;
pub mod vfio;
pub mod virtio;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

use crate::device_queue::{DeviceError, DeviceLink, DeviceOptions, VgpuPci};
use crate::pci::{PciAccess, PciDevice, PciError, UioFunction, SYSFS_PCI, UIO_DRIVER};
use crate::relay::{Relay, RelayError};
use crate::stats::Stats;
use crate::vfio::{VfioError, VfioFunction, DEV_VFIO, SYSFS, VFIO_DRIVER};

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
    /// Wake waiters with the device's interrupt (uio node or VFIO INTx)
    /// besides polling.
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
    /// VFIO no-IOMMU detection or binding failed.
    #[error(transparent)]
    Vfio(#[from] VfioError),
    /// The device could not be initialised.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// DMA memory could not be reserved.
    #[error(transparent)]
    Dma(#[from] dma::DmaError),
    /// The local socket could not be served.
    #[error(transparent)]
    Relay(#[from] RelayError),
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

/// The driver a run binds the device to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    /// `uio_pci_generic`.
    Uio,
    /// `vfio-pci` in no-IOMMU mode.
    Vfio,
}

/// Picks the driver for `choice`. `noiommu` readies VFIO no-IOMMU mode (see
/// [`vfio::prepare_noiommu`]) and is called for `auto` and `vfio` only:
/// `auto` takes VFIO where it succeeds and uio otherwise, `vfio` fails
/// with its error, `uio` never touches VFIO.
pub fn select_driver(
    choice: DriverChoice,
    noiommu: impl FnOnce() -> Result<(), VfioError>,
) -> Result<Driver, Error> {
    match choice {
        DriverChoice::Uio => Ok(Driver::Uio),
        DriverChoice::Vfio => {
            noiommu()?;
            Ok(Driver::Vfio)
        }
        DriverChoice::Auto => match noiommu() {
            Ok(()) => Ok(Driver::Vfio),
            Err(e) => {
                tracing::info!(reason = %e, "Using uio_pci_generic");
                Ok(Driver::Uio)
            }
        },
    }
}

/// Opens the function with `driver`; under `--driver auto`, a VFIO failure
/// falls back to uio (which rebinds the function).
pub fn open_with_fallback<T>(
    choice: DriverChoice,
    driver: Driver,
    open_vfio: impl FnOnce() -> Result<T, VfioError>,
    open_uio: impl FnOnce() -> Result<T, Error>,
) -> Result<T, Error> {
    match driver {
        Driver::Uio => open_uio(),
        Driver::Vfio => match open_vfio() {
            Ok(f) => Ok(f),
            Err(e) if choice == DriverChoice::Auto => {
                tracing::warn!(error = %e, "VFIO no-IOMMU binding failed; falling back to uio_pci_generic");
                open_uio()
            }
            Err(e) => Err(e.into()),
        },
    }
}

fn open_uio(dev: PciDevice, sysfs: &Path) -> Result<Arc<dyn PciAccess>, Error> {
    let bdf = dev.bdf.clone();
    let uio = UioFunction::bind(dev, sysfs)?;
    eprintln!("vgpu-guestd: bound {bdf} to {UIO_DRIVER}");
    if uio.node().is_none() {
        tracing::warn!("No /dev/uioN node for the device; polling without interrupts");
    }
    Ok(Arc::new(uio))
}

fn open_vfio(dev: &PciDevice, sysfs: &Path) -> Result<Arc<dyn PciAccess>, VfioError> {
    let vfio = VfioFunction::open(dev, sysfs, Path::new(DEV_VFIO))?;
    eprintln!(
        "vgpu-guestd: bound {} to {VFIO_DRIVER} (no-IOMMU group {})",
        dev.bdf,
        vfio.group()
    );
    Ok(Arc::new(vfio))
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
    let driver = select_driver(cfg.driver, || {
        vfio::prepare_noiommu(Path::new(SYSFS), &mut vfio::modprobe)
    })?;
    let pci = open_with_fallback(
        cfg.driver,
        driver,
        || open_vfio(&dev, sysfs),
        || open_uio(dev.clone(), sysfs),
    )?;
    reserve_hugepages(cfg)?;
    let opts = DeviceOptions {
        queue_size: cfg.queue_size,
        dma_bytes: cfg.dma_bytes,
        interrupts: cfg.interrupts,
    };
    let device = Arc::new(VgpuPci::open(pci, &opts)?);
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    fn unavailable() -> VfioError {
        VfioError::Unavailable(PathBuf::from("/sys/module/vfio/parameters/x"))
    }

    #[test]
    fn auto_picks_vfio_where_noiommu_is_available() {
        let driver = select_driver(DriverChoice::Auto, || Ok(())).unwrap();
        assert_eq!(driver, Driver::Vfio);
    }

    #[test]
    fn auto_picks_uio_where_noiommu_is_missing() {
        let driver = select_driver(DriverChoice::Auto, || Err(unavailable())).unwrap();
        assert_eq!(driver, Driver::Uio);
    }

    #[test]
    fn forced_vfio_without_noiommu_fails_clearly() {
        let err = select_driver(DriverChoice::Vfio, || Err(unavailable())).unwrap_err();
        assert!(matches!(err, Error::Vfio(VfioError::Unavailable(_))));
        let text = err.to_string();
        assert!(text.contains("VFIO no-IOMMU is not available"), "{text}");
        assert!(text.contains("--driver uio"), "{text}");
        assert_eq!(
            select_driver(DriverChoice::Vfio, || Ok(())).unwrap(),
            Driver::Vfio
        );
    }

    #[test]
    fn forced_uio_never_probes_vfio() {
        let probed = Cell::new(false);
        let driver = select_driver(DriverChoice::Uio, || {
            probed.set(true);
            Ok(())
        })
        .unwrap();
        assert_eq!(driver, Driver::Uio);
        assert!(!probed.get());
    }

    #[test]
    fn failed_vfio_binding_falls_back_to_uio_only_under_auto() {
        let vfio_fails = || Err::<&str, _>(unavailable());
        let uio = || Ok::<_, Error>("uio");
        let got = open_with_fallback(DriverChoice::Auto, Driver::Vfio, vfio_fails, uio).unwrap();
        assert_eq!(got, "uio");
        let err =
            open_with_fallback(DriverChoice::Vfio, Driver::Vfio, vfio_fails, uio).unwrap_err();
        assert!(matches!(err, Error::Vfio(_)));
        let got = open_with_fallback(DriverChoice::Auto, Driver::Vfio, || Ok("vfio"), uio);
        assert_eq!(got.unwrap(), "vfio");
        let vfio_unused = || -> Result<&str, VfioError> { panic!("uio must not open VFIO") };
        let got = open_with_fallback(DriverChoice::Uio, Driver::Uio, vfio_unused, uio);
        assert_eq!(got.unwrap(), "uio");
    }
}
