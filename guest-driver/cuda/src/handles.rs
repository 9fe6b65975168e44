//! Guest-side ids for streams and events. The application sees an id this
//! library chose, never the backend's handle: stream pointers 0, 1 and 2 are
//! the default streams (`CU_STREAM_LEGACY`, `CU_STREAM_PER_THREAD`), so a
//! backend handle cannot be handed out as a pointer value unchanged, and a
//! table lookup also rejects stale or made-up handles locally.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::state::lock;

/// Ids start well above the special stream values and are 16-aligned, so
/// they look like the pointers they stand for.
const FIRST_ID: usize = 0x1000;
const ID_STRIDE: usize = 0x10;
static NEXT_ID: AtomicUsize = AtomicUsize::new(0);

/// What a guest id stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    /// The backend's handle.
    pub backend: u64,
    /// The context it was created in.
    pub ctx: u64,
}

/// Guest ids of one kind of object.
#[derive(Debug, Default)]
pub(crate) struct HandleTable {
    entries: Mutex<HashMap<usize, Entry>>,
}

impl HandleTable {
    /// Registers a backend handle; returns the pointer the application gets.
    pub(crate) fn insert(&self, backend: u64, ctx: u64) -> *mut c_void {
        let id = FIRST_ID + NEXT_ID.fetch_add(1, Ordering::Relaxed) * ID_STRIDE;
        lock(&self.entries).insert(id, Entry { backend, ctx });
        std::ptr::without_provenance_mut(id)
    }

    /// What the application's pointer stands for, if it is live.
    pub(crate) fn get(&self, ptr: *mut c_void) -> Option<Entry> {
        lock(&self.entries).get(&ptr.addr()).copied()
    }

    /// Forgets the pointer, returning what it stood for.
    pub(crate) fn remove(&self, ptr: *mut c_void) -> Option<Entry> {
        lock(&self.entries).remove(&ptr.addr())
    }

    /// Forgets everything created in a context (destroyed with it).
    pub(crate) fn forget_context(&self, ctx: u64) {
        lock(&self.entries).retain(|_, entry| entry.ctx != ctx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_ids_are_never_default_stream_values_and_map_back() {
        let table = HandleTable::default();
        let a = table.insert(1, 7);
        let b = table.insert(2, 7);
        assert_ne!(a, b);
        for p in [a, b] {
            assert!(p.addr() >= FIRST_ID);
            assert_eq!(p.addr() % ID_STRIDE, 0);
        }
        assert_eq!(table.get(a), Some(Entry { backend: 1, ctx: 7 }));
        assert_eq!(table.get(b).map(|e| e.backend), Some(2));
        assert_eq!(table.get(std::ptr::without_provenance_mut(0x2)), None);
    }

    #[test]
    fn removed_and_context_destroyed_ids_are_gone() {
        let table = HandleTable::default();
        let a = table.insert(5, 1);
        let b = table.insert(6, 2);
        let c = table.insert(7, 2);
        assert_eq!(table.remove(a).map(|e| e.backend), Some(5));
        assert_eq!(table.get(a), None);
        table.forget_context(2);
        assert_eq!(table.get(b), None);
        assert_eq!(table.get(c), None);
    }
}
