//! The bookkeeping behind stream-ordered memory pools (`CUmemoryPool`).
//!
//! Pools are a guest-side model: every allocation made through a pool is
//! still a real device allocation of the backend, made at once and freed
//! when the application frees it (see `memory`). A pool records which
//! allocations it handed out, so it can report its used and reserved
//! memory as native CUDA does, and keeps the attributes the application
//! set (release threshold, reuse policy) to return them. Memory freed back
//! to a pool is returned to the slice at once rather than cached up to the
//! release threshold, so a pool's reserved memory is what its live
//! allocations hold.

use std::collections::HashMap;
use std::ffi::c_int;

use vgpu_spec::Status;

use crate::errors::CuResult;

/// `CU_MEMPOOL_ATTR_REUSE_FOLLOW_EVENT_DEPENDENCIES` (int).
pub(crate) const ATTR_REUSE_FOLLOW_EVENT_DEPENDENCIES: c_int = 1;
/// `CU_MEMPOOL_ATTR_REUSE_ALLOW_OPPORTUNISTIC` (int).
pub(crate) const ATTR_REUSE_ALLOW_OPPORTUNISTIC: c_int = 2;
/// `CU_MEMPOOL_ATTR_REUSE_ALLOW_INTERNAL_DEPENDENCIES` (int).
pub(crate) const ATTR_REUSE_ALLOW_INTERNAL_DEPENDENCIES: c_int = 3;
/// `CU_MEMPOOL_ATTR_RELEASE_THRESHOLD` (cuuint64_t).
pub(crate) const ATTR_RELEASE_THRESHOLD: c_int = 4;
/// `CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT` (cuuint64_t, read-only).
pub(crate) const ATTR_RESERVED_MEM_CURRENT: c_int = 5;
/// `CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH` (cuuint64_t, settable to 0 only).
pub(crate) const ATTR_RESERVED_MEM_HIGH: c_int = 6;
/// `CU_MEMPOOL_ATTR_USED_MEM_CURRENT` (cuuint64_t, read-only).
pub(crate) const ATTR_USED_MEM_CURRENT: c_int = 7;
/// `CU_MEMPOOL_ATTR_USED_MEM_HIGH` (cuuint64_t, settable to 0 only).
pub(crate) const ATTR_USED_MEM_HIGH: c_int = 8;

/// The C type of an attribute's value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AttrType {
    /// `int`.
    Int,
    /// `cuuint64_t`.
    U64,
}

/// The value type of a pool attribute, or `INVALID_VALUE` for an unknown one.
pub(crate) fn attr_type(attr: c_int) -> CuResult<AttrType> {
    match attr {
        ATTR_REUSE_FOLLOW_EVENT_DEPENDENCIES
        | ATTR_REUSE_ALLOW_OPPORTUNISTIC
        | ATTR_REUSE_ALLOW_INTERNAL_DEPENDENCIES => Ok(AttrType::Int),
        ATTR_RELEASE_THRESHOLD..=ATTR_USED_MEM_HIGH => Ok(AttrType::U64),
        _ => Err(Status::INVALID_VALUE),
    }
}

/// Pool ids are opaque, nonzero and pointer-aligned, in a range of their own.
const FIRST_ID: usize = 0x5000;
const ID_STRIDE: usize = 0x10;

/// One pool.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pool {
    device: c_int,
    is_default: bool,
    release_threshold: u64,
    /// The three reuse flags, by attribute id 1..=3.
    reuse: [bool; 3],
    used: u64,
    used_high: u64,
    reserved: u64,
    reserved_high: u64,
}

impl Pool {
    fn new(device: c_int, is_default: bool) -> Pool {
        Pool {
            device,
            is_default,
            release_threshold: 0,
            reuse: [true; 3],
            used: 0,
            used_high: 0,
            reserved: 0,
            reserved_high: 0,
        }
    }

