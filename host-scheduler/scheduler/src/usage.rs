//! Metering: backends' usage reports into the ledger, and usage read back for billing.
//!
//! | request | answer |
//! |---|---|
//! | `POST /v1/usage/reports` (`[UsageReport]`) | 200 `{"acked":[seq,...]}`: every report is durable (stored now, or a replay found stored); 400 invalid report or body; 409 a stored report with the same backend and seq has other figures (nothing of the batch is stored) |
//! | `GET /v1/usage/last-seq?backend=ID` | 200 `{"backend":ID,"last_seq":N}` (`null` if none) |
//! | `GET /v1/usage?tenant=T&from=F&to=T&format=json\|csv\|jsonl` | records whose interval overlaps `[from, to)` |
//! | `GET /v1/usage/export?since_cursor=C&limit=N&format=json\|csv\|jsonl` | up to N records after cursor C, in ledger order; header `X-Next-Cursor` |
//!
//! Times (`from`, `to`) are Unix nanoseconds or RFC 3339 dates or date-times; `from` defaults
//! to 0, `to` to the end of time, `tenant` to every tenant. `format` defaults to `json`:
//! `{"records":[Record...],"totals":Totals}` for usage, `{"records":[...],"next_cursor":N}` for
//! export. `csv` and `jsonl` are the ledger's export formats (`vgpu_ledger::write_csv`,
//! `write_jsonl`). Export starts at cursor 0, `limit` defaults to 1000 (at most 100 000); a
//! pipeline stores the next cursor with what it processed, and gets every record exactly once.
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;
use vgpu_ledger::{Appended, Ledger, LedgerError, Record, SliceSummary, Totals, UsageReport};

use crate::api::{parse_body, ApiError, ApiResult};
use crate::timespec::parse_time;

/// Export page size when `limit` is not given.
pub const DEFAULT_EXPORT_LIMIT: usize = 1_000;
/// The largest export page.
pub const MAX_EXPORT_LIMIT: usize = 100_000;
/// The header carrying the export's next cursor.
pub const NEXT_CURSOR_HEADER: &str = "x-next-cursor";

/// Errors of the metering operations.
#[derive(Debug, thiserror::Error)]
pub enum MeteringError {
    /// The ledger refused or failed.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// The blocking task running a ledger call failed.
    #[error("The ledger task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Runs a ledger call on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, LedgerError> + Send + 'static,
) -> Result<T, MeteringError> {
    Ok(tokio::task::spawn_blocking(f).await??)
}

/// The ledger, and per-slice summaries of it kept up to date for `/metrics`.
#[derive(Debug)]
pub struct Metering {
    ledger: Arc<Ledger>,
    summaries: Mutex<HashMap<(String, String), SliceSummary>>,
}

impl Metering {
    /// Opens (creating it if missing) the ledger in `state_dir` and summarizes it.
    pub async fn open(state_dir: &Path) -> Result<Metering, MeteringError> {
        let dir = state_dir.to_path_buf();
        let (ledger, summaries) = blocking(move || {
            let ledger = Ledger::open(&dir)?;
            let summaries = ledger.slice_summaries()?;
            Ok((ledger, summaries))
        })
        .await?;
        let summaries = summaries
            .into_iter()
            .map(|s| ((s.tenant.clone(), s.slice.clone()), s))
            .collect();
        Ok(Metering {
            ledger: Arc::new(ledger),
            summaries: Mutex::new(summaries),
        })
    }

    /// The ledger.
    pub fn ledger(&self) -> &Arc<Ledger> {
        &self.ledger
    }

    /// The summary of (tenant, slice), if the ledger has records of it.
    pub fn summary(&self, tenant: &str, slice: &str) -> Option<SliceSummary> {
        self.lock()
            .get(&(tenant.to_owned(), slice.to_owned()))
            .cloned()
    }

    /// Appends `reports` in one transaction; returns the sequence numbers now durable (all of
    /// them) and updates the summaries with the reports that are new.
    pub async fn append(&self, reports: Vec<UsageReport>) -> Result<Vec<u64>, MeteringError> {
        let ledger = Arc::clone(&self.ledger);
        let (reports, outcomes) = blocking(move || {
            let outcomes = ledger.append_batch(&reports)?;
            Ok((reports, outcomes))
        })
        .await?;
        let mut summaries = self.lock();
        for (r, outcome) in reports.iter().zip(&outcomes) {
            if let Appended::New(_) = outcome {
                summaries
                    .entry((r.tenant.clone(), r.slice.clone()))
                    .or_insert_with(|| SliceSummary::new(&r.tenant, &r.slice))
                    .add(r);
            }
        }
        Ok(reports.iter().map(|r| r.seq).collect())
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<(String, String), SliceSummary>> {
        self.summaries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl From<MeteringError> for ApiError {
    fn from(e: MeteringError) -> ApiError {
        let status = match &e {
            MeteringError::Ledger(LedgerError::InvalidReport { .. })
            | MeteringError::Ledger(LedgerError::InvalidWindow { .. }) => StatusCode::BAD_REQUEST,
            MeteringError::Ledger(LedgerError::Conflict { .. }) => StatusCode::CONFLICT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status.is_server_error() {
            tracing::error!("{e}");
        }
        ApiError::new(status, format!("{e}."))
    }
}

/// The metering routes.
pub fn router(metering: Arc<Metering>) -> Router {
    Router::new()
        .route("/v1/usage/reports", post(post_reports))
        .route("/v1/usage/last-seq", get(last_seq))
        .route("/v1/usage", get(usage))
        .route("/v1/usage/export", get(export))
        .with_state(metering)
}

/// How usage is rendered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Json,
    Jsonl,
    Csv,
}

impl Format {
    fn parse(text: Option<&str>) -> ApiResult<Format> {
        match text.unwrap_or("json") {
            "json" => Ok(Format::Json),
            "jsonl" => Ok(Format::Jsonl),
            "csv" => Ok(Format::Csv),
            other => Err(bad_request(format!(
                "Format {other:?} is unknown; use json, jsonl or csv."
            ))),
        }
    }

    /// The records as CSV or JSON Lines, with their content type.
    fn render(self, records: &[Record]) -> ApiResult<Response> {
        let mut out = Vec::new();
        let (written, content_type) = match self {
            Format::Csv => (
                vgpu_ledger::write_csv(records, &mut out),
                "text/csv; charset=utf-8",
            ),
            _ => (
                vgpu_ledger::write_jsonl(records, &mut out),
                "application/jsonl; charset=utf-8",
            ),
        };
        written.map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("Cannot render the usage: {e}."),
            )
        })?;
        Ok(([(header::CONTENT_TYPE, content_type)], out).into_response())
    }
}

