//! Tables for `vgpuctl list`, `util` and `memory`: aligned columns, two spaces apart.

use crate::api::{Slice, Util};
use crate::size::format_size;

/// Renders `rows` under `headers`, each column as wide as its widest cell, every line ending in
/// a newline and carrying no trailing spaces.
pub fn render(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header_row: Vec<String> = headers.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&header_row).chain(rows) {
        let mut line = String::new();
        for (i, (cell, width)) in row.iter().zip(&widths).enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(cell);
            let pad = width.saturating_sub(cell.chars().count());
            line.extend(std::iter::repeat_n(' ', pad));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `30`, `12.5`: whole numbers without decimals, others with one.
pub fn number(value: f64) -> String {
    if value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{value:.0}")
    } else {
        format!("{value:.1}")
    }
}

fn percent(value: f64) -> String {
    format!("{}%", number(value))
}

/// The `vgpuctl list` table.
pub fn slices_table(slices: &[Slice]) -> String {
    let headers = [
        "NAME",
        "TENANT",
        "GPU",
        "CLASS",
        "COMPUTE",
        "MAX",
        "MEM-GUAR",
        "MEM-LIMIT",
        "WEIGHT",
        "STATE",
        "PID",
        "RESTARTS",
        "SOCKET",
    ];
    let rows: Vec<Vec<String>> = slices
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                s.tenant.clone(),
                s.gpu.to_string(),
                s.class.clone(),
                percent(s.compute_guarantee_pct),
                percent(s.compute_max_pct),
                format_size(s.memory_guarantee),
                format_size(s.memory_limit),
                number(s.weight),
                if s.attached { "attached" } else { "detached" }.to_owned(),
                s.backend_pid
                    .map_or_else(|| "-".to_owned(), |p| p.to_string()),
                s.restarts.to_string(),
                s.socket.clone().unwrap_or_else(|| "-".to_owned()),
            ]
        })
        .collect();
    render(&headers, &rows)
}

/// A latency in microseconds, humanised: `85µs`, `1.2ms`, `2.50s`.
pub fn micros(us: f64) -> String {
    if us < 1_000.0 {
        format!("{us:.0}µs")
    } else if us < 1_000_000.0 {
        format!("{:.1}ms", us / 1e3)
    } else {
        format!("{:.2}s", us / 1e6)
    }
}

/// The PREEMPT cell: p99 / max preemption latency, `-` for a part not measured.
fn preempt(u: &Util) -> String {
    let part = |us: f64| if us > 0.0 { micros(us) } else { "-".to_owned() };
    if u.preempt_p99_us <= 0.0 && u.preempt_max_us <= 0.0 {
        "-".to_owned()
    } else {
        format!("{}/{}", part(u.preempt_p99_us), part(u.preempt_max_us))
    }
}

/// The `vgpuctl util` table. PREEMPT is the p99 / max preemption latency.
pub fn util_table(utils: &[Util]) -> String {
    let headers = [
        "NAME",
        "TENANT",
        "GPU",
        "CLASS",
        "BUSY",
        "THROTTLED",
        "STATE",
        "GRANT",
        "PREEMPT",
        "GPU-TIME",
        "LAUNCHES",
        "HTOD",
        "DTOH",
        "RESTARTS",
    ];
    let rows: Vec<Vec<String>> = utils
        .iter()
        .map(|u| {
            vec![
                u.name.clone(),
                u.tenant.clone(),
                u.gpu.to_string(),
                u.class.clone(),
                format!("{:.1}%", u.busy_pct),
                format!("{:.1}%", u.throttled_pct),
                if u.busy { "busy" } else { "idle" }.to_owned(),
                if u.running { "run" } else { "held" }.to_owned(),
                preempt(u),
                format!("{:.1}s", u.gpu_seconds),
                u.launches.to_string(),
                format_size(u.htod_bytes),
                format_size(u.dtoh_bytes),
                u.restarts.to_string(),
            ]
        })
        .collect();
    render(&headers, &rows)
}

