//! End-to-end: the real `vgpu-scheduler` binary with a fake backend (a shell script that records
//! its arguments and sleeps), driven over its Unix-socket REST API.
#![allow(clippy::unwrap_used)]
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const GIB: u64 = 1 << 30;

/// Polls `f` every 20 ms until it returns `Some`, for at most 20 s.
fn wait_until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One HTTP/1.1 request over the Unix socket; returns the status and the JSON body (Null if
/// empty).
fn try_request(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> std::io::Result<(u16, Value)> {
    let mut s = UnixStream::connect(sock)?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: vgpu\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8(raw).expect("response is UTF-8");
    let (head, rest) = text.split_once("\r\n\r\n").expect("response has a header");
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let payload = if chunked {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    let value = if payload.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&payload).expect("JSON body")
    };
    Ok((status, value))
}

fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, tail) = rest.split_once("\r\n").expect("chunk size line");
        let n = usize::from_str_radix(size.trim(), 16).expect("chunk size");
        if n == 0 {
            return out;
        }
        out.push_str(&tail[..n]);
        rest = &tail[n + 2..];
    }
}

fn request(sock: &Path, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    try_request(sock, method, path, body).expect("API request")
}

fn alive(pid: u64) -> bool {
    let pid = i32::try_from(pid).unwrap();
    // SAFETY: signal 0 sends nothing; it only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a process this test started (or its backend, which it looked up).
    unsafe { libc::kill(i32::try_from(pid).unwrap(), sig) };
}

/// The scheduler under test; SIGTERMed and reaped when dropped.
struct Daemon {
    child: Child,
    sock: PathBuf,
}

impl Daemon {
    fn start(state: &Path, backend: &Path) -> Daemon {
        let child = Command::new(env!("CARGO_BIN_EXE_vgpu-scheduler"))
            .arg("--state-dir")
            .arg(state)
            .arg("--backend")
            .arg(backend)
            .args(["--device", "emulated", "--log", "warn"])
            .stdin(Stdio::null())
            .spawn()
            .expect("start vgpu-scheduler");
        let sock = state.join("api.sock");
        let d = Daemon { child, sock };
        wait_until("the API to answer", || {
            try_request(&d.sock, "GET", "/healthz", None)
                .ok()
                .filter(|(s, v)| *s == 200 && v["status"] == "ok")
        });
        d
    }

    fn stop(mut self) -> ExitStatus {
        signal(self.child.id(), libc::SIGTERM);
        wait_until("the scheduler to exit", || self.child.try_wait().unwrap())
    }

    fn slice(&self, name: &str) -> Value {
        let (status, v) = request(&self.sock, "GET", &format!("/v1/slices/{name}"), None);
        assert_eq!(status, 200, "{v}");
        v
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            signal(self.child.id(), libc::SIGTERM);
            let _ = self.child.wait();
        }
    }
}

/// A fake backend: appends "PID ARGS" to `log`, then becomes `sleep`.
fn fake_backend(dir: &Path, log: &Path) -> PathBuf {
    let path = dir.join("fake-backend.sh");
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\necho \"$$ $*\" >> '{}'\nexec sleep 1000\n",
            log.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// Lines of the fake backends' log for slice `name`: (pid, args).
fn launches(log: &Path, name: &str) -> Vec<(u64, String)> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(_, args)| args.contains(&format!("--slice {name} ")))
        .map(|(pid, args)| (pid.parse().unwrap(), args.to_string()))
        .collect()
}

