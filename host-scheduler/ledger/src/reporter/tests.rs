//! Tests of the reporter against a fake scheduler on a Unix socket.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::*;

/// What the fake answers: `None` closes the connection without an answer.
type Handler = Box<dyn FnMut(&str, &str, &[u8]) -> Option<(u16, String)> + Send>;

/// A fake scheduler: one request per connection, answered by a handler; records requests.
struct Fake {
    socket: PathBuf,
    requests: Arc<Mutex<Vec<(String, String)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Fake {
    fn start(handler: Handler) -> Fake {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("api.sock");
        Fake::start_at(dir, socket, handler)
    }

    fn start_at(dir: tempfile::TempDir, socket: PathBuf, mut handler: Handler) -> Fake {
        let listener = UnixListener::bind(&socket).unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let requests = Arc::clone(&requests);
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(stream) = stream else { continue };
                    let (method, target, body) = read_request(&stream);
                    requests
                        .lock()
                        .unwrap()
                        .push((method.clone(), target.clone()));
                    if let Some((status, answer)) = handler(&method, &target, &body) {
                        let mut s = &stream;
                        let _ = write!(
                            s,
                            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{answer}",
                            answer.len()
                        );
                    }
                }
            })
        };
        Fake {
            socket,
            requests,
            stop,
            thread: Some(thread),
            _dir: dir,
        }
    }

    fn requests(&self) -> Vec<(String, String)> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = UnixStream::connect(&self.socket);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn read_request(stream: &UnixStream) -> (String, String, Vec<u8>) {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_owned();
    let target = parts.next().unwrap_or_default().to_owned();
    let mut length = 0;
    loop {
        let mut header = String::new();
        reader.read_line(&mut header).unwrap();
        if header.trim().is_empty() {
            break;
        }
        if let Some((n, v)) = header.split_once(':') {
            if n.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().unwrap();
            }
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).unwrap();
    (method, target, body)
}

/// A ledger-like handler: stores reports by seq, acks them, answers last-seq.
fn ledger_handler(stored: Arc<Mutex<BTreeMap<u64, UsageReport>>>) -> Handler {
    Box::new(move |method, target, body| {
        let mut stored = stored.lock().unwrap();
        if method == "GET" && target.starts_with(LAST_SEQ_PATH) {
            let last = stored.keys().next_back().copied();
            return Some((200, serde_json::json!({ "last_seq": last }).to_string()));
        }
        let reports: Vec<UsageReport> = serde_json::from_slice(body).unwrap();
        let mut acked = Vec::new();
        for r in reports {
            acked.push(r.seq);
            stored.entry(r.seq).or_insert(r);
        }
        Some((200, serde_json::json!({ "acked": acked }).to_string()))
    })
}

fn report(gpu_ns: u64) -> UsageReport {
    UsageReport {
        backend: String::new(),
        seq: 0,
        tenant: "acme".into(),
        slice: "lc".into(),
        session: 1,
        start_unix_ns: 0,
        end_unix_ns: 1_000,
        gpu_ns,
        mem_resident_byte_ns: 0,
        mem_swapped_byte_ns: 0,
        htod_bytes: 0,
        dtoh_bytes: 0,
        kernels: 1,
    }
}

fn posts(fake: &Fake) -> usize {
    fake.requests().iter().filter(|(m, _)| m == "POST").count()
}

#[test]
fn push_numbers_reports_from_one_and_stamps_the_backend_id() {
    let r = Reporter::new("/nonexistent/api.sock", "lc-1-2");
    assert_eq!(r.push(report(1)), 1);
    assert_eq!(r.push(report(2)), 2);
    assert_eq!(r.pending_seqs(), [1, 2]);
    let q = r.queue();
    assert!(q.reports.iter().all(|x| x.backend == "lc-1-2"));
}

#[test]
fn flush_without_a_scheduler_fails_and_keeps_the_reports() {
    let r = Reporter::new("/nonexistent/api.sock", "b");
    r.push(report(1));
    let err = r.flush().unwrap_err();
    assert!(matches!(err, ReporterError::Connect { .. }), "{err}");
    assert!(err
        .to_string()
        .starts_with("Cannot reach the scheduler at /nonexistent/api.sock: "));
    assert_eq!(r.pending(), 1);
}

