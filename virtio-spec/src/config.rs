//! The device config space: identity and capabilities of the slice.
//!
//! cloud-hypervisor's generic vhost-user device passes no device feature bits
//! to the guest, so everything the driver must know before it speaks on the
//! queues lives here. The layout is fixed at 256 bytes.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout};

use crate::CONFIG_SPACE_SIZE;

/// `"VGPU"` read as a little-endian u32.
pub const CONFIG_MAGIC: u32 = u32::from_le_bytes(*b"VGPU");

/// Capability bit: the device executes kernels on a real GPU. Absent on the
/// emulated device, whose launches are validated but not executed.
pub const CAP_EXECUTES_KERNELS: u64 = 1 << 0;
/// Capability bit: guest memory is registered with the GPU, so copies from
/// and to guest memory are DMA without a host bounce.
pub const CAP_ZERO_COPY: u64 = 1 << 1;
/// Capability bit: the device accepts `VHOST_USER_ADD_MEM_REG`, so the guest
/// may add pinned host memory regions after start.
pub const CAP_ADD_MEM_REGION: u64 = 1 << 2;

/// The config space of a vGPU device (256 bytes, little-endian).
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct VgpuConfig {
    /// [`CONFIG_MAGIC`].
    pub magic: U32,
    /// [`crate::PROTOCOL_VERSION`].
    pub version: U32,
    /// `CAP_*` bits.
    pub capabilities: U64,
    /// The slice's memory limit in bytes; what the guest sees as total memory.
    pub memory_limit: U64,
    /// Streaming multiprocessors visible to the slice.
    pub sm_count: U32,
    /// Compute capability, major.
    pub cc_major: U16,
    /// Compute capability, minor.
    pub cc_minor: U16,
    /// Number of virtqueues ([`crate::NUM_QUEUES`]).
    pub num_queues: U16,
    /// Largest queue size the device accepts.
    pub max_queue_size: U16,
    /// Most concurrent sessions the device accepts per frontend.
    pub max_sessions: U32,
    /// PCI domain of the physical GPU (0 on the emulated device).
    pub pci_domain: U32,
    /// PCI bus of the physical GPU.
    pub pci_bus: u8,
    /// PCI device of the physical GPU.
    pub pci_device: u8,
    /// PCI function of the physical GPU.
    pub pci_function: u8,
    /// Reserved, zero.
    pub _pad0: u8,
    /// UUID of the slice (not of the physical GPU), as `cuDeviceGetUuid` returns.
    pub uuid: [u8; 16],
    /// Slice name, NUL-padded UTF-8.
    pub slice_name: [u8; 48],
    /// Device name, NUL-padded UTF-8, as `cuDeviceGetName` returns.
    pub device_name: [u8; 64],
    /// Reserved, zero.
    pub _reserved: [u8; 80],
}

const _: () = assert!(std::mem::size_of::<VgpuConfig>() == CONFIG_SPACE_SIZE);

impl VgpuConfig {
    /// An all-zero config with the magic, version and queue fields filled in.
    pub fn new() -> Self {
        let mut config = VgpuConfig::new_zeroed();
        config.magic = CONFIG_MAGIC.into();
        config.version = crate::PROTOCOL_VERSION.into();
        config.num_queues = (crate::NUM_QUEUES as u16).into();
        config.max_queue_size = crate::MAX_QUEUE_SIZE.into();
        config
    }

    /// Stores `name` NUL-padded, truncated at a character boundary to fit.
    pub fn set_slice_name(&mut self, name: &str) {
        copy_padded(&mut self.slice_name, name);
    }

    /// Stores `name` NUL-padded, truncated at a character boundary to fit.
    pub fn set_device_name(&mut self, name: &str) {
        copy_padded(&mut self.device_name, name);
    }

    /// The slice name, up to the first NUL.
    pub fn slice_name(&self) -> String {
        padded_str(&self.slice_name)
    }

    /// The device name, up to the first NUL.
    pub fn device_name(&self) -> String {
        padded_str(&self.device_name)
    }

    /// True if the magic and version are ours.
    pub fn is_valid(&self) -> bool {
        self.magic.get() == CONFIG_MAGIC && self.version.get() == crate::PROTOCOL_VERSION
    }

    /// The PCI bus id string `cuDeviceGetPCIBusId` returns (`0000:01:00.0`).
    pub fn pci_bus_id(&self) -> String {
        format!(
            "{:08x}:{:02x}:{:02x}.{:x}",
            self.pci_domain.get(),
            self.pci_bus,
            self.pci_device,
            self.pci_function
        )
    }

    /// Answers a config-space read the way cloud-hypervisor requires: exactly
    /// `size` bytes, the config where it overlaps, zeros elsewhere. Offsets at
    /// or above [`crate::CONFIG_WINDOW`] read as zeros too.
    pub fn read_window(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut out = vec![0u8; size as usize];
        let bytes = self.as_bytes();
        let start = offset as usize;
        if start < bytes.len() {
            let n = (bytes.len() - start).min(out.len());
            out[..n].copy_from_slice(&bytes[start..start + n]);
        }
        out
    }
}

impl Default for VgpuConfig {
    fn default() -> Self {
        Self::new()
    }
}

fn copy_padded(dst: &mut [u8], src: &str) {
    dst.fill(0);
    let mut end = src.len().min(dst.len() - 1);
    while !src.is_char_boundary(end) {
        end -= 1;
    }
    dst[..end].copy_from_slice(&src.as_bytes()[..end]);
}

fn padded_str(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_256_bytes_and_round_trips() {
        let mut c = VgpuConfig::new();
        c.memory_limit = (8u64 << 30).into();
        c.set_slice_name("tenant-a/slice0");
        c.set_device_name("NVIDIA H100 80GB HBM3");
        let bytes = c.as_bytes().to_vec();
        assert_eq!(bytes.len(), 256);
        let back = VgpuConfig::read_from_bytes(&bytes).unwrap();
        assert!(back.is_valid());
        assert_eq!(back.memory_limit.get(), 8 << 30);
        assert_eq!(back.slice_name(), "tenant-a/slice0");
        assert_eq!(back.device_name(), "NVIDIA H100 80GB HBM3");
        assert_eq!(&bytes[0..4], b"VGPU");
    }

    #[test]
    fn read_window_returns_exact_size_zero_padded() {
        let c = VgpuConfig::new();
        let full = c.as_bytes();
        let w = c.read_window(250, 20);
        assert_eq!(w.len(), 20);
        assert_eq!(&w[..6], &full[250..256]);
        assert!(w[6..].iter().all(|b| *b == 0));
        let far = c.read_window(4000, 96);
        assert_eq!(far.len(), 96);
        assert!(far.iter().all(|b| *b == 0));
        let odd = c.read_window(3, 5);
        assert_eq!(odd, full[3..8].to_vec());
    }

    #[test]
    fn long_names_are_truncated_on_char_boundary() {
        let mut c = VgpuConfig::new();
        let long = "é".repeat(40);
        c.set_slice_name(&long);
        let name = c.slice_name();
        assert!(name.len() <= 47);
        assert!(name.chars().all(|ch| ch == 'é'));
    }

    #[test]
    fn pci_bus_id_formats_like_cuda() {
        let mut c = VgpuConfig::new();
        c.pci_bus = 0x1b;
        assert_eq!(c.pci_bus_id(), "00000000:1b:00.0");
    }
}