    fn grow(&mut self, size: u64) {
        self.used = self.used.saturating_add(size);
        self.reserved = self.reserved.saturating_add(size);
        self.used_high = self.used_high.max(self.used);
        self.reserved_high = self.reserved_high.max(self.reserved);
    }

    fn shrink(&mut self, size: u64) {
        self.used = self.used.saturating_sub(size);
        self.reserved = self.reserved.saturating_sub(size);
    }
}

/// An allocation a pool handed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Allocation {
    pool: usize,
    size: u64,
    ctx: u64,
}

/// Every pool of the process, each device's default and current pool, and
/// the allocations made from pools.
#[derive(Debug, Default)]
pub(crate) struct PoolTable {
    pools: HashMap<usize, Pool>,
    defaults: HashMap<c_int, usize>,
    current: HashMap<c_int, usize>,
    allocations: HashMap<u64, Allocation>,
    created: usize,
}

impl PoolTable {
    fn insert(&mut self, pool: Pool) -> usize {
        let id = FIRST_ID + self.created * ID_STRIDE;
        self.created += 1;
        self.pools.insert(id, pool);
        id
    }

    fn pool(&self, id: usize) -> CuResult<&Pool> {
        self.pools.get(&id).ok_or(Status::INVALID_VALUE)
    }

    fn pool_mut(&mut self, id: usize) -> CuResult<&mut Pool> {
        self.pools.get_mut(&id).ok_or(Status::INVALID_VALUE)
    }

    /// The device's default pool, created on first use.
    pub(crate) fn default_pool(&mut self, device: c_int) -> usize {
        if let Some(id) = self.defaults.get(&device) {
            return *id;
        }
        let id = self.insert(Pool::new(device, true));
        self.defaults.insert(device, id);
        id
    }

    /// The device's current pool: the one set last, else the default one.
    pub(crate) fn current_pool(&mut self, device: c_int) -> usize {
        match self.current.get(&device) {
            Some(id) => *id,
            None => self.default_pool(device),
        }
    }

    /// Makes `pool` the device's current pool; it must be a pool of that
    /// device.
    pub(crate) fn set_current(&mut self, device: c_int, pool: usize) -> CuResult<()> {
        if self.pool(pool)?.device != device {
            return Err(Status::INVALID_DEVICE);
        }
        self.current.insert(device, pool);
        Ok(())
    }

    /// A new explicit pool on `device`.
    pub(crate) fn create(&mut self, device: c_int) -> usize {
        self.insert(Pool::new(device, false))
    }

    /// Destroys an explicit pool. A default pool cannot be destroyed. If the
    /// pool was its device's current pool, the default one is current again.
    /// Allocations still outstanding stay valid (natively they are released
    /// when freed), and are no longer accounted anywhere.
    pub(crate) fn destroy(&mut self, pool: usize) -> CuResult<()> {
        let found = self.pool(pool)?;
        if found.is_default {
            return Err(Status::INVALID_VALUE);
        }
        let device = found.device;
        self.pools.remove(&pool);
        if self.current.get(&device) == Some(&pool) {
            self.current.remove(&device);
        }
        Ok(())
    }

    /// Fails with `INVALID_VALUE` unless `pool` is a live pool.
    pub(crate) fn check(&self, pool: usize) -> CuResult<()> {
        self.pool(pool).map(|_| ())
    }

    /// The device of a live pool.
    pub(crate) fn device(&self, pool: usize) -> CuResult<c_int> {
        self.pool(pool).map(|p| p.device)
    }

    /// An attribute's value (int attributes as 0 or 1).
    pub(crate) fn get_attr(&self, pool: usize, attr: c_int) -> CuResult<u64> {
        let p = self.pool(pool)?;
        attr_type(attr)?;
        Ok(match attr {
            ATTR_REUSE_FOLLOW_EVENT_DEPENDENCIES
            | ATTR_REUSE_ALLOW_OPPORTUNISTIC
            | ATTR_REUSE_ALLOW_INTERNAL_DEPENDENCIES => u64::from(p.reuse[reuse_index(attr)]),
            ATTR_RELEASE_THRESHOLD => p.release_threshold,
            ATTR_RESERVED_MEM_CURRENT => p.reserved,
            ATTR_RESERVED_MEM_HIGH => p.reserved_high,
            ATTR_USED_MEM_CURRENT => p.used,
            _ => p.used_high,
        })
    }

