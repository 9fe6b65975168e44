use super::*;

/// A 256-byte config space with the capability list bit set and the given
/// capabilities (offset, bytes) chained in order.
fn config_with(caps: &[(usize, Vec<u8>)]) -> Vec<u8> {
    let mut c = vec![0u8; 256];
    c[0..2].copy_from_slice(&VIRTIO_VENDOR.to_le_bytes());
    c[2..4].copy_from_slice(&0x1080u16.to_le_bytes());
    c[6] = STATUS_CAP_LIST as u8;
    c[0x34] = caps.first().map(|(at, _)| *at as u8).unwrap_or(0);
    for (i, (at, bytes)) in caps.iter().enumerate() {
        c[*at..*at + bytes.len()].copy_from_slice(bytes);
        c[*at + 1] = caps.get(i + 1).map(|(n, _)| *n as u8).unwrap_or(0);
    }
    c
}

fn virtio_cap(cfg_type: u8, bar: u8, offset: u32, length: u32, mult: Option<u32>) -> Vec<u8> {
    let len = if mult.is_some() { 20 } else { 16 };
    let mut v = vec![CAP_ID_VENDOR, 0, len, cfg_type, bar, 0, 0, 0];
    v.extend_from_slice(&offset.to_le_bytes());
    v.extend_from_slice(&length.to_le_bytes());
    if let Some(m) = mult {
        v.extend_from_slice(&m.to_le_bytes());
    }
    v
}

#[test]
fn capability_walk_finds_the_four_virtio_structures_and_skips_others() {
    let msix = vec![0x11, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    let c = config_with(&[
        (0x98, msix),
        (0x84, virtio_cap(cap::COMMON, 4, 0x0, 0x1000, None)),
        (0x70, virtio_cap(cap::ISR, 4, 0x1000, 0x1000, None)),
        (0x60, virtio_cap(cap::DEVICE, 4, 0x2000, 0x1000, None)),
        (0x48, virtio_cap(cap::NOTIFY, 4, 0x3000, 0x1000, Some(4))),
    ]);
    let caps = virtio_caps(&c).unwrap();
    assert_eq!(caps.len(), 4);
    assert_eq!(
        caps[0],
        VirtioCap {
            cfg_type: cap::COMMON,
            bar: 4,
            offset: 0,
            length: 0x1000,
            notify_off_multiplier: 0
        }
    );
    assert_eq!(caps[1].cfg_type, cap::ISR);
    assert_eq!(caps[2].offset, 0x2000);
    assert_eq!(caps[3].cfg_type, cap::NOTIFY);
    assert_eq!(caps[3].notify_off_multiplier, 4);
    assert_eq!(caps[3].offset, 0x3000);
}

#[test]
fn config_space_without_capability_list_has_no_caps() {
    let mut c = config_with(&[(0x40, virtio_cap(cap::COMMON, 0, 0, 64, None))]);
    c[6] = 0;
    assert!(virtio_caps(&c).unwrap().is_empty());
}

#[test]
fn looping_capability_list_is_rejected() {
    let mut c = config_with(&[
        (0x40, virtio_cap(cap::COMMON, 0, 0, 64, None)),
        (0x50, virtio_cap(cap::ISR, 0, 64, 4, None)),
    ]);
    c[0x51] = 0x40;
    let err = virtio_caps(&c).unwrap_err();
    assert!(err.to_string().contains("loops"), "{err}");
}

#[test]
fn capability_pointer_outside_config_space_is_rejected() {
    let mut c = config_with(&[(0x40, virtio_cap(cap::COMMON, 0, 0, 64, None))]);
    c[0x41] = 0x20;
    assert!(matches!(virtio_caps(&c), Err(PciError::BadConfig(_))));
    let mut c = config_with(&[(0xf8, vec![0x05, 0, 0, 0])]);
    c.truncate(0xf9);
    assert!(matches!(virtio_caps(&c), Err(PciError::BadConfig(_))));
}

#[test]
fn truncated_virtio_capability_is_rejected() {
    // Length field says 16 but the capability runs past the end.
    let c = config_with(&[(0xf8, virtio_cap(cap::COMMON, 0, 0, 64, None)[..8].to_vec())]);
    let mut c = c;
    c.truncate(0x100);
    c[0xfa] = 16;
    assert!(matches!(virtio_caps(&c), Err(PciError::BadConfig(_))));
    // A notify capability without its multiplier.
    let mut short = virtio_cap(cap::NOTIFY, 0, 0, 64, None);
    short[2] = 16;
    let c = config_with(&[(0x40, short)]);
    assert!(matches!(virtio_caps(&c), Err(PciError::BadConfig(_))));
}

#[test]
fn unprivileged_64_byte_config_read_is_reported() {
    let err = virtio_caps(&[0u8; 64][..40]).unwrap_err();
    assert!(err.to_string().contains("not root"), "{err}");
}

#[test]
fn ids_are_parsed_from_sysfs_text() {
    assert_eq!(parse_hex_id("0x1af4\n"), Some(0x1af4));
    assert_eq!(parse_hex_id("1080"), Some(0x1080));
    assert_eq!(parse_hex_id("zz"), None);
    assert!(is_vgpu_id(0x1af4, 0x1080));
    assert!(is_vgpu_id(0x1af4, 0x1090));
    assert!(!is_vgpu_id(0x1af4, 0x1041), "virtio-net is not ours");
    assert!(!is_vgpu_id(0x1af4, 0x107f));
    assert!(!is_vgpu_id(0x10de, 0x1080));
}

fn fake_sysfs(devices: &[(&str, &str, &str)]) -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let root = std::env::temp_dir().join(format!(
        "vgpu-guestd-sysfs-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    for (bdf, vendor, device) in devices {
        let d = root.join("devices").join(bdf);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("vendor"), format!("{vendor}\n")).unwrap();
        std::fs::write(d.join("device"), format!("{device}\n")).unwrap();
    }
    std::fs::create_dir_all(root.join("devices")).unwrap();
    root
}

#[test]
fn scan_finds_only_vgpu_functions_in_address_order() {
    let root = fake_sysfs(&[
        ("0000:00:02.0", "0x1af4", "0x1041"),
        ("0000:00:05.0", "0x1af4", "0x1080"),
        ("0000:00:03.0", "0x1af4", "0x1080"),
        ("0000:00:01.0", "0x8086", "0x1237"),
    ]);
    let found = PciDevice::scan(&root).unwrap();
    let bdfs: Vec<_> = found.iter().map(|d| d.bdf.as_str()).collect();
    assert_eq!(bdfs, ["0000:00:03.0", "0000:00:05.0"]);
    assert_eq!(found[0].driver(), None);
    assert!(PciDevice::open(&root, "0000:00:05.0").is_ok());
    assert!(matches!(
        PciDevice::open(&root, "0000:00:02.0"),
        Err(PciError::NotVgpu { device: 0x1041, .. })
    ));
    assert!(matches!(
        PciDevice::open(&root, "0000:00:09.0"),
        Err(PciError::NoSuchDevice(_))
    ));
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn binding_to_a_missing_driver_says_which_module_to_load() {
    let root = fake_sysfs(&[("0000:00:03.0", "0x1af4", "0x1080")]);
    let dev = PciDevice::open(&root, "0000:00:03.0").unwrap();
    let err = dev.bind(&root, "vgpu_no_such_driver").unwrap_err();
    assert!(matches!(err, PciError::NoDriver(_)));
    assert!(err.to_string().contains("modprobe vgpu_no_such_driver"));
    std::fs::remove_dir_all(&root).unwrap();
}
