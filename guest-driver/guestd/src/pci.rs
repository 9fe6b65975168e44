//! PCI through sysfs: finding the vGPU function, binding it to a userspace
//! driver, config space and the virtio-pci capabilities, and BAR mappings
//! (shared, accessed with volatile loads and stores).
//!
//! [`PciAccess`] is what the device code needs from a bound function:
//! config space, BAR mappings and optionally its interrupt. [`UioFunction`]
//! provides them for `uio_pci_generic` (the sysfs `config` and `resourceN`
//! files, and `/dev/uioN`); `crate::vfio::VfioFunction` for `vfio-pci` in
//! no-IOMMU mode (regions of the VFIO device fd, and an eventfd).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::irq::{Interrupts, Uio};

/// Where the PCI bus lives in sysfs.
pub const SYSFS_PCI: &str = "/sys/bus/pci";
/// The virtio vendor id.
pub const VIRTIO_VENDOR: u16 = 0x1af4;
/// Modern virtio-pci device ids are this plus the virtio device type.
pub const VIRTIO_MODERN_BASE: u16 = 0x1040;
/// The highest modern virtio-pci device id.
pub const VIRTIO_MODERN_LAST: u16 = 0x10ff;
/// The userspace driver used where VFIO no-IOMMU is not available.
pub const UIO_DRIVER: &str = "uio_pci_generic";

/// Vendor-specific capability id (virtio-pci capabilities use it).
const CAP_ID_VENDOR: u8 = 0x09;
/// Status register bit: the capability list is present.
const STATUS_CAP_LIST: u16 = 1 << 4;
/// Command register bits: memory space decoding and bus mastering.
const COMMAND_MEMORY: u16 = 1 << 1;
const COMMAND_BUS_MASTER: u16 = 1 << 2;
/// How long to wait for a driver to bind.
const BIND_TIMEOUT: Duration = Duration::from_secs(5);

/// PCI failures.
#[derive(Debug, Error)]
pub enum PciError {
    /// A sysfs file could not be read or written.
    #[error("Cannot {what} {}: {source}", path.display())]
    Io {
        /// The operation.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// No function with our ids exists.
    #[error(
        "No vGPU device found under {}: no PCI function 1af4:1080 (virtio type 64 or above). \
         Is the VM started with the vhost-user device?",
        .0.display()
    )]
    NotFound(PathBuf),
    /// The function named on the command line does not exist.
    #[error("PCI device {0} does not exist")]
    NoSuchDevice(String),
    /// The function is not a modern virtio device of type 64 or above.
    #[error("PCI device {bdf} is {vendor:04x}:{device:04x}, not a vGPU (1af4:1080 or above)")]
    NotVgpu {
        /// The function.
        bdf: String,
        /// Its vendor id.
        vendor: u16,
        /// Its device id.
        device: u16,
    },
    /// The kernel has no such driver.
    #[error("The {0} driver is not available: load its module first (modprobe {0})")]
    NoDriver(String),
    /// The driver did not take the device.
    #[error("{driver} did not bind {bdf} within {secs} s (now bound to {now})")]
    BindTimeout {
        /// The driver.
        driver: String,
        /// The function.
        bdf: String,
        /// Seconds waited.
        secs: u64,
        /// What the device is bound to now.
        now: String,
    },
    /// Config space is too short or its capability list is broken.
    #[error("PCI config space is malformed: {0}")]
    BadConfig(String),
    /// A BAR could not be mapped.
    #[error("Cannot map BAR {bar}: {reason}")]
    Bar {
        /// The BAR index.
        bar: u8,
        /// Why.
        reason: String,
    },
    /// The function's interrupt could not be set up.
    #[error("Cannot set up the device's interrupt: {0}")]
    Interrupt(String),
    /// A register window lies outside its BAR.
    #[error("Register window at {offset:#x}+{len:#x} lies outside its {bar_len:#x}-byte BAR")]
    Window {
        /// Offset in the BAR.
        offset: usize,
        /// Length asked for.
        len: usize,
        /// The BAR's length.
        bar_len: usize,
    },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> PciError + 'a {
    move |source| PciError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Parses a sysfs id file ("0x1af4\n").
pub fn parse_hex_id(text: &str) -> Option<u16> {
    let t = text.trim();
    let t = t.strip_prefix("0x").unwrap_or(t);
    u16::from_str_radix(t, 16).ok()
}

