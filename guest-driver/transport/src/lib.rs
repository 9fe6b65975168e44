//! The guest side of virtio-vgpu: a vhost-user frontend with memfd guest
//! memory and split virtqueues.
//!
//! This library runs inside every guest CUDA process (it is linked into our
//! `libcuda.so.1`), so it never panics, starts no threads, installs no
//! logger, and never blocks forever on a missing or dead backend: every wait
//! also watches the vhost-user socket for hang-up.
//!
//! Modules: [`ring`] (split virtqueue driver, reusable), `async_errors`
//! (failed async requests per context), `mem` (memfd
//! mappings and the guest memory layout), `staging` (bounce-buffer heap),
//! `pinned` (ADD_MEM_REG regions), `vhost` (handshake), `queue` (request
//! placement, reaping, waiting), `device` ([`Device`]).

mod async_errors;
mod device;
mod error;
mod mem;
mod pinned;
mod queue;
pub mod ring;
mod staging;
mod vhost;

use std::path::PathBuf;

pub use device::Device;
pub use error::TransportError;
pub use mem::{SharedMem, GUEST_BASE_GPA, PINNED_BASE_GPA};
pub use staging::Staging;

/// Socket path used when `VGPU_SOCKET` is unset.
pub const DEFAULT_SOCKET: &str = "/run/vgpu/vgpu0.sock";
/// Guest memory size used when `VGPU_STAGING_MB` is unset.
pub const DEFAULT_GUEST_MEM_BYTES: usize = 64 << 20;
/// Queue size requested by default (the device may allow less).
pub const DEFAULT_QUEUE_SIZE: u16 = vgpu_spec::MAX_QUEUE_SIZE;

/// How to reach the backend and how much guest memory to share with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// The backend's vhost-user socket.
    pub socket: PathBuf,
    /// Guest memory: rings, request slots and the staging heap.
    pub guest_mem_bytes: usize,
    /// Requested queue size (power of two; clamped to the device's maximum).
    pub queue_size: u16,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            socket: PathBuf::from(DEFAULT_SOCKET),
            guest_mem_bytes: DEFAULT_GUEST_MEM_BYTES,
            queue_size: DEFAULT_QUEUE_SIZE,
        }
    }
}

impl Options {
    /// Defaults, overridden by `VGPU_SOCKET` and `VGPU_STAGING_MB` (guest
    /// memory in MiB; an unparsable or zero value is ignored with a warning).
    pub fn from_env() -> Options {
        Self::from_vars(
            std::env::var_os("VGPU_SOCKET").map(PathBuf::from),
            std::env::var("VGPU_STAGING_MB").ok(),
        )
    }

    fn from_vars(socket: Option<PathBuf>, staging_mb: Option<String>) -> Options {
        let mut opts = Options::default();
        if let Some(socket) = socket.filter(|s| !s.as_os_str().is_empty()) {
            opts.socket = socket;
        }
        if let Some(mb) = staging_mb {
            match mb
                .trim()
                .parse::<usize>()
                .ok()
                .filter(|n| *n > 0)
                .and_then(|n| n.checked_mul(1 << 20))
            {
                Some(bytes) => opts.guest_mem_bytes = bytes,
                None => {
                    tracing::warn!("Ignoring VGPU_STAGING_MB={mb:?}: not a positive size in MiB")
                }
            }
        }
        opts
    }
}

/// Counters for tests and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Requests placed in a ring (sync and async).
    pub requests: u64,
    /// Device notifications (eventfd writes).
    pub kicks: u64,
    /// Requests sent with [`Device::call`].
    pub sync_calls: u64,
    /// Bytes bounced through guest memory: [`Device::staging`] allocations
    /// plus requests too large for a slot.
    pub bytes_staged: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_default_to_socket_and_64_mib() {
        let o = Options::from_vars(None, None);
        assert_eq!(o, Options::default());
        assert_eq!(o.socket, PathBuf::from("/run/vgpu/vgpu0.sock"));
        assert_eq!(o.guest_mem_bytes, 64 << 20);
        assert_eq!(o.queue_size, 1024);
    }

    #[test]
    fn env_overrides_socket_and_staging_size() {
        let o = Options::from_vars(Some("/tmp/x.sock".into()), Some("128".into()));
        assert_eq!(o.socket, PathBuf::from("/tmp/x.sock"));
        assert_eq!(o.guest_mem_bytes, 128 << 20);
    }

    #[test]
    fn bad_staging_size_is_ignored() {
        for bad in ["", "0", "-4", "lots", "99999999999999999999"] {
            let o = Options::from_vars(None, Some(bad.into()));
            assert_eq!(o.guest_mem_bytes, DEFAULT_GUEST_MEM_BYTES, "{bad}");
        }
        let o = Options::from_vars(Some("".into()), None);
        assert_eq!(o.socket, PathBuf::from(DEFAULT_SOCKET));
    }
}
