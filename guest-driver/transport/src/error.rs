//! Transport errors and the `CUresult` each one surfaces as.

use std::path::PathBuf;

use thiserror::Error;
use vgpu_spec::Status;

/// What can go wrong between the guest library and the backend.
#[derive(Debug, Error)]
pub enum TransportError {
    /// The backend socket could not be connected.
    #[error(
        "Cannot connect to the vGPU backend at {}: {source}. Is the backend running? \
         Set VGPU_SOCKET to its socket path",
        path.display()
    )]
    Connect {
        /// The socket path tried.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// The backend broke the vhost-user or virtio-vgpu handshake.
    #[error("vGPU device handshake failed: {0}")]
    Protocol(String),
    /// The backend went away; every later request fails the same way.
    #[error("The vGPU backend disconnected")]
    Disconnected,
    /// Guest memory for the request (staging, ring space or a region) is exhausted.
    #[error("Out of vGPU transport memory: {0}")]
    NoMemory(String),
    /// The device answered in a way the protocol does not allow.
    #[error("Bad response from the vGPU device: {0}")]
    BadResponse(String),
    /// The caller passed something the transport cannot use.
    #[error("Invalid argument: {0}")]
    InvalidArgument(String),
    /// A system call failed.
    #[error("{what} failed: {source}")]
    System {
        /// The operation.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl TransportError {
    /// The CUDA status a driver-API call returns for this error.
    pub fn status(&self) -> Status {
        match self {
            TransportError::Connect { .. } | TransportError::Protocol(_) => Status::NO_DEVICE,
            TransportError::Disconnected => Status::DEVICE_UNAVAILABLE,
            TransportError::NoMemory(_) => Status::OUT_OF_MEMORY,
            TransportError::BadResponse(_) => Status::UNKNOWN,
            TransportError::InvalidArgument(_) => Status::INVALID_VALUE,
            TransportError::System { source, .. } => {
                if source.raw_os_error() == Some(libc::ENOMEM) {
                    Status::OUT_OF_MEMORY
                } else {
                    Status::UNKNOWN
                }
            }
        }
    }

    /// A [`TransportError::System`] from `errno`.
    pub(crate) fn last_os(what: &'static str) -> TransportError {
        TransportError::System {
            what,
            source: std::io::Error::last_os_error(),
        }
    }

    /// Maps a vhost-user frontend error: a broken or closed socket means the
    /// backend is gone, anything else is a protocol failure of `step`.
    pub(crate) fn from_vhost(step: &str, err: vhost::Error) -> TransportError {
        use vhost::vhost_user::Error as E;
        match err {
            vhost::Error::VhostUserProtocol(
                E::Disconnected | E::PartialMessage | E::SocketBroken(_),
            ) => TransportError::Disconnected,
            vhost::Error::VhostUserProtocol(E::SocketError(ref io))
                if matches!(
                    io.raw_os_error(),
                    Some(libc::EPIPE | libc::ECONNRESET | libc::ENOTCONN)
                ) =>
            {
                TransportError::Disconnected
            }
            other => TransportError::Protocol(format!("{step}: {other}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_error_maps_to_no_device_and_names_socket_and_env() {
        let e = TransportError::Connect {
            path: PathBuf::from("/run/vgpu/missing.sock"),
            source: std::io::Error::from_raw_os_error(libc::ENOENT),
        };
        assert_eq!(e.status(), Status::NO_DEVICE);
        let text = e.to_string();
        assert!(text.contains("/run/vgpu/missing.sock"), "{text}");
        assert!(text.contains("VGPU_SOCKET"), "{text}");
    }

    #[test]
    fn each_error_maps_to_its_cuda_status() {
        assert_eq!(
            TransportError::Disconnected.status(),
            Status::DEVICE_UNAVAILABLE
        );
        assert_eq!(
            TransportError::Protocol("x".into()).status(),
            Status::NO_DEVICE
        );
        assert_eq!(
            TransportError::NoMemory("x".into()).status(),
            Status::OUT_OF_MEMORY
        );
        assert_eq!(
            TransportError::BadResponse("x".into()).status(),
            Status::UNKNOWN
        );
        assert_eq!(
            TransportError::InvalidArgument("x".into()).status(),
            Status::INVALID_VALUE
        );
        let oom = TransportError::System {
            what: "mmap",
            source: std::io::Error::from_raw_os_error(libc::ENOMEM),
        };
        assert_eq!(oom.status(), Status::OUT_OF_MEMORY);
        let other = TransportError::System {
            what: "eventfd",
            source: std::io::Error::from_raw_os_error(libc::EMFILE),
        };
        assert_eq!(other.status(), Status::UNKNOWN);
    }

    #[test]
    fn broken_vhost_socket_maps_to_disconnected() {
        use vhost::vhost_user::Error as E;
        let cases = [
            vhost::Error::VhostUserProtocol(E::Disconnected),
            vhost::Error::VhostUserProtocol(E::PartialMessage),
            vhost::Error::VhostUserProtocol(E::SocketBroken(std::io::Error::from_raw_os_error(
                libc::EPIPE,
            ))),
            vhost::Error::VhostUserProtocol(E::SocketError(std::io::Error::from_raw_os_error(
                libc::ECONNRESET,
            ))),
        ];
        for err in cases {
            assert!(matches!(
                TransportError::from_vhost("SET_OWNER", err),
                TransportError::Disconnected
            ));
        }
        let e = TransportError::from_vhost(
            "GET_CONFIG",
            vhost::Error::VhostUserProtocol(E::InvalidMessage),
        );
        assert!(matches!(&e, TransportError::Protocol(m) if m.contains("GET_CONFIG")));
    }
}
