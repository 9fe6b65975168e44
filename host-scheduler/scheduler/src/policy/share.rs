//! The default policy: guarantees, weighted sharing of the rest, maximum caps, and priority for
//! latency-critical work, all measured over a sliding window of busy time.
//!
//! Per GPU, each tick:
//! 1. Each slice's GPU time over the last window (`used`) comes from its busy-time counter.
//! 2. A slice that used more than its maximum % of the window is held (cap).
//! 3. A latency-critical slice runs at once and never yields — unless it used more than its
//!    guarantee while a busy best-effort slice is below its own guarantee ("starving"). Then it
//!    loses its priority and competes like a best-effort slice until the starving slice caught
//!    up.
//! 4. The busy best-effort slices (and demoted latency-critical ones) form a pool. Each has a
//!    target share: its guarantee, plus what the pool's guarantees leave of the GPU split by
//!    weight, capped at its maximum. The slice with the least `used / target` (virtual time on
//!    busy time, as in stride scheduling) gets the grant; the holder keeps it until another
//!    slice lags it by more than `switch_slack_ns` of GPU time, so hand-overs stay rare. A
//!    slice that just got work has used little and wins at once: borrowed time goes back
//!    at once.
//! 5. Best-effort grants yield to busy latency-critical slices, except while a latency-critical
//!    slice on the GPU is held (capped or demoted): its busy bit must not stop everyone.
//! 6. With no best-effort slice busy, every uncapped best-effort slice may run, so the first to
//!    get work starts without waiting for a tick.
use std::collections::{BTreeSet, HashMap, VecDeque};

use super::{Grant, Policy, SliceInput};
use crate::slice::SliceClass;

/// Tunables of [`SharePolicy`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharePolicyConfig {
    /// Window over which guarantees and maxima hold, nanoseconds.
    pub window_ns: u64,
    /// How much GPU time a holder may run ahead of its share before the grant moves, ns.
    pub switch_slack_ns: u64,
}

impl Default for SharePolicyConfig {
    fn default() -> SharePolicyConfig {
        SharePolicyConfig {
            window_ns: 100_000_000,
            switch_slack_ns: 2_000_000,
        }
    }
}

/// Busy-time samples of one slice over the last window.
#[derive(Debug, Default)]
struct History {
    generation: u64,
    last: u64,
    samples: VecDeque<(u64, u64)>,
}

impl History {
    /// Records the counter at `now` and returns the GPU time consumed over the last window.
    fn record(&mut self, now: u64, generation: u64, busy_ns: u64, window: u64) -> u64 {
        if generation != self.generation || busy_ns < self.last {
            self.generation = generation;
            self.samples.clear();
        }
        self.last = busy_ns;
        self.samples.push_back((now, busy_ns));
        let start = now.saturating_sub(window);
        while self.samples.len() >= 2 && self.samples[1].0 <= start {
            self.samples.pop_front();
        }
        self.samples
            .front()
            .map_or(0, |&(_, first)| busy_ns.saturating_sub(first))
    }
}

/// The default policy (see the module documentation).
#[derive(Debug, Default)]
pub struct SharePolicy {
    cfg: SharePolicyConfig,
    history: HashMap<usize, History>,
    /// Per GPU, the id of the pool slice holding the grant.
    holders: HashMap<u32, usize>,
}

impl SharePolicy {
    /// A policy with these tunables.
    pub fn new(cfg: SharePolicyConfig) -> SharePolicy {
        SharePolicy {
            cfg,
            history: HashMap::new(),
            holders: HashMap::new(),
        }
    }