/// True for a modern virtio-pci id of device type 64 or above.
pub fn is_vgpu_id(vendor: u16, device: u16) -> bool {
    let first = VIRTIO_MODERN_BASE + vgpu_spec::VIRTIO_ID_VGPU as u16;
    vendor == VIRTIO_VENDOR && (first..=VIRTIO_MODERN_LAST).contains(&device)
}

fn read_id(dev: &Path, name: &'static str) -> Result<u16, PciError> {
    let path = dev.join(name);
    let text = std::fs::read_to_string(&path).map_err(io_err("read", &path))?;
    parse_hex_id(&text)
        .ok_or_else(|| PciError::BadConfig(format!("{} holds {text:?}", path.display())))
}

/// A PCI function in sysfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciDevice {
    /// Its address, `dddd:bb:dd.f`.
    pub bdf: String,
    /// Its sysfs directory.
    pub path: PathBuf,
}

impl PciDevice {
    /// The function `bdf` under `sysfs` (normally [`SYSFS_PCI`]), checked to
    /// be a vGPU.
    pub fn open(sysfs: &Path, bdf: &str) -> Result<PciDevice, PciError> {
        let path = sysfs.join("devices").join(bdf);
        if !path.exists() {
            return Err(PciError::NoSuchDevice(bdf.to_owned()));
        }
        let (vendor, device) = (read_id(&path, "vendor")?, read_id(&path, "device")?);
        if !is_vgpu_id(vendor, device) {
            return Err(PciError::NotVgpu {
                bdf: bdf.to_owned(),
                vendor,
                device,
            });
        }
        Ok(PciDevice {
            bdf: bdf.to_owned(),
            path,
        })
    }

