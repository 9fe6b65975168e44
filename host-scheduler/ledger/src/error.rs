//! Errors of the ledger.

#[cfg(feature = "store")]
use std::io;
#[cfg(feature = "store")]
use std::path::PathBuf;

use thiserror::Error;

/// Why a usage report was refused before it reached the database.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ReportError {
    /// A name field (backend, tenant, slice) is empty.
    #[error("The report's {field} is empty")]
    EmptyName {
        /// The field's name.
        field: &'static str,
    },
    /// A name field is longer than [`crate::MAX_NAME_BYTES`].
    #[error("The report's {field} is {len} bytes long; the limit is {limit} bytes")]
    NameTooLong {
        /// The field's name.
        field: &'static str,
        /// Its length in bytes.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// Sequence numbers start at 1.
    #[error("The report's sequence number is 0; sequence numbers start at 1")]
    ZeroSeq,
    /// The interval ends before it starts.
    #[error("The report's interval ends at {end} ns, before it starts at {start} ns")]
    IntervalReversed {
        /// `start_unix_ns`.
        start: u64,
        /// `end_unix_ns`.
        end: u64,
    },
    /// A 64-bit figure does not fit SQLite's signed 64-bit integers.
    #[error("The report's {field} is {value}, above the ledger's limit of {limit}")]
    TooLarge {
        /// The field's name.
        field: &'static str,
        /// Its value.
        value: u64,
        /// The largest value the ledger stores (`i64::MAX`).
        limit: u64,
    },
}

/// Errors of [`crate::Ledger`].
#[cfg(feature = "store")]
#[derive(Debug, Error)]
pub enum LedgerError {
    /// The state directory could not be created.
    #[error("Could not create the state directory {path}: {source}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The database could not be opened or set up.
    #[error("Could not open the ledger at {path}: {source}")]
    Open {
        /// The database file.
        path: PathBuf,
        /// Why.
        source: rusqlite::Error,
    },
    /// The database was written by a newer build.
    #[error(
        "The ledger at {path} has schema version {found}; this build understands version {supported} at most"
    )]
    UnsupportedSchema {
        /// The database file.
        path: PathBuf,
        /// The version found (`PRAGMA user_version`).
        found: i64,
        /// The newest version this build knows.
        supported: i64,
    },
    /// A report failed validation; nothing was written.
    #[error("{source} (report {seq} from backend {backend:?})")]
    InvalidReport {
        /// The report's backend.
        backend: String,
        /// The report's sequence number.
        seq: u64,
        /// What is wrong with it.
        source: ReportError,
    },
    /// A report with an already recorded (backend, seq) carries different figures.
    #[error(
        "Backend {backend:?} sent report {seq} again with different figures; the ledger keeps the first one"
    )]
    Conflict {
        /// The report's backend.
        backend: String,
        /// The report's sequence number.
        seq: u64,
    },
    /// A query window ends before it starts.
    #[error("The query window ends at {to} ns, before it starts at {from} ns")]
    InvalidWindow {
        /// Start of the window.
        from: u64,
        /// End of the window.
        to: u64,
    },
    /// The database failed.
    #[error("The ledger's database failed: {0}")]
    Sqlite(#[from] rusqlite::Error),
}
