//! The VFIO user API (`<linux/vfio.h>`) as far as the no-IOMMU path needs
//! it: ioctl numbers, flags and `#[repr(C)]` structs, with compile-time
//! size checks. The ioctls are `_IO(VFIO_TYPE, VFIO_BASE + n)`; the
//! structs carry their size in `argsz`.

/// `VFIO_TYPE`, the ioctl type `';'`.
pub const VFIO_TYPE: u32 = b';' as u32;
/// `VFIO_BASE`, the first ioctl number.
pub const VFIO_BASE: u32 = 100;

/// `_IO(type, nr)`: no direction and no size bits (VFIO passes `argsz`
/// inside its structs instead).
pub const fn io(ty: u32, nr: u32) -> u32 {
    (ty << 8) | nr
}

/// Container: the API version.
pub const VFIO_GET_API_VERSION: u32 = io(VFIO_TYPE, VFIO_BASE);
/// Container: whether an IOMMU type is supported.
pub const VFIO_CHECK_EXTENSION: u32 = io(VFIO_TYPE, VFIO_BASE + 1);
/// Container: sets the IOMMU type.
pub const VFIO_SET_IOMMU: u32 = io(VFIO_TYPE, VFIO_BASE + 2);
/// Group: its status.
pub const VFIO_GROUP_GET_STATUS: u32 = io(VFIO_TYPE, VFIO_BASE + 3);
/// Group: joins a container.
pub const VFIO_GROUP_SET_CONTAINER: u32 = io(VFIO_TYPE, VFIO_BASE + 4);
/// Group: leaves its container.
pub const VFIO_GROUP_UNSET_CONTAINER: u32 = io(VFIO_TYPE, VFIO_BASE + 5);
/// Group: a device fd, by device name.
pub const VFIO_GROUP_GET_DEVICE_FD: u32 = io(VFIO_TYPE, VFIO_BASE + 6);
/// Device: its info.
pub const VFIO_DEVICE_GET_INFO: u32 = io(VFIO_TYPE, VFIO_BASE + 7);
/// Device: one region's info.
pub const VFIO_DEVICE_GET_REGION_INFO: u32 = io(VFIO_TYPE, VFIO_BASE + 8);
/// Device: one interrupt index's info.
pub const VFIO_DEVICE_GET_IRQ_INFO: u32 = io(VFIO_TYPE, VFIO_BASE + 9);
/// Device: sets up, masks or unmasks interrupts.
pub const VFIO_DEVICE_SET_IRQS: u32 = io(VFIO_TYPE, VFIO_BASE + 10);
/// Device: resets it.
pub const VFIO_DEVICE_RESET: u32 = io(VFIO_TYPE, VFIO_BASE + 11);

/// The only API version there is.
pub const VFIO_API_VERSION: i32 = 0;
/// The no-IOMMU "IOMMU" type.
pub const VFIO_NOIOMMU_IOMMU: u32 = 8;

/// Group status: all devices of the group are bound to VFIO.
pub const VFIO_GROUP_FLAGS_VIABLE: u32 = 1 << 0;
/// Group status: the group is in a container.
pub const VFIO_GROUP_FLAGS_CONTAINER_SET: u32 = 1 << 1;
/// Device info: a vfio-pci device.
pub const VFIO_DEVICE_FLAGS_PCI: u32 = 1 << 1;

/// Region: readable with pread.
pub const VFIO_REGION_INFO_FLAG_READ: u32 = 1 << 0;
/// Region: writable with pwrite.
pub const VFIO_REGION_INFO_FLAG_WRITE: u32 = 1 << 1;
/// Region: can be mmapped.
pub const VFIO_REGION_INFO_FLAG_MMAP: u32 = 1 << 2;
/// Region: has a capability chain.
pub const VFIO_REGION_INFO_FLAG_CAPS: u32 = 1 << 3;

/// Interrupt index: can signal an eventfd.
pub const VFIO_IRQ_INFO_EVENTFD: u32 = 1 << 0;
/// Interrupt index: masked after each interrupt until unmasked.
pub const VFIO_IRQ_INFO_AUTOMASKED: u32 = 1 << 2;

/// Set IRQs: no data.
pub const VFIO_IRQ_SET_DATA_NONE: u32 = 1 << 0;
/// Set IRQs: the data is eventfds (s32 each).
pub const VFIO_IRQ_SET_DATA_EVENTFD: u32 = 1 << 2;
/// Set IRQs: unmask.
pub const VFIO_IRQ_SET_ACTION_UNMASK: u32 = 1 << 4;
/// Set IRQs: (un)set the trigger.
pub const VFIO_IRQ_SET_ACTION_TRIGGER: u32 = 1 << 5;

/// vfio-pci region index of BAR 5 (BAR n is index n).
pub const VFIO_PCI_BAR5_REGION_INDEX: u32 = 5;
/// vfio-pci region index of config space.
pub const VFIO_PCI_CONFIG_REGION_INDEX: u32 = 7;
/// vfio-pci interrupt index of INTx.
pub const VFIO_PCI_INTX_IRQ_INDEX: u32 = 0;

/// `struct vfio_group_status`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GroupStatus {
    pub argsz: u32,
    pub flags: u32,
}

/// `struct vfio_device_info`, with the `pad` of current headers (older
/// ones end at `cap_offset`; the kernel reads only up to `num_irqs`).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DeviceInfo {
    pub argsz: u32,
    pub flags: u32,
    pub num_regions: u32,
    pub num_irqs: u32,
    pub cap_offset: u32,
    pub pad: u32,
}

/// `struct vfio_region_info`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RegionInfo {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub cap_offset: u32,
    pub size: u64,
    pub offset: u64,
}

/// `struct vfio_irq_info`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IrqInfo {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub count: u32,
}

/// `struct vfio_irq_set` without its data.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IrqSet {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub start: u32,
    pub count: u32,
}

/// `struct vfio_irq_set` followed by one eventfd.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IrqSetEventfd {
    pub head: IrqSet,
    pub fd: i32,
}

const _: () = assert!(std::mem::size_of::<GroupStatus>() == 8);
const _: () = assert!(std::mem::size_of::<DeviceInfo>() == 24);
const _: () = assert!(std::mem::size_of::<RegionInfo>() == 32);
const _: () = assert!(std::mem::size_of::<IrqInfo>() == 16);
const _: () = assert!(std::mem::size_of::<IrqSet>() == 20);
const _: () = assert!(std::mem::size_of::<IrqSetEventfd>() == 24);

/// `argsz` of a struct.
pub const fn argsz<T>() -> u32 {
    std::mem::size_of::<T>() as u32
}

/// Points INTx-style index `index` at eventfd `fd`.
pub fn irq_set_eventfd(index: u32, fd: i32) -> IrqSetEventfd {
    IrqSetEventfd {
        head: IrqSet {
            argsz: argsz::<IrqSetEventfd>(),
            flags: VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
            index,
            start: 0,
            count: 1,
        },
        fd,
    }
}

/// Unmasks interrupt 0 of index `index`.
pub fn irq_unmask(index: u32) -> IrqSet {
    IrqSet {
        argsz: argsz::<IrqSet>(),
        flags: VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_UNMASK,
        index,
        start: 0,
        count: 1,
    }
}

/// Tears down every trigger of index `index`.
pub fn irq_disable(index: u32) -> IrqSet {
    IrqSet {
        argsz: argsz::<IrqSet>(),
        flags: VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
        index,
        start: 0,
        count: 0,
    }
}
