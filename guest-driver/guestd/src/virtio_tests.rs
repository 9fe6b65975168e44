use std::sync::{Arc, Mutex};

use super::*;
use zerocopy::IntoBytes;

#[derive(Default)]
struct State {
    device_features: u64,
    device_select: u32,
    driver_features: u64,
    driver_select: u32,
    status: u8,
    generation: u8,
    /// Bump the generation on the next config read (once).
    change_config_once: bool,
    queue_select: u16,
    queue_max: Vec<u16>,
    queue_size: Vec<u16>,
    queue_enable: Vec<u16>,
    queue_addrs: Vec<[u64; 3]>,
    config: Vec<u8>,
    notified: Vec<(usize, u16)>,
    isr: u8,
    /// Never accept FEATURES_OK.
    refuse_features: bool,
}

#[derive(Clone, Copy)]
enum Block {
    Common,
    Notify,
    Isr,
    Device,
}

#[derive(Clone)]
struct View(Arc<Mutex<State>>, Block, usize);

impl View {
    fn read(&self, at: usize, size: usize) -> u64 {
        let mut s = self.0.lock().unwrap();
        let q = usize::from(s.queue_select);
        match self.1 {
            Block::Common => match at {
                common::DEVICE_FEATURE => {
                    (s.device_features >> (32 * s.device_select)) & 0xffff_ffff
                }
                common::NUM_QUEUES => s.queue_max.len() as u64,
                common::DEVICE_STATUS => s.status.into(),
                common::CONFIG_GENERATION => s.generation.into(),
                common::QUEUE_SIZE => s.queue_size.get(q).copied().unwrap_or(0).into(),
                common::QUEUE_NOTIFY_OFF => q as u64,
                _ => 0,
            },
            Block::Device => {
                if s.change_config_once {
                    s.change_config_once = false;
                    s.generation += 1;
                }
                let mut v = 0u64;
                for i in 0..size {
                    v |= u64::from(s.config.get(at + i).copied().unwrap_or(0)) << (8 * i);
                }
                v
            }
            Block::Isr => std::mem::take(&mut s.isr).into(),
            Block::Notify => 0,
        }
    }

    fn write(&self, at: usize, value: u64) {
        let mut s = self.0.lock().unwrap();
        let q = usize::from(s.queue_select);
        match self.1 {
            Block::Common => match at {
                common::DEVICE_FEATURE_SELECT => s.device_select = value as u32,
                common::DRIVER_FEATURE_SELECT => s.driver_select = value as u32,
                common::DRIVER_FEATURE => {
                    let shift = 32 * s.driver_select;
                    s.driver_features &= !(0xffff_ffffu64 << shift);
                    s.driver_features |= value << shift;
                }
                common::DEVICE_STATUS => {
                    let mut v = value as u8;
                    if v == 0 {
                        s.driver_features = 0;
                        s.queue_size = s.queue_max.clone();
                        s.queue_enable.iter_mut().for_each(|e| *e = 0);
                    }
                    let unknown = s.driver_features & !s.device_features != 0;
                    if v & status::FEATURES_OK != 0 && (unknown || s.refuse_features) {
                        v &= !status::FEATURES_OK;
                    }
                    s.status = v;
                }
                common::QUEUE_SELECT => s.queue_select = value as u16,
                common::QUEUE_SIZE => s.queue_size[q] = value as u16,
                common::QUEUE_ENABLE => s.queue_enable[q] = value as u16,
                a if (common::QUEUE_DESC..common::LEN).contains(&a) => {
                    let field = (a - common::QUEUE_DESC) / 8;
                    let shift = if (a - common::QUEUE_DESC) % 8 == 4 {
                        32
                    } else {
                        0
                    };
                    let slot = &mut s.queue_addrs[q][field];
                    *slot &= !(0xffff_ffffu64 << shift);
                    *slot |= value << shift;
                }
                _ => {}
            },
            Block::Notify => s.notified.push((at, value as u16)),
            _ => {}
        }
    }
}

impl Regs for View {
    fn block_len(&self) -> usize {
        self.2
    }
    fn read8(&self, at: usize) -> u8 {
        self.read(at, 1) as u8
    }
    fn read16(&self, at: usize) -> u16 {
        self.read(at, 2) as u16
    }
    fn read32(&self, at: usize) -> u32 {
        self.read(at, 4) as u32
    }
    fn write8(&self, at: usize, value: u8) {
        self.write(at, value.into())
    }
    fn write16(&self, at: usize, value: u16) {
        self.write(at, value.into())
    }
    fn write32(&self, at: usize, value: u32) {
        self.write(at, value.into())
    }
}

fn vgpu_config() -> Vec<u8> {
    let mut c = VgpuConfig::new();
    c.set_slice_name("slice-a");
    c.as_bytes().to_vec()
}

fn fake(features: u64) -> (Arc<Mutex<State>>, VirtioPci<View>) {
    let state = Arc::new(Mutex::new(State {
        device_features: features,
        queue_max: vec![256, 256, 64],
        queue_size: vec![256, 256, 64],
        queue_enable: vec![0; 3],
        queue_addrs: vec![[0; 3]; 3],
        config: vgpu_config(),
        status: 0x0f,
        ..State::default()
    }));
    let v = |b, len| View(state.clone(), b, len);
    let pci = VirtioPci::new(
        v(Block::Common, 0x38),
        v(Block::Notify, 0x1000),
        4,
        v(Block::Isr, 4),
        v(Block::Device, 0x100),
    )
    .unwrap();
    (state, pci)
}

