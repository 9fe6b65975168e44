//! Tests of `heap.rs`: with a fake [`ChunkMemory`] that counts calls and injects failures, and
//! with [`HostChunks`] where every byte can be checked.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use super::*;
use crate::elastic::HostChunks;

const BASE: u64 = 0x10_0000_0000;

/// What the fake saw, shared with the test after the heap owns the fake.
#[derive(Default)]
struct Log {
    /// Mapped extents: start -> length.
    mapped: BTreeMap<u64, u64>,
    saved: BTreeMap<u64, u64>,
    /// Every map and unmap call, in order: (start, length).
    map_calls: Vec<Extent>,
    unmap_calls: Vec<Extent>,
    /// The extents of the last save.
    last_save: Vec<Extent>,
    discards: usize,
    released: bool,
    /// Maps fail with OUT_OF_MEMORY when they would take the chunks mapped past this.
    map_limit: Option<u64>,
    fail_restore: bool,
    fail_save: bool,
    /// Unmaps fail (and leave the extent mapped) while set.
    fail_unmap: bool,
    /// `settle` calls, and whether the next one fails.
    settles: usize,
    fail_settle: bool,
}

impl Log {
    fn mapped_chunks(&self) -> u64 {
        self.mapped.values().map(|len| len / CHUNK).sum()
    }
    fn maps(&self) -> usize {
        self.map_calls.len()
    }
    fn unmaps(&self) -> usize {
        self.unmap_calls.len()
    }
}

/// Whether `[va, va + len)` overlaps an extent of `extents`.
fn overlaps(extents: &BTreeMap<u64, u64>, va: u64, len: u64) -> bool {
    extents.iter().any(|(&s, &l)| s < va + len && va < s + l)
}

struct Fake(Arc<Mutex<Log>>);

impl ChunkMemory for Fake {
    fn reserve(&mut self, _size: u64) -> GpuResult<u64> {
        Ok(BASE)
    }
    fn release_reservation(&mut self, base: u64, _size: u64) {
        let mut log = self.0.lock().unwrap();
        assert_eq!(base, BASE);
        assert!(
            log.mapped.is_empty() && log.saved.is_empty(),
            "released with extents"
        );
        log.released = true;
    }
    fn map(&mut self, va: u64, len: u64) -> GpuResult<()> {
        let mut log = self.0.lock().unwrap();
        assert_eq!(va % CHUNK, 0);
        assert!(len > 0 && len.is_multiple_of(CHUNK));
        if log
            .map_limit
            .is_some_and(|l| log.mapped_chunks() + len / CHUNK > l)
        {
            return Err(Status::OUT_OF_MEMORY);
        }
        assert!(
            !overlaps(&log.mapped, va, len) && !overlaps(&log.saved, va, len),
            "mapped over an extent"
        );
        log.mapped.insert(va, len);
        log.map_calls.push((va, len));
        Ok(())
    }
    fn settle(&mut self) -> GpuResult<()> {
        let mut log = self.0.lock().unwrap();
        log.settles += 1;
        if log.fail_settle {
            return Err(Status::UNKNOWN);
        }
        Ok(())
    }
    fn unmap(&mut self, va: u64, len: u64) -> GpuResult<()> {
        let mut log = self.0.lock().unwrap();
        assert_eq!(
            log.mapped.get(&va),
            Some(&len),
            "unmapped other than mapped"
        );
        if log.fail_unmap {
            return Err(Status::UNKNOWN);
        }
        log.mapped.remove(&va);
        log.unmap_calls.push((va, len));
        Ok(())
    }
    fn save(&mut self, extents: &[Extent]) -> GpuResult<()> {
        let mut log = self.0.lock().unwrap();
        if log.fail_save {
            return Err(Status::OUT_OF_MEMORY);
        }
        for &(va, len) in extents {
            assert_eq!(log.mapped.remove(&va), Some(len));
            log.saved.insert(va, len);
        }
        log.last_save = extents.to_vec();
        Ok(())
    }
    fn restore(&mut self, extents: &[Extent]) -> GpuResult<()> {
        let mut log = self.0.lock().unwrap();
        if log.fail_restore {
            return Err(Status::OUT_OF_MEMORY);
        }
        for &(va, len) in extents {
            assert_eq!(log.saved.remove(&va), Some(len));
            log.mapped.insert(va, len);
        }
        Ok(())
    }
    fn discard(&mut self, va: u64) {
        let mut log = self.0.lock().unwrap();
        assert!(log.saved.remove(&va).is_some());
        log.discards += 1;
    }
}

