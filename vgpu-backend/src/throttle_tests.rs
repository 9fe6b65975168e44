//! Tests of `throttle.rs`, against a real board in a temporary file.

use std::time::Instant;

use vgpu_board::Grant;

use super::*;

struct Fixture {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    board: Board,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("board");
    let board = Board::create(&path).unwrap();
    Fixture {
        _dir: dir,
        path,
        board,
    }
}

impl Fixture {
    fn throttle(&self, index: usize, class: Class) -> Arc<Throttle> {
        self.board.slot(index).unwrap().assign(0, class);
        Arc::new(Throttle::open(&self.path, index, DEFAULT_MAX_INFLIGHT).unwrap())
    }

    fn slot(&self, index: usize) -> Slot<'_> {
        self.board.slot(index).unwrap()
    }
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_micros(200));
    }
}

const HOLD: Grant = Grant {
    run: false,
    yield_to_lc: true,
    evict: false,
};
const RUN: Grant = Grant {
    run: true,
    yield_to_lc: true,
    evict: false,
};

#[test]
fn opening_a_slot_records_the_pid_and_a_heartbeat() {
    let f = fixture();
    let t = f.throttle(2, Class::BestEffort);
    let s = f.slot(2).snapshot();
    assert_eq!(s.pid, std::process::id());
    assert!(s.heartbeat_ns > 0);
    assert!(t.enabled());
    assert!(!t.latency_critical());
    assert!(Throttle::open(&f.path, MAX_SLOTS_PLUS_ONE, DEFAULT_MAX_INFLIGHT).is_err());
}

const MAX_SLOTS_PLUS_ONE: usize = vgpu_board::MAX_SLOTS + 1;

#[test]
fn a_held_slot_blocks_dispatch_until_granted() {
    let f = fixture();
    let t = f.throttle(0, Class::BestEffort);
    f.slot(0).set_grant(HOLD);
    let gated = Arc::new(AtomicBool::new(false));
    let worker = {
        let (t, gated) = (t.clone(), gated.clone());
        std::thread::spawn(move || {
            let _batch = t.batch();
            t.gate();
            gated.store(true, Ordering::SeqCst);
        })
    };
    wait_until("the worker to wait", || f.slot(0).snapshot().waiting);
    let held_since = Instant::now();
    while held_since.elapsed() < Duration::from_millis(20) {
        f.board.tick();
        assert!(!gated.load(Ordering::SeqCst), "dispatched without a grant");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(f.slot(0).snapshot().busy, "a held slot with work is busy");
    f.slot(0).set_grant(RUN);
    worker.join().unwrap();
    assert!(gated.load(Ordering::SeqCst));
    let s = f.slot(0).snapshot();
    assert!(
        s.throttled_ns >= 20_000_000,
        "throttled {} ns",
        s.throttled_ns
    );
    assert!(!s.waiting);
    // The batch ended with nothing in flight: no longer busy.
    assert!(!s.busy);
}

#[test]
fn the_latency_critical_bit_is_set_by_work_and_cleared_when_it_completes() {
    let f = fixture();
    let lc = f.throttle(1, Class::LatencyCritical);
    let be = f.throttle(2, Class::BestEffort);
    assert!(lc.latency_critical());
    let batch = lc.batch();
    lc.gate();
    assert_eq!(f.board.lc_busy_mask(0), 1 << 1);
    assert!(!f.slot(2).may_dispatch(), "best-effort must yield");
    lc.inflight_begin(1);
    drop(batch);
    assert_eq!(f.board.lc_busy_mask(0), 1 << 1, "work still in flight");
    lc.inflight_end(1);
    assert_eq!(f.board.lc_busy_mask(0), 0);
    assert!(f.slot(2).may_dispatch());
    // Best-effort work passes the gate at once now.
    let _b = be.batch();
    let t = Instant::now();
    be.gate();
    assert!(t.elapsed() < Duration::from_millis(50));
}

#[test]
fn a_latency_critical_slot_dispatches_while_others_are_held() {
    let f = fixture();
    let lc = f.throttle(0, Class::LatencyCritical);
    let other = f.throttle(1, Class::LatencyCritical);
    let _b = other.batch();
    other.gate();
    assert_ne!(f.board.lc_busy_mask(0), 0);
    let _a = lc.batch();
    let t = Instant::now();
    lc.gate();
    assert!(t.elapsed() < Duration::from_millis(50));
    assert!(!f.slot(0).snapshot().waiting);
}

#[test]
fn preemption_latency_runs_from_withdrawal_to_drain() {
    let f = fixture();
    let t = f.throttle(3, Class::BestEffort);
    let batch = t.batch();
    t.gate();
    t.inflight_begin(2);
    drop(batch);
    f.slot(3).set_grant(HOLD);
    let mut heartbeat = 0;
    assert!(
        t.monitor_step(&mut heartbeat),
        "busy while work is in flight"
    );
    std::thread::sleep(Duration::from_millis(3));
    t.inflight_end(1);
    assert_eq!(t.preemption_ns(), (0, 0), "not drained yet");
    t.inflight_end(1);
    let (last, max) = t.preemption_ns();
    assert!(last >= 3_000_000, "measured {last} ns");
    assert_eq!(last, max);
    let s = f.slot(3).snapshot();
    assert_eq!((s.preempt_last_ns, s.preempt_max_ns), (last, max));
    assert!(!s.busy);
}

#[test]
fn a_grant_returned_before_the_drain_abandons_the_measurement() {
    let f = fixture();
    let t = f.throttle(3, Class::BestEffort);
    let _batch = t.batch();
    t.gate();
    t.inflight_begin(1);
    f.slot(3).set_grant(HOLD);
    let mut heartbeat = 0;
    t.monitor_step(&mut heartbeat);
    f.slot(3).set_grant(RUN);
    t.gate(); // new work goes out
    t.inflight_end(1);
    assert_eq!(t.preemption_ns(), (0, 0));
}

#[test]
fn usage_reaches_the_board() {
    let f = fixture();
    let t = f.throttle(4, Class::BestEffort);
    t.add_launches(3);
    t.add_copied(100, 7);
    t.add_busy_ns(5_000);
    let s = f.slot(4).snapshot();
    assert_eq!(
        (s.launches, s.htod_bytes, s.dtoh_bytes, s.busy_ns),
        (3, 100, 7, 5_000)
    );
    assert_eq!(
        t.usage(),
        Usage {
            busy_ns: 5_000,
            launches: 3,
            htod_bytes: 100,
            dtoh_bytes: 7
        }
    );
}

#[test]
fn the_monitor_clears_busy_and_heartbeats() {
    let f = fixture();
    let t = f.throttle(5, Class::LatencyCritical);
    t.gate(); // work outside a batch (as a test would): busy
    assert!(f.slot(5).snapshot().busy);
    let first = f.slot(5).snapshot().heartbeat_ns;
    let monitor = t.spawn_monitor().unwrap().unwrap();
    wait_until("busy to clear", || !f.slot(5).snapshot().busy);
    assert_eq!(f.board.lc_busy_mask(0), 0);
    wait_until("a heartbeat", || f.slot(5).snapshot().heartbeat_ns > first);
    drop(monitor);
}

#[test]
fn without_a_board_nothing_is_held_and_usage_is_still_counted() {
    let t = Throttle::disabled();
    assert!(!t.enabled());
    let _b = t.batch();
    t.gate();
    t.add_launches(1);
    assert_eq!(t.usage().launches, 1);
    assert!(t.spawn_monitor().unwrap().is_none());
}
