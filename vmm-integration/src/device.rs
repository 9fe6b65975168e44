//! What both VMMs are told about the device: its virtio type, queues and config space size.
//!
//! Every value here comes from `vgpu-spec` (the contract); the compile-time checks below fail the
//! build if the contract changes in a way a VMM would reject.

use vgpu_spec::{CONFIG_SPACE_SIZE, EVENT_QUEUE, MAX_QUEUE_SIZE, NUM_QUEUES, VIRTIO_ID_VGPU};

/// The virtio device type (`vgpu_spec::VIRTIO_ID_VGPU`). 64 or more, so Linux `virtio_pci` (which
/// binds PCI device ids 0x1000 to 0x107f) leaves the function to `vgpu-guestd`.
pub const DEVICE_TYPE: u32 = VIRTIO_ID_VGPU;

/// The size of each queue, in queue order: control, submission, event. The event queue carries
/// nothing in v1 (SPEC.md section 15), so it stays small.
pub const QUEUE_SIZES: [u16; NUM_QUEUES] = queue_sizes();

/// The event queue's size.
pub const EVENT_QUEUE_SIZE: u16 = 64;

/// The config space size the VMM exposes (`vgpu_spec::CONFIG_SPACE_SIZE`).
pub const CONFIG_SIZE: usize = CONFIG_SPACE_SIZE;

/// QEMU's vhost-user frontend asserts when a device's config space is larger than this
/// (`assert(config_len <= VHOST_USER_MAX_CONFIG_SIZE)` in `vhost_user_get_config()`,
/// `hw/virtio/vhost-user.c`).
pub const QEMU_MAX_CONFIG_SIZE: usize = 256;

const fn queue_sizes() -> [u16; NUM_QUEUES] {
    let mut sizes = [MAX_QUEUE_SIZE; NUM_QUEUES];
    sizes[EVENT_QUEUE as usize] = EVENT_QUEUE_SIZE;
    sizes
}

const _: () = {
    assert!(DEVICE_TYPE >= 64, "Linux virtio_pci would claim the device");
    assert!(CONFIG_SIZE <= QEMU_MAX_CONFIG_SIZE, "QEMU asserts on more");
    assert!(
        CONFIG_SIZE > 0,
        "the driver reads capabilities from config space"
    );
    assert!(NUM_QUEUES == 3);
    // cloud-hypervisor refuses queue sizes that are not powers of two; virtio caps them at 32768.
    let mut i = 0;
    while i < NUM_QUEUES {
        assert!(QUEUE_SIZES[i].is_power_of_two());
        assert!(QUEUE_SIZES[i] <= MAX_QUEUE_SIZE);
        i += 1;
    }
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_matches_the_spec_contract() {
        assert_eq!(DEVICE_TYPE, 64);
        assert_eq!(QUEUE_SIZES, [1024, 1024, 64]);
        assert_eq!(CONFIG_SIZE, vgpu_spec::CONFIG_SPACE_SIZE);
        assert_eq!(CONFIG_SIZE, 256);
    }
}
