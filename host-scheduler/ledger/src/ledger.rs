//! The ledger database: opening it, its schema, and appending reports.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension, Row, Transaction, TransactionBehavior};

use crate::error::LedgerError;
use crate::report::{Record, UsageReport};

/// The ledger's file name inside the state directory.
pub const LEDGER_FILE: &str = "ledger.sqlite3";

/// The schema version this build writes (`PRAGMA user_version`).
pub const SCHEMA_VERSION: i64 = 1;

/// How long a statement waits for another connection's lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Version 1. `id` is an AUTOINCREMENT rowid, so ids only grow and are never reused: it is the
/// export cursor. The memory integrals are `u128`, which SQLite integers cannot hold, so they are
/// stored as decimal TEXT (`CAST(mem_resident_byte_ns AS REAL)` for ad-hoc SQL).
const SCHEMA_V1: &str = "
CREATE TABLE usage (
    id                   INTEGER PRIMARY KEY AUTOINCREMENT,
    recorded_unix_ns     INTEGER NOT NULL,
    backend              TEXT    NOT NULL,
    seq                  INTEGER NOT NULL,
    tenant               TEXT    NOT NULL,
    slice                TEXT    NOT NULL,
    session              INTEGER NOT NULL,
    start_unix_ns        INTEGER NOT NULL,
    end_unix_ns          INTEGER NOT NULL,
    gpu_ns               INTEGER NOT NULL,
    mem_resident_byte_ns TEXT    NOT NULL,
    mem_swapped_byte_ns  TEXT    NOT NULL,
    htod_bytes           INTEGER NOT NULL,
    dtoh_bytes           INTEGER NOT NULL,
    kernels              INTEGER NOT NULL,
    UNIQUE (backend, seq)
);
CREATE INDEX usage_by_time ON usage (start_unix_ns);
CREATE INDEX usage_by_tenant_time ON usage (tenant, start_unix_ns);
";

/// The columns every query selects, in the order [`record_from_row`] reads them.
pub(crate) const COLUMNS: &str = "id, recorded_unix_ns, backend, seq, tenant, slice, session, \
     start_unix_ns, end_unix_ns, gpu_ns, mem_resident_byte_ns, mem_swapped_byte_ns, \
     htod_bytes, dtoh_bytes, kernels";

/// What [`Ledger::append`] did with a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// Recorded now, with this row id (its export cursor).
    New(u64),
    /// Already recorded with the same figures (a replay): ignored.
    Duplicate,
}

/// The durable usage ledger, `$STATE_DIR/ledger.sqlite3`.
///
/// SQLite in WAL mode with `synchronous=FULL`: when [`Ledger::append`] returns, the report is on
/// disk and survives a crash of the process (or of the machine). Each `(backend, seq)` is
/// recorded once; a replayed report is ignored.
///
/// `Send + Sync`: one connection behind a mutex, so share it in an `Arc` (calls block on disk
/// I/O; from async code, call it from `spawn_blocking`). Several processes may open the same
/// ledger; SQLite serializes their writes.
pub struct Ledger {
    conn: Mutex<Connection>,
    path: PathBuf,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger").field("path", &self.path).finish()
    }
}