    fn decide_gpu(&mut self, gpu: u32, slices: &[SliceInput], used: &[u64], grants: &mut [Grant]) {
        let window = u128::from(self.cfg.window_ns);
        let on_gpu: Vec<usize> = (0..slices.len())
            .filter(|&i| slices[i].gpu == gpu)
            .collect();
        // used / window compared with pct / 100, in integers.
        let used_x100 = |i: usize| u128::from(used[i]) * 100;
        let capped = |i: usize| {
            slices[i].max_pct < 100 && used_x100(i) >= u128::from(slices[i].max_pct) * window
        };
        let vs_guarantee =
            |i: usize| used_x100(i).cmp(&(u128::from(slices[i].guarantee_pct) * window));
        let starving = on_gpu.iter().any(|&i| {
            let s = &slices[i];
            s.class == SliceClass::BestEffort && s.busy && !capped(i) && vs_guarantee(i).is_lt()
        });

        let mut pool = Vec::new();
        let mut lc_held = false;
        for &i in &on_gpu {
            let s = &slices[i];
            grants[i] = held(s.class);
            match s.class {
                SliceClass::LatencyCritical => {
                    if capped(i) {
                        lc_held |= s.busy;
                    } else if s.busy && starving && vs_guarantee(i).is_gt() {
                        lc_held = true;
                        pool.push(i);
                    } else {
                        grants[i] = Grant {
                            run: true,
                            yield_to_lc: false,
                            evict: false,
                        };
                    }
                }
                SliceClass::BestEffort => {
                    if !capped(i) && s.busy {
                        pool.push(i);
                    }
                }
            }
        }
        let be_grant = Grant {
            run: true,
            yield_to_lc: !lc_held,
            evict: false,
        };
        if pool.is_empty() {
            self.holders.remove(&gpu);
            for &i in &on_gpu {
                if slices[i].class == SliceClass::BestEffort && !capped(i) {
                    grants[i] = be_grant;
                }
            }
            return;
        }

        let sum_g: u64 = pool
            .iter()
            .map(|&i| u64::from(slices[i].guarantee_pct))
            .sum();
        let sum_w: u64 = pool
            .iter()
            .map(|&i| u64::from(slices[i].weight.max(1)))
            .sum();
        let spare = 100u64.saturating_sub(sum_g) as f64;
        let target = |i: usize| {
            let s = &slices[i];
            let t = f64::from(s.guarantee_pct) + spare * f64::from(s.weight.max(1)) / sum_w as f64;
            t.min(f64::from(s.max_pct)).max(0.01)
        };
        let key = |i: usize| used[i] as f64 / target(i);
        let mut best = pool[0];
        for &i in &pool[1..] {
            let (ki, kb) = (key(i), key(best));
            if ki < kb || (ki == kb && target(i) > target(best)) {
                best = i;
            }
        }
        let holder = self
            .holders
            .get(&gpu)
            .and_then(|&id| pool.iter().copied().find(|&i| slices[i].id == id));
        let winner = match holder {
            Some(h) if (key(h) - key(best)) * target(h) <= self.cfg.switch_slack_ns as f64 => h,
            _ => best,
        };
        self.holders.insert(gpu, slices[winner].id);
        grants[winner] = match slices[winner].class {
            SliceClass::LatencyCritical => Grant {
                run: true,
                yield_to_lc: false,
                evict: false,
            },
            SliceClass::BestEffort => be_grant,
        };
    }
}

/// The grant of a slice that may not dispatch.
fn held(class: SliceClass) -> Grant {
    Grant {
        run: false,
        yield_to_lc: class == SliceClass::BestEffort,
        evict: false,
    }
}

impl Policy for SharePolicy {
    fn decide(&mut self, now_ns: u64, slices: &[SliceInput]) -> Vec<Grant> {
        self.history
            .retain(|id, _| slices.iter().any(|s| s.id == *id));
        let window = self.cfg.window_ns;
        let used: Vec<u64> = slices
            .iter()
            .map(|s| {
                self.history.entry(s.id).or_default().record(
                    now_ns,
                    s.generation,
                    s.busy_ns,
                    window,
                )
            })
            .collect();
        let mut grants: Vec<Grant> = slices.iter().map(|s| held(s.class)).collect();
        let gpus: BTreeSet<u32> = slices.iter().map(|s| s.gpu).collect();
        self.holders.retain(|gpu, _| gpus.contains(gpu));
        for gpu in gpus {
            self.decide_gpu(gpu, slices, &used, &mut grants);
        }
        grants
    }
}
