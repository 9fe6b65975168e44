//! The arbiter: a thread that, every tick, snapshots the attached slots of the grant board,
//! runs the policy and writes the grants back; and that measures each slot's utilization over
//! the last second and samples its preemption latencies ([`crate::preempt`]) for `/v1/util`.
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use vgpu_board::{monotonic_ns, Board, SlotSnapshot};

use crate::policy::{Policy, SliceInput};
use crate::preempt::{PreemptRing, PreemptStats};
use crate::slice::SliceClass;

/// How often utilization is sampled.
const UTIL_SAMPLE: Duration = Duration::from_millis(100);
/// Over how long utilization is measured.
const UTIL_SPAN_NS: u64 = 1_000_000_000;

/// What the policy needs to know about one attached slice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RosterEntry {
    /// Its board slot.
    pub slot: usize,
    /// GPU index.
    pub gpu: u32,
    /// Class.
    pub class: SliceClass,
    /// Guaranteed compute %.
    pub guarantee_pct: u32,
    /// Maximum compute %.
    pub max_pct: u32,
    /// Weight.
    pub weight: u32,
    /// Its memory is reclaimed: the grant carries `evict`.
    pub evict: bool,
}

/// The attached slices, as published by the registry and read by the arbiter every tick.
#[derive(Debug, Default)]
pub struct Roster(Mutex<Arc<Vec<RosterEntry>>>);

impl Roster {
    /// Replaces the roster.
    pub fn publish(&self, entries: Vec<RosterEntry>) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Arc::new(entries);
    }

    /// The current roster.
    pub fn current(&self) -> Arc<Vec<RosterEntry>> {
        Arc::clone(&self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// Utilization of one slot over the last second.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SlotUtil {
    /// The slot's generation it was measured for.
    pub generation: u64,
    /// GPU time, % of wall time.
    pub busy_pct: f64,
    /// Time held back, % of wall time.
    pub throttled_pct: f64,
    /// Preemptions seen (sampled every tick) and their latency percentiles.
    pub preempt: PreemptStats,
}

/// Per-slot utilization, written by the arbiter.
#[derive(Debug, Default)]
pub struct UtilTable(Mutex<HashMap<usize, SlotUtil>>);

impl UtilTable {
    /// Utilization of `slot` if measured for its current `generation`.
    pub fn get(&self, slot: usize, generation: u64) -> Option<SlotUtil> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&slot)
            .copied()
            .filter(|u| u.generation == generation)
    }

    fn replace(&self, table: HashMap<usize, SlotUtil>) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = table;
    }
}

/// (time, busy_ns, throttled_ns) samples of one slot.
#[derive(Debug, Default)]
struct UtilHistory {
    generation: u64,
    samples: VecDeque<(u64, u64, u64)>,
}

impl UtilHistory {
    fn sample(&mut self, now: u64, generation: u64, busy: u64, throttled: u64) -> SlotUtil {
        if generation != self.generation {
            self.generation = generation;
            self.samples.clear();
        }
        self.samples.push_back((now, busy, throttled));
        while self.samples.len() > 2 && self.samples[1].0 <= now.saturating_sub(UTIL_SPAN_NS) {
            self.samples.pop_front();
        }
        let (t0, b0, th0) = self
            .samples
            .front()
            .copied()
            .unwrap_or((now, busy, throttled));
        let dt = now.saturating_sub(t0);
        let pct = |d: u64| {
            if dt == 0 {
                0.0
            } else {
                (d as f64 * 100.0 / dt as f64).min(100.0)
            }
        };
        SlotUtil {
            generation,
            busy_pct: pct(busy.saturating_sub(b0)),
            throttled_pct: pct(throttled.saturating_sub(th0)),
            preempt: PreemptStats::default(),
        }
    }
}

/// The running arbiter thread.
#[derive(Debug)]
pub struct Arbiter {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Arbiter {
    /// Starts the thread.
    pub fn start(
        board: Arc<Board>,
        roster: Arc<Roster>,
        util: Arc<UtilTable>,
        tick: Duration,
        policy: Box<dyn Policy>,
    ) -> std::io::Result<Arbiter> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("vgpu-arbiter".into())
            .spawn(move || run(&board, &roster, &util, tick, policy, &flag))?;
        Ok(Arbiter {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the thread and waits for it.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("the arbiter thread panicked");
            }
        }
    }
}