impl Ledger {
    /// Opens (creating it and `state_dir` if missing) the ledger in `state_dir`.
    pub fn open(state_dir: &Path) -> Result<Ledger, LedgerError> {
        std::fs::create_dir_all(state_dir).map_err(|source| LedgerError::CreateDir {
            path: state_dir.to_path_buf(),
            source,
        })?;
        let path = state_dir.join(LEDGER_FILE);
        let open_err = |source| LedgerError::Open {
            path: path.clone(),
            source,
        };
        let mut conn = Connection::open(&path).map_err(open_err)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
            .map_err(open_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(path = %path.display(), mode, "the ledger could not switch to WAL mode");
        }
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(open_err)?;
        migrate(&mut conn, &path)?;
        tracing::info!(path = %path.display(), "usage ledger open");
        Ok(Ledger {
            conn: Mutex::new(conn),
            path,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records one report, durably. A report whose `(backend, seq)` is already recorded with the
    /// same figures is a replay: [`Appended::Duplicate`], nothing changes. With different figures
    /// it is [`LedgerError::Conflict`] (logged), and the first report stays.
    pub fn append(&self, report: &UsageReport) -> Result<Appended, LedgerError> {
        validate(report)?;
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let outcome = insert(&tx, report, now_unix_ns())?;
        tx.commit()?;
        Ok(outcome)
    }

    /// Records several reports in one transaction: either all of them are recorded (or found to
    /// be replays) or, if any is invalid or conflicts, none is. Returns one outcome per report,
    /// in order. A report repeated inside the batch is recorded once.
    pub fn append_batch(&self, reports: &[UsageReport]) -> Result<Vec<Appended>, LedgerError> {
        for report in reports {
            validate(report)?;
        }
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let now = now_unix_ns();
        let mut outcomes = Vec::with_capacity(reports.len());
        for report in reports {
            outcomes.push(insert(&tx, report, now)?);
        }
        tx.commit()?;
        Ok(outcomes)
    }

    /// The highest sequence number recorded for `backend`, if any: a reconnecting backend
    /// re-sends every report after it.
    pub fn last_seq(&self, backend: &str) -> Result<Option<u64>, LedgerError> {
        let conn = self.lock();
        let seq: Option<u64> = conn.query_row(
            "SELECT MAX(seq) FROM usage WHERE backend = ?1",
            [backend],
            |row| row.get(0),
        )?;
        Ok(seq)
    }

    /// The connection. A panic while it was held cannot leave a transaction half-applied
    /// (an uncommitted transaction rolls back when dropped), so a poisoned lock is still usable.
    pub(crate) fn lock(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Creates the schema in a fresh database, or checks an existing one's version.
fn migrate(conn: &mut Connection, path: &Path) -> Result<(), LedgerError> {
    let open_err = |source| LedgerError::Open {
        path: path.to_path_buf(),
        source,
    };
    // IMMEDIATE: two processes opening a fresh ledger at once must not both create the schema.
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(open_err)?;
    let version: i64 = tx
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .map_err(open_err)?;
    match version {
        0 => {
            tx.execute_batch(SCHEMA_V1).map_err(open_err)?;
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)
                .map_err(open_err)?;
            tracing::info!(path = %path.display(), version = SCHEMA_VERSION, "created the ledger schema");
        }
        SCHEMA_VERSION => {}
        found => {
            return Err(LedgerError::UnsupportedSchema {
                path: path.to_path_buf(),
                found,
                supported: SCHEMA_VERSION,
            })
        }
    }
    tx.commit().map_err(open_err)
}

fn validate(report: &UsageReport) -> Result<(), LedgerError> {
    report
        .validate()
        .map_err(|source| LedgerError::InvalidReport {
            backend: report.backend.clone(),
            seq: report.seq,
            source,
        })
}

/// Inserts one (validated) report inside `tx`.
fn insert(tx: &Transaction<'_>, r: &UsageReport, now: u64) -> Result<Appended, LedgerError> {
    let inserted = tx
        .prepare_cached(
            "INSERT INTO usage (recorded_unix_ns, backend, seq, tenant, slice, session, \
             start_unix_ns, end_unix_ns, gpu_ns, mem_resident_byte_ns, mem_swapped_byte_ns, \
             htod_bytes, dtoh_bytes, kernels) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14) \
             ON CONFLICT (backend, seq) DO NOTHING",
        )?
        .execute(params![
            now,
            r.backend,
            r.seq,
            r.tenant,
            r.slice,
            r.session,
            r.start_unix_ns,
            r.end_unix_ns,
            r.gpu_ns,
            r.mem_resident_byte_ns.to_string(),
            r.mem_swapped_byte_ns.to_string(),
            r.htod_bytes,
            r.dtoh_bytes,
            r.kernels,
        ])?;
    if inserted == 1 {
        let rowid = u64::try_from(tx.last_insert_rowid()).unwrap_or_default();
        let previous: Option<u64> = tx
            .prepare_cached("SELECT MAX(seq) FROM usage WHERE backend = ?1 AND seq < ?2")?
            .query_row(params![r.backend, r.seq], |row| row.get(0))?;
        if previous.is_some_and(|p| p + 1 != r.seq) {
            tracing::warn!(
                backend = %r.backend,
                seq = r.seq,
                previous,
                "usage report arrived after a gap in its backend's sequence"
            );
        }
        tracing::debug!(backend = %r.backend, seq = r.seq, rowid, "usage report recorded");
        return Ok(Appended::New(rowid));
    }
    let existing = tx
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM usage WHERE backend = ?1 AND seq = ?2"
        ))?
        .query_row(params![r.backend, r.seq], record_from_row)
        .optional()?;
    match existing {
        Some(rec) if rec.report == *r => {
            tracing::debug!(backend = %r.backend, seq = r.seq, "replayed usage report ignored");
            Ok(Appended::Duplicate)
        }
        _ => {
            tracing::warn!(
                backend = %r.backend,
                seq = r.seq,
                "usage report conflicts with the one already recorded; kept the first"
            );
            Err(LedgerError::Conflict {
                backend: r.backend.clone(),
                seq: r.seq,
            })
        }
    }
}

/// Reads a row selected with [`COLUMNS`].
pub(crate) fn record_from_row(row: &Row<'_>) -> rusqlite::Result<Record> {
    Ok(Record {
        rowid: row.get(0)?,
        recorded_unix_ns: row.get(1)?,
        report: UsageReport {
            backend: row.get(2)?,
            seq: row.get(3)?,
            tenant: row.get(4)?,
            slice: row.get(5)?,
            session: row.get(6)?,
            start_unix_ns: row.get(7)?,
            end_unix_ns: row.get(8)?,
            gpu_ns: row.get(9)?,
            mem_resident_byte_ns: u128_from_text(row, 10)?,
            mem_swapped_byte_ns: u128_from_text(row, 11)?,
            htod_bytes: row.get(12)?,
            dtoh_bytes: row.get(13)?,
            kernels: row.get(14)?,
        },
    })
}

fn u128_from_text(row: &Row<'_>, idx: usize) -> rusqlite::Result<u128> {
    let text: String = row.get(idx)?;
    text.parse().map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(idx, rusqlite::types::Type::Text, Box::new(e))
    })
}

/// Now, Unix time in ns (0 if the clock is before 1970, saturating in 2554).
fn now_unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
        .min(crate::report::MAX_FIGURE)
}
