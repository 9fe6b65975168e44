//! The deterministic report stream of the crash-safety test (`ledger-stress` and
//! `tests/crash.rs`). Not part of the ledger's API.

use crate::report::UsageReport;

/// Report `seq` of `backend` in the synthetic stream: every figure is a fixed function of `seq`,
/// so a test can compute the exact totals of seq `1..=n`.
pub fn synthetic_report(backend: &str, seq: u64) -> UsageReport {
    let start = 1_700_000_000_000_000_000 + seq * 1_000_000_000;
    UsageReport {
        backend: backend.to_string(),
        seq,
        tenant: format!("tenant-{}", seq % 3),
        slice: format!("slice-{}", seq % 5),
        session: seq % 4,
        start_unix_ns: start,
        end_unix_ns: start + 1_000_000_000,
        gpu_ns: seq * 1_000 + 7,
        // Above u64::MAX for large seq, to exercise the u128 path.
        mem_resident_byte_ns: u128::from(seq) * 100_000_000_000_000_000_000,
        mem_swapped_byte_ns: u128::from(seq % 7) * 1_000_000_007,
        htod_bytes: seq * 4096,
        dtoh_bytes: seq * 512 + 1,
        kernels: seq % 11,
    }
}
