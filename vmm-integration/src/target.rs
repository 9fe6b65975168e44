//! What `vgpuctl` is pointed at: a VM (`cloud-hypervisor:/path/api.sock`) and a slice (a name or a
//! backend socket path).
//!
//! Slice names resolve to `/run/vgpu/<name>.sock`, where the README's examples start backends;
//! the scheduler will own this resolution once it spawns the backends itself.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Where slice sockets live: `<dir>/<name>.sock`.
pub const SLICE_SOCKET_DIR: &str = "/run/vgpu";

/// Errors parsing a VM or a slice.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// Not `kind:path`.
    #[error("VM {0:?} is not of the form cloud-hypervisor:/path/to/api.sock")]
    MalformedVm(String),
    /// QEMU has no REST API to hotplug through.
    #[error(
        "QEMU VMs cannot be attached to at run time by vgpuctl; start QEMU with the arguments \
         in docs/vms.md"
    )]
    QemuHotplug,
    /// A VMM kind this crate does not know.
    #[error("Unknown VMM {0:?}; the supported one is cloud-hypervisor")]
    UnknownVmm(String),
    /// Neither an absolute path nor a plain name.
    #[error("Slice {0:?} is neither an absolute socket path nor a slice name")]
    BadSlice(String),
}

/// A running VM to attach slices to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmTarget {
    /// A cloud-hypervisor VM, by its API socket (`--api-socket path=..`).
    CloudHypervisor {
        /// The API socket.
        api_socket: PathBuf,
    },
}

impl FromStr for VmTarget {
    type Err = TargetError;

    fn from_str(text: &str) -> Result<VmTarget, TargetError> {
        let Some((kind, path)) = text.split_once(':') else {
            return Err(TargetError::MalformedVm(text.to_owned()));
        };
        match kind {
            "cloud-hypervisor" if !path.is_empty() => Ok(VmTarget::CloudHypervisor {
                api_socket: PathBuf::from(path),
            }),
            "cloud-hypervisor" => Err(TargetError::MalformedVm(text.to_owned())),
            "qemu" => Err(TargetError::QemuHotplug),
            other => Err(TargetError::UnknownVmm(other.to_owned())),
        }
    }
}

impl fmt::Display for VmTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmTarget::CloudHypervisor { api_socket } => {
                write!(f, "cloud-hypervisor:{}", api_socket.display())
            }
        }
    }
}

/// The backend socket of `slice`: an absolute path as is, a name as `/run/vgpu/<name>.sock`.
pub fn resolve_slice(slice: &str) -> Result<PathBuf, TargetError> {
    resolve_slice_in(Path::new(SLICE_SOCKET_DIR), slice)
}

/// [`resolve_slice`] with names resolved in `dir`.
pub fn resolve_slice_in(dir: &Path, slice: &str) -> Result<PathBuf, TargetError> {
    if slice.starts_with('/') {
        return Ok(PathBuf::from(slice));
    }
    let bad = slice.is_empty()
        || slice == "."
        || slice == ".."
        || slice.contains(['/', '\0'])
        || slice.chars().any(char::is_control);
    if bad {
        return Err(TargetError::BadSlice(slice.to_owned()));
    }
    Ok(dir.join(format!("{slice}.sock")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cloud_hypervisor_targets_parse_to_their_api_socket() {
        let vm: VmTarget = "cloud-hypervisor:/run/ch/vm1.sock".parse().unwrap();
        assert_eq!(
            vm,
            VmTarget::CloudHypervisor {
                api_socket: PathBuf::from("/run/ch/vm1.sock")
            }
        );
        assert_eq!(vm.to_string(), "cloud-hypervisor:/run/ch/vm1.sock");
        // Colons after the first belong to the path.
        let vm: VmTarget = "cloud-hypervisor:/tmp/a:b.sock".parse().unwrap();
        assert_eq!(vm.to_string(), "cloud-hypervisor:/tmp/a:b.sock");
    }

    #[test]
    fn other_vm_forms_are_refused_with_a_reason() {
        assert_eq!(
            "/run/ch/vm1.sock".parse::<VmTarget>(),
            Err(TargetError::MalformedVm("/run/ch/vm1.sock".to_owned()))
        );
        assert_eq!(
            "cloud-hypervisor:".parse::<VmTarget>(),
            Err(TargetError::MalformedVm("cloud-hypervisor:".to_owned()))
        );
        assert_eq!(
            "qemu:/run/qmp.sock".parse::<VmTarget>(),
            Err(TargetError::QemuHotplug)
        );
        assert_eq!(
            "firecracker:/x".parse::<VmTarget>(),
            Err(TargetError::UnknownVmm("firecracker".to_owned()))
        );
    }

    #[test]
    fn slice_names_map_to_sockets_and_absolute_paths_stay() {
        assert_eq!(
            resolve_slice("tenant-a").unwrap(),
            PathBuf::from("/run/vgpu/tenant-a.sock")
        );
        assert_eq!(
            resolve_slice("/srv/slices/b.sock").unwrap(),
            PathBuf::from("/srv/slices/b.sock")
        );
        assert_eq!(
            resolve_slice_in(Path::new("/tmp/x"), "a").unwrap(),
            PathBuf::from("/tmp/x/a.sock")
        );
    }

    #[test]
    fn relative_paths_and_odd_names_are_refused() {
        for slice in ["", ".", "..", "rel/a.sock", "a\nb"] {
            assert_eq!(
                resolve_slice(slice),
                Err(TargetError::BadSlice(slice.to_owned())),
                "{slice:?}"
            );
        }
    }
}