    /// Every vGPU function under `sysfs`, sorted by address.
    pub fn scan(sysfs: &Path) -> Result<Vec<PciDevice>, PciError> {
        let dir = sysfs.join("devices");
        let entries = std::fs::read_dir(&dir).map_err(io_err("list", &dir))?;
        let mut found = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            let (Ok(vendor), Ok(device)) = (read_id(&path, "vendor"), read_id(&path, "device"))
            else {
                continue;
            };
            if is_vgpu_id(vendor, device) {
                found.push(PciDevice {
                    bdf: entry.file_name().to_string_lossy().into_owned(),
                    path,
                });
            }
        }
        found.sort_by(|a, b| a.bdf.cmp(&b.bdf));
        Ok(found)
    }

    /// The driver bound now, if any.
    pub fn driver(&self) -> Option<String> {
        let link = std::fs::read_link(self.path.join("driver")).ok()?;
        Some(link.file_name()?.to_string_lossy().into_owned())
    }

    fn write_attr(&self, path: &Path, value: &str) -> Result<(), PciError> {
        std::fs::write(path, value).map_err(io_err("write", path))
    }

    /// Binds the function to `driver` with `driver_override`, unbinding it
    /// from whatever holds it. `sysfs` is the bus directory.
    pub fn bind(&self, sysfs: &Path, driver: &str) -> Result<(), PciError> {
        if self.driver().as_deref() == Some(driver) {
            return Ok(());
        }
        let driver_dir = sysfs.join("drivers").join(driver);
        if !driver_dir.exists() {
            // Best effort: the module may simply not be loaded yet.
            let _ = std::process::Command::new("modprobe").arg(driver).status();
            if !driver_dir.exists() {
                return Err(PciError::NoDriver(driver.to_owned()));
            }
        }
        self.write_attr(&self.path.join("driver_override"), driver)?;
        if let Some(current) = self.driver() {
            tracing::info!(bdf = %self.bdf, %current, "Unbinding the device from its driver");
            self.write_attr(&self.path.join("driver").join("unbind"), &self.bdf)?;
        }
        if let Err(e) = self.write_attr(&sysfs.join("drivers_probe"), &self.bdf) {
            tracing::debug!(error = %e, "drivers_probe failed; binding directly");
            self.write_attr(&driver_dir.join("bind"), &self.bdf)?;
        }
        let start = Instant::now();
        while self.driver().as_deref() != Some(driver) {
            if start.elapsed() > BIND_TIMEOUT {
                return Err(PciError::BindTimeout {
                    driver: driver.to_owned(),
                    bdf: self.bdf.clone(),
                    secs: BIND_TIMEOUT.as_secs(),
                    now: self.driver().unwrap_or_else(|| "nothing".into()),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// The `/dev/uioN` node of a function bound to `uio_pci_generic`, if
    /// the node exists.
    pub fn uio_node(&self) -> Option<PathBuf> {
        let entries = std::fs::read_dir(self.path.join("uio")).ok()?;
        entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .find(|n| n.starts_with("uio"))
            .map(|n| Path::new("/dev").join(n))
            .filter(|p| p.exists())
    }

    /// Opens the function's config space (its sysfs `config` file).
    pub fn config(&self) -> Result<ConfigSpace, PciError> {
        let path = self.path.join("config");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_err("open", &path))?;
        Ok(ConfigSpace::new(file, path, 0, SYSFS_CONFIG_MAX))
    }

    /// Maps BAR `bar` (its `resourceN` file) shared, read-write.
    pub fn map_bar(&self, bar: u8) -> Result<Arc<Bar>, PciError> {
        let path = self.path.join(format!("resource{bar}"));
        Bar::map(&path, bar)
    }
}

/// Most config space a sysfs `config` file shows (reads stop short at its
/// real end).
const SYSFS_CONFIG_MAX: usize = 4096;

/// What the device code needs from a function bound to a userspace driver.
pub trait PciAccess: Send + Sync {
    /// The function's address, `dddd:bb:dd.f`.
    fn bdf(&self) -> &str;
    /// Its config space.
    fn config(&self) -> Result<ConfigSpace, PciError>;
    /// BAR `bar`, mapped shared and read-write.
    fn map_bar(&self, bar: u8) -> Result<Arc<Bar>, PciError>;
    /// The function's interrupt, set up and unmasked; `Ok(None)` where the
    /// driver offers none (the caller then polls).
    fn interrupts(&self) -> Result<Option<Box<dyn Interrupts>>, PciError>;
}

/// A function bound to `uio_pci_generic`: config space and BARs through
/// sysfs, INTx through `/dev/uioN`.
#[derive(Debug)]
pub struct UioFunction {
    dev: PciDevice,
    node: Option<PathBuf>,
}

impl UioFunction {
    /// Binds `dev` to `uio_pci_generic` (`sysfs` is the bus directory) and
    /// finds its uio node.
    pub fn bind(dev: PciDevice, sysfs: &Path) -> Result<UioFunction, PciError> {
        dev.bind(sysfs, UIO_DRIVER)?;
        let node = dev.uio_node();
        Ok(UioFunction { dev, node })
    }

    /// The `/dev/uioN` node, if the kernel made one.
    pub fn node(&self) -> Option<&Path> {
        self.node.as_deref()
    }
}

impl PciAccess for UioFunction {
    fn bdf(&self) -> &str {
        &self.dev.bdf
    }

    fn config(&self) -> Result<ConfigSpace, PciError> {
        self.dev.config()
    }

    fn map_bar(&self, bar: u8) -> Result<Arc<Bar>, PciError> {
        self.dev.map_bar(bar)
    }

    fn interrupts(&self) -> Result<Option<Box<dyn Interrupts>>, PciError> {
        let Some(node) = &self.node else {
            return Ok(None);
        };
        let uio = Uio::open(node).map_err(io_err("open", node))?;
        Ok(Some(Box::new(uio)))
    }
}

/// A function's config space: `len` bytes at offset `base` of a file (the
/// sysfs `config` file at 0, or the config region of a VFIO device fd).
#[derive(Debug)]
pub struct ConfigSpace {
    file: File,
    path: PathBuf,
    base: u64,
    len: usize,
}

impl ConfigSpace {
    /// Config space as the `len` bytes at `base` of `file`; `path` names it
    /// in errors.
    pub fn new(file: File, path: PathBuf, base: u64, len: usize) -> ConfigSpace {
        ConfigSpace {
            file,
            path,
            base,
            len,
        }
    }

    /// All of config space the kernel shows (256 or 4096 bytes for root).
    pub fn read_all(&self) -> Result<Vec<u8>, PciError> {
        let mut buf = vec![0u8; self.len];
        let n = self
            .file
            .read_at(&mut buf, self.base)
            .map_err(io_err("read", &self.path))?;
        buf.truncate(n);
        Ok(buf)
    }

    fn read_u16(&self, offset: u64) -> Result<u16, PciError> {
        let mut b = [0u8; 2];
        self.file
            .read_exact_at(&mut b, self.base + offset)
            .map_err(io_err("read", &self.path))?;
        Ok(u16::from_le_bytes(b))
    }

    fn write_u16(&self, offset: u64, value: u16) -> Result<(), PciError> {
        self.file
            .write_all_at(&value.to_le_bytes(), self.base + offset)
            .map_err(io_err("write", &self.path))
    }

    /// Turns on memory decoding and bus mastering (the device's DMA).
    pub fn enable_bus_master(&self) -> Result<(), PciError> {
        let cmd = self.read_u16(4)?;
        let want = cmd | COMMAND_MEMORY | COMMAND_BUS_MASTER;
        if want != cmd {
            self.write_u16(4, want)?;
        }
        Ok(())
    }
}

/// virtio-pci capability types (`cfg_type`).
pub mod cap {
    /// Common configuration.
    pub const COMMON: u8 = 1;
    /// Notifications.
    pub const NOTIFY: u8 = 2;
    /// ISR status.
    pub const ISR: u8 = 3;
    /// Device-specific configuration.
    pub const DEVICE: u8 = 4;
}

/// One virtio-pci capability (`struct virtio_pci_cap`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioCap {
    /// `cfg_type`, one of [`cap`].
    pub cfg_type: u8,
    /// The BAR holding the structure.
    pub bar: u8,
    /// Offset in the BAR.
    pub offset: u32,
    /// Length of the structure.
    pub length: u32,
    /// `notify_off_multiplier` (notify capability only, else 0).
    pub notify_off_multiplier: u32,
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The virtio-pci capabilities in config space, in list order.
pub fn virtio_caps(config: &[u8]) -> Result<Vec<VirtioCap>, PciError> {
    if config.len() < 64 {
        return Err(PciError::BadConfig(format!(
            "only {} bytes of config space are readable (not root?)",
            config.len()
        )));
    }
    let status = u16::from_le_bytes([config[6], config[7]]);
    if status & STATUS_CAP_LIST == 0 {
        return Ok(Vec::new());
    }
    let mut caps = Vec::new();
    let mut ptr = usize::from(config[0x34] & 0xfc);
    // 48 capabilities of at least 4 bytes fill the 192 bytes after the
    // header: more steps than that means the list loops.
    let mut steps = 0;
    while ptr != 0 {
        steps += 1;
        if steps > 48 {
            return Err(PciError::BadConfig("capability list loops".into()));
        }
        if ptr < 0x40 || ptr + 2 > config.len() {
            return Err(PciError::BadConfig(format!(
                "capability pointer {ptr:#x} is outside config space"
            )));
        }
        let id = config[ptr];
        let next = usize::from(config[ptr + 1] & 0xfc);
        if id == CAP_ID_VENDOR {
            let cap_len = usize::from(*config.get(ptr + 2).unwrap_or(&0));
            if cap_len < 16 || ptr + cap_len > config.len() {
                return Err(PciError::BadConfig(format!(
                    "virtio capability at {ptr:#x} has length {cap_len}"
                )));
            }
            let cfg_type = config[ptr + 3];
            let field = |at| {
                le32(config, ptr + at).ok_or_else(|| {
                    PciError::BadConfig(format!("virtio capability at {ptr:#x} is truncated"))
                })
            };
            let notify_off_multiplier = if cfg_type == cap::NOTIFY {
                if cap_len < 20 {
                    return Err(PciError::BadConfig(format!(
                        "notify capability at {ptr:#x} has no multiplier"
                    )));
                }
                field(16)?
            } else {
                0
            };
            caps.push(VirtioCap {
                cfg_type,
                bar: config[ptr + 4],
                offset: field(8)?,
                length: field(12)?,
                notify_off_multiplier,
            });
        }
        ptr = next;
    }
    Ok(caps)
}

/// A mapped memory BAR.
#[derive(Debug)]
pub struct Bar {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is device memory owned by this value until drop; all
// access goes through volatile loads and stores of plain integers.
unsafe impl Send for Bar {}
// SAFETY: as above; shared access only performs volatile MMIO accesses.
unsafe impl Sync for Bar {}

impl Bar {
    fn map(path: &Path, bar: u8) -> Result<Arc<Bar>, PciError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| PciError::Bar {
                bar,
                reason: format!("cannot open {}: {e}", path.display()),
            })?;
        let len = file
            .metadata()
            .map_err(io_err("stat", path))?
            .len()
            .try_into()
            .map_err(|_| PciError::Bar {
                bar,
                reason: "too large".into(),
            })?;
        Bar::map_file(&file, 0, len, bar)
    }

    /// Maps `len` bytes at `offset` of `file` (a `resourceN` file, or a
    /// VFIO device fd at a region's offset) shared, read-write.
    pub fn map_file(file: &File, offset: u64, len: usize, bar: u8) -> Result<Arc<Bar>, PciError> {
        if len == 0 {
            return Err(PciError::Bar {
                bar,
                reason: "it is empty (an I/O or unused BAR)".into(),
            });
        }
        let offset = libc::off_t::try_from(offset).map_err(|_| PciError::Bar {
            bar,
            reason: format!("offset {offset:#x} is too large"),
        })?;
        // SAFETY: mapping `len` bytes at `offset` of an open file, shared, at
        // an address the kernel picks; the kernel checks the range against
        // the BAR (resource file) or region (VFIO). The mapping is owned by
        // the returned Bar.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(PciError::Bar {
                bar,
                reason: format!("mmap failed: {}", io::Error::last_os_error()),
            });
        }
        Ok(Arc::new(Bar {
            ptr: ptr as *mut u8,
            len,
        }))
    }

    /// Length of the BAR.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if the BAR is empty (never, once mapped).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are the mapping made in `map`; windows hold an
        // Arc to the Bar, so none outlives it.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

