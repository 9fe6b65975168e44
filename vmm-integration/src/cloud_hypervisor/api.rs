//! cloud-hypervisor's REST API (v53+) over its Unix socket (`--api-socket`): the calls that
//! hotplug and unplug a slice.
//!
//! Endpoints and bodies follow `vmm/src/api/openapi/cloud-hypervisor.yaml`:
//! - `GET /api/v1/vm.info` answers `VmInfo`; `config.memory` holds `shared` and `hugepages`.
//! - `PUT /api/v1/vm.add-generic-vhost-user` takes `GenericVhostUserConfig` (`socket`,
//!   `device_type`, `queue_sizes`, optional `id`, `pci_segment`) and answers 200 with
//!   `PciDeviceInfo` (`id`, `bdf`) for a running VM, or 204 when the VM is created but not booted
//!   (the device is only added to its configuration).
//! - `PUT /api/v1/vm.remove-device` takes `VmRemoveDevice` (`id`) and answers 204.
//!
//! Errors come back as 4xx/5xx with a JSON array of messages, outermost first.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::device::{DEVICE_TYPE, QUEUE_SIZES};
use crate::http::{HttpError, Response, UnixHttpClient};

/// The API's path prefix.
pub const API_PREFIX: &str = "/api/v1";

/// The message when the VM's RAM cannot be mapped by a vhost-user backend.
pub const MEMORY_NOT_SHARED: &str =
    "cloud-hypervisor VM memory is not shared (--memory shared=on); vhost-user devices need it";

/// Errors from [`ApiClient`].
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The API socket could not be connected to.
    #[error("Cannot connect to the cloud-hypervisor API socket {}: {source}", socket.display())]
    Connect {
        /// The API socket.
        socket: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The connection failed, timed out, or carried something that is not HTTP.
    #[error("cloud-hypervisor API request failed: {0}")]
    Transport(#[source] HttpError),
    /// cloud-hypervisor answered with an error status.
    #[error(
        "cloud-hypervisor answered {endpoint} with HTTP {status}: {}",
        describe_body(body)
    )]
    Status {
        /// The endpoint, such as `vm.add-generic-vhost-user`.
        endpoint: String,
        /// The HTTP status.
        status: u16,
        /// The response body as sent (a JSON array of messages, usually).
        body: String,
    },
    /// A success answer whose body is not the JSON expected.
    #[error("cloud-hypervisor's answer to {endpoint} is not the expected JSON: {source}")]
    BadJson {
        /// The endpoint.
        endpoint: String,
        /// The body as sent.
        body: String,
        /// What serde found.
        #[source]
        source: serde_json::Error,
    },
    /// A success status this client does not expect from the endpoint.
    #[error("cloud-hypervisor answered {endpoint} with unexpected HTTP {status}")]
    UnexpectedStatus {
        /// The endpoint.
        endpoint: String,
        /// The HTTP status.
        status: u16,
    },
    /// The VM's RAM is private, so no vhost-user backend could map it.
    #[error("{}", MEMORY_NOT_SHARED)]
    MemoryNotShared,
    /// The backend socket path cannot be sent as JSON.
    #[error("Socket path {} is not valid UTF-8", .0.display())]
    NotUtf8(PathBuf),
}

impl From<HttpError> for ApiError {
    fn from(e: HttpError) -> ApiError {
        match e {
            HttpError::Connect { path, source } => ApiError::Connect {
                socket: path,
                source,
            },
            other => ApiError::Transport(other),
        }
    }
}

/// cloud-hypervisor's error bodies are JSON arrays of messages, outermost first; joined with
/// `: `. Any other body is shown trimmed.
fn describe_body(body: &str) -> String {
    match serde_json::from_str::<Vec<String>>(body) {
        Ok(messages) if !messages.is_empty() => messages.join(": "),
        _ if body.trim().is_empty() => "(no body)".to_owned(),
        _ => body.trim().to_owned(),
    }
}

/// The body of `vm.add-generic-vhost-user` (`GenericVhostUserConfig` in the API spec).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenericVhostUserConfig {
    /// The backend's vhost-user socket.
    pub socket: PathBuf,
    /// The virtio device type.
    pub device_type: u32,
    /// One size per queue.
    pub queue_sizes: Vec<u16>,
    /// The device id; cloud-hypervisor picks `_generic_vhost_user<N>` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The PCI segment; 0 when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_segment: Option<u16>,
}

impl GenericVhostUserConfig {
    /// Our device (type 64, three queues) behind `socket`.
    pub fn vgpu(socket: impl Into<PathBuf>, id: Option<String>) -> GenericVhostUserConfig {
        GenericVhostUserConfig {
            socket: socket.into(),
            device_type: DEVICE_TYPE,
            queue_sizes: QUEUE_SIZES.to_vec(),
            id,
            pci_segment: None,
        }
    }
}

/// A hotplugged device (`PciDeviceInfo` in the API spec).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciDeviceInfo {
    /// The device id, for `vm.remove-device`.
    pub id: String,
    /// Where the guest sees it: `segment:bus:device.function`, such as `0000:00:06.0`.
    pub bdf: String,
}

/// What `vm.add-generic-vhost-user` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddOutcome {
    /// The VM is running and the device was hotplugged.
    Hotplugged(PciDeviceInfo),
    /// The VM is created but not booted: the device was added to its configuration and appears
    /// when it boots.
    AddedToConfig,
}

/// The parts of `vm.info` (`VmInfo`) this crate reads; everything else is ignored.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct VmInfo {
    /// `Created`, `Running`, `Shutdown`, `Paused` or `BreakPoint`.
    pub state: String,
    /// The VM's configuration.
    pub config: VmConfigInfo,
}

