//! VFIO no-IOMMU: binding the function to `vfio-pci` and driving it
//! through raw VFIO ioctls (the `vfio-ioctls` crate cannot open no-IOMMU
//! groups).
//!
//! Where the guest kernel is built with `CONFIG_VFIO_NOIOMMU`,
//! `/sys/module/vfio/parameters/enable_unsafe_noiommu_mode` exists; with it
//! on, `vfio-pci` puts a function that no IOMMU translates into a fake group
//! `/dev/vfio/noiommu-N`. The container takes the `VFIO_NOIOMMU_IOMMU` type,
//! which maps nothing: the device does DMA to physical addresses, exactly as
//! with `uio_pci_generic`, so the huge-page and pagemap code (`crate::dma`)
//! is shared unchanged. What VFIO adds over uio is a driver that owns the
//! function properly (config space through the device fd, BAR mappings of its
//! regions, INTx as an eventfd).
//!
//! Not exercised end to end in this repository: the VM tests boot Debian 6.1
//! kernels, which lack `CONFIG_VFIO_NOIOMMU`, so `--driver auto` picks
//! `uio_pci_generic` there. The ioctl numbers, struct layouts, region
//! parsing, detection and group lookup are unit-tested against values
//! derived from `<linux/vfio.h>`.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::irq::Interrupts;
use crate::pci::{Bar, ConfigSpace, PciAccess, PciDevice, PciError};

/// The sysfs root.
pub const SYSFS: &str = "/sys";
/// Where VFIO's character devices live.
pub const DEV_VFIO: &str = "/dev/vfio";
/// The VFIO PCI driver.
pub const VFIO_DRIVER: &str = "vfio-pci";
/// The module parameter that turns no-IOMMU mode on, under the sysfs root.
const NOIOMMU_PARAM: &str = "module/vfio/parameters/enable_unsafe_noiommu_mode";
/// How long to wait for the group's device node after binding.
const NODE_TIMEOUT: Duration = Duration::from_secs(2);

#[path = "vfio_uapi.rs"]
pub mod uapi;

use uapi::*;

/// VFIO failures.
#[derive(Debug, Error)]
pub enum VfioError {
    /// The kernel offers no VFIO no-IOMMU mode.
    #[error(
        "VFIO no-IOMMU is not available: {} does not exist (the kernel lacks \
         CONFIG_VFIO_NOIOMMU or the vfio module); use --driver uio",
        .0.display()
    )]
    Unavailable(PathBuf),
    /// No-IOMMU mode could not be turned on.
    #[error("VFIO no-IOMMU mode stays off: {} reads {value:?} after writing Y", path.display())]
    NotEnabled {
        /// The parameter file.
        path: PathBuf,
        /// What it reads.
        value: String,
    },
    /// A file could not be opened, read or written.
    #[error("Cannot {what} {}: {source}", path.display())]
    Io {
        /// The operation.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// Binding or PCI access failed.
    #[error(transparent)]
    Pci(#[from] PciError),
    /// The function has no usable IOMMU group.
    #[error("PCI device {bdf} has no IOMMU group after binding to vfio-pci: {reason}")]
    NoGroup {
        /// The function.
        bdf: String,
        /// Why.
        reason: String,
    },
    /// The function sits behind a real IOMMU.
    #[error(
        "PCI device {bdf} is in IOMMU group {group} behind a real IOMMU ({} exists, not a \
         no-IOMMU group); vgpu-guestd drives only VFIO no-IOMMU, use --driver uio",
        path.display()
    )]
    RealIommu {
        /// The function.
        bdf: String,
        /// Its group.
        group: u32,
        /// The group's node.
        path: PathBuf,
    },
    /// A VFIO ioctl failed.
    #[error("VFIO {call} failed: {source}")]
    Ioctl {
        /// The ioctl.
        call: &'static str,
        /// The cause.
        source: io::Error,
    },
    /// The container speaks another API version.
    #[error("The VFIO API version is {0}, expected {VFIO_API_VERSION}")]
    ApiVersion(i32),
    /// The container cannot do no-IOMMU.
    #[error("The VFIO container does not support the no-IOMMU type")]
    NoNoIommuType,
    /// Some device of the group is not bound to VFIO.
    #[error("VFIO group {} is not viable (flags {flags:#x}): bind all its devices to vfio-pci", path.display())]
    NotViable {
        /// The group node.
        path: PathBuf,
        /// Its status flags.
        flags: u32,
    },
    /// The device is not a vfio-pci device with config space.
    #[error("VFIO device {bdf} is not a PCI device (flags {flags:#x}, {regions} regions)")]
    NotPci {
        /// The function.
        bdf: String,
        /// Its device flags.
        flags: u32,
        /// Its number of regions.
        regions: u32,
    },
    /// A region cannot be used as needed.
    #[error("VFIO region {index}: {reason}")]
    Region {
        /// The region index.
        index: u32,
        /// Why.
        reason: String,
    },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> VfioError + 'a {
    move |source| VfioError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// The no-IOMMU module parameter under the sysfs root `sys`.