fn fake(capacity: u64) -> (ElasticHeap<Fake>, Arc<Mutex<Log>>) {
    let log = Arc::new(Mutex::new(Log::default()));
    let heap = ElasticHeap::new(Fake(Arc::clone(&log)), capacity).unwrap();
    (heap, log)
}

fn host_heap(capacity: u64) -> ElasticHeap<HostChunks> {
    let window = capacity.next_multiple_of(CHUNK);
    ElasticHeap::new(HostChunks::new(0x7f00_0000_0000, window), capacity).unwrap()
}

/// A byte pattern unique to (allocation, offset), generated a word at a time (tests run
/// unoptimized).
fn pattern(seed: u64, len: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len as usize + 8);
    for i in 0..len.div_ceil(8) {
        let word = (seed << 40) ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        out.extend_from_slice(&word.to_le_bytes());
    }
    out.truncate(len as usize);
    out
}

fn fill(heap: &mut ElasticHeap<HostChunks>, addr: u64, seed: u64) {
    let (start, size) = heap.find(addr, 1).unwrap();
    assert_eq!(start, addr);
    let bytes = heap.memory_mut().slice_mut(addr, size).unwrap();
    bytes.copy_from_slice(&pattern(seed, size));
}

fn check(heap: &ElasticHeap<HostChunks>, addr: u64, seed: u64) {
    let (_, size) = heap.find(addr, 1).unwrap();
    let bytes = heap.memory().slice(addr, size).unwrap();
    assert!(
        bytes == pattern(seed, size).as_slice(),
        "allocation {addr:#x} (seed {seed}) lost bytes"
    );
}

#[test]
fn capacity_rounds_up_to_whole_chunks_and_nothing_is_mapped_at_first() {
    let (heap, log) = fake(CHUNK + 1);
    assert_eq!(heap.capacity(), 2 * CHUNK);
    assert_eq!(heap.base(), BASE);
    assert_eq!(heap.resident_bytes(), 0);
    assert_eq!(log.lock().unwrap().maps(), 0);
}

#[test]
fn small_allocations_share_a_chunk_and_are_512_aligned() {
    let (mut heap, log) = fake(8 * CHUNK);
    let a = heap.alloc(1).unwrap();
    let b = heap.alloc(1000).unwrap();
    let c = heap.alloc(512).unwrap();
    assert_eq!(a, BASE);
    assert_eq!(b, BASE + 512);
    assert_eq!(c, BASE + 512 + 1024);
    assert!([a, b, c].iter().all(|p| p % ALLOC_ALIGN == 0));
    assert_eq!(log.lock().unwrap().map_calls, vec![(BASE, CHUNK)]);
    assert_eq!(heap.resident_bytes(), CHUNK);
    assert_eq!(heap.allocated_bytes(), 1513);
}

