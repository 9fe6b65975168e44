//! Attaching a slice to a running VM and detaching it: what `vgpuctl attach` and `detach` do.

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cloud_hypervisor::args::check_id;
use crate::cloud_hypervisor::{AddOutcome, ApiClient, ApiError};
use crate::http::DEFAULT_TIMEOUT;
use crate::target::VmTarget;
use crate::ArgsError;

/// Errors from [`attach`] and [`detach`].
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// Nothing at the slice's socket path.
    #[error("Backend socket {} does not exist; is the slice's vgpu-backend running?", .0.display())]
    BackendMissing(PathBuf),
    /// Something that is not a socket at the slice's socket path.
    #[error("{} is not a socket", .0.display())]
    NotASocket(PathBuf),
    /// A device id the VMM would refuse.
    #[error(transparent)]
    Args(#[from] ArgsError),
    /// The VMM refused or could not be reached.
    #[error(transparent)]
    Vm(#[from] ApiError),
}

/// How to reach the VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// Per-read and per-write timeout on the VMM's API socket.
    pub timeout: Duration,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

/// Attaches the slice served on `backend_socket` to `vm`, as device `id` when given.
///
/// The socket must exist here (the VMM is assumed to share this host's view of the file
/// system). For cloud-hypervisor the VM's memory must be shared, which is checked through
/// `vm.info` before anything is added.
pub fn attach(
    vm: &VmTarget,
    backend_socket: &Path,
    id: Option<&str>,
    options: Options,
) -> Result<AddOutcome, AttachError> {
    if let Some(id) = id {
        check_id(id)?;
    }
    match std::fs::metadata(backend_socket) {
        Err(_) => return Err(AttachError::BackendMissing(backend_socket.to_path_buf())),
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(AttachError::NotASocket(backend_socket.to_path_buf()))
        }
        Ok(_) => {}
    }
    match vm {
        VmTarget::CloudHypervisor { api_socket } => {
            let client = ApiClient::new(api_socket).with_timeout(options.timeout);
            let outcome = client.hotplug_vgpu(backend_socket, id)?;
            tracing::info!(%vm, socket = %backend_socket.display(), ?outcome, "slice attached");
            Ok(outcome)
        }
    }
}

/// Removes device `id` from `vm`.
pub fn detach(vm: &VmTarget, id: &str, options: Options) -> Result<(), AttachError> {
    match vm {
        VmTarget::CloudHypervisor { api_socket } => {
            ApiClient::new(api_socket)
                .with_timeout(options.timeout)
                .remove_device(id)?;
            tracing::info!(%vm, %id, "device detached");
            Ok(())
        }
    }
}
