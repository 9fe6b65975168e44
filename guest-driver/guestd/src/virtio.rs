//! The modern virtio-pci transport (virtio 1.x, section 4.1): device
//! status, feature negotiation, config space and queue setup, through the
//! common, notify, ISR and device-specific register blocks.

use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use thiserror::Error;
use vgpu_spec::{VgpuConfig, CONFIG_SPACE_SIZE};
use zerocopy::FromBytes;

use crate::pci::Regs;

/// Device status bits.
pub mod status {
    /// The driver has noticed the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// The driver knows how to drive it.
    pub const DRIVER: u8 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u8 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u8 = 8;
    /// The device hit an error it cannot recover from.
    pub const DEVICE_NEEDS_RESET: u8 = 64;
    /// The driver gave up on the device.
    pub const FAILED: u8 = 128;
}

/// `VIRTIO_F_VERSION_1`: the only feature this driver accepts.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// "No MSI-X vector".
const NO_VECTOR: u16 = 0xffff;

/// Offsets in `struct virtio_pci_common_cfg`.
mod common {
    pub const DEVICE_FEATURE_SELECT: usize = 0x00;
    pub const DEVICE_FEATURE: usize = 0x04;
    pub const DRIVER_FEATURE_SELECT: usize = 0x08;
    pub const DRIVER_FEATURE: usize = 0x0c;
    pub const MSIX_CONFIG: usize = 0x10;
    pub const NUM_QUEUES: usize = 0x12;
    pub const DEVICE_STATUS: usize = 0x14;
    pub const CONFIG_GENERATION: usize = 0x15;
    pub const QUEUE_SELECT: usize = 0x16;
    pub const QUEUE_SIZE: usize = 0x18;
    pub const QUEUE_MSIX_VECTOR: usize = 0x1a;
    pub const QUEUE_ENABLE: usize = 0x1c;
    pub const QUEUE_NOTIFY_OFF: usize = 0x1e;
    pub const QUEUE_DESC: usize = 0x20;
    pub const QUEUE_DRIVER: usize = 0x28;
    pub const QUEUE_DEVICE: usize = 0x30;
    /// Bytes of the structure this driver uses.
    pub const LEN: usize = 0x38;
}

/// virtio-pci failures.
#[derive(Debug, Error)]
pub enum VirtioError {
    /// The device did not finish a reset.
    #[error("Device did not reset within {0:?}")]
    ResetTimeout(Duration),
    /// The device lacks a feature the driver needs.
    #[error("Device features {0:#x} lack VIRTIO_F_VERSION_1")]
    NoVersion1(u64),
    /// The device refused the features.
    #[error("Device refused features {0:#x} (FEATURES_OK did not stick)")]
    FeaturesRefused(u64),
    /// Config space is not a vGPU's.
    #[error(
        "Device config space has magic {magic:#x} version {version}; expected a vGPU of \
         protocol {expected}"
    )]
    BadConfig {
        /// The magic read.
        magic: u32,
        /// The version read.
        version: u32,
        /// The version this driver speaks.
        expected: u32,
    },
    /// Config space kept changing while it was read.
    #[error("Device config space kept changing while being read")]
    ConfigUnstable,
    /// A register block is too small.
    #[error("The {what} register block is {len} bytes, at least {need} are needed")]
    ShortBlock {
        /// Which block.
        what: &'static str,
        /// Its length.
        len: usize,
        /// Bytes needed.
        need: usize,
    },
    /// The device has fewer queues than the protocol needs.
    #[error("Device has {have} queues, the vGPU needs {need}")]
    TooFewQueues {
        /// Queues the device has.
        have: u16,
        /// Queues needed.
        need: usize,
    },
    /// A queue is missing (size 0).
    #[error("Queue {0} is not available on the device")]
    NoQueue(u16),
    /// A queue's notify address lies outside the notify block.
    #[error("Queue {queue} notify offset {offset:#x} is outside the notify block")]
    NotifyOutOfRange {
        /// The queue.
        queue: u16,
        /// Its offset.
        offset: usize,
    },
    /// The device reported an unrecoverable error.
    #[error("Device needs a reset (status {0:#x}); the host backend may have gone away")]
    NeedsReset(u8),
}