/// The `vgpuctl memory` table from `/v1/memory` (sizes in MiB).
pub fn memory_table(rows: &[serde_json::Value]) -> String {
    let mib = |v: &serde_json::Value| (v.as_u64().unwrap_or(0) >> 20).to_string();
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r["name"].as_str().unwrap_or("?").to_owned(),
                r["gpu"].as_u64().unwrap_or(0).to_string(),
                mib(&r["guarantee"]),
                mib(&r["limit"]),
                mib(&r["resident"]),
                mib(&r["swapped"]),
                r["reclaims"].as_u64().unwrap_or(0).to_string(),
                if r["evicted"].as_bool().unwrap_or(false) {
                    "reclaimed"
                } else {
                    "resident"
                }
                .to_owned(),
            ]
        })
        .collect();
    render(
        &[
            "SLICE",
            "GPU",
            "GUAR MiB",
            "LIMIT MiB",
            "RESIDENT",
            "SWAPPED",
            "RECLAIMS",
            "STATE",
        ],
        &body,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(name: &str) -> Slice {
        Slice {
            name: name.to_owned(),
            tenant: "acme".to_owned(),
            gpu: 0,
            class: "latency-critical".to_owned(),
            compute_guarantee_pct: 30.0,
            compute_max_pct: 100.0,
            memory_guarantee: 8 << 30,
            memory_limit: 16 << 30,
            weight: 1.0,
            attached: true,
            socket: Some("/var/lib/vgpu/slices/lc.sock".to_owned()),
            board_slot: Some(3),
            backend_pid: Some(1234),
            restarts: 0,
        }
    }

    #[test]
    fn columns_are_as_wide_as_their_widest_cell() {
        let table = render(
            &["A", "LONG-HEADER", "C"],
            &[
                vec!["wide-cell".into(), "x".into(), "".into()],
                vec!["b".into(), "y".into(), "z".into()],
            ],
        );
        assert_eq!(
            table,
            "A          LONG-HEADER  C\n\
             wide-cell  x\n\
             b          y            z\n"
        );
    }

    #[test]
    fn slice_table_shows_guarantees_sizes_and_backend() {
        let mut be = slice("be-batch");
        be.class = "best-effort".to_owned();
        be.compute_guarantee_pct = 12.5;
        be.memory_guarantee = 0;
        be.memory_limit = 3 << 29;
        be.weight = 2.0;
        be.attached = false;
        be.socket = None;
        be.backend_pid = None;
        be.restarts = 4;
        let table = slices_table(&[slice("lc"), be]);
        assert_eq!(
            table,
            "NAME      TENANT  GPU  CLASS             COMPUTE  MAX   MEM-GUAR  MEM-LIMIT  WEIGHT  \
             STATE     PID   RESTARTS  SOCKET\n\
             lc        acme    0    latency-critical  30%      100%  8GiB      16GiB      1       \
             attached  1234  0         /var/lib/vgpu/slices/lc.sock\n\
             be-batch  acme    0    best-effort       12.5%    100%  0B        1.5GiB     2       \
             detached  -     4         -\n"
        );
    }

    #[test]
    fn empty_tables_have_only_the_header() {
        assert_eq!(slices_table(&[]).lines().count(), 1);
        assert!(util_table(&[]).starts_with("NAME  TENANT  GPU  CLASS  BUSY  THROTTLED"));
    }

    #[test]
    fn util_table_shows_shares_state_and_totals() {
        let lc = Util {
            name: "lc".to_owned(),
            tenant: "acme".to_owned(),
            gpu: 0,
            class: "latency-critical".to_owned(),
            busy_pct: 41.25,
            throttled_pct: 0.0,
            busy: true,
            running: true,
            gpu_seconds: 12.5,
            launches: 100_000,
            htod_bytes: 2 << 30,
            dtoh_bytes: 512,
            restarts: 0,
            ..Util::default()
        };
        let be = Util {
            name: "be".to_owned(),
            class: "best-effort".to_owned(),
            running: false,
            busy: true,
            restarts: 1,
            preempt_p99_us: 85.4,
            preempt_max_us: 1_250.0,
            preemptions: 12,
            ..Util::default()
        };
        let idle = Util {
            name: "idle".to_owned(),
            running: true,
            ..Util::default()
        };
        let table = util_table(&[lc, be, idle]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines[0],
            "NAME  TENANT  GPU  CLASS             BUSY   THROTTLED  STATE  GRANT  PREEMPT     \
             GPU-TIME  LAUNCHES  HTOD  DTOH  RESTARTS"
        );
        assert_eq!(
            lines[1],
            "lc    acme    0    latency-critical  41.2%  0.0%       busy   run    -           \
             12.5s     100000    2GiB  512B  0"
        );
        assert_eq!(
            lines[2],
            "be            0    best-effort       0.0%   0.0%       busy   held   85µs/1.2ms  \
             0.0s      0         0B    0B    1"
        );
        assert!(lines[3].contains(" idle   run "), "{}", lines[3]);
    }

    #[test]
    fn preemption_latencies_are_humanised() {
        assert_eq!(micros(85.4), "85µs");
        assert_eq!(micros(1_250.0), "1.2ms");
        assert_eq!(micros(2_500_000.0), "2.50s");
        let only_max = Util {
            preempt_max_us: 40.0,
            ..Util::default()
        };
        assert_eq!(preempt(&only_max), "-/40µs");
        assert_eq!(preempt(&Util::default()), "-");
    }

    #[test]
    fn numbers_drop_decimals_only_when_whole() {
        assert_eq!(number(30.0), "30");
        assert_eq!(number(12.5), "12.5");
        assert_eq!(number(0.25), "0.2");
    }
}
