//! Preemption latency distribution per board slot.
//!
//! A backend writes the latency of each preemption it measures (grant withdrawn to its
//! in-flight GPU work drained) to its board slot: `preempt_last_ns` (the latest) and
//! `preempt_max_ns` (the largest). The board keeps no history, so the arbiter samples
//! `preempt_last_ns` every tick and records each change as one preemption in a bounded ring,
//! from which `/v1/util` reports percentiles and `/metrics` the count.
//!
//! Sampled at the tick: back-to-back preemptions within one tick count once (only the later
//! one is seen), and two successive preemptions of exactly the same latency (to the
//! nanosecond) count once.

use std::collections::VecDeque;

/// How many latencies each slot's ring keeps.
pub const PREEMPT_RING: usize = 1024;

/// The preemptions seen on one slot: how many, and percentiles of the latest [`PREEMPT_RING`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PreemptStats {
    /// Preemptions seen since the slot was assigned (sampled at the tick).
    pub count: u64,
    /// Median latency of the latest ones (ns), 0 if none.
    pub p50_ns: u64,
    /// 99th percentile latency of the latest ones (ns), 0 if none.
    pub p99_ns: u64,
}

/// The latencies seen on one slot, for one generation of it.
#[derive(Debug, Default)]
pub struct PreemptRing {
    generation: u64,
    last_ns: u64,
    count: u64,
    latencies: VecDeque<u64>,
}

impl PreemptRing {
    /// Looks at the slot's `preempt_last_ns` for `generation`; a value other than the one seen
    /// before is a new preemption. A new generation starts over (the board clears the slot's
    /// counters on assign, so its first nonzero value is a preemption). Returns whether one
    /// was recorded.
    pub fn observe(&mut self, generation: u64, last_ns: u64) -> bool {
        if generation != self.generation {
            *self = PreemptRing {
                generation,
                ..PreemptRing::default()
            };
        }
        if last_ns == self.last_ns {
            return false;
        }
        self.last_ns = last_ns;
        if self.latencies.len() == PREEMPT_RING {
            self.latencies.pop_front();
        }
        self.latencies.push_back(last_ns);
        self.count += 1;
        true
    }

    /// The generation the ring belongs to.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The count and the percentiles (nearest rank) of the latencies in the ring.
    pub fn stats(&self) -> PreemptStats {
        let mut sorted: Vec<u64> = self.latencies.iter().copied().collect();
        sorted.sort_unstable();
        PreemptStats {
            count: self.count,
            p50_ns: percentile(&sorted, 50),
            p99_ns: percentile(&sorted, 99),
        }
    }
}

/// The nearest-rank `pct` percentile of `sorted` (ascending), 0 if empty.
fn percentile(sorted: &[u64], pct: usize) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (sorted.len() * pct).div_ceil(100).max(1);
    sorted[rank.min(sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_changed_value_counts_as_one_preemption() {
        let mut r = PreemptRing::default();
        assert!(!r.observe(1, 0), "a fresh slot has no preemption");
        assert!(r.observe(1, 300));
        assert!(
            !r.observe(1, 300),
            "the same value seen again is the same one"
        );
        assert!(r.observe(1, 900));
        assert!(r.observe(1, 100));
        let s = r.stats();
        assert_eq!(s.count, 3);
        assert_eq!(s.p50_ns, 300);
        assert_eq!(s.p99_ns, 900);
    }

    #[test]
    fn a_new_generation_starts_over() {
        let mut r = PreemptRing::default();
        r.observe(1, 500);
        r.observe(1, 700);
        assert!(!r.observe(2, 0));
        assert_eq!(r.generation(), 2);
        assert_eq!(r.stats(), PreemptStats::default());
        assert!(r.observe(3, 700), "a first nonzero value is a preemption");
        assert_eq!(r.stats().count, 1);
    }

    #[test]
    fn the_ring_keeps_only_the_latest_latencies_but_counts_all() {
        let mut r = PreemptRing::default();
        // 100 huge latencies, then a full ring of small ones: the huge ones fall out.
        for i in 0..100 {
            r.observe(1, 1_000_000 + i);
        }
        for i in 1..=PREEMPT_RING as u64 {
            r.observe(1, i);
        }
        let s = r.stats();
        assert_eq!(s.count, 100 + PREEMPT_RING as u64);
        assert_eq!(s.p50_ns, 512);
        assert_eq!(s.p99_ns, 1014);
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        assert_eq!(percentile(&[], 99), 0);
        assert_eq!(percentile(&[7], 50), 7);
        assert_eq!(percentile(&[7], 99), 7);
        let hundred: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&hundred, 50), 50);
        assert_eq!(percentile(&hundred, 99), 99);
        assert_eq!(percentile(&[1, 2], 50), 1);
        assert_eq!(percentile(&[1, 2], 99), 2);
    }
}