/// A register block inside a BAR.
#[derive(Debug, Clone)]
pub struct Window {
    bar: Arc<Bar>,
    offset: usize,
    len: usize,
}

impl Window {
    /// The `len` bytes at `offset` of `bar`.
    pub fn new(bar: Arc<Bar>, offset: usize, len: usize) -> Result<Window, PciError> {
        match offset.checked_add(len) {
            Some(end) if end <= bar.len => Ok(Window { bar, offset, len }),
            _ => Err(PciError::Window {
                offset,
                len,
                bar_len: bar.len,
            }),
        }
    }

    /// Length of the window.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if the window is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A pointer to the `size`-byte register at `at`, if it is inside the
    /// window and naturally aligned.
    fn reg(&self, at: usize, size: usize) -> Option<*mut u8> {
        let end = at.checked_add(size)?;
        if end > self.len || !(self.offset + at).is_multiple_of(size) {
            tracing::error!(
                at,
                size,
                len = self.len,
                "Register access outside its window"
            );
            return None;
        }
        Some(self.bar.ptr.wrapping_add(self.offset + at))
    }
}

/// Register access, so virtio code can run against a fake in tests.
pub trait Regs: Send + Sync {
    /// Length of the register block in bytes.
    fn block_len(&self) -> usize;
    /// Reads an 8-bit register.
    fn read8(&self, at: usize) -> u8;
    /// Reads a 16-bit register.
    fn read16(&self, at: usize) -> u16;
    /// Reads a 32-bit register.
    fn read32(&self, at: usize) -> u32;
    /// Writes an 8-bit register.
    fn write8(&self, at: usize, value: u8);
    /// Writes a 16-bit register.
    fn write16(&self, at: usize, value: u16);
    /// Writes a 32-bit register.
    fn write32(&self, at: usize, value: u32);
}

macro_rules! mmio {
    ($read:ident, $write:ident, $ty:ty) => {
        fn $read(&self, at: usize) -> $ty {
            match self.reg(at, std::mem::size_of::<$ty>()) {
                // SAFETY: `reg` checked the register lies inside the mapped
                // window and is naturally aligned; MMIO needs volatile.
                Some(p) => <$ty>::from_le(unsafe { std::ptr::read_volatile(p as *const $ty) }),
                None => <$ty>::MAX,
            }
        }
        fn $write(&self, at: usize, value: $ty) {
            if let Some(p) = self.reg(at, std::mem::size_of::<$ty>()) {
                // SAFETY: as for the read.
                unsafe { std::ptr::write_volatile(p as *mut $ty, value.to_le()) }
            }
        }
    };
}

impl Regs for Window {
    fn block_len(&self) -> usize {
        self.len
    }
    mmio!(read8, write8, u8);
    mmio!(read16, write16, u16);
    mmio!(read32, write32, u32);
}

#[cfg(test)]
#[path = "pci_tests.rs"]
mod tests;
