//! A small deterministic simulator for policy tests: GPUs that run one kernel at a time (like
//! contexts time-sliced on one GPU, or the emulated GPU lock), backends that dispatch a kernel
//! whenever their grant and the latency-critical mask allow it, busy time credited when a kernel
//! completes (as real backends do), and the policy invoked every tick.
use super::{Grant, Policy, SliceInput};
use crate::slice::SliceClass;

/// Simulation step.
pub const STEP_NS: u64 = 10_000;
/// Width of the buckets GPU time is recorded in.
pub const BUCKET_NS: u64 = 1_000_000;
/// One millisecond.
pub const MS: u64 = 1_000_000;

/// When a simulated tenant has work.
#[derive(Debug, Clone, Copy)]
pub enum Demand {
    /// Always has work from `start` to `end`.
    Saturating {
        /// First instant with work.
        start: u64,
        /// First instant without.
        end: u64,
    },
    /// Every `period` ns from `start`, `work` more ns of kernels arrive.
    Periodic {
        /// Time between arrivals.
        period: u64,
        /// Kernel time per arrival.
        work: u64,
        /// First arrival.
        start: u64,
    },
}

/// One simulated slice.
#[derive(Debug, Clone, Copy)]
pub struct SimSlice {
    /// GPU index.
    pub gpu: u32,
    /// Class.
    pub class: SliceClass,
    /// Guaranteed %.
    pub guarantee_pct: u32,
    /// Maximum %.
    pub max_pct: u32,
    /// Weight.
    pub weight: u32,
    /// Length of its kernels (its in-flight bound).
    pub kernel_ns: u64,
    /// Its work.
    pub demand: Demand,
}

impl SimSlice {
    /// A best-effort slice saturating the GPU from the start.
    pub fn be(guarantee_pct: u32) -> SimSlice {
        SimSlice {
            gpu: 0,
            class: SliceClass::BestEffort,
            guarantee_pct,
            max_pct: 100,
            weight: 1,
            kernel_ns: 500_000,
            demand: Demand::Saturating {
                start: 0,
                end: u64::MAX,
            },
        }
    }

    /// A latency-critical slice saturating the GPU from the start.
    pub fn lc(guarantee_pct: u32) -> SimSlice {
        SimSlice {
            class: SliceClass::LatencyCritical,
            kernel_ns: 100_000,
            ..SimSlice::be(guarantee_pct)
        }
    }
}

#[derive(Debug, Default)]
struct State {
    backlog: u64,
    next_arrival: u64,
    busy_ns: u64,
    grant: Grant,
    /// End of the kernel in flight and its length.
    in_flight: Option<(u64, u64)>,
    /// GPU time per bucket, credited as it runs.
    buckets: Vec<u64>,
    /// Oldest arrival not yet dispatched.
    waiting_since: Option<u64>,
    max_wait_ns: u64,
}

/// The simulator.
pub struct Sim<P: Policy> {
    policy: P,
    slices: Vec<SimSlice>,
    state: Vec<State>,
    tick_ns: u64,
    now: u64,
    rr: usize,
}

impl<P: Policy> Sim<P> {
    /// A simulation of `slices` under `policy`, ticking every `tick_ns`.
    pub fn new(policy: P, slices: Vec<SimSlice>, tick_ns: u64) -> Sim<P> {
        let state = slices
            .iter()
            .map(|s| State {
                grant: Grant::initial(s.class.board()),
                next_arrival: match s.demand {
                    Demand::Periodic { start, .. } => start,
                    Demand::Saturating { .. } => u64::MAX,
                },
                ..State::default()
            })
            .collect();
        Sim {
            policy,
            slices,
            state,
            tick_ns,
            now: 0,
            rr: 0,
        }
    }

    fn busy(&self, i: usize) -> bool {
        let st = &self.state[i];
        st.backlog > 0 || st.in_flight.is_some()
    }

    fn arrivals(&mut self) {
        for (s, st) in self.slices.iter().zip(self.state.iter_mut()) {
            match s.demand {
                Demand::Saturating { start, end } => {
                    st.backlog = if (start..end).contains(&self.now) {
                        u64::MAX
                    } else {
                        0
                    };
                }
                Demand::Periodic { period, work, .. } => {
                    while st.next_arrival <= self.now {
                        st.backlog += work;
                        st.waiting_since.get_or_insert(st.next_arrival);
                        st.next_arrival += period;
                    }
                }
            }
        }
    }