#[test]
fn failing_scheduler_then_accepting_one_gets_every_report_once_in_order() {
    let stored = Arc::new(Mutex::new(BTreeMap::new()));
    let mut inner = ledger_handler(Arc::clone(&stored));
    let mut failures = 2;
    let fake = Fake::start(Box::new(move |m, t, b| {
        if m == "POST" && failures > 0 {
            failures -= 1;
            return Some((503, r#"{"error":"The ledger is busy."}"#.into()));
        }
        inner(m, t, b)
    }));
    let r = Reporter::new(&fake.socket, "b");
    for i in 1..=3 {
        r.push(report(i * 10));
    }
    for _ in 0..2 {
        let err = r.flush().unwrap_err();
        assert!(
            matches!(err, ReporterError::Status { status: 503, .. }),
            "{err}"
        );
        assert_eq!(r.pending(), 3);
    }
    r.push(report(40));
    assert_eq!(r.flush().unwrap(), 4);
    assert_eq!(r.pending(), 0);
    let stored = stored.lock().unwrap();
    assert_eq!(stored.keys().copied().collect::<Vec<_>>(), [1, 2, 3, 4]);
    assert_eq!(stored[&4].gpu_ns, 40);
    // Every failed flush made the next one ask for last-seq first.
    let gets = fake.requests().iter().filter(|(m, _)| m == "GET").count();
    assert_eq!(gets, 3);
    assert_eq!(fake.requests()[0].1, "/v1/usage/last-seq?backend=b");
}

#[test]
fn reports_stored_before_a_lost_answer_are_dropped_after_last_seq_not_resent() {
    let stored = Arc::new(Mutex::new(BTreeMap::new()));
    let mut inner = ledger_handler(Arc::clone(&stored));
    let mut lose_answer = true;
    let fake = Fake::start(Box::new(move |m, t, b| {
        let answer = inner(m, t, b);
        if m == "POST" && lose_answer {
            // Stored, but the scheduler "dies" before answering.
            lose_answer = false;
            return None;
        }
        answer
    }));
    let r = Reporter::new(&fake.socket, "b");
    r.push(report(1));
    r.push(report(2));
    let err = r.flush().unwrap_err();
    assert!(matches!(err, ReporterError::Malformed(_)), "{err}");
    assert_eq!(r.pending_seqs(), [1, 2]);
    r.push(report(3));
    assert_eq!(r.flush().unwrap(), 1);
    assert_eq!(r.pending(), 0);
    assert_eq!(stored.lock().unwrap().len(), 3);
    // The second flush asked last-seq (2), dropped 1 and 2, and posted only 3.
    let reqs = fake.requests();
    let methods: Vec<&str> = reqs.iter().map(|(m, _)| m.as_str()).collect();
    assert_eq!(methods, ["GET", "POST", "GET", "POST"]);
}

#[test]
fn only_the_seqs_listed_in_the_ack_leave_the_queue() {
    let fake = Fake::start(Box::new(|m, _, _| {
        if m == "GET" {
            return Some((200, r#"{"last_seq":null}"#.into()));
        }
        Some((200, r#"{"acked":[1,99]}"#.into()))
    }));
    let r = Reporter::new(&fake.socket, "b");
    r.push(report(1));
    r.push(report(2));
    let err = r.flush().unwrap_err();
    assert_eq!(
        err.to_string(),
        "The scheduler's answer is malformed: the scheduler acknowledged 1 of the 2 reports sent"
    );
    assert_eq!(r.pending_seqs(), [2]);
}

#[test]
fn a_refused_report_is_dropped_and_the_rest_of_its_batch_is_acked() {
    let fake = Fake::start(Box::new(|m, _, body| {
        if m == "GET" {
            return Some((200, r#"{"last_seq":null}"#.into()));
        }
        let reports: Vec<UsageReport> = serde_json::from_slice(body).unwrap();
        if reports.iter().any(|r| r.seq == 2) {
            return Some((409, r#"{"error":"Conflict."}"#.into()));
        }
        let acked: Vec<u64> = reports.iter().map(|r| r.seq).collect();
        Some((200, serde_json::json!({ "acked": acked }).to_string()))
    }));
    let r = Reporter::new(&fake.socket, "b");
    for i in 1..=3 {
        r.push(report(i));
    }
    let err = r.flush().unwrap_err();
    assert!(
        matches!(
            err,
            ReporterError::Rejected {
                seq: 2,
                status: 409,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(r.pending(), 0);
    // One batch, then one request per report.
    assert_eq!(posts(&fake), 4);
}

#[test]
fn a_reused_backend_id_renumbers_the_queue_after_the_ledgers_last_seq() {
    let stored = Arc::new(Mutex::new(BTreeMap::new()));
    stored.lock().unwrap().insert(7, report(0));
    let fake = Fake::start(ledger_handler(Arc::clone(&stored)));
    let r = Reporter::new(&fake.socket, "b");
    r.push(report(1));
    r.push(report(2));
    assert_eq!(r.flush().unwrap(), 2);
    assert_eq!(r.push(report(3)), 10);
    assert_eq!(
        stored.lock().unwrap().keys().copied().collect::<Vec<_>>(),
        [7, 8, 9]
    );
}

#[test]
fn a_full_queue_drops_the_oldest_reports() {
    let r = Reporter::new("/nonexistent/api.sock", "b").with_queue_cap(3);
    for i in 1..=5 {
        r.push(report(i));
    }
    assert_eq!(r.pending_seqs(), [3, 4, 5]);
    assert_eq!(r.dropped(), 2);
}

#[test]
fn large_queues_go_in_batches() {
    let stored = Arc::new(Mutex::new(BTreeMap::new()));
    let fake = Fake::start(ledger_handler(Arc::clone(&stored)));
    let r = Reporter::new(&fake.socket, "b");
    let n = MAX_BATCH * 2 + 1;
    for i in 0..n {
        r.push(report(i as u64));
    }
    assert_eq!(r.flush().unwrap(), n);
    assert_eq!(posts(&fake), 3);
    assert_eq!(stored.lock().unwrap().len(), n);
}
