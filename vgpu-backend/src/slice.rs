//! The slice's memory accounting, shared by every connection of a backend.

use std::sync::atomic::{AtomicU64, Ordering};

/// Memory limit and bytes allocated by all sessions of the slice.
#[derive(Debug)]
pub struct SliceMemory {
    limit: AtomicU64,
    used: AtomicU64,
}

impl SliceMemory {
    /// A slice with `limit` bytes and nothing allocated.
    pub fn new(limit: u64) -> Self {
        SliceMemory {
            limit: AtomicU64::new(limit),
            used: AtomicU64::new(0),
        }
    }

    /// The memory limit in bytes.
    pub fn limit(&self) -> u64 {
        self.limit.load(Ordering::Acquire)
    }

    /// Bytes allocated by all sessions.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    /// Bytes still available under the limit.
    pub fn free(&self) -> u64 {
        self.limit().saturating_sub(self.used())
    }

    /// Reserves `size` bytes if `used + size <= limit`; false otherwise.
    pub fn try_reserve(&self, size: u64) -> bool {
        let limit = self.limit();
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(size).filter(|total| *total <= limit)
            })
            .is_ok()
    }

    /// Returns `size` reserved bytes.
    pub fn release(&self, size: u64) {
        let result = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                Some(used.saturating_sub(size))
            });
        if let Ok(before) = result {
            if before < size {
                tracing::error!(before, size, "Slice accounting released more than it held");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn reserve_respects_the_limit_exactly() {
        let s = SliceMemory::new(100);
        assert!(s.try_reserve(60));
        assert!(!s.try_reserve(41));
        assert!(s.try_reserve(40));
        assert_eq!(s.free(), 0);
        s.release(60);
        assert_eq!(s.used(), 40);
        assert_eq!(s.free(), 60);
    }

    #[test]
    fn reserve_never_overflows() {
        let s = SliceMemory::new(u64::MAX);
        assert!(s.try_reserve(u64::MAX - 1));
        assert!(!s.try_reserve(2));
    }

    #[test]
    fn concurrent_reservations_never_exceed_the_limit() {
        let s = Arc::new(SliceMemory::new(1000));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let s = s.clone();
                std::thread::spawn(move || (0..100).filter(|_| s.try_reserve(3)).count() as u64)
            })
            .collect();
        let granted: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(granted, 333);
        assert_eq!(s.used(), 999);
    }
}
