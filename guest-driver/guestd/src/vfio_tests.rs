use super::*;
use crate::pci::{Regs, Window};
use std::mem::{offset_of, size_of};
use std::os::unix::fs::FileExt;

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "vgpu-guestd-vfio-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    fn write(&self, rel: &str, text: &str) -> PathBuf {
        let p = self.0.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// The expected values below were printed by a C program including
// <linux/vfio.h> (linux-libc-dev 6.1) and agree with the rust-vmm
// vfio-bindings crate; `vfio_device_info` is 24 bytes in current headers
// (6.1's ends at `cap_offset`, 20 bytes; the kernel reads 16).

#[test]
fn ioctl_numbers_match_the_kernel_uapi() {
    assert_eq!(VFIO_TYPE, 0x3b);
    assert_eq!(VFIO_GET_API_VERSION, 0x3b64);
    assert_eq!(VFIO_CHECK_EXTENSION, 0x3b65);
    assert_eq!(VFIO_SET_IOMMU, 0x3b66);
    assert_eq!(VFIO_GROUP_GET_STATUS, 0x3b67);
    assert_eq!(VFIO_GROUP_SET_CONTAINER, 0x3b68);
    assert_eq!(VFIO_GROUP_UNSET_CONTAINER, 0x3b69);
    assert_eq!(VFIO_GROUP_GET_DEVICE_FD, 0x3b6a);
    assert_eq!(VFIO_DEVICE_GET_INFO, 0x3b6b);
    assert_eq!(VFIO_DEVICE_GET_REGION_INFO, 0x3b6c);
    assert_eq!(VFIO_DEVICE_GET_IRQ_INFO, 0x3b6d);
    assert_eq!(VFIO_DEVICE_SET_IRQS, 0x3b6e);
    assert_eq!(VFIO_DEVICE_RESET, 0x3b6f);
    assert_eq!(VFIO_API_VERSION, 0);
    assert_eq!(VFIO_NOIOMMU_IOMMU, 8);
}

#[test]
fn uapi_flags_and_indexes_match_the_kernel() {
    assert_eq!(VFIO_GROUP_FLAGS_VIABLE, 0x1);
    assert_eq!(VFIO_GROUP_FLAGS_CONTAINER_SET, 0x2);
    assert_eq!(VFIO_DEVICE_FLAGS_PCI, 0x2);
    assert_eq!(VFIO_REGION_INFO_FLAG_READ, 0x1);
    assert_eq!(VFIO_REGION_INFO_FLAG_WRITE, 0x2);
    assert_eq!(VFIO_REGION_INFO_FLAG_MMAP, 0x4);
    assert_eq!(VFIO_REGION_INFO_FLAG_CAPS, 0x8);
    assert_eq!(VFIO_IRQ_INFO_EVENTFD, 0x1);
    assert_eq!(VFIO_IRQ_INFO_AUTOMASKED, 0x4);
    assert_eq!(VFIO_IRQ_SET_DATA_NONE, 0x1);
    assert_eq!(VFIO_IRQ_SET_DATA_EVENTFD, 0x4);
    assert_eq!(VFIO_IRQ_SET_ACTION_UNMASK, 0x10);
    assert_eq!(VFIO_IRQ_SET_ACTION_TRIGGER, 0x20);
    assert_eq!(VFIO_PCI_BAR5_REGION_INDEX, 5);
    assert_eq!(VFIO_PCI_CONFIG_REGION_INDEX, 7);
    assert_eq!(VFIO_PCI_INTX_IRQ_INDEX, 0);
}

#[test]
fn uapi_structs_have_the_kernel_layout() {
    assert_eq!(size_of::<GroupStatus>(), 8);
    assert_eq!(size_of::<DeviceInfo>(), 24);
    assert_eq!(offset_of!(DeviceInfo, num_irqs), 12);
    assert_eq!(offset_of!(DeviceInfo, cap_offset), 16);
    assert_eq!(size_of::<RegionInfo>(), 32);
    assert_eq!(offset_of!(RegionInfo, index), 8);
    assert_eq!(offset_of!(RegionInfo, size), 16);
    assert_eq!(offset_of!(RegionInfo, offset), 24);
    assert_eq!(size_of::<IrqInfo>(), 16);
    assert_eq!(offset_of!(IrqInfo, count), 12);
    assert_eq!(size_of::<IrqSet>(), 20);
    // `data[]` starts right after `count`, at 20.
    assert_eq!(offset_of!(IrqSetEventfd, fd), 20);
    assert_eq!(size_of::<IrqSetEventfd>(), 24);
}