impl Drop for Arbiter {
    fn drop(&mut self) {
        self.halt();
    }
}

/// One policy tick: snapshot, decide, write the grants that changed. Returns the snapshots
/// taken (slot, snapshot) of the assigned slots.
pub fn tick_once(
    board: &Board,
    roster: &[RosterEntry],
    policy: &mut dyn Policy,
    now_ns: u64,
) -> Vec<(usize, SlotSnapshot)> {
    let mut inputs = Vec::with_capacity(roster.len());
    let mut current = Vec::with_capacity(roster.len());
    let mut snaps = Vec::with_capacity(roster.len());
    for e in roster {
        let Ok(slot) = board.slot(e.slot) else {
            continue;
        };
        let snap = slot.snapshot();
        if snap.generation == 0 {
            continue;
        }
        inputs.push(SliceInput {
            id: e.slot,
            generation: snap.generation,
            gpu: e.gpu,
            class: e.class,
            guarantee_pct: e.guarantee_pct,
            max_pct: e.max_pct,
            weight: e.weight,
            busy: snap.busy,
            busy_ns: snap.busy_ns,
        });
        current.push((slot, snap.grant, e.evict));
        snaps.push((e.slot, snap));
    }
    let grants = policy.decide(now_ns, &inputs);
    for ((slot, old, evict), mut new) in current.into_iter().zip(grants) {
        new.evict = evict;
        if old != new {
            slot.set_grant(new);
        }
    }
    board.tick();
    snaps
}

/// Records the preemptions the snapshots of one tick show, one ring per slot.
fn sample_preemptions(rings: &mut HashMap<usize, PreemptRing>, snaps: &[(usize, SlotSnapshot)]) {
    for (slot, snap) in snaps {
        let ring = rings.entry(*slot).or_default();
        if ring.observe(snap.generation, snap.preempt_last_ns) {
            tracing::trace!(slot, ns = snap.preempt_last_ns, "preemption");
        }
    }
}