/// The parts of `VmConfig` this crate reads.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct VmConfigInfo {
    /// `--memory`.
    pub memory: MemoryInfo,
}

/// The parts of `MemoryConfig` this crate reads.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct MemoryInfo {
    /// Boot RAM in bytes; 0 when all RAM is in zones.
    pub size: u64,
    /// `shared=on`.
    #[serde(default)]
    pub shared: bool,
    /// `hugepages=on` (hugetlbfs mappings are shared too).
    #[serde(default)]
    pub hugepages: bool,
    /// `--memory-zone` entries.
    #[serde(default)]
    pub zones: Option<Vec<MemoryZoneInfo>>,
}

/// The parts of `MemoryZoneConfig` this crate reads.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct MemoryZoneInfo {
    /// `shared=on`.
    #[serde(default)]
    pub shared: bool,
    /// `hugepages=on`.
    #[serde(default)]
    pub hugepages: bool,
}

impl MemoryInfo {
    /// Whether a vhost-user backend can map all guest RAM: the rule cloud-hypervisor itself
    /// applies before it accepts a vhost-user device (`VmConfig::backed_by_shared_memory`).
    pub fn is_shared(&self) -> bool {
        if self.shared || self.hugepages {
            return true;
        }
        match &self.zones {
            Some(zones) if self.size == 0 => zones.iter().all(|z| z.shared || z.hugepages),
            _ => false,
        }
    }
}

/// A client for one cloud-hypervisor API socket.
#[derive(Debug, Clone)]
pub struct ApiClient {
    http: UnixHttpClient,
}

impl ApiClient {
    /// A client for the API socket `socket` (cloud-hypervisor's `--api-socket path=..`).
    pub fn new(socket: impl Into<PathBuf>) -> ApiClient {
        ApiClient {
            http: UnixHttpClient::new(socket),
        }
    }

    /// The same client with another per-read and per-write timeout.
    pub fn with_timeout(self, timeout: Duration) -> ApiClient {
        ApiClient {
            http: self.http.with_timeout(timeout),
        }
    }

    /// The API socket.
    pub fn socket(&self) -> &Path {
        self.http.socket()
    }

    /// `GET vm.info`.
    pub fn vm_info(&self) -> Result<VmInfo, ApiError> {
        let endpoint = "vm.info";
        let response = self.call("GET", endpoint, None)?;
        parse_json(endpoint, &response)
    }

    /// Fails with [`ApiError::MemoryNotShared`] unless the VM's RAM is shared.
    pub fn ensure_shared_memory(&self) -> Result<(), ApiError> {
        if self.vm_info()?.config.memory.is_shared() {
            Ok(())
        } else {
            Err(ApiError::MemoryNotShared)
        }
    }

    /// `PUT vm.add-generic-vhost-user` with `config`, as is (no memory check).
    pub fn add_generic_vhost_user(
        &self,
        config: &GenericVhostUserConfig,
    ) -> Result<AddOutcome, ApiError> {
        let endpoint = "vm.add-generic-vhost-user";
        if config.socket.to_str().is_none() {
            return Err(ApiError::NotUtf8(config.socket.clone()));
        }
        let body = serde_json::to_vec(config).map_err(|source| ApiError::BadJson {
            endpoint: endpoint.to_owned(),
            body: String::new(),
            source,
        })?;
        let response = self.call("PUT", endpoint, Some(&body))?;
        match response.status {
            204 => Ok(AddOutcome::AddedToConfig),
            200 => parse_json(endpoint, &response).map(AddOutcome::Hotplugged),
            status => Err(ApiError::UnexpectedStatus {
                endpoint: endpoint.to_owned(),
                status,
            }),
        }
    }

    /// Checks that the VM's memory is shared, then hotplugs our device behind `backend_socket`.
    pub fn hotplug_vgpu(
        &self,
        backend_socket: &Path,
        id: Option<&str>,
    ) -> Result<AddOutcome, ApiError> {
        if backend_socket.to_str().is_none() {
            return Err(ApiError::NotUtf8(backend_socket.to_path_buf()));
        }
        self.ensure_shared_memory()?;
        let config = GenericVhostUserConfig::vgpu(backend_socket, id.map(str::to_owned));
        self.add_generic_vhost_user(&config)
    }

    /// `PUT vm.remove-device` for `id`.
    pub fn remove_device(&self, id: &str) -> Result<(), ApiError> {
        let endpoint = "vm.remove-device";
        let body = serde_json::json!({ "id": id }).to_string();
        self.call("PUT", endpoint, Some(body.as_bytes())).map(drop)
    }

    /// Sends one request; any non-2xx answer becomes [`ApiError::Status`].
    fn call(
        &self,
        method: &str,
        endpoint: &str,
        body: Option<&[u8]>,
    ) -> Result<Response, ApiError> {
        let target = format!("{API_PREFIX}/{endpoint}");
        tracing::debug!(socket = %self.socket().display(), %method, %target, "cloud-hypervisor API call");
        let response = self.http.request(method, &target, body)?;
        if !response.is_success() {
            return Err(ApiError::Status {
                endpoint: endpoint.to_owned(),
                status: response.status,
                body: response.body_text(),
            });
        }
        Ok(response)
    }
}

fn parse_json<T: serde::de::DeserializeOwned>(
    endpoint: &str,
    response: &Response,
) -> Result<T, ApiError> {
    serde_json::from_slice(&response.body).map_err(|source| ApiError::BadJson {
        endpoint: endpoint.to_owned(),
        body: response.body_text(),
        source,
    })
}

#[cfg(test)]
#[path = "api_tests.rs"]
mod tests;
