//! The virtio-vgpu device: the contract between the guest driver and the backend.
//!
//! Everything here is plain data: the device id, the config space, the queue
//! numbering, every request and response layout, and the error codes. There is
//! no I/O. `SPEC.md` next to this crate is the normative text; the types here
//! follow it field by field.
//!
//! All multi-byte fields are little-endian on the wire (zerocopy's
//! `little_endian` types, alignment 1), so every struct can be read from or
//! written to an arbitrary byte offset of guest memory.

pub mod config;
pub mod fatbin;
pub mod link;
pub mod request;
pub mod response;
pub mod status;
pub mod wire;

pub use config::VgpuConfig;
pub use request::{DecodeError, Request};
pub use response::Response;
pub use status::Status;

/// The virtio device type of a vGPU. Types of 64 and above map to PCI device
/// ids above 0x107f, which Linux `virtio_pci` refuses to bind, so the in-guest
/// userspace driver can claim the function.
pub const VIRTIO_ID_VGPU: u32 = 64;

/// Protocol version carried in config space and checked at session open.
pub const PROTOCOL_VERSION: u32 = 1;

/// Index of the control queue: device queries, session open and close.
pub const CONTROL_QUEUE: u16 = 0;
/// Index of the submission queue: all per-session work.
pub const SUBMISSION_QUEUE: u16 = 1;
/// Index of the event queue: device-to-driver notifications (none in v1).
pub const EVENT_QUEUE: u16 = 2;
/// Number of queues the device exposes.
pub const NUM_QUEUES: usize = 3;
/// Largest queue size the device accepts.
pub const MAX_QUEUE_SIZE: u16 = 1024;

/// The virtio feature bits the device offers over vhost-user:
/// `VIRTIO_F_VERSION_1` (bit 32) and `VHOST_USER_F_PROTOCOL_FEATURES` (bit 30,
/// vhost-user only, never shown to a guest). Nothing device-specific: the
/// capabilities are in config space.
pub const VHOST_USER_FEATURES: u64 = (1 << 32) | (1 << 30);
/// The vhost-user protocol features the device offers: `MQ` (bit 0),
/// `REPLY_ACK` (bit 3), `CONFIG` (bit 9) and `CONFIGURE_MEM_SLOTS` (bit 15);
/// not `INFLIGHT_SHMFD`. Every implementation of the device (the backend,
/// and `vgpu-guestd`'s relay in a VM) offers exactly these.
pub const VHOST_USER_PROTOCOL_FEATURES: u64 = (1 << 0) | (1 << 3) | (1 << 9) | (1 << 15);

/// Size of the device config space in bytes. QEMU's generic vhost-user
/// device asserts on more than 256.
pub const CONFIG_SPACE_SIZE: usize = 256;
/// `get_config` answers any offset below this, zero-padding past the config.
pub const CONFIG_WINDOW: u32 = 4096;

/// The largest module image a request may carry.
pub const MAX_MODULE_IMAGE: u64 = 256 << 20;
/// The largest packed kernel parameter block (CUDA's own limit is 32764).
pub const MAX_PARAM_BYTES: u32 = 32 * 1024;
/// The most scatter-gather entries one copy may carry.
pub const MAX_SG_ENTRIES: u32 = 1 << 16;
/// The longest symbol name a request may carry.
pub const MAX_SYMBOL_NAME: u32 = 4096;
/// The most kernel parameters a function may have.
pub const MAX_PARAMS: u32 = 4096;
/// The number of device attribute slots returned by `GET_DEVICE_INFO`.
pub const DEVICE_ATTRIBUTE_SLOTS: u32 = 160;
/// The most inputs one `MODULE_LINK` request may carry.
pub const MAX_LINK_INPUTS: u32 = 256;
/// The most JIT options one `MODULE_LINK` request may carry.
pub const MAX_JIT_OPTIONS: u32 = 64;
/// The largest log area of a `MODULE_LINK` request.
pub const MAX_LINK_LOG: u32 = 1 << 20;
/// The largest request chain (readable part) the device accepts.
pub const MAX_REQUEST_BYTES: u64 = MAX_MODULE_IMAGE + 4096;