pub fn noiommu_param(sys: &Path) -> PathBuf {
    sys.join(NOIOMMU_PARAM)
}

/// Runs `modprobe ARGS` (best effort: a kernel with the module built in, or
/// a guest without modprobe, is fine).
pub fn modprobe(args: &[&str]) {
    match std::process::Command::new("modprobe").args(args).status() {
        Ok(status) => tracing::debug!(?args, %status, "modprobe"),
        Err(e) => tracing::debug!(?args, error = %e, "Cannot run modprobe"),
    }
}

/// Makes VFIO no-IOMMU mode usable if the kernel has it: loads `vfio` with
/// the parameter and `vfio-pci` (through `load`, normally [`modprobe`]) when
/// they are missing, and turns the parameter on if it reads `N`. `sys` is
/// the sysfs root. Fails with [`VfioError::Unavailable`] where the kernel
/// has no no-IOMMU mode.
pub fn prepare_noiommu(sys: &Path, load: &mut dyn FnMut(&[&str])) -> Result<(), VfioError> {
    let param = noiommu_param(sys);
    if !param.exists() {
        load(&["vfio", "enable_unsafe_noiommu_mode=1"]);
        if !param.exists() {
            return Err(VfioError::Unavailable(param));
        }
    }
    if !sys.join("bus/pci/drivers").join(VFIO_DRIVER).exists() {
        load(&[VFIO_DRIVER]);
    }
    let read = |param: &Path| -> Result<String, VfioError> {
        let text = std::fs::read_to_string(param).map_err(io_err("read", param))?;
        Ok(text.trim().to_owned())
    };
    let is_on = |v: &str| v == "Y" || v == "1";
    if is_on(&read(&param)?) {
        return Ok(());
    }
    std::fs::write(&param, "Y").map_err(io_err("write", &param))?;
    let value = read(&param)?;
    if !is_on(&value) {
        return Err(VfioError::NotEnabled { path: param, value });
    }
    tracing::warn!("Enabled VFIO no-IOMMU mode (this taints the kernel)");
    Ok(())
}

/// The IOMMU group of the function at `dev_path`, from its `iommu_group`
/// link, and the group's no-IOMMU node under `dev_vfio`.
pub fn group_node(
    dev_path: &Path,
    bdf: &str,
    dev_vfio: &Path,
) -> Result<(u32, PathBuf), VfioError> {
    let no_group = |reason: String| VfioError::NoGroup {
        bdf: bdf.to_owned(),
        reason,
    };
    let link = dev_path.join("iommu_group");
    let target = std::fs::read_link(&link)
        .map_err(|e| no_group(format!("cannot read {}: {e}", link.display())))?;
    let group: u32 = target
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| no_group(format!("{} points at {}", link.display(), target.display())))?;
    let node = dev_vfio.join(format!("noiommu-{group}"));
    let real = dev_vfio.join(group.to_string());
    if !node.exists() && real.exists() {
        return Err(VfioError::RealIommu {
            bdf: bdf.to_owned(),
            group,
            path: real,
        });
    }
    Ok((group, node))
}

/// A VFIO region as the device reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// Its index (BAR n is n, config space 7).
    pub index: u32,
    /// `VFIO_REGION_INFO_FLAG_*`.
    pub flags: u32,
    /// Its size in bytes.
    pub size: u64,
    /// Its offset in the device fd.
    pub offset: u64,
}

impl Region {
    /// The region described by `info`; `None` for an absent (empty) one.
    pub fn from_info(info: &RegionInfo) -> Option<Region> {
        (info.size > 0).then_some(Region {
            index: info.index,
            flags: info.flags,
            size: info.size,
            offset: info.offset,
        })
    }

    fn has(&self, flag: u32) -> bool {
        self.flags & flag != 0
    }

    fn error(&self, reason: impl Into<String>) -> VfioError {
        VfioError::Region {
            index: self.index,
            reason: reason.into(),
        }
    }