fn run(
    board: &Board,
    roster: &Roster,
    util: &UtilTable,
    tick: Duration,
    mut policy: Box<dyn Policy>,
    stop: &AtomicBool,
) {
    tracing::info!(?tick, "arbiter started");
    let tick_ns = u64::try_from(tick.as_nanos()).unwrap_or(u64::MAX).max(1);
    let sample_ns = u64::try_from(UTIL_SAMPLE.as_nanos()).unwrap_or(u64::MAX);
    let mut histories: HashMap<usize, UtilHistory> = HashMap::new();
    let mut rings: HashMap<usize, PreemptRing> = HashMap::new();
    let mut next_sample = 0u64;
    let mut deadline = monotonic_ns();
    while !stop.load(Ordering::Relaxed) {
        let now = monotonic_ns();
        let entries = roster.current();
        let snaps = tick_once(board, &entries, policy.as_mut(), now);
        sample_preemptions(&mut rings, &snaps);
        if now >= next_sample {
            next_sample = now + sample_ns;
            histories.retain(|slot, _| entries.iter().any(|e| e.slot == *slot));
            rings.retain(|slot, _| entries.iter().any(|e| e.slot == *slot));
            let mut table = HashMap::new();
            for e in entries.iter() {
                if let Ok(slot) = board.slot(e.slot) {
                    let s = slot.snapshot();
                    let h = histories.entry(e.slot).or_default();
                    let mut u = h.sample(now, s.generation, s.busy_ns, s.throttled_ns);
                    if let Some(r) = rings
                        .get(&e.slot)
                        .filter(|r| r.generation() == s.generation)
                    {
                        u.preempt = r.stats();
                    }
                    table.insert(e.slot, u);
                }
            }
            util.replace(table);
        }
        deadline += tick_ns;
        let after = monotonic_ns();
        if deadline > after {
            std::thread::sleep(Duration::from_nanos(deadline - after));
        } else {
            // Late (a slow tick, or the host was busy): start the next tick now.
            deadline = after;
        }
    }
    tracing::info!("arbiter stopped");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{SharePolicy, SharePolicyConfig};
    use vgpu_board::{Class, Grant};

    fn entry(slot: usize, class: SliceClass, guarantee_pct: u32) -> RosterEntry {
        RosterEntry {
            slot,
            gpu: 0,
            class,
            guarantee_pct,
            max_pct: 100,
            weight: 1,
            evict: false,
        }
    }

    #[test]
    fn tick_writes_the_policy_grants_to_the_board() {
        let dir = tempfile::tempdir().unwrap();
        let board = Board::create(&dir.path().join("board")).unwrap();
        board.slot(0).unwrap().assign(0, Class::BestEffort);
        board.slot(1).unwrap().assign(0, Class::BestEffort);
        board.slot(0).unwrap().set_busy(true);
        board.slot(1).unwrap().set_busy(true);
        let roster = [
            entry(0, SliceClass::BestEffort, 50),
            entry(1, SliceClass::BestEffort, 50),
        ];
        let mut p = SharePolicy::new(SharePolicyConfig::default());
        tick_once(&board, &roster, &mut p, 1);
        let runs: Vec<bool> = (0..2)
            .map(|i| board.slot(i).unwrap().snapshot().grant.run)
            .collect();
        assert_eq!(runs.iter().filter(|r| **r).count(), 1, "{runs:?}");
    }

    #[test]
    fn tick_skips_free_slots() {
        let dir = tempfile::tempdir().unwrap();
        let board = Board::create(&dir.path().join("board")).unwrap();
        let mut p = SharePolicy::new(SharePolicyConfig::default());
        tick_once(
            &board,
            &[entry(3, SliceClass::LatencyCritical, 0)],
            &mut p,
            1,
        );
        assert_eq!(board.slot(3).unwrap().snapshot().grant, Grant::default());
    }

    #[test]
    fn utilization_is_busy_time_over_wall_time() {
        let mut h = UtilHistory::default();
        h.sample(0, 1, 0, 0);
        let u = h.sample(500_000_000, 1, 250_000_000, 50_000_000);
        assert!((u.busy_pct - 50.0).abs() < 1e-9);
        assert!((u.throttled_pct - 10.0).abs() < 1e-9);
        let u = h.sample(600_000_000, 2, 0, 0);
        assert_eq!(u.busy_pct, 0.0, "a new generation starts over");
    }

    #[test]
    fn preemptions_on_the_board_are_sampled_at_each_tick() {
        let dir = tempfile::tempdir().unwrap();
        let board = Board::create(&dir.path().join("board")).unwrap();
        board.slot(2).unwrap().assign(0, Class::BestEffort);
        let roster = [entry(2, SliceClass::BestEffort, 10)];
        let mut p = SharePolicy::new(SharePolicyConfig::default());
        let mut rings = HashMap::new();
        for ns in [0, 40_000, 40_000, 90_000, 0] {
            if ns != 0 {
                board.slot(2).unwrap().record_preemption(ns);
            }
            let snaps = tick_once(&board, &roster, &mut p, 1);
            assert_eq!(snaps.len(), 1);
            sample_preemptions(&mut rings, &snaps);
        }
        let stats = rings[&2].stats();
        assert_eq!(stats.count, 2, "40 µs recorded twice in a row is seen once");
        assert_eq!((stats.p50_ns, stats.p99_ns), (40_000, 90_000));
    }

    #[test]
    fn arbiter_thread_ticks_the_board_and_stops() {
        let dir = tempfile::tempdir().unwrap();
        let board = Arc::new(Board::create(&dir.path().join("board")).unwrap());
        board.slot(0).unwrap().assign(0, Class::BestEffort);
        board.slot(0).unwrap().record_preemption(25_000);
        let roster = Arc::new(Roster::default());
        roster.publish(vec![entry(0, SliceClass::BestEffort, 10)]);
        let util = Arc::new(UtilTable::default());
        let a = Arbiter::start(
            Arc::clone(&board),
            roster,
            Arc::clone(&util),
            Duration::from_millis(1),
            Box::new(SharePolicy::new(SharePolicyConfig::default())),
        )
        .unwrap();
        let gen = board.slot(0).unwrap().snapshot().generation;
        for _ in 0..500 {
            if util.get(0, gen).is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let u = util.get(0, gen).unwrap();
        assert_eq!(u.preempt.count, 1);
        assert_eq!(u.preempt.p99_ns, 25_000);
        assert!(!board.scheduler_stale());
        a.stop();
    }
}
