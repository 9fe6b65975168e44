//! The built `vgpuctl` against a fake scheduler API: what it sends and what it prints.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Output, Stdio};

use common::{text, vgpuctl, vgpuctl_command, FakeScheduler};
use serde_json::json;

const LC: &str = r#"{"name":"lc","tenant":"acme","gpu":0,"class":"latency-critical",
    "compute_guarantee_pct":30,"compute_max_pct":100,"memory_guarantee":8589934592,
    "memory_limit":17179869184,"weight":1,"attached":false,"socket":null,"board_slot":3,
    "backend_pid":null,"restarts":0}"#;

const LC_ATTACHED: &str = r#"{"name":"lc","tenant":"acme","gpu":0,"class":"latency-critical",
    "compute_guarantee_pct":30,"compute_max_pct":100,"memory_guarantee":8589934592,
    "memory_limit":17179869184,"weight":1,"attached":true,
    "socket":"/var/lib/vgpu/slices/lc.sock","board_slot":3,"backend_pid":1234,"restarts":0}"#;

const UTIL: &str = r#"[{"name":"lc","tenant":"acme","gpu":0,"class":"latency-critical",
    "busy_pct":41.2,"throttled_pct":0.0,"busy":true,"running":true,"gpu_seconds":12.5,
    "launches":100000,"htod_bytes":1073741824,"dtoh_bytes":0,"restarts":0,
    "preempt_last_us":40.0,"preempt_max_us":120.0,"preempt_p50_us":35.5,"preempt_p99_us":85.0,
    "preemptions":12}]"#;

struct Setup {
    fake: FakeScheduler,
    _dir: tempfile::TempDir,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeScheduler::start(&dir.path().join("api.sock"));
    Setup { fake, _dir: dir }
}

impl Setup {
    fn run(&self, args: &[&str]) -> Output {
        let socket = self.fake.socket().to_str().unwrap().to_owned();
        let mut all = vec!["--scheduler", &socket];
        all.extend_from_slice(args);
        vgpuctl(&all)
    }
}

fn assert_ok(out: &Output) {
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert!(out.stderr.is_empty(), "stderr: {}", text(&out.stderr));
}

#[test]
fn create_posts_the_spec_and_prints_the_slice() {
    let s = setup();
    s.fake.route("POST", "/v1/slices", 201, LC);
    let out = s.run(&[
        "create",
        "lc",
        "--tenant",
        "acme",
        "--class",
        "latency-critical",
        "--compute",
        "30",
        "--memory-guarantee",
        "8GiB",
        "--memory-limit",
        "16GiB",
    ]);
    assert_ok(&out);
    assert_eq!(
        text(&out.stdout),
        "created lc: GPU 0, latency-critical, compute 30% (max 100%), memory 8GiB (limit \
         16GiB), weight 1\n"
    );
    let requests = s.fake.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(
        (requests[0].method.as_str(), requests[0].path.as_str()),
        ("POST", "/v1/slices")
    );
    assert_eq!(
        requests[0].body,
        Some(
            json!({"name": "lc", "tenant": "acme", "class": "latency-critical",
                    "compute_guarantee_pct": 30, "memory_guarantee": 8589934592u64,
                    "memory_limit": 17179869184u64})
        )
    );
}

#[test]
fn create_with_attach_prints_the_backend_socket() {
    let s = setup();
    s.fake.route("POST", "/v1/slices", 201, LC_ATTACHED);
    let out = s.run(&["create", "lc", "--tenant", "acme", "--attach"]);
    assert_ok(&out);
    assert_eq!(
        text(&out.stdout).lines().nth(1),
        Some("attached lc: socket /var/lib/vgpu/slices/lc.sock, backend pid 1234")
    );
    assert_eq!(
        s.fake.requests()[0].body,
        Some(json!({"name": "lc", "tenant": "acme", "attach": true}))
    );
}