    /// The offset and length to mmap the whole region with.
    pub fn mmap_range(&self) -> Result<(u64, usize), VfioError> {
        if !self.has(VFIO_REGION_INFO_FLAG_MMAP) {
            return Err(self.error("vfio-pci does not allow mapping it"));
        }
        if !self.has(VFIO_REGION_INFO_FLAG_READ) || !self.has(VFIO_REGION_INFO_FLAG_WRITE) {
            return Err(self.error(format!("it is not read-write (flags {:#x})", self.flags)));
        }
        let len = usize::try_from(self.size).map_err(|_| self.error("it is too large"))?;
        if !self.offset.is_multiple_of(4096) {
            return Err(self.error(format!("its offset {:#x} is not page-aligned", self.offset)));
        }
        Ok((self.offset, len))
    }

    /// The base offset and length to pread/pwrite config space at.
    pub fn config_range(&self) -> Result<(u64, usize), VfioError> {
        if !self.has(VFIO_REGION_INFO_FLAG_READ) || !self.has(VFIO_REGION_INFO_FLAG_WRITE) {
            return Err(self.error(format!("it is not read-write (flags {:#x})", self.flags)));
        }
        let len = usize::try_from(self.size).map_err(|_| self.error("it is too large"))?;
        if len < 64 {
            return Err(self.error(format!("config space is only {len} bytes")));
        }
        Ok((self.offset, len))
    }
}

fn check(ret: libc::c_int, call: &'static str) -> Result<libc::c_int, VfioError> {
    if ret < 0 {
        return Err(VfioError::Ioctl {
            call,
            source: io::Error::last_os_error(),
        });
    }
    Ok(ret)
}

/// An ioctl whose argument is a plain integer.
fn ioctl_value(
    fd: RawFd,
    req: u32,
    arg: libc::c_ulong,
    call: &'static str,
) -> Result<i32, VfioError> {
    // SAFETY: VFIO container ioctls of this kind read no memory from the
    // integer argument; a wrong fd or request fails with an errno.
    check(unsafe { libc::ioctl(fd, req as _, arg) }, call)
}

/// An ioctl whose argument is a pointer to a `T` (a `#[repr(C)]` VFIO
/// struct starting with `argsz`, or an s32).
///
/// # Safety
/// `T` must be what `req` expects (for `argsz` structs, one at least as
/// large as its `argsz` says).
unsafe fn ioctl_struct<T>(
    fd: RawFd,
    req: u32,
    arg: &mut T,
    call: &'static str,
) -> Result<i32, VfioError> {
    // SAFETY: the caller guarantees `T` matches `req`; `arg` is live and
    // writable for the whole call, and the kernel stays within `argsz`.
    check(unsafe { libc::ioctl(fd, req as _, arg as *mut T) }, call)
}

fn open_rw(path: &Path) -> Result<File, VfioError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(io_err("open", path))
}

/// A function bound to `vfio-pci` in no-IOMMU mode: its container, group
/// and device fds, and the regions it uses.
#[derive(Debug)]
pub struct VfioFunction {
    bdf: String,
    group: u32,
    group_path: PathBuf,
    // Field order is drop order: the device closes before its group, the
    // group before the container.
    device: Arc<File>,
    regions: Vec<Option<Region>>,
    _group: File,
    _container: File,
}

