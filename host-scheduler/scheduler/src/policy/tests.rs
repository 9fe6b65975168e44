use super::sim::{Demand, Sim, SimSlice, MS};
use super::*;

const WINDOW: u64 = 100 * MS;
const RUN: Grant = Grant {
    run: true,
    yield_to_lc: false,
    evict: false,
};

fn policy() -> SharePolicy {
    SharePolicy::new(SharePolicyConfig::default())
}

fn sim(slices: Vec<SimSlice>) -> Sim<SharePolicy> {
    Sim::new(policy(), slices, MS)
}

fn input(id: usize, class: SliceClass, guarantee_pct: u32, busy: bool) -> SliceInput {
    SliceInput {
        id,
        generation: 1,
        gpu: 0,
        class,
        guarantee_pct,
        max_pct: 100,
        weight: 1,
        busy,
        busy_ns: 0,
    }
}

fn assert_share(s: &Sim<SharePolicy>, i: usize, from: u64, to: u64, want: f64, tol: f64) {
    let (lo, hi) = s.share_range(i, from, to, WINDOW);
    assert!(
        lo >= want - tol && hi <= want + tol,
        "slice {i}: shares over 100 ms windows from {} to {} ms range {lo:.1}..{hi:.1}%, want {want}±{tol}%",
        from / MS,
        to / MS
    );
}

#[test]
fn latency_critical_slice_runs_at_once_and_never_yields() {
    let mut p = policy();
    let g = p.decide(
        0,
        &[
            input(0, SliceClass::LatencyCritical, 10, true),
            input(1, SliceClass::BestEffort, 90, true),
        ],
    );
    assert_eq!(g[0], RUN);
    assert!(
        g[1].run && g[1].yield_to_lc,
        "best-effort yields to latency-critical"
    );
}

#[test]
fn best_effort_slices_all_may_start_when_none_has_work() {
    let mut p = policy();
    let g = p.decide(
        0,
        &[
            input(0, SliceClass::BestEffort, 50, false),
            input(1, SliceClass::BestEffort, 50, false),
        ],
    );
    assert!(g.iter().all(|g| g.run && g.yield_to_lc));
}

#[test]
fn only_one_busy_best_effort_slice_holds_the_grant() {
    let mut p = policy();
    let g = p.decide(
        0,
        &[
            input(0, SliceClass::BestEffort, 50, true),
            input(1, SliceClass::BestEffort, 50, true),
            input(2, SliceClass::BestEffort, 0, false),
        ],
    );
    assert_eq!(g.iter().filter(|g| g.run).count(), 1);
    assert!(
        !g[2].run,
        "an idle slice waits for its turn once others have work"
    );
}

#[test]
fn latency_critical_slice_above_its_max_is_held_and_best_effort_stops_yielding() {
    let mut p = policy();
    let mut lc = input(0, SliceClass::LatencyCritical, 10, true);
    lc.max_pct = 20;
    let be = input(1, SliceClass::BestEffort, 0, true);
    p.decide(0, &[lc, be]);
    lc.busy_ns = 25 * MS;
    let g = p.decide(50 * MS, &[lc, be]);
    assert!(!g[0].run, "capped latency-critical slice is held");
    assert_eq!(
        g[1], RUN,
        "best-effort must not wait for a held slice's busy bit"
    );
}

#[test]
fn policy_forgets_history_when_a_slot_is_reused() {
    let mut p = policy();
    let mut a = input(0, SliceClass::BestEffort, 0, true);
    a.max_pct = 50;
    p.decide(0, &[a]);
    a.busy_ns = 60 * MS;
    assert!(!p.decide(60 * MS, &[a])[0].run, "over its max");
    a.generation = 2;
    a.busy_ns = 61 * MS;
    assert!(
        p.decide(61 * MS, &[a])[0].run,
        "a new slice in the slot starts fresh"
    );
}

#[test]
fn two_saturating_best_effort_slices_get_70_and_30_percent_in_every_100ms_window() {
    let mut s = sim(vec![SimSlice::be(70), SimSlice::be(30)]);
    s.run(1000 * MS);
    assert_share(&s, 0, 0, 900 * MS, 70.0, 5.0);
    assert_share(&s, 1, 0, 900 * MS, 30.0, 5.0);
}

#[test]
fn guarantees_hold_with_coarse_kernels_and_slow_ticks() {
    let mut a = SimSlice::be(70);
    let mut b = SimSlice::be(30);
    a.kernel_ns = 2 * MS;
    b.kernel_ns = 2 * MS;
    let mut s = Sim::new(policy(), vec![a, b], 2 * MS);
    s.run(1000 * MS);
    assert_share(&s, 0, 0, 900 * MS, 70.0, 5.0);
    assert_share(&s, 1, 0, 900 * MS, 30.0, 5.0);
}

#[test]
fn best_effort_slice_alone_with_work_borrows_the_whole_gpu() {
    let mut idle = SimSlice::be(70);
    idle.demand = Demand::Saturating { start: 0, end: 0 };
    let mut s = sim(vec![SimSlice::be(30), idle]);
    s.run(500 * MS);
    assert_share(&s, 0, 0, 400 * MS, 100.0, 1.0);
}