#[test]
fn a_large_allocations_tail_is_not_shared_with_small_ones() {
    let (mut heap, log) = fake(8 * CHUNK);
    let small = heap.alloc(100).unwrap();
    let big = heap.alloc(CHUNK + CHUNK / 2).unwrap();
    assert_eq!(big % CHUNK, 0);
    assert_eq!(big, BASE + CHUNK);
    assert_eq!(
        log.lock().unwrap().map_calls,
        vec![(BASE, CHUNK), (big, 2 * CHUNK)]
    );
    // First fit: the rest of the first chunk, then past the big one's extent (not its tail).
    assert_eq!(heap.alloc(CHUNK - 512).unwrap(), small + 512);
    let after = heap.alloc(1024).unwrap();
    assert_eq!(after, big + 2 * CHUNK);
    assert_eq!(log.lock().unwrap().maps(), 3);
    // Freeing the big one unmaps its whole extent although a small one follows it.
    heap.free(big).unwrap();
    assert_eq!(log.lock().unwrap().unmap_calls, vec![(big, 2 * CHUNK)]);
    assert_eq!(heap.resident_bytes(), 2 * CHUNK);
}

#[test]
fn a_large_allocation_maps_one_extent_with_one_map_call() {
    let (mut heap, log) = fake(64 * CHUNK);
    let big = heap.alloc(20 * CHUNK + 1).unwrap();
    assert_eq!(big, BASE);
    let l = log.lock().unwrap();
    assert_eq!(l.map_calls, vec![(BASE, 21 * CHUNK)]);
    assert_eq!(l.settles, 1);
    drop(l);
    assert_eq!(heap.resident_bytes(), 21 * CHUNK);
    assert_eq!(heap.find(big, 20 * CHUNK + 1), Some((big, 20 * CHUNK + 1)));
    assert_eq!(
        heap.find(big, 20 * CHUNK + 2),
        None,
        "the tail is not allocated"
    );
}

#[test]
fn freeing_a_large_allocation_unmaps_its_extent_with_one_unmap_call() {
    let (mut heap, log) = fake(64 * CHUNK);
    let a = heap.alloc(6 * CHUNK).unwrap();
    let b = heap.alloc(3 * CHUNK + 100).unwrap();
    assert_eq!(heap.free(b), Ok(3 * CHUNK + 100));
    assert_eq!(log.lock().unwrap().unmap_calls, vec![(b, 4 * CHUNK)]);
    assert_eq!(heap.free(a), Ok(6 * CHUNK));
    let l = log.lock().unwrap();
    assert_eq!(l.unmap_calls, vec![(b, 4 * CHUNK), (a, 6 * CHUNK)]);
    assert!(l.mapped.is_empty());
    drop(l);
    assert_eq!(heap.resident_bytes(), 0);
}

#[test]
fn a_small_allocation_straddling_two_chunks_keeps_both_until_freed() {
    let (mut heap, log) = fake(8 * CHUNK);
    let a = heap.alloc(CHUNK / 2).unwrap();
    let b = heap.alloc(CHUNK * 3 / 4).unwrap();
    assert_eq!(b, a + CHUNK / 2);
    assert_eq!(
        log.lock().unwrap().map_calls,
        vec![(BASE, CHUNK), (BASE + CHUNK, CHUNK)]
    );
    heap.free(a).unwrap();
    assert_eq!(
        log.lock().unwrap().unmaps(),
        0,
        "b still uses the first chunk"
    );
    heap.free(b).unwrap();
    assert_eq!(log.lock().unwrap().unmaps(), 2);
    assert_eq!(heap.resident_bytes(), 0);
}

#[test]
fn an_extent_left_mapped_by_a_failed_unmap_is_reused_or_unmapped_before_its_addresses_are() {
    let (mut heap, log) = fake(16 * CHUNK);
    let big = heap.alloc(4 * CHUNK).unwrap();
    log.lock().unwrap().fail_unmap = true;
    heap.free(big).unwrap();
    assert_eq!(heap.resident_bytes(), 4 * CHUNK, "kept, and counted");
    log.lock().unwrap().fail_unmap = false;
    // The same extent again: reused as it is.
    assert_eq!(heap.alloc(4 * CHUNK), Ok(big));
    assert_eq!(log.lock().unwrap().maps(), 1);
    log.lock().unwrap().fail_unmap = true;
    heap.free(big).unwrap();
    log.lock().unwrap().fail_unmap = false;
    // A small allocation at its start: the leftover goes first, then one chunk is mapped.
    let small = heap.alloc(100).unwrap();
    assert_eq!(small, big);
    let l = log.lock().unwrap();
    assert_eq!(l.unmap_calls, vec![(big, 4 * CHUNK)]);
    assert_eq!(l.map_calls.last(), Some(&(big, CHUNK)));
    drop(l);
    assert_eq!(heap.resident_bytes(), CHUNK);
}