#[test]
fn init_sequence_accepts_only_version_1_and_reads_the_config() {
    let (state, pci) = fake(VIRTIO_F_VERSION_1 | (1 << 28) | 1);
    pci.reset().unwrap();
    assert_eq!(pci.status(), 0);
    let offered = pci.negotiate().unwrap();
    assert_eq!(offered & VIRTIO_F_VERSION_1, VIRTIO_F_VERSION_1);
    {
        let s = state.lock().unwrap();
        assert_eq!(s.driver_features, VIRTIO_F_VERSION_1);
        assert_eq!(
            s.status,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK
        );
    }
    let config = pci.read_config().unwrap();
    assert_eq!(config.slice_name(), "slice-a");
    assert_eq!(pci.num_queues(), 3);
    pci.driver_ok();
    assert_ne!(pci.status() & status::DRIVER_OK, 0);
    pci.check_health().unwrap();
}

#[test]
fn device_without_version_1_is_refused() {
    let (_, pci) = fake(1);
    assert!(matches!(pci.negotiate(), Err(VirtioError::NoVersion1(1))));
}

#[test]
fn features_ok_that_does_not_stick_is_an_error() {
    let (state, pci) = fake(VIRTIO_F_VERSION_1);
    state.lock().unwrap().refuse_features = true;
    assert!(matches!(
        pci.negotiate(),
        Err(VirtioError::FeaturesRefused(VIRTIO_F_VERSION_1))
    ));
}

#[test]
fn config_read_retries_when_the_generation_changes() {
    let (state, pci) = fake(VIRTIO_F_VERSION_1);
    state.lock().unwrap().change_config_once = true;
    let config = pci.read_config().unwrap();
    assert!(config.is_valid());
    assert_eq!(state.lock().unwrap().generation, 1);
}

#[test]
fn wrong_config_magic_is_refused() {
    let (state, pci) = fake(VIRTIO_F_VERSION_1);
    state.lock().unwrap().config[0] ^= 0xff;
    assert!(matches!(
        pci.read_config(),
        Err(VirtioError::BadConfig { .. })
    ));
}

#[test]
fn queue_setup_programs_size_and_64_bit_addresses_and_enables() {
    let (state, pci) = fake(VIRTIO_F_VERSION_1);
    assert_eq!(pci.queue_max_size(2), 64);
    let addrs = RingAddrs {
        desc: 0x1_2345_6000,
        driver: 0x1_2345_7000,
        device: 0x1_2345_8000,
    };
    let info = pci.enable_queue(1, 128, addrs).unwrap();
    assert_eq!(info.notify_offset, 4);
    let s = state.lock().unwrap();
    assert_eq!(s.queue_size[1], 128);
    assert_eq!(s.queue_enable[1], 1);
    assert_eq!(s.queue_addrs[1], [addrs.desc, addrs.driver, addrs.device]);
    drop(s);
    pci.notify(&info, 1);
    assert_eq!(state.lock().unwrap().notified, [(4, 1)]);
}

#[test]
fn missing_queue_is_reported() {
    let (state, pci) = fake(VIRTIO_F_VERSION_1);
    state.lock().unwrap().queue_size[0] = 0;
    let addrs = RingAddrs {
        desc: 0,
        driver: 0,
        device: 0,
    };
    assert!(matches!(
        pci.enable_queue(0, 64, addrs),
        Err(VirtioError::NoQueue(0))
    ));
}

#[test]
fn queue_size_is_the_largest_power_of_two_within_both_limits() {
    assert_eq!(pick_size(256, 1024), Some(256));
    assert_eq!(pick_size(1024, 300), Some(256));
    assert_eq!(pick_size(100, 1024), Some(64));
    assert_eq!(pick_size(0, 1024), None);
    assert_eq!(pick_size(1, 1), Some(1));
}

#[test]
fn needs_reset_status_is_an_error_and_isr_read_clears() {
    let (state, pci) = fake(VIRTIO_F_VERSION_1);
    state.lock().unwrap().status = status::DRIVER_OK | status::DEVICE_NEEDS_RESET;
    assert!(matches!(
        pci.check_health(),
        Err(VirtioError::NeedsReset(_))
    ));
    state.lock().unwrap().isr = 1;
    assert_eq!(pci.ack_interrupt(), 1);
    assert_eq!(pci.ack_interrupt(), 0);
}

#[test]
fn short_common_block_is_rejected() {
    let state = Arc::new(Mutex::new(State::default()));
    let v = |b, len| View(state.clone(), b, len);
    let r = VirtioPci::new(
        v(Block::Common, 0x20),
        v(Block::Notify, 4),
        0,
        v(Block::Isr, 1),
        v(Block::Device, 256),
    );
    assert!(matches!(
        r,
        Err(VirtioError::ShortBlock { what: "common", .. })
    ));
}