#[test]
fn borrowed_time_is_given_back_at_once_when_the_owner_gets_work() {
    let mut owner = SimSlice::be(70);
    owner.demand = Demand::Saturating {
        start: 300 * MS,
        end: u64::MAX,
    };
    let mut s = sim(vec![SimSlice::be(30), owner]);
    s.run(1000 * MS);
    let first = s.first_run_after(1, 300 * MS).unwrap();
    assert!(first <= 302 * MS, "owner first ran at {} ms", first / MS);
    assert_share(&s, 1, 300 * MS, 900 * MS, 70.0, 5.0);
    assert_share(&s, 0, 300 * MS, 900 * MS, 30.0, 5.0);
}

#[test]
fn borrowed_time_flows_back_when_the_owner_goes_idle() {
    let mut owner = SimSlice::be(70);
    owner.demand = Demand::Saturating {
        start: 0,
        end: 300 * MS,
    };
    let mut s = sim(vec![SimSlice::be(30), owner]);
    s.run(800 * MS);
    assert_share(&s, 0, 305 * MS, 700 * MS, 100.0, 1.0);
}

#[test]
fn weights_split_the_time_no_one_guarantees() {
    let mut a = SimSlice::be(0);
    a.weight = 3;
    let mut s = sim(vec![a, SimSlice::be(0)]);
    s.run(1000 * MS);
    assert_share(&s, 0, 0, 900 * MS, 75.0, 5.0);
    assert_share(&s, 1, 0, 900 * MS, 25.0, 5.0);
}

#[test]
fn weights_share_what_guarantees_leave() {
    let mut b = SimSlice::be(20);
    b.weight = 3;
    let mut s = sim(vec![SimSlice::be(20), b]);
    s.run(1000 * MS);
    // 20 + 60/4 = 35 and 20 + 60·3/4 = 65.
    assert_share(&s, 0, 0, 900 * MS, 35.0, 5.0);
    assert_share(&s, 1, 0, 900 * MS, 65.0, 5.0);
}

#[test]
fn max_cap_limits_a_slice_even_when_it_is_alone() {
    let mut a = SimSlice::be(10);
    a.max_pct = 40;
    let mut s = sim(vec![a]);
    s.run(1000 * MS);
    assert_share(&s, 0, 0, 900 * MS, 40.0, 2.0);
}

#[test]
fn max_cap_leaves_the_rest_to_other_slices() {
    let mut a = SimSlice::be(0);
    a.max_pct = 25;
    a.weight = 10;
    let mut s = sim(vec![a, SimSlice::be(0)]);
    s.run(1000 * MS);
    assert_share(&s, 0, 0, 900 * MS, 25.0, 2.0);
    assert_share(&s, 1, 0, 900 * MS, 75.0, 3.0);
}

#[test]
fn latency_critical_work_dispatches_within_one_best_effort_kernel() {
    let mut lc = SimSlice::lc(40);
    lc.demand = Demand::Periodic {
        period: 5 * MS,
        work: MS,
        start: 3 * MS,
    };
    let mut s = sim(vec![lc, SimSlice::be(60)]);
    s.run(1000 * MS);
    let be_kernel = SimSlice::be(60).kernel_ns;
    assert!(
        s.max_wait_ns(0) <= be_kernel,
        "latency-critical waited {} µs",
        s.max_wait_ns(0) / 1000
    );
    assert_share(&s, 0, 10 * MS, 900 * MS, 20.0, 2.0);
    assert_share(&s, 1, 10 * MS, 900 * MS, 80.0, 3.0);
}

#[test]
fn latency_critical_slice_keeps_priority_when_no_guarantee_starves() {
    let mut s = sim(vec![SimSlice::lc(0), SimSlice::be(0)]);
    s.run(500 * MS);
    assert_share(&s, 0, 0, 400 * MS, 100.0, 1.0);
}

#[test]
fn latency_critical_slice_over_its_guarantee_loses_priority_to_a_starving_guarantee() {
    let mut s = sim(vec![SimSlice::lc(30), SimSlice::be(70)]);
    s.run(1000 * MS);
    assert_share(&s, 1, 0, 900 * MS, 70.0, 5.0);
    assert_share(&s, 0, 0, 900 * MS, 30.0, 5.0);
}

#[test]
fn latency_critical_slice_within_its_guarantee_is_never_delayed_by_best_effort() {
    let mut lc = SimSlice::lc(50);
    lc.demand = Demand::Periodic {
        period: 10 * MS,
        work: 4 * MS,
        start: 0,
    };
    let mut s = sim(vec![lc, SimSlice::be(50)]);
    s.run(1000 * MS);
    assert!(s.max_wait_ns(0) <= SimSlice::be(50).kernel_ns);
    assert_share(&s, 0, 0, 900 * MS, 40.0, 2.0);
}

#[test]
fn gpus_are_scheduled_independently() {
    let mut c = SimSlice::be(10);
    c.gpu = 1;
    let mut s = sim(vec![SimSlice::be(70), SimSlice::be(30), c]);
    s.run(600 * MS);
    assert_share(&s, 0, 0, 500 * MS, 70.0, 5.0);
    assert_share(&s, 2, 0, 500 * MS, 100.0, 1.0);
}