#[test]
fn scheduler_admits_attaches_restarts_and_persists_slices() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let log = dir.path().join("launches.log");
    let backend = fake_backend(dir.path(), &log);
    let d = Daemon::start(&state, &backend);
    let sock = d.sock.clone();

    // The default slice is attached at start, with the documented backend flags.
    let (pid, args) = wait_until("the default backend", || launches(&log, "default").pop());
    let s = state.display();
    assert_eq!(
        args,
        format!(
            "--socket {s}/slices/default.sock --device emulated --slice default \
             --memory-limit {} --board {s}/board --board-slot 0 \
             --scheduler-socket {s}/api.sock --tenant default \
             --emulated-gpu-lock {s}/emulated-gpu-0.lock --emulated-gpu-memory {}",
            80 * GIB,
            80 * GIB
        )
    );
    let default = d.slice("default");
    assert_eq!(default["attached"], true);
    assert_eq!(default["backend_pid"], pid);
    assert_eq!(default["compute_guarantee_pct"], 100);

    // The default slice owns GPU 0: nothing more can be guaranteed.
    let lc = json!({"name": "lc", "tenant": "acme", "class": "latency-critical",
                    "compute_guarantee_pct": 30, "memory_limit": 16 * GIB, "attach": true});
    let (status, v) = request(&sock, "POST", "/v1/slices", Some(&lc));
    assert_eq!(status, 409);
    assert_eq!(
        v["error"],
        "GPU 0 has 0% of compute left to guarantee; slice lc asks 30%."
    );
    let (status, v) = request(
        &sock,
        "POST",
        "/v1/slices",
        Some(&json!({"name": "Bad Name", "tenant": "t"})),
    );
    assert_eq!(status, 400, "{v}");
    let (status, v) = request(&sock, "POST", "/v1/slices", Some(&json!({"name": "x"})));
    assert_eq!(status, 400);
    assert!(v["error"].as_str().unwrap().contains("tenant"), "{v}");

    // Shrink the default slice, then the latency-critical slice fits and starts.
    let (status, v) = request(
        &sock,
        "PATCH",
        "/v1/slices/default",
        Some(&json!({"compute_guarantee_pct": 70})),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["compute_guarantee_pct"], 70);
    let (status, v) = request(&sock, "POST", "/v1/slices", Some(&lc));
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["attached"], true);
    assert_eq!(v["class"], "latency-critical");
    assert_eq!(v["socket"], format!("{s}/slices/lc.sock"));
    assert_eq!(v["board_slot"], 1);
    assert_eq!(v["memory_limit"], 16 * GIB);
    let (status, v) = request(&sock, "POST", "/v1/slices", Some(&lc));
    assert_eq!(
        (status, v["error"].as_str()),
        (409, Some("Slice lc already exists."))
    );
    let (status, v) = request(
        &sock,
        "POST",
        "/v1/slices",
        Some(&json!({"name": "be2", "tenant": "t", "compute_guarantee_pct": 1})),
    );
    assert_eq!(status, 409);
    assert_eq!(
        v["error"],
        "GPU 0 has 0% of compute left to guarantee; slice be2 asks 1%."
    );
    let (status, _) = request(
        &sock,
        "PATCH",
        "/v1/slices/lc",
        Some(&json!({"compute_guarantee_pct": 31})),
    );
    assert_eq!(status, 409);

    // A killed backend is restarted and the restart counted.
    let (lc_pid, _) = wait_until("the lc backend", || launches(&log, "lc").pop());
    assert_eq!(d.slice("lc")["backend_pid"], lc_pid);
    signal(u32::try_from(lc_pid).unwrap(), libc::SIGKILL);
    let restarted = wait_until("the lc backend to be restarted", || {
        let v = d.slice("lc");
        (v["restarts"] == 1 && v["backend_pid"].as_u64().is_some_and(|p| p != lc_pid)).then_some(v)
    });
    let new_pid = restarted["backend_pid"].as_u64().unwrap();
    // The new backend logs its launch as it starts, which may be just after the API shows it.
    wait_until("the restarted backend's launch line", || {
        (launches(&log, "lc").len() == 2).then_some(())
    });
    assert!(alive(new_pid));

    let (status, util) = request(&sock, "GET", "/v1/util", None);
    assert_eq!(status, 200);
    let names: Vec<&str> = util
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["default", "lc"]);
    assert_eq!(util[1]["restarts"], 1);
    assert_eq!(util[1]["class"], "latency-critical");
    for field in [
        "preempt_last_us",
        "preempt_max_us",
        "preempt_p50_us",
        "preempt_p99_us",
    ] {
        assert!(util[1][field].is_f64(), "{field} in {util}");
    }
    assert!(util[1]["preemptions"].is_u64(), "{util}");

    // Delete stops the backend; detach stops it but keeps the slice.
    let (status, v) = request(&sock, "DELETE", "/v1/slices/lc", None);
    assert_eq!((status, v), (204, Value::Null));
    wait_until("the lc backend to go", || (!alive(new_pid)).then_some(()));
    let (status, v) = request(&sock, "GET", "/v1/slices/lc", None);
    assert_eq!(
        (status, v["error"].as_str()),
        (404, Some("Slice lc does not exist."))
    );
    let keep = json!({"name": "keep", "tenant": "t", "compute_guarantee_pct": 20,
                      "memory_guarantee": "2GiB"});
    let (status, v) = request(&sock, "POST", "/v1/slices", Some(&keep));
    assert_eq!(status, 201, "{v}");
    assert_eq!(
        (v["attached"].as_bool(), v["socket"].is_null()),
        (Some(false), true)
    );
    let (status, v) = request(&sock, "POST", "/v1/slices/keep/attach", None);
    assert_eq!(status, 200, "{v}");
    let keep_pid = wait_until("the keep backend", || launches(&log, "keep").pop()).0;
    let (status, v) = request(&sock, "POST", "/v1/slices/keep/detach", None);
    assert_eq!((status, v["attached"].as_bool()), (200, Some(false)));
    wait_until("the keep backend to go", || {
        (!alive(keep_pid)).then_some(())
    });

    // Shutdown stops the remaining backend; a restart brings the slices back.
    let status = d.stop();
    assert!(status.success(), "{status}");
    wait_until("the default backend to go", || (!alive(pid)).then_some(()));
    assert!(!sock.exists(), "the API socket is removed at shutdown");

    let d = Daemon::start(&state, &backend);
    let default = d.slice("default");
    assert_eq!(default["compute_guarantee_pct"], 70);
    assert_eq!(default["attached"], true);
    let keep = d.slice("keep");
    assert_eq!(keep["attached"], false);
    assert_eq!(keep["memory_guarantee"], 2 * GIB);
    let (status, _) = request(&d.sock, "GET", "/v1/slices/lc", None);
    assert_eq!(status, 404);
    wait_until("the default backend to start again", || {
        (launches(&log, "default").len() == 2).then_some(())
    });
    assert!(d.stop().success());
}

#[test]
fn second_scheduler_on_the_same_state_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let log = dir.path().join("launches.log");
    let backend = fake_backend(dir.path(), &log);
    let d = Daemon::start(&state, &backend);
    let out = Command::new(env!("CARGO_BIN_EXE_vgpu-scheduler"))
        .arg("--state-dir")
        .arg(&state)
        .arg("--backend")
        .arg(&backend)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Another scheduler is serving"), "{err}");
    assert!(d.stop().success());
}

#[test]
fn bad_config_fails_with_a_message_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("vgpu.toml");
    std::fs::write(&cfg, "tick_us = 5\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_vgpu-scheduler"))
        .arg("--config")
        .arg(&cfg)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "The configuration {} is invalid: tick_us is 5",
            cfg.display()
        )),
        "{err}"
    );
}
