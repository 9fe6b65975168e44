//! The device address ranges a session may touch: its allocations and the
//! globals of its modules.

use std::collections::BTreeMap;

use vgpu_spec::Status;

/// What a device range is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangeKind {
    /// A `MEM_ALLOC` allocation, counted against the slice.
    Allocation,
    /// A global of the module with this guest handle.
    Global(u64),
}

/// One device range of a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceRange {
    /// First address.
    pub start: u64,
    /// Size in bytes.
    pub size: u64,
    /// Guest handle of the context that owns the range.
    pub context: u64,
    /// Allocation or module global.
    pub kind: RangeKind,
}

impl DeviceRange {
    fn contains(&self, ptr: u64, len: u64) -> bool {
        let Some(offset) = ptr.checked_sub(self.start) else {
            return false;
        };
        if len == 0 {
            return offset < self.size.max(1);
        }
        offset
            .checked_add(len)
            .is_some_and(|end_offset| end_offset <= self.size)
    }
}

/// An interval map of a session's device ranges, keyed by start address.
#[derive(Debug, Default)]
pub struct DeviceMemory {
    ranges: BTreeMap<u64, DeviceRange>,
}

impl DeviceMemory {
    /// Records an allocation. Fails if it overlaps a range already known,
    /// which would mean the executor handed out the same memory twice.
    pub fn insert_allocation(&mut self, start: u64, size: u64, context: u64) -> Result<(), Status> {
        self.insert(DeviceRange {
            start,
            size,
            context,
            kind: RangeKind::Allocation,
        })
    }

    /// Records a module global. Looking the same global up twice is fine.
    pub fn insert_global(
        &mut self,
        start: u64,
        size: u64,
        context: u64,
        module: u64,
    ) -> Result<(), Status> {
        let range = DeviceRange {
            start,
            size,
            context,
            kind: RangeKind::Global(module),
        };
        if self.ranges.get(&start) == Some(&range) {
            return Ok(());
        }
        self.insert(range)
    }

    fn insert(&mut self, range: DeviceRange) -> Result<(), Status> {
        let end = range.start.checked_add(range.size).ok_or(Status::UNKNOWN)?;
        let overlaps_before = self
            .ranges
            .range(..=range.start)
            .next_back()
            .is_some_and(|(_, r)| r.start.saturating_add(r.size.max(1)) > range.start);
        let overlaps_after = self
            .ranges
            .range(range.start..)
            .next()
            .is_some_and(|(start, _)| *start < end.max(range.start.saturating_add(1)));
        if overlaps_before || overlaps_after {
            tracing::error!(
                ?range,
                "Executor returned a device range that overlaps another"
            );
            return Err(Status::UNKNOWN);
        }
        self.ranges.insert(range.start, range);
        Ok(())
    }

    /// The range that holds all of `[ptr, ptr + len)`; for `len == 0`, the
    /// range that holds `ptr`.
    pub fn find(&self, ptr: u64, len: u64) -> Result<&DeviceRange, Status> {
        self.ranges
            .range(..=ptr)
            .next_back()
            .map(|(_, r)| r)
            .filter(|r| r.contains(ptr, len))
            .ok_or(Status::INVALID_VALUE)
    }

    /// The allocation that starts exactly at `ptr`.
    pub fn allocation_at(&self, ptr: u64) -> Result<&DeviceRange, Status> {
        self.ranges
            .get(&ptr)
            .filter(|r| r.kind == RangeKind::Allocation)
            .ok_or(Status::INVALID_VALUE)
    }

    /// Removes the range starting at `ptr`.
    pub fn remove(&mut self, ptr: u64) -> Option<DeviceRange> {
        self.ranges.remove(&ptr)
    }

    /// Removes every range the predicate selects and returns the bytes of
    /// the allocations among them.
    pub fn remove_where(&mut self, mut pred: impl FnMut(&DeviceRange) -> bool) -> u64 {
        let mut freed = 0u64;
        self.ranges.retain(|_, r| {
            if pred(r) {
                if r.kind == RangeKind::Allocation {
                    freed = freed.saturating_add(r.size);
                }
                false
            } else {
                true
            }
        });
        freed
    }

    /// Total bytes of all allocations.
    pub fn allocated_bytes(&self) -> u64 {
        self.ranges
            .values()
            .filter(|r| r.kind == RangeKind::Allocation)
            .map(|r| r.size)
            .fold(0u64, u64::saturating_add)
    }

    /// Number of ranges.
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    /// True if there are no ranges.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map() -> DeviceMemory {
        let mut m = DeviceMemory::default();
        m.insert_allocation(0x1000, 0x100, 1).unwrap();
        m.insert_allocation(0x2000, 0x800, 2).unwrap();
        m.insert_global(0x9000, 16, 1, 77).unwrap();
        m
    }

    #[test]
    fn ranges_inside_one_allocation_are_found() {
        let m = map();
        assert_eq!(m.find(0x1000, 0x100).unwrap().start, 0x1000);
        assert_eq!(m.find(0x10ff, 1).unwrap().start, 0x1000);
        assert_eq!(m.find(0x2400, 0x400).unwrap().context, 2);
        assert_eq!(m.find(0x9008, 8).unwrap().kind, RangeKind::Global(77));
        assert_eq!(m.find(0x1050, 0).unwrap().start, 0x1000);
    }

    #[test]
    fn ranges_crossing_an_end_or_outside_return_invalid_value() {
        let m = map();
        assert_eq!(m.find(0x1000, 0x101), Err(Status::INVALID_VALUE));
        assert_eq!(m.find(0x0fff, 2), Err(Status::INVALID_VALUE));
        assert_eq!(m.find(0x1100, 1), Err(Status::INVALID_VALUE));
        assert_eq!(m.find(0x1100, 0), Err(Status::INVALID_VALUE));
        assert_eq!(m.find(0x10ff, u64::MAX), Err(Status::INVALID_VALUE));
        assert_eq!(m.find(u64::MAX, 1), Err(Status::INVALID_VALUE));
        assert_eq!(m.find(0, 0), Err(Status::INVALID_VALUE));
    }

    #[test]
    fn free_must_name_an_allocation_start() {
        let m = map();
        assert!(m.allocation_at(0x1000).is_ok());
        assert_eq!(m.allocation_at(0x1001), Err(Status::INVALID_VALUE));
        assert_eq!(m.allocation_at(0x9000), Err(Status::INVALID_VALUE));
    }

    #[test]
    fn overlapping_inserts_are_refused() {
        let mut m = map();
        assert!(m.insert_allocation(0x10f0, 0x20, 1).is_err());
        assert!(m.insert_allocation(0x0f00, 0x101, 1).is_err());
        assert!(m.insert_allocation(0x1100, 0x10, 1).is_ok());
        // The same global twice is not an overlap.
        assert!(m.insert_global(0x9000, 16, 1, 77).is_ok());
        assert_eq!(m.len(), 4);
    }

    #[test]
    fn remove_where_counts_only_allocations() {
        let mut m = map();
        assert_eq!(m.allocated_bytes(), 0x900);
        let freed = m.remove_where(|r| r.context == 1);
        assert_eq!(freed, 0x100);
        assert_eq!(m.len(), 1);
        assert_eq!(m.allocated_bytes(), 0x800);
    }
}
