//! What a backend reports, and what the ledger returns.

use serde::{Deserialize, Serialize};

use crate::error::ReportError;

/// The longest backend, tenant or slice name the ledger accepts, in bytes.
pub const MAX_NAME_BYTES: usize = 256;

/// The largest 64-bit figure the ledger stores (SQLite integers are signed 64-bit).
pub const MAX_FIGURE: u64 = i64::MAX as u64;

/// Nanoseconds per second.
const NS_PER_S: u128 = 1_000_000_000;

/// Byte-nanoseconds per GiB-second.
const BYTE_NS_PER_GIB_S: u128 = (1 << 30) * NS_PER_S;

/// One interval of usage, as a backend measured it. This is also the JSON a backend POSTs to the
/// scheduler.
///
/// `(backend, seq)` identifies a report: the ledger records each pair once, so a backend that is
/// unsure whether a report arrived sends it again.
///
/// The memory integrals are `u128`: 80 GiB resident for one second is already about 8.6e19
/// byte-ns, more than a `u64` holds. JSON carries them as plain integers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageReport {
    /// The backend instance: unique per backend process start, e.g. `"<slice>-<pid>-<start ns>"`.
    pub backend: String,
    /// Per backend instance, starts at 1 and grows by 1 per report.
    pub seq: u64,
    /// The tenant the slice belongs to.
    pub tenant: String,
    /// The slice.
    pub slice: String,
    /// The guest session; 0 = figures of the slice as a whole.
    pub session: u64,
    /// Start of the interval (Unix time, ns).
    pub start_unix_ns: u64,
    /// End of the interval (Unix time, ns), not before the start.
    pub end_unix_ns: u64,
    /// GPU busy time in the interval, ns (overlapping work counted once).
    pub gpu_ns: u64,
    /// Integral of resident device memory over the interval, byte-ns.
    pub mem_resident_byte_ns: u128,
    /// Integral of swapped-out (host-held) memory over the interval, byte-ns.
    pub mem_swapped_byte_ns: u128,
    /// Bytes copied host to device.
    pub htod_bytes: u64,
    /// Bytes copied device to host.
    pub dtoh_bytes: u64,
    /// Kernels launched.
    pub kernels: u64,
}

impl UsageReport {
    /// Checks what the ledger requires of a report: names non-empty and at most
    /// [`MAX_NAME_BYTES`], `seq >= 1`, `end >= start`, 64-bit figures at most [`MAX_FIGURE`].
    pub fn validate(&self) -> Result<(), ReportError> {
        for (field, name) in [
            ("backend", &self.backend),
            ("tenant", &self.tenant),
            ("slice", &self.slice),
        ] {
            if name.is_empty() {
                return Err(ReportError::EmptyName { field });
            }
            if name.len() > MAX_NAME_BYTES {
                return Err(ReportError::NameTooLong {
                    field,
                    len: name.len(),
                    limit: MAX_NAME_BYTES,
                });
            }
        }
        if self.seq == 0 {
            return Err(ReportError::ZeroSeq);
        }
        for (field, value) in [
            ("seq", self.seq),
            ("session", self.session),
            ("start_unix_ns", self.start_unix_ns),
            ("end_unix_ns", self.end_unix_ns),
            ("gpu_ns", self.gpu_ns),
            ("htod_bytes", self.htod_bytes),
            ("dtoh_bytes", self.dtoh_bytes),
            ("kernels", self.kernels),
        ] {
            if value > MAX_FIGURE {
                return Err(ReportError::TooLarge {
                    field,
                    value,
                    limit: MAX_FIGURE,
                });
            }
        }
        if self.end_unix_ns < self.start_unix_ns {
            return Err(ReportError::IntervalReversed {
                start: self.start_unix_ns,
                end: self.end_unix_ns,
            });
        }
        Ok(())
    }
}

/// A report as recorded in the ledger.
///
/// Serialized flat: the report's fields plus `rowid` and `recorded_unix_ns` (one JSON Lines line
/// of [`crate::write_jsonl`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "FlatRecord", into = "FlatRecord")]
pub struct Record {
    /// The row id: the export cursor of this record (see [`crate::Ledger::export_since`]).
    pub rowid: u64,
    /// When the ledger committed it (Unix time, ns, the scheduler's clock).
    pub recorded_unix_ns: u64,
    /// What the backend reported.
    pub report: UsageReport,
}

/// Sums over a set of records.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    /// How many records were summed.
    pub records: u64,
    /// GPU busy time, ns.
    pub gpu_ns: u128,
    /// Resident memory integral, byte-ns.
    pub mem_resident_byte_ns: u128,
    /// Swapped memory integral, byte-ns.
    pub mem_swapped_byte_ns: u128,
    /// Bytes copied host to device.
    pub htod_bytes: u128,
    /// Bytes copied device to host.
    pub dtoh_bytes: u128,
    /// Kernels launched.
    pub kernels: u128,
}