impl VfioFunction {
    /// Binds `dev` to `vfio-pci` (`sysfs_pci` is the bus directory) and
    /// opens it through the container `dev_vfio/vfio` and its no-IOMMU
    /// group. No-IOMMU mode must be on ([`prepare_noiommu`]).
    pub fn open(dev: &PciDevice, sysfs_pci: &Path, dev_vfio: &Path) -> Result<Self, VfioError> {
        dev.bind(sysfs_pci, VFIO_DRIVER)?;
        let start = Instant::now();
        let (group, group_path) = loop {
            // Looked up again each time: the node appears a little after
            // the bind, and a real IOMMU's group node may appear instead.
            let (group, node) = group_node(&dev.path, &dev.bdf, dev_vfio)?;
            if node.exists() {
                break (group, node);
            }
            if start.elapsed() > NODE_TIMEOUT {
                return Err(VfioError::NoGroup {
                    bdf: dev.bdf.clone(),
                    reason: format!("{} did not appear", node.display()),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let container = open_rw(&dev_vfio.join("vfio"))?;
        let cfd = container.as_raw_fd();
        let version = ioctl_value(cfd, VFIO_GET_API_VERSION, 0, "GET_API_VERSION")?;
        if version != VFIO_API_VERSION {
            return Err(VfioError::ApiVersion(version));
        }
        let noiommu = libc::c_ulong::from(VFIO_NOIOMMU_IOMMU);
        if ioctl_value(cfd, VFIO_CHECK_EXTENSION, noiommu, "CHECK_EXTENSION")? <= 0 {
            return Err(VfioError::NoNoIommuType);
        }
        let group_file = open_rw(&group_path)?;
        let gfd = group_file.as_raw_fd();
        let mut status = GroupStatus {
            argsz: argsz::<GroupStatus>(),
            flags: 0,
        };
        // SAFETY: GET_STATUS takes a vfio_group_status.
        unsafe { ioctl_struct(gfd, VFIO_GROUP_GET_STATUS, &mut status, "GROUP_GET_STATUS")? };
        if status.flags & VFIO_GROUP_FLAGS_VIABLE == 0 {
            return Err(VfioError::NotViable {
                path: group_path,
                flags: status.flags,
            });
        }
        let mut container_fd: i32 = cfd;
        // SAFETY: SET_CONTAINER takes a pointer to the container's fd (s32).
        unsafe {
            ioctl_struct(
                gfd,
                VFIO_GROUP_SET_CONTAINER,
                &mut container_fd,
                "GROUP_SET_CONTAINER",
            )?
        };
        ioctl_value(cfd, VFIO_SET_IOMMU, noiommu, "SET_IOMMU")?;
        let name = CString::new(dev.bdf.as_str()).map_err(|_| VfioError::NoGroup {
            bdf: dev.bdf.clone(),
            reason: "its name holds a NUL".into(),
        })?;
        // SAFETY: GET_DEVICE_FD reads a NUL-terminated name, which `name`
        // holds for the whole call.
        let dfd = check(
            unsafe { libc::ioctl(gfd, VFIO_GROUP_GET_DEVICE_FD as _, name.as_ptr()) },
            "GROUP_GET_DEVICE_FD",
        )?;
        // SAFETY: the ioctl returned a fresh descriptor that only this File
        // owns from now on.
        let device = unsafe { File::from_raw_fd(dfd) };
        let regions = Self::regions(&device, &dev.bdf)?;
        tracing::info!(
            bdf = %dev.bdf,
            group,
            regions = regions.iter().flatten().count(),
            "Opened the device through VFIO no-IOMMU"
        );
        Ok(VfioFunction {
            bdf: dev.bdf.clone(),
            group,
            group_path,
            device: Arc::new(device),
            regions,
            _group: group_file,
            _container: container,
        })
    }

    /// Reads the device info and the regions of BARs 0-5 and config space.
    fn regions(device: &File, bdf: &str) -> Result<Vec<Option<Region>>, VfioError> {
        let fd = device.as_raw_fd();
        let mut info = DeviceInfo {
            argsz: argsz::<DeviceInfo>(),
            ..DeviceInfo::default()
        };
        // SAFETY: GET_INFO takes a vfio_device_info.
        unsafe { ioctl_struct(fd, VFIO_DEVICE_GET_INFO, &mut info, "DEVICE_GET_INFO")? };
        if info.flags & VFIO_DEVICE_FLAGS_PCI == 0
            || info.num_regions <= VFIO_PCI_CONFIG_REGION_INDEX
        {
            return Err(VfioError::NotPci {
                bdf: bdf.to_owned(),
                flags: info.flags,
                regions: info.num_regions,
            });
        }
        let mut regions = vec![None; VFIO_PCI_CONFIG_REGION_INDEX as usize + 1];
        let indexes = (0..=VFIO_PCI_BAR5_REGION_INDEX).chain([VFIO_PCI_CONFIG_REGION_INDEX]);
        for index in indexes {
            let mut ri = RegionInfo {
                argsz: argsz::<RegionInfo>(),
                index,
                ..RegionInfo::default()
            };
            // SAFETY: GET_REGION_INFO takes a vfio_region_info; with argsz
            // 32 the kernel writes no capability chain past it.
            unsafe { ioctl_struct(fd, VFIO_DEVICE_GET_REGION_INFO, &mut ri, "GET_REGION_INFO")? };
            regions[index as usize] = Region::from_info(&ri);
        }
        Ok(regions)
    }

    /// The function's IOMMU group number.
    pub fn group(&self) -> u32 {
        self.group
    }

    fn region(&self, index: u32) -> Result<Region, VfioError> {
        self.regions
            .get(index as usize)
            .copied()
            .flatten()
            .ok_or(VfioError::Region {
                index,
                reason: "the device does not have it".into(),
            })
    }
}

impl PciAccess for VfioFunction {
    fn bdf(&self) -> &str {
        &self.bdf
    }

    fn config(&self) -> Result<ConfigSpace, PciError> {
        let label = PathBuf::from(format!(
            "the config region of {} in {}",
            self.bdf,
            self.group_path.display()
        ));
        let region = self
            .region(VFIO_PCI_CONFIG_REGION_INDEX)
            .and_then(|r| r.config_range())
            .map_err(|e| PciError::BadConfig(e.to_string()))?;
        let file = self.device.try_clone().map_err(|source| PciError::Io {
            what: "duplicate",
            path: label.clone(),
            source,
        })?;
        Ok(ConfigSpace::new(file, label, region.0, region.1))
    }

    fn map_bar(&self, bar: u8) -> Result<Arc<Bar>, PciError> {
        let (offset, len) = self
            .region(u32::from(bar))
            .and_then(|r| r.mmap_range())
            .map_err(|e| PciError::Bar {
                bar,
                reason: e.to_string(),
            })?;
        Bar::map_file(&self.device, offset, len, bar)
    }

    fn interrupts(&self) -> Result<Option<Box<dyn Interrupts>>, PciError> {
        let intx = VfioIntx::new(Arc::clone(&self.device))
            .map_err(|e| PciError::Interrupt(format!("INTx of {}: {e}", self.bdf)))?;
        Ok(Some(Box::new(intx)))
    }
}

/// INTx of a VFIO device, signalled on an eventfd. vfio-pci masks the line
/// after each interrupt until it is unmasked through `SET_IRQS`.
#[derive(Debug)]
struct VfioIntx {
    device: Arc<File>,
    eventfd: File,
}

impl VfioIntx {
    fn new(device: Arc<File>) -> Result<VfioIntx, VfioError> {
        let fd = device.as_raw_fd();
        let mut info = IrqInfo {
            argsz: argsz::<IrqInfo>(),
            index: VFIO_PCI_INTX_IRQ_INDEX,
            ..IrqInfo::default()
        };
        // SAFETY: GET_IRQ_INFO takes a vfio_irq_info.
        unsafe { ioctl_struct(fd, VFIO_DEVICE_GET_IRQ_INFO, &mut info, "GET_IRQ_INFO")? };
        if info.count == 0 || info.flags & VFIO_IRQ_INFO_EVENTFD == 0 {
            return Err(VfioError::Ioctl {
                call: "GET_IRQ_INFO",
                source: io::Error::other(format!(
                    "INTx has {} interrupts, flags {:#x}: no eventfd signalling",
                    info.count, info.flags
                )),
            });
        }
        // SAFETY: eventfd takes no pointers; the result is checked.
        let efd = check(
            unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) },
            "eventfd",
        )?;
        // SAFETY: a fresh descriptor that only this File owns.
        let eventfd = unsafe { File::from_raw_fd(efd) };
        let mut set = irq_set_eventfd(VFIO_PCI_INTX_IRQ_INDEX, efd);
        // SAFETY: SET_IRQS takes a vfio_irq_set; `set` is one followed by
        // the single s32 eventfd its count and argsz announce.
        unsafe {
            ioctl_struct(
                fd,
                VFIO_DEVICE_SET_IRQS,
                &mut set,
                "SET_IRQS (INTx eventfd)",
            )?
        };
        tracing::debug!(
            automasked = info.flags & VFIO_IRQ_INFO_AUTOMASKED != 0,
            "VFIO INTx signals an eventfd"
        );
        Ok(VfioIntx { device, eventfd })
    }
}

impl Interrupts for VfioIntx {
    fn fd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    fn clear(&self) {
        let mut count = [0u8; 8];
        // SAFETY: reads at most 8 bytes into a live buffer.
        let _ = unsafe { libc::read(self.eventfd.as_raw_fd(), count.as_mut_ptr().cast(), 8) };
    }

    fn unmask(&self) {
        let mut set = irq_unmask(VFIO_PCI_INTX_IRQ_INDEX);
        // SAFETY: SET_IRQS with DATA_NONE takes a bare vfio_irq_set.
        let r = unsafe {
            ioctl_struct(
                self.device.as_raw_fd(),
                VFIO_DEVICE_SET_IRQS,
                &mut set,
                "SET_IRQS (unmask)",
            )
        };
        if let Err(e) = r {
            tracing::debug!(error = %e, "Cannot unmask INTx");
        }
    }
}

impl Drop for VfioIntx {
    fn drop(&mut self) {
        let mut set = irq_disable(VFIO_PCI_INTX_IRQ_INDEX);
        // SAFETY: SET_IRQS with DATA_NONE and count 0 takes a bare
        // vfio_irq_set; it detaches the eventfd before it is closed.
        let _ = unsafe {
            ioctl_struct(
                self.device.as_raw_fd(),
                VFIO_DEVICE_SET_IRQS,
                &mut set,
                "SET_IRQS (disable)",
            )
        };
    }
}

#[cfg(test)]
#[path = "vfio_tests.rs"]
mod tests;