fn bad_request(message: String) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, message)
}

/// The query string, or 400 with the parser's explanation.
fn query<T>(q: Result<Query<T>, QueryRejection>) -> ApiResult<T> {
    q.map(|Query(v)| v)
        .map_err(|e| bad_request(format!("The query string is invalid: {}.", e.body_text())))
}

async fn post_reports(State(m): State<Arc<Metering>>, body: Bytes) -> ApiResult<Response> {
    let reports: Vec<UsageReport> = parse_body(&body)?;
    let acked = if reports.is_empty() {
        Vec::new()
    } else {
        m.append(reports).await?
    };
    Ok(Json(json!({ "acked": acked })).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LastSeqQuery {
    backend: String,
}

async fn last_seq(
    State(m): State<Arc<Metering>>,
    q: Result<Query<LastSeqQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let backend = query(q)?.backend;
    let ledger = Arc::clone(&m.ledger);
    let name = backend.clone();
    let last = blocking(move || ledger.last_seq(&name)).await?;
    Ok(Json(json!({ "backend": backend, "last_seq": last })).into_response())
}

/// The JSON answer of `GET /v1/usage`. Typed rather than built with `json!`, which cannot
/// carry the `u128` memory integrals.
#[derive(Serialize)]
struct UsageBody<'a> {
    tenant: Option<&'a str>,
    from_unix_ns: u64,
    to_unix_ns: u64,
    records: &'a [Record],
    totals: &'a Totals,
}

/// The JSON answer of `GET /v1/usage/export`.
#[derive(Serialize)]
struct ExportBody<'a> {
    records: &'a [Record],
    next_cursor: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UsageQuery {
    tenant: Option<String>,
    from: Option<String>,
    to: Option<String>,
    format: Option<String>,
}

async fn usage(
    State(m): State<Arc<Metering>>,
    q: Result<Query<UsageQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let q = query(q)?;
    let format = Format::parse(q.format.as_deref())?;
    let time = |name: &str, text: Option<&str>, default: u64| match text {
        None => Ok(default),
        Some(t) => parse_time(t).map_err(|e| bad_request(format!("{name}: {e}."))),
    };
    let from = time("from", q.from.as_deref(), 0)?;
    let to = time("to", q.to.as_deref(), u64::MAX)?;
    let ledger = Arc::clone(&m.ledger);
    let tenant = q.tenant.clone();
    let (records, totals) = blocking(move || {
        let records = ledger.usage(tenant.as_deref(), from, to)?;
        let mut totals = Totals::default();
        records.iter().for_each(|r| totals.add(&r.report));
        Ok((records, totals))
    })
    .await?;
    match format {
        Format::Json => Ok(Json(UsageBody {
            tenant: q.tenant.as_deref(),
            from_unix_ns: from,
            to_unix_ns: to,
            records: &records,
            totals: &totals,
        })
        .into_response()),
        f => f.render(&records),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportQuery {
    since_cursor: Option<u64>,
    limit: Option<usize>,
    format: Option<String>,
}

async fn export(
    State(m): State<Arc<Metering>>,
    q: Result<Query<ExportQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let q = query(q)?;
    let format = Format::parse(q.format.as_deref())?;
    let cursor = q.since_cursor.unwrap_or(0);
    let limit = q.limit.unwrap_or(DEFAULT_EXPORT_LIMIT);
    if limit == 0 || limit > MAX_EXPORT_LIMIT {
        return Err(bad_request(format!(
            "limit is {limit}; it must be from 1 to {MAX_EXPORT_LIMIT}."
        )));
    }
    let ledger = Arc::clone(&m.ledger);
    let (records, next) = blocking(move || ledger.export_since(cursor, limit)).await?;
    let mut response = match format {
        Format::Json => Json(ExportBody {
            records: &records,
            next_cursor: next,
        })
        .into_response(),
        f => f.render(&records)?,
    };
    response
        .headers_mut()
        .insert(NEXT_CURSOR_HEADER, HeaderValue::from(next));
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_parse_and_unknown_ones_are_refused() {
        assert_eq!(Format::parse(None).unwrap(), Format::Json);
        assert_eq!(Format::parse(Some("csv")).unwrap(), Format::Csv);
        assert_eq!(Format::parse(Some("jsonl")).unwrap(), Format::Jsonl);
        let e = Format::parse(Some("xml")).unwrap_err();
        assert_eq!(
            e.message(),
            "Format \"xml\" is unknown; use json, jsonl or csv."
        );
    }
}