impl Totals {
    /// Adds one report's figures (saturating; the sums cannot realistically overflow `u128`).
    pub fn add(&mut self, r: &UsageReport) {
        self.records = self.records.saturating_add(1);
        self.gpu_ns = self.gpu_ns.saturating_add(u128::from(r.gpu_ns));
        self.mem_resident_byte_ns = self
            .mem_resident_byte_ns
            .saturating_add(r.mem_resident_byte_ns);
        self.mem_swapped_byte_ns = self
            .mem_swapped_byte_ns
            .saturating_add(r.mem_swapped_byte_ns);
        self.htod_bytes = self.htod_bytes.saturating_add(u128::from(r.htod_bytes));
        self.dtoh_bytes = self.dtoh_bytes.saturating_add(u128::from(r.dtoh_bytes));
        self.kernels = self.kernels.saturating_add(u128::from(r.kernels));
    }

    /// GPU seconds.
    pub fn gpu_seconds(&self) -> f64 {
        self.gpu_ns as f64 / NS_PER_S as f64
    }

    /// Resident memory, GiB-seconds.
    pub fn mem_resident_gib_s(&self) -> f64 {
        gib_s(self.mem_resident_byte_ns)
    }

    /// Swapped memory, GiB-seconds.
    pub fn mem_swapped_gib_s(&self) -> f64 {
        gib_s(self.mem_swapped_byte_ns)
    }
}

/// GiB-seconds from byte-nanoseconds: `byte_ns / 2^30 / 1e9`.
pub fn gib_s(byte_ns: u128) -> f64 {
    byte_ns as f64 / BYTE_NS_PER_GIB_S as f64
}

/// GiB-seconds from byte-nanoseconds as an exact decimal string with 9 decimals (rounded half
/// up), as the CSV export prints them.
pub fn gib_s_decimal(byte_ns: u128) -> String {
    fixed_decimal(byte_ns, BYTE_NS_PER_GIB_S, 9)
}

/// Seconds from nanoseconds as an exact decimal string with 9 decimals.
pub fn seconds_decimal(ns: u64) -> String {
    fixed_decimal(u128::from(ns), NS_PER_S, 9)
}

/// `num / den` rounded half up to `places` decimals, computed in integers so the output never
/// depends on floating point.
fn fixed_decimal(num: u128, den: u128, places: u32) -> String {
    let scale = 10u128.pow(places);
    let mut whole = num / den;
    let rem = num % den;
    // rem < den <= 2^60 * 1e9, and rem * scale * 2 stays well inside u128 for places <= 9.
    let scaled = rem.saturating_mul(scale);
    let mut frac = scaled / den;
    if (scaled % den).saturating_mul(2) >= den {
        frac += 1;
    }
    if frac == scale {
        whole += 1;
        frac = 0;
    }
    format!("{whole}.{frac:0width$}", width = places as usize)
}

/// The flat serde shape of [`Record`]. Written out by hand rather than with `#[serde(flatten)]`,
/// which cannot carry `u128` through serde_json.
#[derive(Serialize, Deserialize)]
struct FlatRecord {
    rowid: u64,
    recorded_unix_ns: u64,
    backend: String,
    seq: u64,
    tenant: String,
    slice: String,
    session: u64,
    start_unix_ns: u64,
    end_unix_ns: u64,
    gpu_ns: u64,
    mem_resident_byte_ns: u128,
    mem_swapped_byte_ns: u128,
    htod_bytes: u64,
    dtoh_bytes: u64,
    kernels: u64,
}

impl From<Record> for FlatRecord {
    fn from(r: Record) -> Self {
        let u = r.report;
        FlatRecord {
            rowid: r.rowid,
            recorded_unix_ns: r.recorded_unix_ns,
            backend: u.backend,
            seq: u.seq,
            tenant: u.tenant,
            slice: u.slice,
            session: u.session,
            start_unix_ns: u.start_unix_ns,
            end_unix_ns: u.end_unix_ns,
            gpu_ns: u.gpu_ns,
            mem_resident_byte_ns: u.mem_resident_byte_ns,
            mem_swapped_byte_ns: u.mem_swapped_byte_ns,
            htod_bytes: u.htod_bytes,
            dtoh_bytes: u.dtoh_bytes,
            kernels: u.kernels,
        }
    }
}