#[test]
fn irq_set_requests_carry_their_size_and_action() {
    let set = irq_set_eventfd(VFIO_PCI_INTX_IRQ_INDEX, 42);
    assert_eq!(set.head.argsz, 24);
    assert_eq!(set.head.flags, 0x4 | 0x20);
    assert_eq!((set.head.index, set.head.start, set.head.count), (0, 0, 1));
    assert_eq!(set.fd, 42);
    let unmask = irq_unmask(VFIO_PCI_INTX_IRQ_INDEX);
    assert_eq!(unmask.argsz, 20);
    assert_eq!(unmask.flags, 0x1 | 0x10);
    assert_eq!(unmask.count, 1);
    let off = irq_disable(VFIO_PCI_INTX_IRQ_INDEX);
    assert_eq!(off.flags, 0x1 | 0x20);
    assert_eq!(
        off.count, 0,
        "count 0 with DATA_NONE tears the trigger down"
    );
}

fn region_info(index: u32, flags: u32, size: u64) -> RegionInfo {
    RegionInfo {
        argsz: 32,
        flags,
        index,
        cap_offset: 0,
        size,
        // vfio-pci puts region n at n << 40.
        offset: u64::from(index) << 40,
    }
}

const RW: u32 = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;

#[test]
fn mappable_bar_region_maps_at_its_reported_offset() {
    let r = Region::from_info(&region_info(4, RW | VFIO_REGION_INFO_FLAG_MMAP, 0x4000)).unwrap();
    assert_eq!(r.index, 4);
    assert_eq!(r.mmap_range().unwrap(), (4 << 40, 0x4000));
}

#[test]
fn bar_region_without_mmap_flag_is_refused() {
    let r = Region::from_info(&region_info(0, RW, 0x1000)).unwrap();
    let err = r.mmap_range().unwrap_err();
    assert!(matches!(err, VfioError::Region { index: 0, .. }));
    assert!(err.to_string().contains("does not allow mapping"), "{err}");
    let read_only = region_info(
        2,
        VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_MMAP,
        4096,
    );
    let err = Region::from_info(&read_only)
        .unwrap()
        .mmap_range()
        .unwrap_err();
    assert!(err.to_string().contains("not read-write"), "{err}");
}

#[test]
fn empty_region_is_absent() {
    assert_eq!(Region::from_info(&region_info(3, 0, 0)), None);
}

#[test]
fn config_region_gives_its_offset_and_size() {
    let r = Region::from_info(&region_info(7, RW, 256)).unwrap();
    assert_eq!(r.config_range().unwrap(), (7 << 40, 256));
    let short = Region::from_info(&region_info(7, RW, 32)).unwrap();
    assert!(short.config_range().is_err());
    let ro = Region::from_info(&region_info(7, VFIO_REGION_INFO_FLAG_READ, 256)).unwrap();
    assert!(ro.config_range().is_err());
}

#[test]
fn config_space_is_read_and_written_at_the_region_offset() {
    // A plain file stands in for the device fd: config space at 0x8000.
    let dir = Scratch::new();
    let path = dir.path().join("device");
    let file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    let mut config = vec![0u8; 256];
    config[0..2].copy_from_slice(&0x1af4u16.to_le_bytes());
    config[4] = 0x01; // I/O space on, memory and bus master off.
    file.write_all_at(&config, 0x8000).unwrap();
    file.write_all_at(&[0xee; 16], 0x8100).unwrap();
    let space = ConfigSpace::new(file.try_clone().unwrap(), path.clone(), 0x8000, 256);
    assert_eq!(space.read_all().unwrap(), config);
    space.enable_bus_master().unwrap();
    let mut cmd = [0u8; 2];
    file.read_exact_at(&mut cmd, 0x8004).unwrap();
    assert_eq!(u16::from_le_bytes(cmd), 0x01 | 0x02 | 0x04);
    let mut untouched = [0u8; 2];
    file.read_exact_at(&mut untouched, 4).unwrap();
    assert_eq!(untouched, [0, 0], "nothing is written outside the region");
}

#[test]
fn bar_is_mapped_at_the_region_offset_of_the_device_fd() {
    let dir = Scratch::new();
    let path = dir.path().join("device");
    let file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    file.set_len(0x6000).unwrap();
    file.write_all_at(&0xfeed_f00du32.to_le_bytes(), 0x4010)
        .unwrap();
    let bar = Bar::map_file(&file, 0x4000, 0x2000, 4).unwrap();
    assert_eq!(bar.len(), 0x2000);
    let window = Window::new(bar, 0x10, 0x10).unwrap();
    assert_eq!(window.read32(0), 0xfeed_f00d);
    window.write32(4, 0x1234_5678);
    let mut b = [0u8; 4];
    file.read_exact_at(&mut b, 0x4014).unwrap();
    assert_eq!(u32::from_le_bytes(b), 0x1234_5678);
    assert!(matches!(
        Bar::map_file(&file, 0, 0, 1),
        Err(PciError::Bar { bar: 1, .. })
    ));
}

/// Records what the module loader was asked to load.
#[derive(Default)]
struct Loads(Vec<Vec<String>>);

impl Loads {
    fn record(&mut self, args: &[&str]) {
        self.0.push(args.iter().map(|s| s.to_string()).collect());
    }
}