#[test]
fn admission_refusal_prints_the_scheduler_message_and_exits_1() {
    let s = setup();
    let message = "GPU 0 has 30% of compute left to guarantee; slice lc asks 50%.";
    s.fake.route(
        "POST",
        "/v1/slices",
        409,
        &json!({ "error": message }).to_string(),
    );
    let out = s.run(&["create", "lc", "--tenant", "acme", "--compute", "50"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(text(&out.stderr), format!("vgpuctl: {message}\n"));
    assert!(out.stdout.is_empty());
}

#[test]
fn an_error_status_without_a_json_message_shows_status_and_body() {
    let s = setup();
    s.fake.route("GET", "/v1/slices", 500, "upstream exploded");
    let out = s.run(&["list"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        "vgpuctl: The scheduler answered GET /v1/slices with HTTP 500: upstream exploded\n"
    );
}

#[test]
fn list_prints_a_table_and_json_prints_the_answer_as_is() {
    let s = setup();
    let body = format!("[{LC},{LC_ATTACHED}]");
    s.fake.route("GET", "/v1/slices", 200, &body);
    let out = s.run(&["list"]);
    assert_ok(&out);
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    assert!(lines[0].starts_with("NAME  TENANT  GPU  CLASS"), "{stdout}");
    assert!(
        lines[1].ends_with("detached  -     0         -"),
        "{stdout}"
    );
    assert!(
        lines[2].ends_with("attached  1234  0         /var/lib/vgpu/slices/lc.sock"),
        "{stdout}"
    );

    let out = s.run(&["list", "--json"]);
    assert_ok(&out);
    assert_eq!(text(&out.stdout), format!("{body}\n"));
}

#[test]
fn resize_patches_the_given_fields() {
    let s = setup();
    s.fake.route("PATCH", "/v1/slices/lc", 200, LC);
    let out = s.run(&["resize", "lc", "--max-compute", "80", "--weight", "3"]);
    assert_ok(&out);
    assert!(text(&out.stdout).starts_with("resized lc: "));
    let requests = s.fake.requests();
    assert_eq!(requests[0].method, "PATCH");
    assert_eq!(requests[0].path, "/v1/slices/lc");
    assert_eq!(
        requests[0].body,
        Some(json!({"compute_max_pct": 80, "weight": 3}))
    );
}

#[test]
fn delete_of_an_unknown_slice_prints_the_404_message() {
    let s = setup();
    s.fake.route("DELETE", "/v1/slices/lc", 204, "");
    let out = s.run(&["delete", "lc"]);
    assert_ok(&out);
    assert_eq!(text(&out.stdout), "deleted lc\n");

    let out = s.run(&["delete", "gone"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(text(&out.stderr), "vgpuctl: Not found.\n");
    assert_eq!(
        s.fake.calls(),
        [
            ("DELETE".to_owned(), "/v1/slices/lc".to_owned()),
            ("DELETE".to_owned(), "/v1/slices/gone".to_owned())
        ]
    );
}

#[test]
fn attach_and_detach_without_a_vm_only_ask_the_scheduler() {
    let s = setup();
    s.fake
        .route("POST", "/v1/slices/lc/attach", 200, LC_ATTACHED);
    s.fake.route("POST", "/v1/slices/lc/detach", 200, LC);
    let out = s.run(&["attach", "lc"]);
    assert_ok(&out);
    assert_eq!(
        text(&out.stdout),
        "attached lc: socket /var/lib/vgpu/slices/lc.sock, backend pid 1234\n"
    );
    let out = s.run(&["detach", "lc"]);
    assert_ok(&out);
    assert_eq!(text(&out.stdout), "detached lc\n");
    let requests = s.fake.requests();
    assert_eq!(
        s.fake.calls(),
        [
            ("POST".to_owned(), "/v1/slices/lc/attach".to_owned()),
            ("POST".to_owned(), "/v1/slices/lc/detach".to_owned())
        ]
    );
    assert!(requests.iter().all(|r| r.body.is_none()));
}

#[test]
fn util_prints_a_table_or_the_json() {
    let s = setup();
    s.fake.route("GET", "/v1/util", 200, UTIL);
    let out = s.run(&["util"]);
    assert_ok(&out);
    assert_eq!(
        text(&out.stdout),
        "NAME  TENANT  GPU  CLASS             BUSY   THROTTLED  STATE  GRANT  PREEMPT     GPU-TIME  \
         LAUNCHES  HTOD  DTOH  RESTARTS\n\
         lc    acme    0    latency-critical  41.2%  0.0%       busy   run    85µs/120µs  12.5s     \
         100000    1GiB  0B    0\n"
    );
    let out = s.run(&["util", "--json"]);
    assert_ok(&out);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for field in [
        "preempt_last_us",
        "preempt_max_us",
        "preempt_p50_us",
        "preempt_p99_us",
        "preemptions",
    ] {
        assert!(v[0].get(field).is_some(), "{field} in {v}");
    }
    let out = s.run(&["util", "--json"]);
    assert_ok(&out);
    assert_eq!(text(&out.stdout), format!("{UTIL}\n"));
}

#[test]
fn util_watch_redraws_until_killed() {
    let s = setup();
    s.fake.route("GET", "/v1/util", 200, UTIL);
    let socket = s.fake.socket().to_str().unwrap().to_owned();
    let mut child = vgpuctl_command(&["util", "--watch", "0.05", "--scheduler", &socket])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Three answers sent means at least two tables were printed and flushed.
    s.fake.wait_for_requests(3);
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = text(&out.stdout);
    let header = format!("Every 0.05s: vgpuctl util ({socket})");
    assert!(stdout.matches(&header).count() >= 2, "{stdout}");
    assert!(
        stdout
            .matches("lc    acme    0    latency-critical")
            .count()
            >= 2,
        "{stdout}"
    );
    assert!(out.stderr.is_empty(), "{}", text(&out.stderr));
}

#[test]
fn util_watch_json_prints_one_document_a_line() {
    let s = setup();
    s.fake.route("GET", "/v1/util", 200, UTIL);
    let socket = s.fake.socket().to_str().unwrap().to_owned();
    let mut child = vgpuctl_command(&["util", "--watch", "0.05", "--json", "--scheduler", &socket])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    s.fake.wait_for_requests(3);
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines.len() >= 2, "{stdout}");
    for line in lines {
        let value: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(value[0]["name"], "lc");
    }
}

#[test]
fn an_absent_scheduler_is_named_with_how_to_start_it() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("api.sock");
    let out = vgpuctl(&["--scheduler", socket.to_str().unwrap(), "list"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with(&format!(
            "vgpuctl: Cannot reach the vgpu scheduler at {} (",
            socket.display()
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "start it with `vgpu-scheduler --state-dir {}`",
            dir.path().display()
        )),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn the_scheduler_comes_from_the_environment_when_not_given() {
    let s = setup();
    s.fake.route("GET", "/v1/slices", 200, "[]");
    let out = vgpuctl_command(&["list"])
        .env("VGPU_SCHEDULER", s.fake.socket())
        .output()
        .unwrap();
    assert_ok(&out);
    assert_eq!(s.fake.calls().len(), 1);
    assert!(text(&out.stdout).starts_with("NAME"));
}

#[test]
fn a_malformed_scheduler_address_is_refused() {
    let out = vgpuctl(&["--scheduler", "https://example:443", "list"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("is neither a Unix socket path nor an http://HOST:PORT"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn usage_errors_exit_2() {
    let out = vgpuctl(&["resize", "lc"]);
    assert_eq!(out.status.code(), Some(2));
    let out = vgpuctl(&["create", "lc", "--tenant", "t", "--memory-limit", "lots"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("is not a whole number of bytes"),
        "{}",
        text(&out.stderr)
    );
}

const RECORD: &str = r#"{"rowid":6,"recorded_unix_ns":1700000000000000009,"backend":"lc-42-1",
    "seq":3,"tenant":"acme","slice":"lc","session":2,"start_unix_ns":1700000000000000000,
    "end_unix_ns":1700000001000000000,"gpu_ns":250000000,
    "mem_resident_byte_ns":85899345920000000000,"mem_swapped_byte_ns":0,"htod_bytes":4096,
    "dtoh_bytes":512,"kernels":17}"#;

#[test]
fn usage_prints_the_tenants_records_as_csv() {
    let s = setup();
    s.fake.route(
        "GET",
        "/v1/usage?format=json&tenant=acme&from=2023-11-14",
        200,
        &format!(r#"{{"records":[{RECORD}],"totals":{{"records":1}}}}"#),
    );
    let out = s.run(&["usage", "--tenant", "acme", "--from", "2023-11-14"]);
    assert_ok(&out);
    assert_eq!(
        text(&out.stdout),
        format!(
            "{}\n6,1700000000000000009,acme,lc,2,lc-42-1,3,1700000000000000000,\
             1700000001000000000,250000000,0.250000000,85899345920000000000,80.000000000,\
             0,0.000000000,4096,512,17\n",
            vgpu_ledger::CSV_HEADER
        )
    );
}

#[test]
fn usage_export_prints_records_and_the_next_cursor_on_stderr() {
    let s = setup();
    s.fake.route(
        "GET",
        "/v1/usage/export?since_cursor=5&limit=2&format=json",
        200,
        &format!(r#"{{"records":[{RECORD}],"next_cursor":6}}"#),
    );
    let out = s.run(&["usage", "export", "--since-cursor", "5", "--limit", "2"]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stderr), "next-cursor: 6\n");
    let line = text(&out.stdout);
    assert_eq!(line.lines().count(), 1);
    let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    assert_eq!(
        (v["rowid"].as_u64(), v["kernels"].as_u64()),
        (Some(6), Some(17))
    );
    assert!(line.contains("\"mem_resident_byte_ns\":85899345920000000000"));
}

#[test]
fn usage_errors_carry_the_scheduler_message() {
    let s = setup();
    s.fake.route(
        "GET",
        "/v1/usage?format=json&from=soon",
        400,
        r#"{"error":"from: \"soon\" is neither Unix nanoseconds nor an RFC 3339 date."}"#,
    );
    let out = s.run(&["usage", "--from", "soon"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        "vgpuctl: from: \"soon\" is neither Unix nanoseconds nor an RFC 3339 date.\n"
    );
}