    /// Sets an attribute. The current-memory attributes are read-only; the
    /// high watermarks can only be reset, by setting 0.
    pub(crate) fn set_attr(&mut self, pool: usize, attr: c_int, value: u64) -> CuResult<()> {
        let p = self.pool_mut(pool)?;
        attr_type(attr)?;
        match attr {
            ATTR_REUSE_FOLLOW_EVENT_DEPENDENCIES
            | ATTR_REUSE_ALLOW_OPPORTUNISTIC
            | ATTR_REUSE_ALLOW_INTERNAL_DEPENDENCIES => p.reuse[reuse_index(attr)] = value != 0,
            ATTR_RELEASE_THRESHOLD => p.release_threshold = value,
            ATTR_RESERVED_MEM_HIGH if value == 0 => p.reserved_high = p.reserved,
            ATTR_USED_MEM_HIGH if value == 0 => p.used_high = p.used,
            _ => return Err(Status::INVALID_VALUE),
        }
        Ok(())
    }

    /// Accounts a new allocation of `size` bytes at `dptr` to `pool`.
    pub(crate) fn record_alloc(
        &mut self,
        pool: usize,
        dptr: u64,
        size: u64,
        ctx: u64,
    ) -> CuResult<()> {
        self.pool_mut(pool)?.grow(size);
        let previous = self
            .allocations
            .insert(dptr, Allocation { pool, size, ctx });
        // An address the backend hands out again was freed behind the
        // table's back (its context died): drop the stale record.
        if let Some(stale) = previous {
            if let Some(p) = self.pools.get_mut(&stale.pool) {
                p.shrink(stale.size);
            }
        }
        Ok(())
    }

    /// Forgets a freed allocation; returns its pool if it came from one.
    pub(crate) fn record_free(&mut self, dptr: u64) -> Option<usize> {
        let allocation = self.allocations.remove(&dptr)?;
        if let Some(p) = self.pools.get_mut(&allocation.pool) {
            p.shrink(allocation.size);
        }
        Some(allocation.pool)
    }

    /// Forgets the allocations of a destroyed context (the backend freed
    /// them with it).
    pub(crate) fn forget_context(&mut self, ctx: u64) {
        let gone: Vec<u64> = self
            .allocations
            .iter()
            .filter(|(_, a)| a.ctx == ctx)
            .map(|(dptr, _)| *dptr)
            .collect();
        for dptr in gone {
            self.record_free(dptr);
        }
    }
}

