//! The metering endpoints of a scheduler started in-process: usage reports in, usage and the
//! export out, `/metrics`, and the real `Reporter` against them.
#![allow(clippy::unwrap_used)]
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use serde_json::{json, Value};
use vgpu_ledger::{Record, Reporter, UsageReport};
use vgpu_scheduler::config::{Config, DeviceKind};
use vgpu_scheduler::slice::SliceRequest;
use vgpu_scheduler::Scheduler;

/// An answer: status, headers (names lowercase), body.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap()
    }
}

fn send(addr: SocketAddr, method: &str, path: &str, body: Option<String>) -> Answer {
    let mut s = TcpStream::connect(addr).unwrap();
    let body = body.unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Answer {
        status,
        headers,
        body: body.to_owned(),
    }
}

fn report(backend: &str, seq: u64, tenant: &str, start_s: u64, gpu_ns: u64) -> UsageReport {
    let start = 1_700_000_000_000_000_000 + start_s * 1_000_000_000;
    UsageReport {
        backend: backend.into(),
        seq,
        tenant: tenant.into(),
        slice: format!("{tenant}-slice"),
        session: 1,
        start_unix_ns: start,
        end_unix_ns: start + 1_000_000_000,
        gpu_ns,
        // 80 GiB for one second: beyond u64.
        mem_resident_byte_ns: 80 * (1 << 30) * 1_000_000_000,
        mem_swapped_byte_ns: 0,
        htod_bytes: 100,
        dtoh_bytes: 200,
        kernels: 3,
    }
}

fn post(addr: SocketAddr, reports: &[UsageReport]) -> Answer {
    send(
        addr,
        "POST",
        "/v1/usage/reports",
        Some(serde_json::to_string(reports).unwrap()),
    )
}

