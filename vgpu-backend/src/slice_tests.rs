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

#[test]
fn workers_sharing_the_counters_hold_one_limit_together() {
    let (main, fd) = SliceMemory::create_shared(100).unwrap();
    let a = SliceMemory::open_shared(&fd, 1).unwrap();
    let b = SliceMemory::open_shared(&fd, 2).unwrap();
    assert_eq!(a.limit(), 100);
    assert!(a.try_reserve(70));
    assert!(!b.try_reserve(31), "only 30 bytes are left for the slice");
    assert!(b.try_reserve(30));
    assert_eq!(main.used(), 100);
    assert_eq!((a.used_here(), b.used_here()), (70, 30));
    a.release(70);
    assert_eq!(b.free(), 70);
}

#[test]
fn a_dead_workers_bytes_are_given_back_exactly() {
    let (main, fd) = SliceMemory::create_shared(1 << 20).unwrap();
    let dead = SliceMemory::open_shared(&fd, 5).unwrap();
    let live = SliceMemory::open_shared(&fd, 6).unwrap();
    assert!(dead.try_reserve(4096));
    assert!(live.try_reserve(8192));
    main.forget_worker(5);
    assert_eq!(main.used(), 8192);
    assert_eq!(live.used_here(), 8192);
}

#[test]
fn a_worker_that_died_holding_the_lock_does_not_block_the_slice() {
    let (main, fd) = SliceMemory::create_shared(1000).unwrap();
    let dead = SliceMemory::open_shared(&fd, 3).unwrap();
    let live = SliceMemory::open_shared(&fd, 4).unwrap();
    assert!(dead.try_reserve(100));
    // It died inside its critical section, after counting its row but before the total.
    let held = dead.lock();
    dead.counters().used[3].fetch_add(50, Ordering::AcqRel);
    std::mem::forget(held);
    main.forget_worker(3);
    assert_eq!(main.used(), 0);
    assert!(live.try_reserve(1000), "the whole limit is free again");
}

#[test]
fn opening_shared_counters_checks_the_worker_and_the_file() {
    let (_main, fd) = SliceMemory::create_shared(10).unwrap();
    assert!(SliceMemory::open_shared(&fd, MAX_WORKERS).is_err());
    let small = tempfile::tempfile().unwrap();
    assert!(SliceMemory::open_shared(&small, 0).is_err());
}

#[test]
fn residency_sums_the_workers_and_forgets_a_dead_one() {
    let (main, fd) = SliceMemory::create_shared(1 << 30).unwrap();
    let a = SliceMemory::open_shared(&fd, 1).unwrap();
    let b = SliceMemory::open_shared(&fd, 2).unwrap();
    a.set_residency_here(4 << 20, 0);
    b.set_residency_here(2 << 20, 6 << 20);
    assert_eq!(main.residency(), (6 << 20, 6 << 20));
    main.forget_worker(2);
    assert_eq!(main.residency(), (4 << 20, 0));
}
