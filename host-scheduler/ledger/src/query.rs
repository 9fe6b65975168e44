//! Reading the ledger: usage in a time window, totals, and the incremental export.

use rusqlite::params;

use crate::error::LedgerError;
use crate::ledger::{record_from_row, Ledger, COLUMNS};
use crate::report::{Record, Totals, MAX_FIGURE};

/// Records whose interval overlaps the window `[from, to)`: a record with interval
/// `[start, end)` matches when `start < to && end > from`; a zero-length record (`start == end`)
/// matches when `from <= start < to`. `?1` = from, `?2` = to, `?3` = tenant or NULL for all.
const OVERLAP_WHERE: &str = "start_unix_ns < ?2 \
     AND (end_unix_ns > ?1 OR (end_unix_ns = start_unix_ns AND start_unix_ns >= ?1)) \
     AND (?3 IS NULL OR tenant = ?3)";

impl Ledger {
    /// Every record of `tenant` (all tenants if `None`) whose interval overlaps
    /// `[from_unix_ns, to_unix_ns)`, ordered by interval start (then end, then row id).
    ///
    /// Records are whole: one that straddles a window edge is returned in full, not prorated, so
    /// windows that share an edge can both return it. A billing pipeline that must count each
    /// record exactly once uses [`Ledger::export_since`].
    pub fn usage(
        &self,
        tenant: Option<&str>,
        from_unix_ns: u64,
        to_unix_ns: u64,
    ) -> Result<Vec<Record>, LedgerError> {
        let (from, to) = window(from_unix_ns, to_unix_ns)?;
        let conn = self.lock();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {COLUMNS} FROM usage WHERE {OVERLAP_WHERE} \
             ORDER BY start_unix_ns, end_unix_ns, id"
        ))?;
        let rows = stmt.query_map(params![from, to, tenant], record_from_row)?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// The sums over the records [`Ledger::usage`] returns for the same arguments.
    pub fn totals(
        &self,
        tenant: Option<&str>,
        from_unix_ns: u64,
        to_unix_ns: u64,
    ) -> Result<Totals, LedgerError> {
        let (from, to) = window(from_unix_ns, to_unix_ns)?;
        let conn = self.lock();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {COLUMNS} FROM usage WHERE {OVERLAP_WHERE}"
        ))?;
        let mut rows = stmt.query(params![from, to, tenant])?;
        let mut totals = Totals::default();
        while let Some(row) = rows.next()? {
            totals.add(&record_from_row(row)?.report);
        }
        Ok(totals)
    }

    /// The incremental export: up to `limit` records with a row id above `cursor`, in row-id
    /// order, and the cursor to pass next time (the last returned row id; `cursor` itself when
    /// nothing is new). Start with cursor 0.
    ///
    /// The cursor never skips or repeats a record: row ids are AUTOINCREMENT (they only grow and
    /// are never reused), and SQLite commits one writer at a time, so a record with a smaller id
    /// than one already visible is never committed later. A consumer that stores the cursor
    /// together with what it has processed gets every record exactly once.
    pub fn export_since(
        &self,
        cursor: u64,
        limit: usize,
    ) -> Result<(Vec<Record>, u64), LedgerError> {
        // Row ids are positive i64, so a cursor beyond i64::MAX has nothing after it.
        let after = cursor.min(MAX_FIGURE);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let conn = self.lock();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {COLUMNS} FROM usage WHERE id > ?1 ORDER BY id LIMIT ?2"
        ))?;
        let records = stmt
            .query_map(params![after, limit], record_from_row)?
            .collect::<Result<Vec<_>, _>>()?;
        let next = records.last().map_or(cursor, |r| r.rowid);
        Ok((records, next))
    }
}

/// Checks a query window and converts it to SQLite integers (values above `i64::MAX` clamp:
/// no stored time is that large).
fn window(from: u64, to: u64) -> Result<(u64, u64), LedgerError> {
    if to < from {
        return Err(LedgerError::InvalidWindow { from, to });
    }
    Ok((from.min(MAX_FIGURE), to.min(MAX_FIGURE)))
}