    fn may_dispatch(&self, i: usize) -> bool {
        let g = self.state[i].grant;
        if !g.run {
            return false;
        }
        !g.yield_to_lc
            || !(0..self.slices.len()).any(|j| {
                j != i
                    && self.slices[j].gpu == self.slices[i].gpu
                    && self.slices[j].class == SliceClass::LatencyCritical
                    && self.busy(j)
            })
    }

    fn step_gpu(&mut self, gpu: u32) {
        let n = self.slices.len();
        let on_gpu: Vec<usize> = (0..n).filter(|&i| self.slices[i].gpu == gpu).collect();
        for &i in &on_gpu {
            if let Some((end, len)) = self.state[i].in_flight {
                if end <= self.now {
                    self.state[i].busy_ns += len;
                    self.state[i].in_flight = None;
                }
            }
        }
        if !on_gpu.iter().any(|&i| self.state[i].in_flight.is_some()) {
            for k in 0..n {
                let i = (self.rr + k) % n;
                if self.slices[i].gpu != gpu || self.state[i].backlog == 0 || !self.may_dispatch(i)
                {
                    continue;
                }
                let len = self.slices[i].kernel_ns.min(self.state[i].backlog);
                let st = &mut self.state[i];
                if st.backlog != u64::MAX {
                    st.backlog -= len;
                }
                if let Some(since) = st.waiting_since.take() {
                    st.max_wait_ns = st.max_wait_ns.max(self.now - since);
                }
                st.in_flight = Some((self.now + len, len));
                self.rr = i + 1;
                break;
            }
        }
        let bucket = usize::try_from(self.now / BUCKET_NS).unwrap_or(usize::MAX);
        for &i in &on_gpu {
            if self.state[i].in_flight.is_some() {
                let b = &mut self.state[i].buckets;
                if b.len() <= bucket {
                    b.resize(bucket + 1, 0);
                }
                b[bucket] += STEP_NS;
            }
        }
    }

    /// Runs until `until` ns.
    pub fn run(&mut self, until: u64) {
        let mut gpus: Vec<u32> = self.slices.iter().map(|s| s.gpu).collect();
        gpus.sort_unstable();
        gpus.dedup();
        while self.now < until {
            self.arrivals();
            if self.now.is_multiple_of(self.tick_ns) {
                let inputs: Vec<SliceInput> = (0..self.slices.len())
                    .map(|i| {
                        let s = &self.slices[i];
                        SliceInput {
                            id: i,
                            generation: 1,
                            gpu: s.gpu,
                            class: s.class,
                            guarantee_pct: s.guarantee_pct,
                            max_pct: s.max_pct,
                            weight: s.weight,
                            busy: self.busy(i),
                            busy_ns: self.state[i].busy_ns,
                        }
                    })
                    .collect();
                let grants = self.policy.decide(self.now, &inputs);
                for (st, g) in self.state.iter_mut().zip(grants) {
                    st.grant = g;
                }
            }
            for &gpu in &gpus {
                self.step_gpu(gpu);
            }
            self.now += STEP_NS;
        }
    }

    /// Slice `i`'s share (%) of GPU time in `[from, from + len)`.
    pub fn share(&self, i: usize, from: u64, len: u64) -> f64 {
        let b = &self.state[i].buckets;
        let first = usize::try_from(from / BUCKET_NS).unwrap_or(0);
        let last = usize::try_from((from + len) / BUCKET_NS).unwrap_or(0);
        let total: u64 = (first..last).map(|k| b.get(k).copied().unwrap_or(0)).sum();
        total as f64 * 100.0 / len as f64
    }

    /// The smallest and largest share of slice `i` over all windows of `len` starting every
    /// millisecond in `[from, to]`.
    pub fn share_range(&self, i: usize, from: u64, to: u64, len: u64) -> (f64, f64) {
        let mut lo = f64::MAX;
        let mut hi = f64::MIN;
        let mut t = from;
        while t <= to {
            let s = self.share(i, t, len);
            lo = lo.min(s);
            hi = hi.max(s);
            t += MS;
        }
        (lo, hi)
    }

    /// The longest time a periodic arrival of slice `i` waited for its first kernel.
    pub fn max_wait_ns(&self, i: usize) -> u64 {
        self.state[i].max_wait_ns
    }

    /// The first instant at or after `from` at which slice `i` ran on the GPU.
    pub fn first_run_after(&self, i: usize, from: u64) -> Option<u64> {
        let b = &self.state[i].buckets;
        let first = usize::try_from(from / BUCKET_NS).unwrap_or(0);
        (first..b.len())
            .find(|&k| b[k] > 0)
            .map(|k| k as u64 * BUCKET_NS)
    }
}
