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

mod error;
mod ledger;
mod query;
mod render;
mod report;
#[doc(hidden)]
pub mod stress;

pub use error::{LedgerError, ReportError};
pub use ledger::{Appended, Ledger, LEDGER_FILE, SCHEMA_VERSION};
pub use render::{write_csv, write_jsonl, CSV_HEADER};
pub use report::{
    gib_s, gib_s_decimal, seconds_decimal, Record, Totals, UsageReport, MAX_FIGURE, MAX_NAME_BYTES,
};

#[cfg(test)]
mod tests;