#[test]
fn a_chunk_is_unmapped_when_its_last_allocation_goes() {
    let (mut heap, log) = fake(8 * CHUNK);
    let a = heap.alloc(4096).unwrap();
    let b = heap.alloc(4096).unwrap();
    assert_eq!(heap.free(a), Ok(4096));
    assert_eq!(log.lock().unwrap().unmaps(), 0);
    assert_eq!(heap.free(b), Ok(4096));
    assert_eq!(log.lock().unwrap().unmap_calls, vec![(BASE, CHUNK)]);
    assert_eq!(heap.resident_bytes(), 0);
    // Freed space is whole again: a range-sized allocation fits.
    let all = heap.alloc(8 * CHUNK).unwrap();
    assert_eq!(all, BASE);
}

#[test]
fn freeing_an_unknown_address_returns_invalid_value() {
    let (mut heap, _log) = fake(2 * CHUNK);
    let a = heap.alloc(1024).unwrap();
    assert_eq!(heap.free(a + 512), Err(Status::INVALID_VALUE));
    assert_eq!(heap.free(0), Err(Status::INVALID_VALUE));
    heap.free(a).unwrap();
    assert_eq!(heap.free(a), Err(Status::INVALID_VALUE));
}

#[test]
fn zero_sized_allocations_return_invalid_value() {
    let (mut heap, _log) = fake(2 * CHUNK);
    assert_eq!(heap.alloc(0), Err(Status::INVALID_VALUE));
}

#[test]
fn find_returns_the_allocation_containing_the_whole_range() {
    let (mut heap, _log) = fake(2 * CHUNK);
    let a = heap.alloc(100).unwrap();
    let b = heap.alloc(100).unwrap();
    assert_eq!(heap.find(a + 10, 90), Some((a, 100)));
    assert_eq!(heap.find(a + 10, 91), None, "runs past the allocation");
    assert_eq!(heap.find(a + 200, 1), None, "in the padding");
    assert_eq!(heap.find(b, 100), Some((b, 100)));
    assert_eq!(heap.find(BASE - 1, 1), None);
    assert_eq!(heap.find(a, u64::MAX), None);
}

#[test]
fn a_full_range_returns_out_of_memory_and_keeps_other_allocations() {
    let mut heap = host_heap(4 * CHUNK);
    let a = heap.alloc(3 * CHUNK).unwrap();
    fill(&mut heap, a, 1);
    let b = heap.alloc(CHUNK / 2).unwrap();
    fill(&mut heap, b, 2);
    assert_eq!(heap.alloc(CHUNK), Err(Status::OUT_OF_MEMORY));
    assert_eq!(heap.alloc(u64::MAX), Err(Status::OUT_OF_MEMORY));
    check(&heap, a, 1);
    check(&heap, b, 2);
    assert_eq!(heap.allocation_count(), 2);
    // What is left still serves a fitting allocation.
    let c = heap.alloc(CHUNK / 2).unwrap();
    assert_eq!(c, b + CHUNK / 2);
}

