use super::*;

fn board() -> (tempfile::TempDir, Board) {
    let dir = tempfile::tempdir().unwrap();
    let board = Board::create(&dir.path().join("board")).unwrap();
    (dir, board)
}

#[test]
fn a_created_board_opens_in_another_mapping_and_shares_writes() {
    let (dir, created) = board();
    let opened = Board::open(&dir.path().join("board")).unwrap();
    created.slot(3).unwrap().assign(1, Class::BestEffort);
    opened.slot(3).unwrap().add_busy_ns(1234);
    let seen = created.slot(3).unwrap().snapshot();
    assert_eq!(seen.busy_ns, 1234);
    assert_eq!(seen.gpu, 1);
    assert_eq!(seen.class, Some(Class::BestEffort));
    assert_eq!(seen.generation, 1);
}

#[test]
fn opening_a_file_that_is_not_a_board_fails() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("junk");
    std::fs::write(&path, vec![0u8; crate::layout::BOARD_BYTES as usize]).unwrap();
    assert!(matches!(
        Board::open(&path),
        Err(BoardError::NotABoard { .. })
    ));
    std::fs::write(&path, b"short").unwrap();
    assert!(matches!(
        Board::open(&path),
        Err(BoardError::TooSmall { .. })
    ));
    assert!(matches!(
        Board::open(&dir.path().join("missing")),
        Err(BoardError::Open { .. })
    ));
}

#[test]
fn slots_beyond_the_board_are_refused() {
    let (_dir, b) = board();
    assert!(b.slot(MAX_SLOTS - 1).is_ok());
    assert!(matches!(b.slot(MAX_SLOTS), Err(BoardError::NoSuchSlot(64))));
}

#[test]
fn assignment_sets_the_class_grant_and_clears_counters() {
    let (_dir, b) = board();
    let s = b.slot(0).unwrap();
    s.assign(0, Class::BestEffort);
    s.add_launches(5);
    s.set_pid(77);
    assert_eq!(
        s.snapshot().grant,
        Grant {
            run: true,
            yield_to_lc: true,
            evict: false,
        }
    );
    s.assign(0, Class::LatencyCritical);
    let snap = s.snapshot();
    assert_eq!(snap.launches, 0);
    assert_eq!(snap.pid, 0);
    assert_eq!(snap.generation, 2);
    assert_eq!(
        snap.grant,
        Grant {
            run: true,
            yield_to_lc: false,
            evict: false,
        }
    );
    s.release();
    assert_eq!(s.snapshot().generation, 0);
    assert_eq!(s.snapshot().class, None);
}

#[test]
fn best_effort_holds_while_a_latency_critical_slot_on_its_gpu_is_busy() {
    let (_dir, b) = board();
    let lc = b.slot(1).unwrap();
    let be = b.slot(2).unwrap();
    let other_gpu_lc = b.slot(3).unwrap();
    lc.assign(0, Class::LatencyCritical);
    be.assign(0, Class::BestEffort);
    other_gpu_lc.assign(1, Class::LatencyCritical);
    assert!(be.may_dispatch());
    other_gpu_lc.set_busy(true);
    assert!(be.may_dispatch(), "LC work on another GPU must not hold it");
    lc.set_busy(true);
    assert_eq!(b.lc_busy_mask(0), 1 << 1);
    assert!(!be.may_dispatch());
    assert!(lc.may_dispatch(), "LC never waits for anyone");
    lc.set_busy(false);
    assert!(be.may_dispatch());
    assert_eq!(b.lc_busy_mask(0), 0);
}

#[test]
fn best_effort_busy_does_not_touch_the_latency_critical_mask() {
    let (_dir, b) = board();
    let be = b.slot(4).unwrap();
    be.assign(0, Class::BestEffort);
    be.set_busy(true);
    assert!(be.snapshot().busy);
    assert_eq!(b.lc_busy_mask(0), 0);
}

#[test]
fn clearing_a_dead_latency_critical_backend_releases_best_effort() {
    let (_dir, b) = board();
    let lc = b.slot(0).unwrap();
    let be = b.slot(1).unwrap();
    lc.assign(0, Class::LatencyCritical);
    be.assign(0, Class::BestEffort);
    lc.set_busy(true);
    assert!(!be.may_dispatch());
    lc.clear_busy();
    assert!(be.may_dispatch());
    assert!(!lc.snapshot().busy);
}

#[test]
fn a_withdrawn_grant_holds_until_given_back_and_counts_the_wait() {
    let (dir, b) = board();
    b.tick();
    let s = b.slot(5).unwrap();
    s.assign(0, Class::BestEffort);
    s.set_grant(Grant {
        run: false,
        yield_to_lc: true,
        evict: false,
    });
    assert!(!s.may_dispatch());
    let path = dir.path().join("board");
    let releaser = std::thread::spawn(move || {
        let other = Board::open(&path).unwrap();
        let slot = other.slot(5).unwrap();
        // Wait until the backend is blocked, then grant.
        while !slot.snapshot().waiting {
            other.tick();
            std::thread::yield_now();
        }
        slot.set_grant(Grant {
            run: true,
            yield_to_lc: true,
            evict: false,
        });
    });
    let waited = s.wait_to_dispatch(Some(Duration::from_secs(10)));
    releaser.join().unwrap();
    assert!(s.may_dispatch());
    assert!(waited < Duration::from_secs(10));
    let snap = s.snapshot();
    assert!(!snap.waiting);
    assert!(snap.busy, "a slot that waited has work");
    assert!(snap.throttled_ns > 0);
    assert_eq!(snap.throttled_ns, u64::try_from(waited.as_nanos()).unwrap());
}