async fn start(dir: &std::path::Path) -> Scheduler {
    let config = Config {
        slices: vec![],
        ..Config::default()
    };
    Scheduler::builder(dir)
        .config(config)
        .device(DeviceKind::Emulated)
        .backend("/bin/false")
        .listen_tcp("127.0.0.1:0".parse().unwrap())
        .start()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_are_stored_once_and_read_back_as_usage_export_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let scheduler = start(dir.path()).await;
    let addr = scheduler.tcp_addr().unwrap();
    let req: SliceRequest = serde_json::from_value(
        json!({"name": "acme-slice", "tenant": "acme", "class": "latency-critical"}),
    )
    .unwrap();
    scheduler.core().create(req).unwrap();

    tokio::task::spawn_blocking(move || {
        // Reports in, replays and bad input.
        let batch = [
            report("b1", 1, "acme", 0, 1_000_000_000),
            report("b1", 2, "acme", 1, 500_000_000),
            report("b1", 3, "beta", 2, 7),
        ];
        let a = post(addr, &batch);
        assert_eq!((a.status, a.json()), (200, json!({"acked": [1, 2, 3]})));
        let a = post(addr, &batch[1..]);
        assert_eq!((a.status, a.json()), (200, json!({"acked": [2, 3]})));
        let a = post(addr, &[report("b1", 2, "acme", 1, 999)]);
        assert_eq!(a.status, 409, "{}", a.body);
        assert!(a.json()["error"]
            .as_str()
            .unwrap()
            .contains("sent report 2 again with different figures"));
        let a = post(addr, &[report("b1", 0, "acme", 1, 1)]);
        assert_eq!(a.status, 400);
        assert!(a.json()["error"]
            .as_str()
            .unwrap()
            .contains("sequence number is 0"));
        let a = send(addr, "POST", "/v1/usage/reports", Some("{\"x\":1}".into()));
        assert_eq!(a.status, 400);
        assert!(a.json()["error"]
            .as_str()
            .unwrap()
            .starts_with("The request body is invalid"));
        let a = post(addr, &[]);
        assert_eq!((a.status, a.json()), (200, json!({"acked": []})));

        // Last seq.
        let a = send(addr, "GET", "/v1/usage/last-seq?backend=b1", None);
        assert_eq!(a.json(), json!({"backend": "b1", "last_seq": 3}));
        let a = send(addr, "GET", "/v1/usage/last-seq?backend=nobody", None);
        assert_eq!(a.json(), json!({"backend": "nobody", "last_seq": null}));
        let a = send(addr, "GET", "/v1/usage/last-seq", None);
        assert_eq!(a.status, 400);
        assert!(
            a.json()["error"].as_str().unwrap().contains("backend"),
            "{}",
            a.body
        );

        // Usage of one tenant, as JSON with exact totals, CSV and JSON Lines.
        let a = send(addr, "GET", "/v1/usage?tenant=acme", None);
        assert_eq!(a.status, 200, "{}", a.body);
        assert!(
            a.body
                .contains("\"mem_resident_byte_ns\":171798691840000000000"),
            "{}",
            a.body
        );
        let v = a.json();
        assert_eq!(v["records"].as_array().unwrap().len(), 2);
        assert_eq!(v["totals"]["gpu_ns"], 1_500_000_000u64);
        assert_eq!(v["totals"]["records"], 2);
        let a = send(addr, "GET", "/v1/usage?format=csv", None);
        assert_eq!(a.header("content-type"), Some("text/csv; charset=utf-8"));
        assert_eq!(a.body.lines().count(), 4);
        assert!(a.body.starts_with(vgpu_ledger::CSV_HEADER));
        // The window [start of report 2, +1 s) by RFC 3339: only report 2 overlaps it.
        let a = send(
            addr,
            "GET",
            "/v1/usage?from=2023-11-14T22:13:21Z&to=2023-11-14T22:13:22Z&format=jsonl",
            None,
        );
        assert_eq!(a.status, 200, "{}", a.body);
        let lines: Vec<Record> = a
            .body
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].report.seq, 2);
        let a = send(addr, "GET", "/v1/usage?from=soon", None);
        assert_eq!(a.status, 400);
        assert!(a.json()["error"]
            .as_str()
            .unwrap()
            .starts_with("from: \"soon\" is neither"));
        let a = send(addr, "GET", "/v1/usage?from=20&to=10", None);
        assert_eq!(a.status, 400);
        let a = send(addr, "GET", "/v1/usage?tenant=acme&format=xml", None);
        assert_eq!(a.status, 400);
        let a = send(addr, "GET", "/v1/usage?tennant=acme", None);
        assert_eq!(a.status, 400, "unknown parameters are refused");

        // The export pages through every record once.
        let a = send(addr, "GET", "/v1/usage/export?since_cursor=0&limit=2", None);
        assert_eq!(a.header("x-next-cursor"), Some("2"));
        let v = a.json();
        assert_eq!(v["next_cursor"], 2);
        assert_eq!(v["records"].as_array().unwrap().len(), 2);
        let a = send(
            addr,
            "GET",
            "/v1/usage/export?since_cursor=2&limit=2&format=csv",
            None,
        );
        assert_eq!(a.header("x-next-cursor"), Some("3"));
        assert_eq!(a.body.lines().count(), 2);
        let a = send(
            addr,
            "GET",
            "/v1/usage/export?since_cursor=3&format=jsonl",
            None,
        );
        assert_eq!(
            (a.header("x-next-cursor"), a.body.as_str()),
            (Some("3"), "")
        );
        let a = send(addr, "GET", "/v1/usage/export?limit=0", None);
        assert_eq!(a.status, 400);

        // /metrics: OpenMetrics, per slice, GPU time from the ledger.
        let a = send(addr, "GET", "/metrics", None);
        assert_eq!(a.status, 200);
        assert_eq!(
            a.header("content-type"),
            Some(vgpu_scheduler::metrics::CONTENT_TYPE)
        );
        let labels = r#"tenant="acme",slice="acme-slice",gpu="0",class="latency-critical""#;
        assert!(
            a.body
                .contains(&format!("vgpu_gpu_seconds_total{{{labels}}} 1.5\n")),
            "{}",
            a.body
        );
        assert!(a.body.contains(&format!(
            "vgpu_memory_resident_bytes{{{labels}}} 85899345920.0\n"
        )));
        assert!(a.body.ends_with("# EOF\n"));
    })
    .await
    .unwrap();
    scheduler.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reporter_delivers_to_the_scheduler_and_resumes_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let scheduler = start(dir.path()).await;
    let socket = scheduler.api_socket().to_path_buf();
    let reporter = std::sync::Arc::new(Reporter::new(&socket, "be-7-1"));
    let r = std::sync::Arc::clone(&reporter);
    tokio::task::spawn_blocking(move || {
        r.push(report("", 0, "acme", 0, 10));
        r.push(report("", 0, "acme", 1, 20));
        assert_eq!(r.flush().unwrap(), 2);
    })
    .await
    .unwrap();
    scheduler.shutdown().await;

    let r = std::sync::Arc::clone(&reporter);
    tokio::task::spawn_blocking(move || {
        r.push(report("", 0, "acme", 2, 30));
        assert!(r.flush().is_err(), "no scheduler");
        assert_eq!(r.pending(), 1);
    })
    .await
    .unwrap();

    let scheduler = start(dir.path()).await;
    let r = std::sync::Arc::clone(&reporter);
    tokio::task::spawn_blocking(move || assert_eq!(r.flush().unwrap(), 1))
        .await
        .unwrap();
    let ledger = std::sync::Arc::clone(scheduler.metering().ledger());
    let totals = tokio::task::spawn_blocking(move || ledger.totals(None, 0, u64::MAX))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((totals.records, totals.gpu_ns), (3, 60));
    let summary = scheduler.metering().summary("acme", "acme-slice").unwrap();
    assert_eq!(summary.totals.gpu_ns, 60);
    scheduler.shutdown().await;
}
