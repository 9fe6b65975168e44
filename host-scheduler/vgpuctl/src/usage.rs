//! `vgpuctl usage`: tenants' usage from the scheduler's ledger, and the incremental export for
//! billing pipelines.
//!
//! Both ask the scheduler for JSON (`GET /v1/usage`, `GET /v1/usage/export`) and print the
//! records with the ledger's own CSV / JSON Lines writers, so the output is exactly the
//! scheduler's export format.

use std::io::Write;

use clap::{Args, Subcommand, ValueEnum};
use serde::Deserialize;
use vgpu_ledger::Record;

use crate::api::{percent_encode, ApiRequest};
use crate::client::{Client, ClientError};

/// How records are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum UsageFormat {
    /// A header line, then one line per record.
    Csv,
    /// One JSON object per record and line.
    Jsonl,
}

/// `vgpuctl usage [--tenant T] [--from ..] [--to ..] [--format csv|jsonl]`.
#[derive(Debug, Clone, Args)]
pub struct UsageArgs {
    /// Only this tenant [default: every tenant].
    #[arg(long)]
    pub tenant: Option<String>,
    /// Records whose interval ends after this: Unix nanoseconds, or an RFC 3339 date
    /// (2025-01-31) or date-time (2025-01-31T12:00:00Z) [default: the beginning].
    #[arg(long, value_name = "TIME")]
    pub from: Option<String>,
    /// Records whose interval starts before this [default: the end of time].
    #[arg(long, value_name = "TIME")]
    pub to: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = UsageFormat::Csv)]
    pub format: UsageFormat,
}

/// The subcommands of `vgpuctl usage`.
#[derive(Debug, Clone, Subcommand)]
pub enum UsageCommand {
    /// Prints the records recorded after a cursor, in ledger order, and the cursor to resume
    /// from on stderr (`next-cursor: N`). Start with cursor 0; run again with the printed
    /// cursor until no records come: every record is printed exactly once.
    Export {
        /// The cursor of the last run (0: from the first record).
        #[arg(long, value_name = "C", default_value_t = 0)]
        since_cursor: u64,
        /// At most this many records [scheduler default: 1000].
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = UsageFormat::Jsonl)]
        format: UsageFormat,
    },
}

/// The JSON answer of `GET /v1/usage` (its totals are not needed here).
#[derive(Debug, Deserialize)]
pub struct UsageAnswer {
    /// The records.
    pub records: Vec<Record>,
}

/// The JSON answer of `GET /v1/usage/export`.
#[derive(Debug, Deserialize)]
pub struct ExportAnswer {
    /// The records.
    pub records: Vec<Record>,
    /// Where the next export starts.
    pub next_cursor: u64,
}

/// The request `usage` sends.
pub fn usage_request(args: &UsageArgs) -> ApiRequest {
    let mut query = vec!["format=json".to_owned()];
    for (name, value) in [
        ("tenant", &args.tenant),
        ("from", &args.from),
        ("to", &args.to),
    ] {
        if let Some(v) = value {
            query.push(format!("{name}={}", percent_encode(v)));
        }
    }
    ApiRequest::new("GET", format!("/v1/usage?{}", query.join("&")))
}

/// The request `usage export` sends.
pub fn export_request(since_cursor: u64, limit: Option<usize>) -> ApiRequest {
    let mut path = format!("/v1/usage/export?since_cursor={since_cursor}");
    if let Some(limit) = limit {
        path.push_str(&format!("&limit={limit}"));
    }
    path.push_str("&format=json");
    ApiRequest::new("GET", path)
}

/// Errors of the usage commands.
#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    /// The scheduler failed or refused.
    #[error(transparent)]
    Scheduler(#[from] ClientError),
    /// Writing the output failed.
    #[error("Cannot write the output: {0}")]
    Output(#[from] std::io::Error),
}

/// Runs `usage` (no subcommand) or `usage export`; records go to `out`, the next cursor of an
/// export to `err`.
pub fn run_usage(
    client: &Client,
    args: &UsageArgs,
    command: Option<&UsageCommand>,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<(), UsageError> {
    match command {
        None => {
            let answer: UsageAnswer = client.send_json(&usage_request(args))?;
            print(&answer.records, args.format, out)?;
        }
        Some(UsageCommand::Export {
            since_cursor,
            limit,
            format,
        }) => {
            let answer: ExportAnswer = client.send_json(&export_request(*since_cursor, *limit))?;
            print(&answer.records, *format, out)?;
            out.flush()?;
            writeln!(err, "next-cursor: {}", answer.next_cursor)?;
        }
    }
    Ok(())
}

fn print(records: &[Record], format: UsageFormat, out: &mut dyn Write) -> std::io::Result<()> {
    match format {
        UsageFormat::Csv => vgpu_ledger::write_csv(records, out),
        UsageFormat::Jsonl => vgpu_ledger::write_jsonl(records, out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_query_encodes_times_and_leaves_out_what_was_not_given() {
        let args = UsageArgs {
            tenant: Some("acme".into()),
            from: Some("2025-01-31T12:00:00+02:00".into()),
            to: None,
            format: UsageFormat::Csv,
        };
        assert_eq!(
            usage_request(&args).path,
            "/v1/usage?format=json&tenant=acme&from=2025-01-31T12%3A00%3A00%2B02%3A00"
        );
    }

    #[test]
    fn export_query_carries_cursor_and_limit() {
        assert_eq!(
            export_request(42, Some(10)).path,
            "/v1/usage/export?since_cursor=42&limit=10&format=json"
        );
        assert_eq!(
            export_request(0, None).path,
            "/v1/usage/export?since_cursor=0&format=json"
        );
    }
}