#[test]
fn waiting_gives_up_at_the_timeout() {
    let (_dir, b) = board();
    b.tick();
    let s = b.slot(6).unwrap();
    s.assign(0, Class::BestEffort);
    s.set_grant(Grant::default());
    let waited = s.wait_to_dispatch(Some(Duration::from_millis(5)));
    assert!(waited >= Duration::from_millis(5));
    assert!(!s.may_dispatch());
}

#[test]
fn preemption_records_keep_the_last_and_the_largest() {
    let (_dir, b) = board();
    let s = b.slot(7).unwrap();
    s.record_preemption(300);
    s.record_preemption(900);
    s.record_preemption(100);
    let snap = s.snapshot();
    assert_eq!(snap.preempt_last_ns, 100);
    assert_eq!(snap.preempt_max_ns, 900);
}

#[test]
fn a_stale_scheduler_lets_waiting_backends_go() {
    let (_dir, b) = board();
    // Pretend the last tick was long ago.
    b.layout().header.tick_ns.store(
        monotonic_ns().saturating_sub(10_000_000_000),
        Ordering::Release,
    );
    assert!(b.scheduler_stale());
    let s = b.slot(8).unwrap();
    s.assign(0, Class::BestEffort);
    s.set_grant(Grant::default());
    let waited = s.wait_to_dispatch(Some(Duration::from_secs(10)));
    assert!(waited < Duration::from_secs(10));
}

#[test]
fn a_slot_stays_busy_while_any_of_its_workers_is() {
    let (_dir, b) = board();
    b.slot(2).unwrap().assign(0, Class::LatencyCritical);
    let w0 = b.worker_slot(2, 0).unwrap();
    let w5 = b.worker_slot(2, 5).unwrap();
    w0.set_busy(true);
    w5.set_busy(true);
    assert_eq!(b.lc_busy_mask(0), 1 << 2);
    w0.set_busy(false);
    assert!(w0.snapshot().busy, "worker 5 is still busy");
    assert_eq!(b.lc_busy_mask(0), 1 << 2, "the latency-critical bit stays");
    w5.set_busy(false);
    assert!(!w0.snapshot().busy);
    assert_eq!(b.lc_busy_mask(0), 0);
}

#[test]
fn clearing_a_dead_worker_keeps_the_others_flags() {
    let (_dir, b) = board();
    b.slot(1).unwrap().assign(0, Class::LatencyCritical);
    let live = b.worker_slot(1, 3).unwrap();
    let dead = b.worker_slot(1, 63).unwrap();
    dead.set_busy(true);
    dead.clear_worker();
    assert!(!live.snapshot().busy, "the dead worker's flag is gone");
    assert_eq!(b.lc_busy_mask(0), 0);
    live.set_busy(true);
    dead.set_busy(true);
    dead.clear_worker();
    assert!(live.snapshot().busy);
    assert_eq!(b.lc_busy_mask(0), 1 << 1);
}

#[test]
fn workers_beyond_the_mask_are_refused() {
    let (_dir, b) = board();
    assert!(b.worker_slot(0, MAX_WORKERS - 1).is_ok());
    assert!(matches!(
        b.worker_slot(0, MAX_WORKERS),
        Err(BoardError::NoSuchWorker(64))
    ));
}

#[test]
fn concurrent_workers_leave_the_latency_critical_bit_matching_the_busy_mask() {
    let (_dir, b) = board();
    b.slot(4).unwrap().assign(0, Class::LatencyCritical);
    let b = &b;
    std::thread::scope(|s| {
        for w in 0..4 {
            s.spawn(move || {
                let slot = b.worker_slot(4, w).unwrap();
                for i in 0..20_000 {
                    slot.set_busy(true);
                    // Worker 0 ends busy, the others idle.
                    if w != 0 || i + 1 < 20_000 {
                        slot.set_busy(false);
                    }
                }
            });
        }
    });
    assert!(b.slot(4).unwrap().snapshot().busy);
    assert_eq!(b.lc_busy_mask(0), 1 << 4, "busy, so marked");
    b.worker_slot(4, 0).unwrap().set_busy(false);
    assert_eq!(b.lc_busy_mask(0), 0);
}

#[test]
fn an_evict_grant_round_trips_and_memory_figures_are_published() {
    let (_dir, b) = board();
    let s = b.slot(7).unwrap();
    s.assign(0, Class::BestEffort);
    assert!(!s.evict_requested());
    s.set_grant(Grant {
        run: true,
        yield_to_lc: true,
        evict: true,
    });
    assert!(s.evict_requested());
    assert!(
        s.may_dispatch(),
        "eviction is separate from the compute grant"
    );
    s.set_memory(3 << 20, 5 << 20);
    s.add_reclaim();
    let snap = s.snapshot();
    assert_eq!(
        (snap.mem_resident, snap.mem_swapped, snap.reclaims),
        (3 << 20, 5 << 20, 1)
    );
    s.assign(0, Class::BestEffort);
    let snap = s.snapshot();
    assert_eq!(
        (snap.mem_resident, snap.mem_swapped, snap.reclaims),
        (0, 0, 0)
    );
}

#[test]
fn a_memory_limit_set_by_the_scheduler_is_seen_by_the_backend_until_reassignment() {
    let (dir, b) = board();
    let backend = Board::open(&dir.path().join("board")).unwrap();
    let slot = b.slot(5).unwrap();
    slot.assign(0, Class::BestEffort);
    assert_eq!(backend.worker_slot(5, 2).unwrap().memory_limit(), None);
    slot.set_memory_limit(3 << 30);
    assert_eq!(
        backend.worker_slot(5, 2).unwrap().memory_limit(),
        Some(3 << 30)
    );
    assert_eq!(slot.snapshot().mem_limit, 3 << 30);
    slot.assign(0, Class::BestEffort);
    assert_eq!(backend.slot(5).unwrap().memory_limit(), None);
}
