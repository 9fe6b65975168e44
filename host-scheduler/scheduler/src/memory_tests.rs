use super::*;

fn slice(
    name: &str,
    class: SliceClass,
    guarantee: u64,
    resident: u64,
    busy: bool,
    busy_pct: f64,
) -> SliceMemory {
    SliceMemory {
        name: name.into(),
        gpu: 0,
        class,
        guarantee,
        limit: 80 << 30,
        resident,
        swapped: 0,
        reclaims: 0,
        evicted: false,
        claimed: None,
        busy,
        busy_pct,
    }
}

const GIB: u64 = 1 << 30;

#[test]
fn best_effort_slices_above_their_guarantee_are_reclaimed_before_latency_critical_ones() {
    let all = vec![
        slice(
            "lc",
            SliceClass::LatencyCritical,
            40 * GIB,
            10 * GIB,
            false,
            0.0,
        ),
        slice(
            "lc-burst",
            SliceClass::LatencyCritical,
            0,
            30 * GIB,
            false,
            0.0,
        ),
        slice("be", SliceClass::BestEffort, 0, 30 * GIB, true, 90.0),
    ];
    assert_eq!(
        choose_victims(&all, "lc", 20 * GIB),
        Some(vec!["be".to_string()])
    );
}

#[test]
fn the_most_recently_idle_best_effort_slice_goes_first() {
    let all = vec![
        slice(
            "claimant",
            SliceClass::LatencyCritical,
            40 * GIB,
            0,
            false,
            0.0,
        ),
        slice("busy", SliceClass::BestEffort, 0, 20 * GIB, true, 80.0),
        slice(
            "idle-a-bit",
            SliceClass::BestEffort,
            0,
            20 * GIB,
            false,
            5.0,
        ),
        slice("idle", SliceClass::BestEffort, 0, 20 * GIB, false, 0.0),
    ];
    assert_eq!(
        choose_victims(&all, "claimant", 30 * GIB),
        Some(vec!["idle".to_string(), "idle-a-bit".to_string()])
    );
}

#[test]
fn slices_within_their_guarantee_or_on_another_gpu_are_never_victims() {
    let mut other_gpu = slice("other", SliceClass::BestEffort, 0, 40 * GIB, false, 0.0);
    other_gpu.gpu = 1;
    let all = vec![
        slice(
            "claimant",
            SliceClass::LatencyCritical,
            40 * GIB,
            0,
            false,
            0.0,
        ),
        slice(
            "guaranteed",
            SliceClass::BestEffort,
            30 * GIB,
            30 * GIB,
            false,
            0.0,
        ),
        other_gpu,
    ];
    assert_eq!(choose_victims(&all, "claimant", GIB), None);
}

#[test]
fn a_claim_that_all_victims_together_cannot_cover_takes_nothing() {
    let all = vec![
        slice(
            "claimant",
            SliceClass::LatencyCritical,
            40 * GIB,
            0,
            false,
            0.0,
        ),
        slice("be", SliceClass::BestEffort, 0, 10 * GIB, false, 0.0),
    ];
    assert_eq!(choose_victims(&all, "claimant", 20 * GIB), None);
    assert_eq!(choose_victims(&all, "nobody", GIB), None);
}

#[test]
fn a_victim_returns_once_the_claimant_gives_back_what_it_claimed() {
    let mut c = Claimed {
        taken: false,
        at_ms: 0,
        claimant: "lc".into(),
        claimant_resident: 10 * GIB,
        level: 70 * GIB,
        bytes: 5 * GIB,
    };
    // Right after the claim, before the claimant took its bytes: not yet.
    assert!(!may_return(&c, 20 * GIB, 50 * GIB, 10 * GIB));
    // The claimant took its 5 GiB: still not.
    c.taken = true;
    assert!(!may_return(&c, 20 * GIB, 55 * GIB, 15 * GIB));
    // It freed them: the victim fits where it was.
    assert!(may_return(&c, 20 * GIB, 50 * GIB, 10 * GIB));
    // Or the GPU emptied enough elsewhere, the claim still held.
    assert!(may_return(&c, 20 * GIB, 45 * GIB, 15 * GIB));
}
