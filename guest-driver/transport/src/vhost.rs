//! The vhost-user control channel: connect, handshake, memory regions.
//!
//! Every message is sent with `NEED_REPLY` once `REPLY_ACK` is negotiated (the
//! vhost library always offers it), so when a call returns the backend has
//! applied it; in particular a region added with `ADD_MEM_REG` is mapped
//! before any request can name it.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use vgpu_spec::{VgpuConfig, CONFIG_SPACE_SIZE, NUM_QUEUES};
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag};
use vhost::vhost_user::VhostUserVirtioFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;
use zerocopy::FromBytes;

use crate::mem::SharedMem;
use crate::ring::SplitRing;
use crate::TransportError;

/// `VIRTIO_F_VERSION_1`.
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

/// Protocol features the transport cannot work without.
pub fn required_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
}

/// What the handshake learned about the device.
#[derive(Debug, Clone, Copy)]
pub struct DeviceFacts {
    /// The device config space.
    pub config: VgpuConfig,
    /// Memory slots the backend supports (guest memory uses one).
    pub max_mem_slots: u64,
}

/// The frontend end of the vhost-user socket.
pub struct Control {
    frontend: Frontend,
    fd: RawFd,
}

/// Connects to the backend socket, retrying briefly while the listener is
/// not accepting yet (`ECONNREFUSED`); a missing socket fails at once.
fn connect_socket(path: &Path) -> Result<UnixStream, TransportError> {
    let mut tries = 5;
    loop {
        match UnixStream::connect(path) {
            Ok(sock) => return Ok(sock),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused && tries > 0 => {
                tries -= 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(source) => {
                return Err(TransportError::Connect {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
    }
}

fn vhost<T>(step: &str, r: vhost::Result<T>) -> Result<T, TransportError> {
    r.map_err(|e| TransportError::from_vhost(step, e))
}

fn region(mem: &SharedMem, gpa: u64) -> VhostUserMemoryRegionInfo {
    VhostUserMemoryRegionInfo {
        guest_phys_addr: gpa,
        memory_size: mem.len() as u64,
        userspace_addr: mem.ptr() as u64,
        mmap_offset: 0,
        mmap_handle: mem.fd(),
    }
}

impl Control {
    /// Connects to the backend at `path`.
    pub fn connect(path: &Path) -> Result<Control, TransportError> {
        let sock = connect_socket(path)?;
        let fd = sock.as_raw_fd();
        Ok(Control {
            frontend: Frontend::from_stream(sock, NUM_QUEUES as u64),
            fd,
        })
    }

    /// The socket fd, to watch for hang-up. Valid while `self` lives.
    pub fn raw_fd(&self) -> RawFd {
        self.fd
    }

    /// SET_OWNER, feature and protocol-feature negotiation, queue count and
    /// config space.
    pub fn negotiate(&mut self) -> Result<DeviceFacts, TransportError> {
        let f = &mut self.frontend;
        vhost("SET_OWNER", f.set_owner())?;
        let features = vhost("GET_FEATURES", f.get_features())?;
        let protocol = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let required = VIRTIO_F_VERSION_1 | protocol;
        if features & required != required {
            return Err(TransportError::Protocol(format!(
                "Backend features {features:#x} lack VIRTIO_F_VERSION_1 or \
                 VHOST_USER_F_PROTOCOL_FEATURES"
            )));
        }
        vhost("SET_FEATURES", f.set_features(required))?;
        let offered = vhost("GET_PROTOCOL_FEATURES", f.get_protocol_features())?;
        if !offered.contains(required_protocol_features()) {
            return Err(TransportError::Protocol(format!(
                "Backend protocol features {:#x} lack CONFIG, MQ or CONFIGURE_MEM_SLOTS",
                offered.bits()
            )));
        }
        let wanted =
            required_protocol_features() | (offered & VhostUserProtocolFeatures::REPLY_ACK);
        vhost("SET_PROTOCOL_FEATURES", f.set_protocol_features(wanted))?;
        if wanted.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            f.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let queues = vhost("GET_QUEUE_NUM", f.get_queue_num())?;
        if queues < NUM_QUEUES as u64 {
            return Err(TransportError::Protocol(format!(
                "Backend has {queues} queues, the vGPU device needs {NUM_QUEUES}"
            )));
        }
        let max_mem_slots = vhost("GET_MAX_MEM_SLOTS", f.get_max_mem_slots())?;
        let buf = [0u8; CONFIG_SPACE_SIZE];
        let (_, bytes) = vhost(
            "GET_CONFIG",
            f.get_config(
                0,
                CONFIG_SPACE_SIZE as u32,
                VhostUserConfigFlags::empty(),
                &buf,
            ),
        )?;
        let config = VgpuConfig::read_from_bytes(&bytes).map_err(|_| {
            TransportError::Protocol(format!("Config space is {} bytes", bytes.len()))
        })?;
        if !config.is_valid() {
            return Err(TransportError::Protocol(format!(
                "Config space has magic {:#x} version {}; expected a vGPU device of protocol {}",
                config.magic.get(),
                config.version.get(),
                vgpu_spec::PROTOCOL_VERSION
            )));
        }
        Ok(DeviceFacts {
            config,
            max_mem_slots,
        })
    }

    /// SET_MEM_TABLE with guest memory as the only region.
    pub fn set_mem_table(&mut self, mem: &SharedMem, gpa: u64) -> Result<(), TransportError> {
        vhost(
            "SET_MEM_TABLE",
            self.frontend.set_mem_table(&[region(mem, gpa)]),
        )
        .map(|_| ())
    }

    /// SET_VRING_NUM/ADDR/BASE/CALL/KICK and SET_VRING_ENABLE(1) for one queue.
    pub fn setup_queue(
        &mut self,
        index: usize,
        ring: &SplitRing,
        call: &EventFd,
        kick: &EventFd,
    ) -> Result<(), TransportError> {
        let f = &mut self.frontend;
        vhost("SET_VRING_NUM", f.set_vring_num(index, ring.size()))?;
        let addrs = VringConfigData {
            queue_max_size: ring.size(),
            queue_size: ring.size(),
            flags: 0,
            desc_table_addr: ring.desc_host(),
            used_ring_addr: ring.used_host(),
            avail_ring_addr: ring.avail_host(),
            log_addr: None,
        };
        vhost("SET_VRING_ADDR", f.set_vring_addr(index, &addrs))?;
        vhost("SET_VRING_BASE", f.set_vring_base(index, 0))?;
        vhost("SET_VRING_CALL", f.set_vring_call(index, call))?;
        vhost("SET_VRING_KICK", f.set_vring_kick(index, kick))?;
        vhost("SET_VRING_ENABLE", f.set_vring_enable(index, true))
    }

    /// ADD_MEM_REG: makes `mem` visible to the device at `gpa`.
    pub fn add_region(&mut self, mem: &SharedMem, gpa: u64) -> Result<(), TransportError> {
        vhost(
            "ADD_MEM_REG",
            self.frontend.add_mem_region(&region(mem, gpa)),
        )
        .map(|_| ())
    }

    /// REM_MEM_REG: withdraws a region added with [`add_region`](Self::add_region).
    pub fn remove_region(&mut self, mem: &SharedMem, gpa: u64) -> Result<(), TransportError> {
        vhost(
            "REM_MEM_REG",
            self.frontend.remove_mem_region(&region(mem, gpa)),
        )
    }
}