#[test]
fn kernel_without_noiommu_is_unavailable_after_trying_to_load_vfio() {
    let sys = Scratch::new();
    let mut loads = Loads::default();
    let err = prepare_noiommu(sys.path(), &mut |a| loads.record(a)).unwrap_err();
    assert!(matches!(&err, VfioError::Unavailable(p) if p.ends_with("enable_unsafe_noiommu_mode")));
    assert!(err.to_string().contains("CONFIG_VFIO_NOIOMMU"), "{err}");
    assert_eq!(loads.0, [["vfio", "enable_unsafe_noiommu_mode=1"]]);
}

#[test]
fn loading_vfio_with_the_parameter_makes_noiommu_available() {
    let sys = Scratch::new();
    let mut loads = Loads::default();
    let root = sys.path().to_path_buf();
    prepare_noiommu(sys.path(), &mut |a| {
        loads.record(a);
        if a[0] == "vfio" {
            // What modprobe does on a kernel with CONFIG_VFIO_NOIOMMU.
            std::fs::create_dir_all(noiommu_param(&root).parent().unwrap()).unwrap();
            std::fs::write(noiommu_param(&root), "Y\n").unwrap();
        }
    })
    .unwrap();
    assert_eq!(
        loads.0,
        vec![
            vec!["vfio".to_string(), "enable_unsafe_noiommu_mode=1".into()],
            vec!["vfio-pci".into()]
        ]
    );
}

#[test]
fn noiommu_parameter_reading_n_is_switched_on() {
    let sys = Scratch::new();
    let param = sys.write(NOIOMMU_PARAM, "N\n");
    sys.write("bus/pci/drivers/vfio-pci/bind", "");
    let mut loads = Loads::default();
    prepare_noiommu(sys.path(), &mut |a| loads.record(a)).unwrap();
    assert_eq!(std::fs::read_to_string(param).unwrap().trim(), "Y");
    assert!(loads.0.is_empty(), "both modules were there: {:?}", loads.0);
}

#[test]
fn enabled_noiommu_is_left_alone() {
    let sys = Scratch::new();
    let param = sys.write(NOIOMMU_PARAM, "Y\n");
    let mut loads = Loads::default();
    prepare_noiommu(sys.path(), &mut |a| loads.record(a)).unwrap();
    assert_eq!(std::fs::read_to_string(param).unwrap(), "Y\n");
    assert_eq!(
        loads.0,
        [["vfio-pci"]],
        "only the missing vfio-pci is loaded"
    );
}

#[test]
fn unreadable_noiommu_parameter_is_an_error() {
    let sys = Scratch::new();
    std::fs::create_dir_all(noiommu_param(sys.path())).unwrap();
    let err = prepare_noiommu(sys.path(), &mut |_| {}).unwrap_err();
    assert!(matches!(err, VfioError::Io { what: "read", .. }), "{err}");
}

fn device_with_group(sys: &Scratch, group: Option<&str>) -> PathBuf {
    let dev = sys.path().join("devices/0000:00:03.0");
    std::fs::create_dir_all(&dev).unwrap();
    if let Some(g) = group {
        let target = format!("../../kernel/iommu_groups/{g}");
        std::os::unix::fs::symlink(target, dev.join("iommu_group")).unwrap();
    }
    dev
}

#[test]
fn noiommu_group_node_is_found_from_the_iommu_group_link() {
    let sys = Scratch::new();
    let dev = device_with_group(&sys, Some("5"));
    let dev_vfio = sys.path().join("dev-vfio");
    sys.write("dev-vfio/noiommu-5", "");
    sys.write("dev-vfio/5", "");
    let (group, node) = group_node(&dev, "0000:00:03.0", &dev_vfio).unwrap();
    assert_eq!(group, 5);
    assert_eq!(node, dev_vfio.join("noiommu-5"));
}

#[test]
fn group_behind_a_real_iommu_is_refused() {
    let sys = Scratch::new();
    let dev = device_with_group(&sys, Some("12"));
    let dev_vfio = sys.path().join("dev-vfio");
    sys.write("dev-vfio/12", "");
    let err = group_node(&dev, "0000:00:03.0", &dev_vfio).unwrap_err();
    assert!(
        matches!(err, VfioError::RealIommu { group: 12, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("--driver uio"), "{err}");
}

#[test]
fn device_without_iommu_group_is_reported() {
    let sys = Scratch::new();
    let dev = device_with_group(&sys, None);
    let err = group_node(&dev, "0000:00:03.0", sys.path()).unwrap_err();
    assert!(matches!(err, VfioError::NoGroup { .. }), "{err}");
    let sys = Scratch::new();
    let dev = device_with_group(&sys, Some("not-a-number"));
    let err = group_node(&dev, "0000:00:03.0", sys.path()).unwrap_err();
    assert!(err.to_string().contains("points at"), "{err}");
}