/// The four register blocks of a modern virtio-pci device.
pub struct VirtioPci<R> {
    common: R,
    notify: R,
    notify_multiplier: u32,
    isr: R,
    device: R,
}

/// A queue as set up on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueInfo {
    /// The size chosen.
    pub size: u16,
    /// Offset of its notify register in the notify block.
    pub notify_offset: usize,
}

/// The ring addresses of one queue (guest-physical).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingAddrs {
    /// Descriptor table.
    pub desc: u64,
    /// Driver (avail) ring.
    pub driver: u64,
    /// Device (used) ring.
    pub device: u64,
}

/// The largest power of two not above `want` nor the device's size.
pub fn pick_size(device_max: u16, want: u16) -> Option<u16> {
    let limit = device_max.min(want);
    (limit > 0).then(|| 1 << (15 - limit.leading_zeros()))
}

impl<R: Regs> VirtioPci<R> {
    /// Wraps the register blocks (common, notify with its multiplier, ISR,
    /// device-specific), checking their sizes.
    pub fn new(
        common: R,
        notify: R,
        notify_multiplier: u32,
        isr: R,
        device: R,
    ) -> Result<Self, VirtioError> {
        for (what, len, need) in [
            ("common", common.block_len(), common::LEN),
            ("ISR", isr.block_len(), 1),
            ("notify", notify.block_len(), 2),
            ("device", device.block_len(), 16),
        ] {
            if len < need {
                return Err(VirtioError::ShortBlock { what, len, need });
            }
        }
        Ok(VirtioPci {
            common,
            notify,
            notify_multiplier,
            isr,
            device,
        })
    }

    /// The device status byte.
    pub fn status(&self) -> u8 {
        self.common.read8(common::DEVICE_STATUS)
    }

    fn set_status(&self, bits: u8) {
        let s = self.status();
        self.common.write8(common::DEVICE_STATUS, s | bits);
    }

    /// Fails if the device has flagged an unrecoverable error.
    pub fn check_health(&self) -> Result<(), VirtioError> {
        let s = self.status();
        if s & status::DEVICE_NEEDS_RESET != 0 {
            return Err(VirtioError::NeedsReset(s));
        }
        Ok(())
    }