#[test]
fn a_failed_map_leaves_nothing_half_done() {
    let (mut heap, log) = fake(8 * CHUNK);
    let a = heap.alloc(100).unwrap();
    log.lock().unwrap().map_limit = Some(3);
    // Needs one extent of 4 chunks, more than the 2 left: nothing is mapped.
    assert_eq!(heap.alloc(4 * CHUNK), Err(Status::OUT_OF_MEMORY));
    {
        let log = log.lock().unwrap();
        assert_eq!(log.mapped_chunks(), 1);
        assert_eq!((log.maps(), log.unmaps()), (1, 0));
    }
    assert_eq!(heap.resident_bytes(), CHUNK);
    assert_eq!(heap.find(a, 100), Some((a, 100)));
    // The range is still free: the same allocation works once memory is there.
    log.lock().unwrap().map_limit = None;
    assert_eq!(heap.alloc(4 * CHUNK).unwrap(), BASE + CHUNK);
}

#[test]
fn swap_out_and_in_move_every_resident_extent_whole() {
    let (mut heap, log) = fake(8 * CHUNK);
    heap.alloc(3 * CHUNK).unwrap();
    heap.alloc(100).unwrap();
    assert_eq!(heap.swap_out(), Ok(4 * CHUNK));
    assert_eq!(
        log.lock().unwrap().last_save,
        vec![(BASE, 3 * CHUNK), (BASE + 3 * CHUNK, CHUNK)]
    );
    assert!(heap.is_swapped());
    assert_eq!(
        (heap.resident_bytes(), heap.swapped_bytes()),
        (0, 4 * CHUNK)
    );
    assert_eq!(log.lock().unwrap().saved.len(), 2);
    assert_eq!(heap.swap_out(), Ok(0), "nothing left to move");
    assert_eq!(heap.swap_in(), Ok(4 * CHUNK));
    assert!(!heap.is_swapped());
    assert_eq!(
        (heap.resident_bytes(), heap.swapped_bytes()),
        (4 * CHUNK, 0)
    );
    assert_eq!(heap.swap_in(), Ok(0));
}

#[test]
fn a_failed_save_leaves_the_heap_resident() {
    let (mut heap, log) = fake(4 * CHUNK);
    heap.alloc(100).unwrap();
    log.lock().unwrap().fail_save = true;
    assert_eq!(heap.swap_out(), Err(Status::OUT_OF_MEMORY));
    assert!(!heap.is_swapped());
    assert_eq!(heap.resident_bytes(), CHUNK);
}

#[test]
fn swap_in_out_of_memory_stays_swapped_and_a_later_swap_in_succeeds() {
    let (mut heap, log) = fake(4 * CHUNK);
    let a = heap.alloc(100).unwrap();
    heap.swap_out().unwrap();
    log.lock().unwrap().fail_restore = true;
    assert_eq!(heap.swap_in(), Err(Status::OUT_OF_MEMORY));
    assert!(heap.is_swapped());
    assert_eq!(heap.swapped_bytes(), CHUNK);
    // Allocating needs the memory back, and fails the same way.
    assert_eq!(heap.alloc(100), Err(Status::OUT_OF_MEMORY));
    assert_eq!(heap.allocation_count(), 1);
    log.lock().unwrap().fail_restore = false;
    assert_eq!(heap.swap_in(), Ok(CHUNK));
    assert_eq!(heap.find(a, 100), Some((a, 100)));
}

#[test]
fn freeing_while_swapped_out_discards_the_saved_extent() {
    let (mut heap, log) = fake(4 * CHUNK);
    let a = heap.alloc(100).unwrap();
    let big = heap.alloc(2 * CHUNK).unwrap();
    heap.swap_out().unwrap();
    assert_eq!(heap.free(big), Ok(2 * CHUNK));
    assert_eq!(log.lock().unwrap().discards, 1);
    assert_eq!(heap.swapped_bytes(), CHUNK);
    assert!(heap.is_swapped());
    assert_eq!(heap.swap_in(), Ok(CHUNK));
    assert_eq!(heap.find(a, 1), Some((a, 100)));
}

#[test]
fn allocating_while_swapped_out_swaps_in_first() {
    let (mut heap, log) = fake(4 * CHUNK);
    heap.alloc(100).unwrap();
    heap.swap_out().unwrap();
    let b = heap.alloc(100).unwrap();
    assert!(!heap.is_swapped());
    assert_eq!(b, BASE + 512);
    let log = log.lock().unwrap();
    assert!(log.saved.is_empty());
    assert_eq!(log.mapped_chunks(), 1);
}

