//! cloud-hypervisor (v53 and later): boot arguments and REST hotplug of a slice.

pub mod api;
pub mod args;
pub mod fake;

pub use api::{AddOutcome, ApiClient, ApiError, GenericVhostUserConfig, PciDeviceInfo, VmInfo};
pub use args::{boot_args, device_args, generic_vhost_user_value, memory_args};