    /// Resets the device and waits until it reports status 0.
    pub fn reset(&self) -> Result<(), VirtioError> {
        const LIMIT: Duration = Duration::from_secs(2);
        self.common.write8(common::DEVICE_STATUS, 0);
        let start = Instant::now();
        while self.status() != 0 {
            if start.elapsed() > LIMIT {
                return Err(VirtioError::ResetTimeout(LIMIT));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// Marks the device failed (best effort, on a setup error).
    pub fn fail(&self) {
        self.set_status(status::FAILED);
    }

    /// ACKNOWLEDGE, DRIVER, feature negotiation (VERSION_1 only) and
    /// FEATURES_OK. Returns the device's features.
    pub fn negotiate(&self) -> Result<u64, VirtioError> {
        self.set_status(status::ACKNOWLEDGE);
        self.set_status(status::DRIVER);
        let mut features = 0u64;
        for half in 0..2u32 {
            self.common.write32(common::DEVICE_FEATURE_SELECT, half);
            features |= u64::from(self.common.read32(common::DEVICE_FEATURE)) << (32 * half);
        }
        if features & VIRTIO_F_VERSION_1 == 0 {
            return Err(VirtioError::NoVersion1(features));
        }
        let accepted = VIRTIO_F_VERSION_1;
        for half in 0..2u32 {
            self.common.write32(common::DRIVER_FEATURE_SELECT, half);
            self.common
                .write32(common::DRIVER_FEATURE, (accepted >> (32 * half)) as u32);
        }
        self.set_status(status::FEATURES_OK);
        if self.status() & status::FEATURES_OK == 0 {
            return Err(VirtioError::FeaturesRefused(accepted));
        }
        self.common.write16(common::MSIX_CONFIG, NO_VECTOR);
        Ok(features)
    }

    /// Reads and checks the vGPU config space (consistent across a
    /// config-generation change).
    pub fn read_config(&self) -> Result<VgpuConfig, VirtioError> {
        let len = self.device.block_len().min(CONFIG_SPACE_SIZE);
        for _ in 0..10 {
            let before = self.common.read8(common::CONFIG_GENERATION);
            let mut bytes = [0u8; CONFIG_SPACE_SIZE];
            for at in (0..len).step_by(4) {
                if at + 4 <= len {
                    bytes[at..at + 4].copy_from_slice(&self.device.read32(at).to_le_bytes());
                } else {
                    for (i, b) in bytes[at..len].iter_mut().enumerate() {
                        *b = self.device.read8(at + i);
                    }
                }
            }
            if self.common.read8(common::CONFIG_GENERATION) != before {
                continue;
            }
            // The array is exactly the config's size, so this cannot fail.
            let config =
                VgpuConfig::read_from_bytes(&bytes).map_err(|_| VirtioError::ConfigUnstable)?;
            if !config.is_valid() {
                return Err(VirtioError::BadConfig {
                    magic: config.magic.get(),
                    version: config.version.get(),
                    expected: vgpu_spec::PROTOCOL_VERSION,
                });
            }
            return Ok(config);
        }
        Err(VirtioError::ConfigUnstable)
    }

    /// Number of queues the device has.
    pub fn num_queues(&self) -> u16 {
        self.common.read16(common::NUM_QUEUES)
    }

    /// The largest size queue `index` allows (0 if it does not exist).
    pub fn queue_max_size(&self, index: u16) -> u16 {
        self.common.write16(common::QUEUE_SELECT, index);
        self.common.read16(common::QUEUE_SIZE)
    }

    /// Programs queue `index` with `size` entries at `addrs` and enables it.
    pub fn enable_queue(
        &self,
        index: u16,
        size: u16,
        addrs: RingAddrs,
    ) -> Result<QueueInfo, VirtioError> {
        self.common.write16(common::QUEUE_SELECT, index);
        let max = self.common.read16(common::QUEUE_SIZE);
        if max == 0 {
            return Err(VirtioError::NoQueue(index));
        }
        let notify_offset = usize::from(self.common.read16(common::QUEUE_NOTIFY_OFF))
            * self.notify_multiplier as usize;
        if notify_offset + 2 > self.notify.block_len() {
            return Err(VirtioError::NotifyOutOfRange {
                queue: index,
                offset: notify_offset,
            });
        }
        self.common.write16(common::QUEUE_SIZE, size);
        self.common.write16(common::QUEUE_MSIX_VECTOR, NO_VECTOR);
        for (at, addr) in [
            (common::QUEUE_DESC, addrs.desc),
            (common::QUEUE_DRIVER, addrs.driver),
            (common::QUEUE_DEVICE, addrs.device),
        ] {
            self.common.write32(at, addr as u32);
            self.common.write32(at + 4, (addr >> 32) as u32);
        }
        self.common.write16(common::QUEUE_ENABLE, 1);
        Ok(QueueInfo {
            size,
            notify_offset,
        })
    }

    /// Tells the device the driver is ready.
    pub fn driver_ok(&self) {
        self.set_status(status::DRIVER_OK);
    }

    /// Notifies the device of new buffers in `queue`.
    pub fn notify(&self, info: &QueueInfo, queue: u16) {
        // Ring updates must be visible before the doorbell.
        fence(Ordering::SeqCst);
        self.notify.write16(info.notify_offset, queue);
    }

    /// Reads (and so clears) the ISR status, deasserting INTx.
    pub fn ack_interrupt(&self) -> u8 {
        self.isr.read8(0)
    }
}

#[cfg(test)]
#[path = "virtio_tests.rs"]
mod tests;
