//! The durable usage ledger (decision 8 of the design): backends report their usage in
//! intervals, the scheduler appends each report here, and `vgpuctl usage` and billing pipelines
//! read it back.
//!
//! - [`UsageReport`] is what a backend measured over one interval; it is also the JSON a backend
//!   POSTs to the scheduler. `(backend, seq)` identifies it.
//! - [`Ledger`] is `$STATE_DIR/ledger.sqlite3` (SQLite, WAL, `synchronous=FULL`).
//!   [`Ledger::append`] returns once the report is durable; a replayed report is recognised and
//!   ignored, so a backend re-sends whatever it is unsure of, starting after
//!   [`Ledger::last_seq`], and nothing is counted twice.
//! - [`Ledger::usage`] / [`Ledger::totals`] answer "what did tenant T use from .. to ..";
//!   [`Ledger::export_since`] walks every record exactly once with a cursor.
//! - [`write_csv`] / [`write_jsonl`] render records.
//! - [`Reporter`] is the backends' side: it numbers reports, queues them and POSTs them to the
//!   scheduler (`POST /v1/usage/reports` on its API socket) until they are acknowledged.
//! - [`SliceSummary`] / `Ledger::slice_summaries` feed the scheduler's `/metrics`.
//!
//! Cargo feature `store` (on by default) builds the SQLite ledger. A backend depends on this
//! crate with `default-features = false`: [`UsageReport`], the rendering and [`Reporter`]
//! without SQLite.

mod error;
#[cfg(feature = "store")]
mod ledger;
#[cfg(feature = "store")]
mod query;
mod render;
mod report;
pub mod reporter;
#[doc(hidden)]
pub mod stress;
mod summary;

#[cfg(feature = "store")]
pub use error::LedgerError;
pub use error::ReportError;
#[cfg(feature = "store")]
pub use ledger::{Appended, Ledger, LEDGER_FILE, SCHEMA_VERSION};
pub use render::{write_csv, write_jsonl, CSV_HEADER};
pub use report::{
    gib_s, gib_s_decimal, seconds_decimal, Record, Totals, UsageReport, MAX_FIGURE, MAX_NAME_BYTES,
};
pub use reporter::{Reporter, ReporterError};
pub use summary::SliceSummary;

#[cfg(test)]
#[cfg(feature = "store")]
mod tests;
