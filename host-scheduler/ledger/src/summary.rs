//! Per-slice summaries of the ledger, for the scheduler's `/metrics`: what each (tenant, slice)
//! used in all, and its memory in the latest interval reported.

use crate::report::{Totals, UsageReport};

/// All-time usage of one (tenant, slice), and its memory over the latest interval reported.
///
/// The memory gauges assume what a backend does: it reports every session of one metering
/// interval with the same interval bounds. They sum, over the reports that end at the latest
/// end seen, each report's average memory (`byte_ns / interval ns`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SliceSummary {
    /// The tenant.
    pub tenant: String,
    /// The slice.
    pub slice: String,
    /// Sums over every record of the slice.
    pub totals: Totals,
    /// End of the latest interval reported (Unix time, ns); 0 before any.
    pub latest_end_unix_ns: u64,
    /// Average resident device memory over the latest interval, bytes.
    pub resident_bytes: f64,
    /// Average swapped-out memory over the latest interval, bytes.
    pub swapped_bytes: f64,
}

impl SliceSummary {
    /// An empty summary.
    pub fn new(tenant: &str, slice: &str) -> SliceSummary {
        SliceSummary {
            tenant: tenant.to_owned(),
            slice: slice.to_owned(),
            ..SliceSummary::default()
        }
    }

    /// Adds one report of this slice. The result does not depend on the order reports are
    /// added in.
    pub fn add(&mut self, r: &UsageReport) {
        self.totals.add(r);
        let len = r.end_unix_ns.saturating_sub(r.start_unix_ns);
        let average = |byte_ns: u128| {
            if len == 0 {
                0.0
            } else {
                byte_ns as f64 / len as f64
            }
        };
        if r.end_unix_ns > self.latest_end_unix_ns {
            self.latest_end_unix_ns = r.end_unix_ns;
            self.resident_bytes = 0.0;
            self.swapped_bytes = 0.0;
        }
        if r.end_unix_ns == self.latest_end_unix_ns {
            self.resident_bytes += average(r.mem_resident_byte_ns);
            self.swapped_bytes += average(r.mem_swapped_byte_ns);
        }
    }
}

#[cfg(feature = "store")]
impl crate::Ledger {
    /// One summary per (tenant, slice) in the ledger, sorted by tenant, then slice. Reads every
    /// record once: the scheduler calls it at start and then keeps the summaries up to date
    /// with [`SliceSummary::add`].
    pub fn slice_summaries(&self) -> Result<Vec<SliceSummary>, crate::LedgerError> {
        use std::collections::BTreeMap;
        let conn = self.lock();
        let mut stmt = conn.prepare(&format!("SELECT {} FROM usage", crate::ledger::COLUMNS))?;
        let mut rows = stmt.query([])?;
        let mut map: BTreeMap<(String, String), SliceSummary> = BTreeMap::new();
        while let Some(row) = rows.next()? {
            let rec = crate::ledger::record_from_row(row)?;
            let r = &rec.report;
            map.entry((r.tenant.clone(), r.slice.clone()))
                .or_insert_with(|| SliceSummary::new(&r.tenant, &r.slice))
                .add(r);
        }
        Ok(map.into_values().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(seq: u64, start: u64, end: u64, resident: u128) -> UsageReport {
        UsageReport {
            backend: "b".into(),
            seq,
            tenant: "t".into(),
            slice: "s".into(),
            session: seq,
            start_unix_ns: start,
            end_unix_ns: end,
            gpu_ns: 10,
            mem_resident_byte_ns: resident,
            mem_swapped_byte_ns: resident / 2,
            htod_bytes: 1,
            dtoh_bytes: 2,
            kernels: 3,
        }
    }

    #[test]
    fn memory_gauges_sum_the_sessions_of_the_latest_interval_in_any_order() {
        let reports = [
            report(1, 0, 1_000, 4_000),
            report(2, 1_000, 2_000, 8_000),
            report(3, 1_000, 2_000, 2_000),
            report(4, 1_500, 1_500, 0),
        ];
        let mut forward = SliceSummary::new("t", "s");
        reports.iter().for_each(|r| forward.add(r));
        let mut backward = SliceSummary::new("t", "s");
        reports.iter().rev().for_each(|r| backward.add(r));
        assert_eq!(forward, backward);
        assert_eq!(forward.latest_end_unix_ns, 2_000);
        assert_eq!(forward.resident_bytes, 10.0);
        assert_eq!(forward.swapped_bytes, 5.0);
        assert_eq!(forward.totals.records, 4);
        assert_eq!(forward.totals.gpu_ns, 40);
        assert_eq!(forward.totals.kernels, 12);
    }
}