fn reuse_index(attr: c_int) -> usize {
    usize::try_from(attr - ATTR_REUSE_FOLLOW_EVENT_DEPENDENCIES).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn default_pool_is_created_once_per_device_and_is_current_until_replaced() {
        let mut t = PoolTable::default();
        let d0 = t.default_pool(0);
        assert_eq!(t.default_pool(0), d0);
        assert_ne!(d0, 0);
        assert_ne!(t.default_pool(1), d0);
        assert_eq!(t.current_pool(0), d0);
        let own = t.create(0);
        t.set_current(0, own).unwrap();
        assert_eq!(t.current_pool(0), own);
        assert_eq!(t.default_pool(0), d0);
    }

    #[test]
    fn attributes_round_trip_with_native_defaults() {
        let mut t = PoolTable::default();
        let p = t.default_pool(0);
        assert_eq!(t.get_attr(p, ATTR_RELEASE_THRESHOLD), Ok(0));
        for attr in 1..=3 {
            assert_eq!(t.get_attr(p, attr), Ok(1), "reuse flag {attr}");
        }
        t.set_attr(p, ATTR_RELEASE_THRESHOLD, 64 * MIB).unwrap();
        assert_eq!(t.get_attr(p, ATTR_RELEASE_THRESHOLD), Ok(64 * MIB));
        t.set_attr(p, ATTR_REUSE_ALLOW_OPPORTUNISTIC, 0).unwrap();
        assert_eq!(t.get_attr(p, ATTR_REUSE_ALLOW_OPPORTUNISTIC), Ok(0));
        assert_eq!(t.get_attr(p, ATTR_REUSE_FOLLOW_EVENT_DEPENDENCIES), Ok(1));
        t.set_attr(p, ATTR_REUSE_ALLOW_OPPORTUNISTIC, 5).unwrap();
        assert_eq!(t.get_attr(p, ATTR_REUSE_ALLOW_OPPORTUNISTIC), Ok(1));
    }

    #[test]
    fn attribute_types_follow_the_driver_api() {
        assert_eq!(
            attr_type(ATTR_REUSE_ALLOW_INTERNAL_DEPENDENCIES),
            Ok(AttrType::Int)
        );
        assert_eq!(attr_type(ATTR_RELEASE_THRESHOLD), Ok(AttrType::U64));
        assert_eq!(attr_type(ATTR_USED_MEM_HIGH), Ok(AttrType::U64));
        assert_eq!(attr_type(0), Err(Status::INVALID_VALUE));
        assert_eq!(attr_type(99), Err(Status::INVALID_VALUE));
    }

    #[test]
    fn used_and_reserved_follow_allocations_and_frees() {
        let mut t = PoolTable::default();
        let p = t.default_pool(0);
        t.record_alloc(p, 0x1000_0000, 3 * MIB, 7).unwrap();
        t.record_alloc(p, 0x2000_0000, MIB, 7).unwrap();
        assert_eq!(t.get_attr(p, ATTR_USED_MEM_CURRENT), Ok(4 * MIB));
        assert_eq!(t.get_attr(p, ATTR_RESERVED_MEM_CURRENT), Ok(4 * MIB));
        assert_eq!(t.record_free(0x1000_0000), Some(p));
        assert_eq!(t.get_attr(p, ATTR_USED_MEM_CURRENT), Ok(MIB));
        assert_eq!(t.get_attr(p, ATTR_USED_MEM_HIGH), Ok(4 * MIB));
        assert_eq!(t.record_free(0x2000_0000), Some(p));
        assert_eq!(t.get_attr(p, ATTR_USED_MEM_CURRENT), Ok(0));
        assert_eq!(t.get_attr(p, ATTR_RESERVED_MEM_CURRENT), Ok(0));
        assert_eq!(t.get_attr(p, ATTR_RESERVED_MEM_HIGH), Ok(4 * MIB));
        // A pointer no pool handed out is not a pool's business.
        assert_eq!(t.record_free(0x3000_0000), None);
    }

    #[test]
    fn allocations_are_accounted_to_their_own_pool_only() {
        let mut t = PoolTable::default();
        let d = t.default_pool(0);
        let own = t.create(0);
        t.record_alloc(own, 0x1000, 2 * MIB, 1).unwrap();
        t.record_alloc(d, 0x2000, MIB, 1).unwrap();
        assert_eq!(t.get_attr(own, ATTR_USED_MEM_CURRENT), Ok(2 * MIB));
        assert_eq!(t.get_attr(d, ATTR_USED_MEM_CURRENT), Ok(MIB));
    }

    #[test]
    fn high_watermarks_reset_to_current_only_by_setting_zero() {
        let mut t = PoolTable::default();
        let p = t.default_pool(0);
        t.record_alloc(p, 0x1000, 8 * MIB, 1).unwrap();
        t.record_free(0x1000);
        t.record_alloc(p, 0x2000, MIB, 1).unwrap();
        assert_eq!(
            t.set_attr(p, ATTR_USED_MEM_HIGH, 5),
            Err(Status::INVALID_VALUE)
        );
        t.set_attr(p, ATTR_USED_MEM_HIGH, 0).unwrap();
        t.set_attr(p, ATTR_RESERVED_MEM_HIGH, 0).unwrap();
        assert_eq!(t.get_attr(p, ATTR_USED_MEM_HIGH), Ok(MIB));
        assert_eq!(t.get_attr(p, ATTR_RESERVED_MEM_HIGH), Ok(MIB));
    }

    #[test]
    fn current_memory_attributes_are_read_only() {
        let mut t = PoolTable::default();
        let p = t.default_pool(0);
        for attr in [ATTR_USED_MEM_CURRENT, ATTR_RESERVED_MEM_CURRENT] {
            assert_eq!(t.set_attr(p, attr, 0), Err(Status::INVALID_VALUE));
        }
        assert_eq!(t.set_attr(p, 42, 0), Err(Status::INVALID_VALUE));
        assert_eq!(t.get_attr(p, 42), Err(Status::INVALID_VALUE));
    }

    #[test]
    fn unknown_pool_handle_is_invalid_value() {
        let mut t = PoolTable::default();
        let bogus = 0xdead_0000;
        assert_eq!(t.check(bogus), Err(Status::INVALID_VALUE));
        assert_eq!(t.device(bogus), Err(Status::INVALID_VALUE));
        assert_eq!(
            t.get_attr(bogus, ATTR_RELEASE_THRESHOLD),
            Err(Status::INVALID_VALUE)
        );
        assert_eq!(
            t.set_attr(bogus, ATTR_RELEASE_THRESHOLD, 1),
            Err(Status::INVALID_VALUE)
        );
        assert_eq!(t.destroy(bogus), Err(Status::INVALID_VALUE));
        assert_eq!(t.set_current(0, bogus), Err(Status::INVALID_VALUE));
        assert_eq!(
            t.record_alloc(bogus, 0x1000, 1, 1),
            Err(Status::INVALID_VALUE)
        );
    }

    #[test]
    fn destroying_the_default_pool_is_refused() {
        let mut t = PoolTable::default();
        let d = t.default_pool(0);
        assert_eq!(t.destroy(d), Err(Status::INVALID_VALUE));
        assert_eq!(t.check(d), Ok(()));
    }

    #[test]
    fn destroyed_pool_is_gone_and_its_device_falls_back_to_the_default() {
        let mut t = PoolTable::default();
        let d = t.default_pool(0);
        let own = t.create(0);
        t.set_current(0, own).unwrap();
        t.record_alloc(own, 0x1000, MIB, 1).unwrap();
        t.destroy(own).unwrap();
        assert_eq!(t.check(own), Err(Status::INVALID_VALUE));
        assert_eq!(t.current_pool(0), d);
        assert_eq!(t.destroy(own), Err(Status::INVALID_VALUE));
        // Freeing an allocation of the destroyed pool still works.
        assert_eq!(t.record_free(0x1000), Some(own));
    }

    #[test]
    fn a_pool_of_another_device_cannot_be_made_current() {
        let mut t = PoolTable::default();
        let other = t.create(1);
        assert_eq!(t.set_current(0, other), Err(Status::INVALID_DEVICE));
    }

    #[test]
    fn destroyed_context_releases_its_pool_allocations() {
        let mut t = PoolTable::default();
        let p = t.default_pool(0);
        t.record_alloc(p, 0x1000, MIB, 10).unwrap();
        t.record_alloc(p, 0x2000, 2 * MIB, 11).unwrap();
        t.forget_context(10);
        assert_eq!(t.get_attr(p, ATTR_USED_MEM_CURRENT), Ok(2 * MIB));
        assert_eq!(t.record_free(0x1000), None);
    }

    #[test]
    fn a_reused_address_replaces_the_stale_record() {
        let mut t = PoolTable::default();
        let p = t.default_pool(0);
        t.record_alloc(p, 0x1000, MIB, 1).unwrap();
        t.record_alloc(p, 0x1000, 2 * MIB, 1).unwrap();
        assert_eq!(t.get_attr(p, ATTR_USED_MEM_CURRENT), Ok(2 * MIB));
    }
}
