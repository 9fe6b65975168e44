//! Guest memory: translating scatter-gather lists into host buffers, and
//! keeping the GPU's registration of guest regions in step with the
//! frontend's memory table.

use std::collections::BTreeMap;
use std::sync::Arc;

use vgpu_spec::wire::SgEntry;
use vgpu_spec::Status;
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap, MemoryRegionAddress,
    MmapRegion,
};

use crate::gpu::{Gpu, HostBuf};

/// The guest memory type the backend maps.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// Translates a guest scatter-gather list into host buffers. Every entry must
/// lie inside one guest memory region; zero-length entries are skipped.
///
/// The buffers stay valid while the regions stay mapped: [`RegionRegistry`]
/// keeps every region alive until all contexts of the connection have been
/// synchronized after the frontend removed it.
pub fn host_buffers(
    mem: &GuestMemoryMmap,
    segs: &[SgEntry],
    out: &mut Vec<HostBuf>,
) -> Result<(), Status> {
    out.clear();
    for seg in segs {
        let gpa = seg.gpa.get();
        let len = seg.len.get();
        if len == 0 {
            continue;
        }
        let region = mem
            .find_region(GuestAddress(gpa))
            .ok_or(Status::INVALID_VALUE)?;
        let offset = gpa - region.start_addr().0;
        let end = offset.checked_add(len).ok_or(Status::INVALID_VALUE)?;
        if end > region.len() {
            return Err(Status::INVALID_VALUE);
        }
        let len = usize::try_from(len).map_err(|_| Status::INVALID_VALUE)?;
        let host = region
            .get_host_address(MemoryRegionAddress(offset))
            .map_err(|_| Status::INVALID_VALUE)?;
        // SAFETY: host..host+len lies inside one mapped guest region (checked
        // above against the region's length); the region is mapped read-write
        // and stays mapped while any context may use it (see RegionRegistry).
        out.push(unsafe { HostBuf::new(host, len) });
    }
    Ok(())
}

struct Registered {
    len: usize,
    gpa: u64,
    // Holds the mapping alive until the region is unregistered.
    mapping: Arc<MmapRegion<()>>,
}

impl Registered {
    fn host_buf(&self) -> HostBuf {
        // SAFETY: the range is the whole of a mapping that `self.mapping`
        // keeps alive.
        unsafe { HostBuf::new(self.mapping.as_ptr(), self.len) }
    }
}

/// The guest regions registered with the GPU, by host address.
#[derive(Default)]
pub struct RegionRegistry {
    regions: BTreeMap<(usize, usize), Registered>,
}

/// Changes between the registry and a new memory table.
pub struct RegionDiff {
    added: Vec<Arc<MmapRegion<()>>>,
    added_gpa: Vec<u64>,
    removed: Vec<(usize, usize)>,
}

impl RegionDiff {
    /// True if some regions were removed: the caller must quiesce every
    /// context before [`RegionRegistry::apply`].
    pub fn removes_regions(&self) -> bool {
        !self.removed.is_empty()
    }
}

fn key_of(region: &GuestRegionMmap<()>) -> (usize, usize) {
    (region.as_ptr() as usize, region.size())
}

impl RegionRegistry {
    /// Compares the registry with the regions of `mem`.
    pub fn diff(&self, mem: &GuestMemoryMmap) -> RegionDiff {
        let mut seen = Vec::new();
        let mut added = Vec::new();
        let mut added_gpa = Vec::new();
        for region in mem.iter() {
            let key = key_of(region);
            seen.push(key);
            if !self.regions.contains_key(&key) {
                added.push(region.get_mmap());
                added_gpa.push(region.start_addr().0);
            }
        }
        let removed = self
            .regions
            .keys()
            .filter(|k| !seen.contains(k))
            .copied()
            .collect();
        RegionDiff {
            added,
            added_gpa,
            removed,
        }
    }

    /// Unregisters removed regions (dropping our hold on their mappings) and
    /// registers new ones. A region the GPU refuses to register is still
    /// tracked: copies then take the executor's slower path.
    pub fn apply(&mut self, gpu: &dyn Gpu, diff: RegionDiff) {
        for key in diff.removed {
            if let Some(reg) = self.regions.remove(&key) {
                tracing::debug!(gpa = reg.gpa, len = reg.len, "Unregistering guest region");
                if let Err(status) = gpu.unregister_host(reg.host_buf()) {
                    tracing::warn!(gpa = reg.gpa, %status, "GPU refused to unregister a guest region");
                }
            }
        }
        for (mapping, gpa) in diff.added.into_iter().zip(diff.added_gpa) {
            let reg = Registered {
                len: mapping.size(),
                gpa,
                mapping,
            };
            let key = (reg.mapping.as_ptr() as usize, reg.len);
            tracing::debug!(gpa, len = reg.len, "Registering guest region");
            if let Err(status) = gpu.register_host(reg.host_buf()) {
                tracing::warn!(gpa, len = reg.len, %status, "GPU refused to register a guest region");
            }
            self.regions.insert(key, reg);
        }
    }

    /// Unregisters everything (at disconnect, after all contexts are gone).
    pub fn clear(&mut self, gpu: &dyn Gpu) {
        let diff = RegionDiff {
            added: Vec::new(),
            added_gpa: Vec::new(),
            removed: self.regions.keys().copied().collect(),
        };
        self.apply(gpu, diff);
    }

    /// Number of registered regions.
    pub fn len(&self) -> usize {
        self.regions.len()
    }

    /// True if nothing is registered.
    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000), (GuestAddress(0x20000), 0x1000)])
            .unwrap()
    }

    fn seg(gpa: u64, len: u64) -> SgEntry {
        SgEntry {
            gpa: gpa.into(),
            len: len.into(),
        }
    }

    #[test]
    fn entries_inside_regions_translate_to_host_buffers() {
        let m = mem();
        let mut out = Vec::new();
        host_buffers(
            &m,
            &[seg(0x100, 0x10), seg(0x20000, 0x1000), seg(5, 0)],
            &mut out,
        )
        .unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].len(), 0x10);
        out[0].write_at(0, b"hello").unwrap();
        let mut back = [0u8; 5];
        vm_memory::Bytes::read_slice(&m, &mut back, GuestAddress(0x100)).unwrap();
        assert_eq!(&back, b"hello");
    }

    #[test]
    fn entries_outside_or_across_regions_return_invalid_value() {
        let m = mem();
        let mut out = Vec::new();
        for bad in [
            seg(0x10000, 1),
            seg(0xfff0, 0x20),
            seg(0x1ffff, 2),
            seg(0x20000, 0x1001),
            seg(u64::MAX, 1),
            seg(0x100, u64::MAX),
        ] {
            assert_eq!(
                host_buffers(&m, &[seg(0, 8), bad], &mut out),
                Err(Status::INVALID_VALUE),
                "{bad:?}"
            );
        }
    }
}