impl From<FlatRecord> for Record {
    fn from(f: FlatRecord) -> Self {
        Record {
            rowid: f.rowid,
            recorded_unix_ns: f.recorded_unix_ns,
            report: UsageReport {
                backend: f.backend,
                seq: f.seq,
                tenant: f.tenant,
                slice: f.slice,
                session: f.session,
                start_unix_ns: f.start_unix_ns,
                end_unix_ns: f.end_unix_ns,
                gpu_ns: f.gpu_ns,
                mem_resident_byte_ns: f.mem_resident_byte_ns,
                mem_swapped_byte_ns: f.mem_swapped_byte_ns,
                htod_bytes: f.htod_bytes,
                dtoh_bytes: f.dtoh_bytes,
                kernels: f.kernels,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> UsageReport {
        UsageReport {
            backend: "lc-42-1".into(),
            seq: 1,
            tenant: "acme".into(),
            slice: "lc".into(),
            session: 0,
            start_unix_ns: 10,
            end_unix_ns: 20,
            gpu_ns: 5,
            mem_resident_byte_ns: 0,
            mem_swapped_byte_ns: 0,
            htod_bytes: 0,
            dtoh_bytes: 0,
            kernels: 0,
        }
    }

    #[test]
    fn valid_report_passes_validation() {
        assert_eq!(report().validate(), Ok(()));
    }

    #[test]
    fn zero_length_interval_is_valid() {
        let r = UsageReport {
            end_unix_ns: 10,
            ..report()
        };
        assert_eq!(r.validate(), Ok(()));
    }

    #[test]
    fn reversed_interval_is_refused() {
        let r = UsageReport {
            end_unix_ns: 9,
            ..report()
        };
        assert_eq!(
            r.validate(),
            Err(ReportError::IntervalReversed { start: 10, end: 9 })
        );
    }

    #[test]
    fn empty_names_are_refused_naming_the_field() {
        let r = UsageReport {
            tenant: String::new(),
            ..report()
        };
        let err = r.validate().unwrap_err();
        assert_eq!(err, ReportError::EmptyName { field: "tenant" });
        assert_eq!(err.to_string(), "The report's tenant is empty");
    }

    #[test]
    fn overlong_name_is_refused() {
        let r = UsageReport {
            slice: "s".repeat(MAX_NAME_BYTES + 1),
            ..report()
        };
        assert!(matches!(
            r.validate(),
            Err(ReportError::NameTooLong { field: "slice", .. })
        ));
    }

    #[test]
    fn seq_zero_is_refused() {
        let r = UsageReport { seq: 0, ..report() };
        assert_eq!(r.validate(), Err(ReportError::ZeroSeq));
    }

    #[test]
    fn figure_above_i64_max_is_refused() {
        let r = UsageReport {
            kernels: MAX_FIGURE + 1,
            ..report()
        };
        assert!(matches!(
            r.validate(),
            Err(ReportError::TooLarge {
                field: "kernels",
                ..
            })
        ));
    }

    #[test]
    fn gib_s_decimal_is_exact_and_rounds_half_up() {
        let one = BYTE_NS_PER_GIB_S;
        assert_eq!(gib_s_decimal(0), "0.000000000");
        assert_eq!(gib_s_decimal(one), "1.000000000");
        assert_eq!(gib_s_decimal(one * 3 / 2), "1.500000000");
        // 80 GiB resident for one second does not fit a u64 but is exact here.
        assert_eq!(gib_s_decimal(80 * one), "80.000000000");
        // One byte for one second is 1/2^30 GiB-s = 0.000000000931..., rounds to 1e-9.
        assert_eq!(gib_s_decimal(NS_PER_S), "0.000000001");
        // Rounding that carries into the whole part.
        assert_eq!(gib_s_decimal(one - 1), "1.000000000");
        assert_eq!(gib_s_decimal(u128::MAX).split('.').count(), 2);
    }

    #[test]
    fn seconds_decimal_prints_nanoseconds_exactly() {
        assert_eq!(seconds_decimal(1_500_000_001), "1.500000001");
        assert_eq!(seconds_decimal(0), "0.000000000");
    }

    #[test]
    fn report_json_round_trips_memory_integrals_beyond_u64() {
        let r = UsageReport {
            mem_resident_byte_ns: 80 * BYTE_NS_PER_GIB_S,
            ..report()
        };
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains("\"mem_resident_byte_ns\":85899345920000000000"));
        let back: UsageReport = serde_json::from_str(&json).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn record_serializes_flat_and_round_trips() {
        let rec = Record {
            rowid: 7,
            recorded_unix_ns: 99,
            report: UsageReport {
                mem_swapped_byte_ns: u128::from(u64::MAX) + 1,
                ..report()
            },
        };
        let json = serde_json::to_string(&rec).unwrap();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["rowid"], 7);
        assert_eq!(v["tenant"], "acme");
        assert!(v.get("report").is_none());
        assert!(json.contains("\"mem_swapped_byte_ns\":18446744073709551616"));
        let back: Record = serde_json::from_str(&json).unwrap();
        assert_eq!(back, rec);
    }

    #[test]
    fn totals_add_sums_every_figure() {
        let mut t = Totals::default();
        let r = UsageReport {
            gpu_ns: 2_000_000_000,
            mem_resident_byte_ns: BYTE_NS_PER_GIB_S,
            htod_bytes: 3,
            dtoh_bytes: 4,
            kernels: 5,
            ..report()
        };
        t.add(&r);
        t.add(&r);
        assert_eq!(t.records, 2);
        assert_eq!(t.gpu_ns, 4_000_000_000);
        assert_eq!(t.gpu_seconds(), 4.0);
        assert_eq!(t.mem_resident_gib_s(), 2.0);
        assert_eq!(t.mem_swapped_gib_s(), 0.0);
        assert_eq!((t.htod_bytes, t.dtoh_bytes, t.kernels), (6, 8, 10));
    }
}