#[test]
fn dropping_the_heap_unmaps_discards_and_releases_everything() {
    let (mut heap, log) = fake(8 * CHUNK);
    heap.alloc(2 * CHUNK).unwrap();
    heap.swap_out().unwrap();
    heap.swap_in().unwrap();
    heap.alloc(CHUNK).unwrap();
    heap.swap_out().unwrap();
    heap.alloc(100).unwrap(); // swaps back in
    heap.swap_out().unwrap();
    let kept = heap.alloc(CHUNK).unwrap(); // resident again
    let _ = kept;
    heap.swap_out().unwrap();
    drop(heap);
    let log = log.lock().unwrap();
    assert!(log.released);
    assert!(log.mapped.is_empty() && log.saved.is_empty());
    assert_eq!(log.discards, 4, "four extents: 2 chunks, 1, 1 shared, 1");
}

#[test]
fn dropping_a_resident_heap_unmaps_every_extent() {
    let (mut heap, log) = fake(8 * CHUNK);
    heap.alloc(3 * CHUNK).unwrap();
    heap.alloc(10).unwrap();
    drop(heap);
    let log = log.lock().unwrap();
    assert!(log.released && log.mapped.is_empty());
    assert_eq!(
        log.unmap_calls,
        vec![(BASE, 3 * CHUNK), (BASE + 3 * CHUNK, CHUNK)]
    );
}

#[test]
fn every_byte_survives_many_swap_cycles_interleaved_with_alloc_and_free() {
    let mut heap = host_heap(64 * CHUNK);
    let mut live: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut seed = 1u64;
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for round in 0..16 {
        // A few allocations of mixed sizes, from 1 byte to 2 chunks.
        for _ in 0..4 {
            let size = match next() % 4 {
                0 => 1 + next() % 600,
                1 => 1 + next() % (64 << 10),
                2 => CHUNK / 2 + next() % CHUNK,
                _ => CHUNK + next() % CHUNK,
            };
            if let Ok(addr) = heap.alloc(size) {
                fill(&mut heap, addr, seed);
                live.push((addr, pattern(seed, size)));
                seed += 1;
            }
        }
        // Free about a third, some while swapped out.
        let swapped_first = round % 2 == 0;
        if swapped_first {
            heap.swap_out().unwrap();
            assert_eq!(heap.resident_bytes(), 0);
        }
        let mut i = 0;
        while i < live.len() {
            if next() % 3 == 0 {
                let (addr, _) = live.swap_remove(i);
                heap.free(addr).unwrap();
            } else {
                i += 1;
            }
        }
        if !swapped_first {
            heap.swap_out().unwrap();
        }
        let swapped = heap.swapped_bytes();
        assert_eq!(heap.swap_in().unwrap(), swapped);
        for (addr, expected) in &live {
            let bytes = heap.memory().slice(*addr, expected.len() as u64).unwrap();
            assert!(
                bytes == expected.as_slice(),
                "allocation {addr:#x} lost bytes"
            );
        }
        // No allocations overlap.
        let mut spans: Vec<(u64, u64)> = live
            .iter()
            .map(|(a, _)| (*a, heap.find(*a, 1).unwrap().1))
            .collect();
        spans.sort_unstable();
        assert!(spans.windows(2).all(|w| w[0].0 + w[0].1 <= w[1].0));
    }
    // Resident chunks are exactly those the live allocations' extents hold.
    let touched: HashSet<u64> = live
        .iter()
        .flat_map(|(a, _)| {
            let a = *a;
            let size = heap.find(a, 1).unwrap().1;
            let unit = if size >= CHUNK { CHUNK } else { ALLOC_ALIGN };
            chunks_of(a, size.next_multiple_of(unit))
        })
        .collect();
    assert_eq!(heap.resident_bytes(), touched.len() as u64 * CHUNK);
    assert_eq!(heap.memory().mapped_chunks(), touched.len());
}

