//! Rendering records as CSV and JSON Lines, for `vgpuctl usage` and billing pipelines.

use std::io::{self, Write};

use crate::report::{gib_s_decimal, seconds_decimal, Record};

/// The CSV header, in the column order every row follows. The column set and order are part of
/// the export format: add columns only at the end.
pub const CSV_HEADER: &str = "rowid,recorded_unix_ns,tenant,slice,session,backend,seq,\
start_unix_ns,end_unix_ns,gpu_ns,gpu_seconds,mem_resident_byte_ns,mem_resident_gib_s,\
mem_swapped_byte_ns,mem_swapped_gib_s,htod_bytes,dtoh_bytes,kernels";

/// Writes a header row and one line per record (`\n` line ends). Raw integer figures come with
/// derived decimals: `gpu_seconds`, and GiB-seconds for memory, exact to 9 decimals.
pub fn write_csv<'a, W: Write>(
    records: impl IntoIterator<Item = &'a Record>,
    mut out: W,
) -> io::Result<()> {
    writeln!(out, "{CSV_HEADER}")?;
    for rec in records {
        let r = &rec.report;
        writeln!(
            out,
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
            rec.rowid,
            rec.recorded_unix_ns,
            csv_field(&r.tenant),
            csv_field(&r.slice),
            r.session,
            csv_field(&r.backend),
            r.seq,
            r.start_unix_ns,
            r.end_unix_ns,
            r.gpu_ns,
            seconds_decimal(r.gpu_ns),
            r.mem_resident_byte_ns,
            gib_s_decimal(r.mem_resident_byte_ns),
            r.mem_swapped_byte_ns,
            gib_s_decimal(r.mem_swapped_byte_ns),
            r.htod_bytes,
            r.dtoh_bytes,
            r.kernels,
        )?;
    }
    out.flush()
}

/// Writes one JSON object per line: the flat [`Record`] serialization (exact integers, memory
/// integrals in byte-ns).
pub fn write_jsonl<'a, W: Write>(
    records: impl IntoIterator<Item = &'a Record>,
    mut out: W,
) -> io::Result<()> {
    for rec in records {
        serde_json::to_writer(&mut out, rec)?;
        out.write_all(b"\n")?;
    }
    out.flush()
}

/// Quotes a text field when it needs it (RFC 4180): it holds a comma, a quote or a line break.
fn csv_field(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\"")).into()
    } else {
        s.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::UsageReport;

    fn record(rowid: u64, tenant: &str) -> Record {
        Record {
            rowid,
            recorded_unix_ns: 1_700_000_000_000_000_000 + rowid,
            report: UsageReport {
                backend: "lc-42-7".into(),
                seq: rowid,
                tenant: tenant.into(),
                slice: "lc".into(),
                session: 3,
                start_unix_ns: 1_000_000_000,
                end_unix_ns: 2_000_000_000,
                gpu_ns: 250_000_000,
                // 80 GiB for one second, and 1.5 GiB for one second.
                mem_resident_byte_ns: 80 * (1 << 30) * 1_000_000_000,
                mem_swapped_byte_ns: 3 * (1 << 29) * 1_000_000_000,
                htod_bytes: 4096,
                dtoh_bytes: 512,
                kernels: 17,
            },
        }
    }

    #[test]
    fn csv_has_header_and_one_exact_line_per_record() {
        let mut out = Vec::new();
        write_csv(&[record(1, "acme"), record(2, "beta")], &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let expected = format!(
            "{CSV_HEADER}\n\
             1,1700000000000000001,acme,lc,3,lc-42-7,1,1000000000,2000000000,250000000,0.250000000,\
             85899345920000000000,80.000000000,1610612736000000000,1.500000000,4096,512,17\n\
             2,1700000000000000002,beta,lc,3,lc-42-7,2,1000000000,2000000000,250000000,0.250000000,\
             85899345920000000000,80.000000000,1610612736000000000,1.500000000,4096,512,17\n"
        );
        assert_eq!(text, expected);
        let columns = CSV_HEADER.split(',').count();
        assert!(text.lines().all(|l| l.split(',').count() == columns));
    }

    #[test]
    fn csv_of_no_records_is_just_the_header() {
        let mut out = Vec::new();
        write_csv(&[], &mut out).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), format!("{CSV_HEADER}\n"));
    }

    #[test]
    fn csv_quotes_fields_with_commas_and_quotes() {
        let mut out = Vec::new();
        write_csv(&[record(1, "a,\"b\"")], &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains(",\"a,\"\"b\"\"\",lc,"), "{text}");
    }

    #[test]
    fn jsonl_writes_one_parsable_flat_object_per_record() {
        let records = [record(1, "acme"), record(2, "beta")];
        let mut out = Vec::new();
        write_jsonl(&records, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(text.ends_with('\n'));
        assert!(lines[0].starts_with("{\"rowid\":1,\"recorded_unix_ns\":1700000000000000001,"));
        assert!(lines[0].contains("\"mem_resident_byte_ns\":85899345920000000000"));
        for (line, rec) in lines.iter().zip(&records) {
            let back: Record = serde_json::from_str(line).unwrap();
            assert_eq!(&back, rec);
        }
    }
}
