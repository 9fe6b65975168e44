//! `vgpu-vmm`: attaches vGPU slices to virtual machines.
//!
//! A slice is a `vgpu-backend` process serving the virtio-vgpu device (type 64, three queues,
//! 256-byte config space; `virtio-spec/SPEC.md`) on a vhost-user socket. A VMM becomes that
//! socket's vhost-user frontend and shows the guest a virtio-pci function (1af4:1080), which
//! `vgpu-guestd` drives from guest userspace.
//!
//! - [`cloud_hypervisor`]: `--generic-vhost-user` boot arguments, and hotplug and unplug of a
//!   running VM through the REST API (with a check that the VM's memory is shared).
//! - [`qemu`]: arguments for the generic `vhost-user-test-device-pci` and memfd guest RAM.
//! - [`attach`]: attach and detach a slice (what `vgpuctl` runs).
//! - [`target`]: what `vgpuctl attach` and `detach` parse (the VM, the slice's socket).
//! - [`http`]: the small HTTP/1.1-over-Unix-socket client the REST calls use.

pub mod attach;
pub mod cloud_hypervisor;
pub mod device;
pub mod http;
pub mod qemu;
pub mod size;
pub mod target;

use std::path::PathBuf;

pub use size::{MemorySize, SizeError};

/// Errors building VMM command-line arguments.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArgsError {
    /// A path that cannot be written into a command-line option.
    #[error("Socket path {} is not valid UTF-8", .0.display())]
    NotUtf8(PathBuf),
    /// A device id the VMM would refuse.
    #[error("Device id {0:?} is not accepted by the VMM")]
    BadDeviceId(String),
}