#[test]
fn host_swap_in_out_of_memory_keeps_the_bytes_for_a_later_swap_in() {
    let mut heap = host_heap(8 * CHUNK);
    let a = heap.alloc(CHUNK + 5000).unwrap();
    fill(&mut heap, a, 7);
    let b = heap.alloc(300).unwrap();
    fill(&mut heap, b, 8);
    assert_eq!(b, a + 2 * CHUNK, "not in the tail of a's extent");
    assert_eq!(heap.swap_out(), Ok(3 * CHUNK));
    heap.memory_mut().set_budget(Some(2));
    assert_eq!(heap.swap_in(), Err(Status::OUT_OF_MEMORY));
    assert!(heap.is_swapped());
    assert_eq!(heap.memory().mapped_chunks(), 0);
    assert!(
        heap.memory().slice(b, 300).is_none(),
        "no host view while swapped"
    );
    heap.memory_mut().set_budget(None);
    assert_eq!(heap.swap_in(), Ok(3 * CHUNK));
    assert_eq!(heap.memory().mapped_extents(), 2);
    check(&heap, a, 7);
    check(&heap, b, 8);
}

#[test]
fn a_host_heap_at_its_budget_refuses_allocations_and_keeps_the_others() {
    let mut heap = host_heap(8 * CHUNK);
    heap.memory_mut().set_budget(Some(2));
    let a = heap.alloc(CHUNK).unwrap();
    fill(&mut heap, a, 3);
    let b = heap.alloc(1000).unwrap();
    fill(&mut heap, b, 4);
    assert_eq!(heap.alloc(CHUNK), Err(Status::OUT_OF_MEMORY));
    assert_eq!(heap.memory().mapped_chunks(), 2);
    check(&heap, a, 3);
    check(&heap, b, 4);
    // Small allocations still fit in the mapped chunk.
    let c = heap.alloc(1000).unwrap();
    assert_eq!(c, b + 1024);
}

#[test]
fn dropping_a_host_heap_releases_its_reservation() {
    let mut heap = host_heap(4 * CHUNK);
    let a = heap.alloc(100).unwrap();
    fill(&mut heap, a, 1);
    heap.swap_out().unwrap();
    drop(heap); // unmaps, discards and munmaps; Miri or ASan would flag a leak or misuse
}

#[test]
fn the_reservation_for_a_limit_leaves_room_for_alignment() {
    let limit = 10 * CHUNK + 123;
    let r = reservation_for_limit(limit);
    assert!(r >= limit + 16 * CHUNK && r.is_multiple_of(CHUNK));
    assert_eq!(reservation_for_limit(u64::MAX) % CHUNK, 0);
}

#[test]
fn an_allocation_settles_its_new_chunks_once_and_a_failed_settle_undoes_them() {
    let (mut heap, log) = fake(64 * CHUNK);
    heap.alloc(5 * CHUNK).unwrap();
    assert_eq!(
        log.lock().unwrap().settles,
        1,
        "one wait for five new chunks"
    );
    heap.alloc(100).unwrap();
    heap.alloc(100).unwrap();
    assert_eq!(
        log.lock().unwrap().settles,
        2,
        "a shared chunk needs no second wait"
    );
    log.lock().unwrap().fail_settle = true;
    assert_eq!(heap.alloc(3 * CHUNK), Err(Status::UNKNOWN));
    let l = log.lock().unwrap();
    assert_eq!(
        l.mapped_chunks(),
        6,
        "the extent of the failed allocation is unmapped"
    );
    assert_eq!(l.unmap_calls, vec![(BASE + 6 * CHUNK, 3 * CHUNK)]);
    drop(l);
    assert_eq!(heap.resident_bytes(), 6 * CHUNK);
}
