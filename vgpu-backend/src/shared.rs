//! State shared by every connection of one backend: the executor, the slice
//! accounting, and the device identity the guest sees.

use std::sync::Arc;

use vgpu_spec::config::{CAP_ADD_MEM_REGION, CAP_EXECUTES_KERNELS, CAP_ZERO_COPY};
use vgpu_spec::wire::DeviceInfoResp;
use vgpu_spec::{VgpuConfig, DEVICE_ATTRIBUTE_SLOTS};
use zerocopy::little_endian::I32;

use crate::config::SliceUuid;
use crate::gpu::Gpu;
use crate::metering::MeterRegistry;
use crate::slice::SliceMemory;
use crate::throttle::Throttle;

/// `CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT`.
pub const ATTR_MULTIPROCESSOR_COUNT: usize = 16;
/// `CU_DEVICE_ATTRIBUTE_PCI_BUS_ID`.
pub const ATTR_PCI_BUS_ID: usize = 33;
/// `CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID`.
pub const ATTR_PCI_DEVICE_ID: usize = 34;
/// `CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID`.
pub const ATTR_PCI_DOMAIN_ID: usize = 50;
/// `CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR`.
pub const ATTR_COMPUTE_CAPABILITY_MAJOR: usize = 75;
/// `CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR`.
pub const ATTR_COMPUTE_CAPABILITY_MINOR: usize = 76;

/// What every connection of a backend shares.
pub struct DeviceShared {
    /// The executor.
    pub gpu: Arc<dyn Gpu>,
    /// The slice's memory accounting.
    pub slice: Arc<SliceMemory>,
    /// The config space.
    pub config: VgpuConfig,
    /// The most sessions one connection may open.
    pub max_sessions: u32,
    /// The largest queue size accepted.
    pub max_queue_size: u16,
    /// How long a queue is busy-polled after a batch before its worker
    /// sleeps (zero: never).
    pub poll_after_work: std::time::Duration,
    /// How long a poisoned backend keeps serving before it stops.
    pub fault_restart_after: std::time::Duration,
    /// The grant board slot (a disabled throttle without one).
    pub throttle: Arc<Throttle>,
    /// Every session's usage meter (kept only while a reporter reads them).
    pub meters: Arc<MeterRegistry>,
    /// The first sticky (fault) status any request met, or 0. On a real GPU a faulting kernel
    /// corrupts the CUDA state of the whole process, so the backend restarts (see
    /// `server::POISON_GRACE`).
    pub poisoned: std::sync::atomic::AtomicU32,
    /// The slice's memory state: frozen while reclaimed (see [`crate::memctl`]).
    pub memory: Arc<crate::memctl::MemoryControl>,
    /// Asks the scheduler for memory when the GPU is full (with a scheduler).
    pub claimer: Option<Arc<crate::memctl::Claimer>>,
}

impl DeviceShared {
    /// Records that a request met a sticky fault status.
    pub fn poison(&self, status: vgpu_spec::Status) {
        let code = status.0;
        if self
            .poisoned
            .compare_exchange(
                0,
                code,
                std::sync::atomic::Ordering::AcqRel,
                std::sync::atomic::Ordering::Acquire,
            )
            .is_ok()
        {
            tracing::error!(
                %status,
                "A kernel faulted: this process's CUDA state is lost; the backend restarts"
            );
        }
    }

    /// The sticky status that poisoned the backend, if any.
    pub fn poisoned(&self) -> Option<vgpu_spec::Status> {
        match self.poisoned.load(std::sync::atomic::Ordering::Acquire) {
            0 => None,
            code => Some(vgpu_spec::Status(code)),
        }
    }
}

impl DeviceShared {
    /// Builds the shared state and the config space from the executor's
    /// identity and the slice settings.
    pub fn new(
        gpu: Arc<dyn Gpu>,
        slice: Arc<SliceMemory>,
        slice_name: &str,
        uuid: SliceUuid,
        max_sessions: u32,
        max_queue_size: u16,
    ) -> Self {
        let id = gpu.identity();
        let mut config = VgpuConfig::new();
        let mut caps = CAP_ZERO_COPY | CAP_ADD_MEM_REGION;
        if id.executes_kernels {
            caps |= CAP_EXECUTES_KERNELS;
        }
        config.capabilities = caps.into();
        config.memory_limit = slice.limit().into();
        config.sm_count = id.sm_count.into();
        config.cc_major = (id.compute_capability.0.min(u32::from(u16::MAX)) as u16).into();
        config.cc_minor = (id.compute_capability.1.min(u32::from(u16::MAX)) as u16).into();
        config.max_queue_size = max_queue_size.into();
        config.max_sessions = max_sessions.into();
        config.pci_domain = id.pci.0.into();
        config.pci_bus = id.pci.1;
        config.pci_device = id.pci.2;
        config.pci_function = id.pci.3;
        config.uuid = uuid.0;
        config.set_slice_name(slice_name);
        config.set_device_name(&id.name);
        DeviceShared {
            gpu,
            slice,
            config,
            max_sessions,
            max_queue_size,
            poll_after_work: crate::config::DEFAULT_POLL_AFTER_WORK,
            fault_restart_after: crate::server::POISON_GRACE,
            throttle: Throttle::disabled(),
            meters: Arc::new(MeterRegistry::new(false)),
            poisoned: std::sync::atomic::AtomicU32::new(0),
            memory: Arc::default(),
            claimer: None,
        }
    }

    /// The `GET_DEVICE_INFO` answer: total memory is the slice limit, and
    /// the attribute table follows the identity.
    pub fn device_info(&self) -> (DeviceInfoResp, Vec<I32>) {
        let id = self.gpu.identity();
        let slots = DEVICE_ATTRIBUTE_SLOTS as usize;
        let mut attrs: Vec<i32> = id.attributes.iter().copied().take(slots).collect();
        attrs.resize(slots, 0);
        let clamp = |v: u32| i32::try_from(v).unwrap_or(i32::MAX);
        attrs[ATTR_MULTIPROCESSOR_COUNT] = clamp(id.sm_count);
        attrs[ATTR_COMPUTE_CAPABILITY_MAJOR] = clamp(id.compute_capability.0);
        attrs[ATTR_COMPUTE_CAPABILITY_MINOR] = clamp(id.compute_capability.1);
        attrs[ATTR_PCI_DOMAIN_ID] = clamp(id.pci.0);
        attrs[ATTR_PCI_BUS_ID] = i32::from(id.pci.1);
        attrs[ATTR_PCI_DEVICE_ID] = i32::from(id.pci.2);
        let resp = DeviceInfoResp {
            total_mem: self.slice.limit().into(),
            driver_version: id.driver_version.into(),
            attr_count: (slots as u32).into(),
        };
        (resp, attrs.into_iter().map(I32::new).collect())
    }
}
