//! Test helpers: a fake scheduler API on a Unix socket, and running the built `vgpuctl`.

// Test helpers outside #[test] functions unwrap too; not every test file uses every helper.
#![allow(clippy::unwrap_used, dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

/// One request the fake scheduler got.
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    /// The body as JSON; `None` when there was none.
    pub body: Option<Value>,
}

#[derive(Default)]
struct State {
    routes: HashMap<(String, String), (u16, String)>,
    requests: Vec<Recorded>,
}

/// A fake scheduler: answers canned JSON per method and path (404 `{"error": ...}` otherwise),
/// one request per connection, and records what it got.
pub struct FakeScheduler {
    socket: PathBuf,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeScheduler {
    pub fn start(socket: &Path) -> FakeScheduler {
        let listener = UnixListener::bind(socket).unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let state = Arc::clone(&state);
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    if let Ok(stream) = stream {
                        serve(stream, &state);
                    }
                }
            })
        };
        FakeScheduler {
            socket: socket.to_owned(),
            state,
            stop,
            thread: Some(thread),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Answers `method path` with `status` and `body` from now on.
    pub fn route(&self, method: &str, path: &str, status: u16, body: &str) {
        self.state.lock().unwrap().routes.insert(
            (method.to_owned(), path.to_owned()),
            (status, body.to_owned()),
        );
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.lock().unwrap().requests.clone()
    }

    /// `(method, path)` of every request so far.
    pub fn calls(&self) -> Vec<(String, String)> {
        self.requests()
            .into_iter()
            .map(|r| (r.method, r.path))
            .collect()
    }

    /// Polls until `count` requests came, or panics after 10 s.
    pub fn wait_for_requests(&self, count: usize) -> Vec<Recorded> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let requests = self.requests();
            if requests.len() >= count {
                return requests;
            }
            assert!(
                Instant::now() < deadline,
                "only {} of {count} requests came: {requests:?}",
                requests.len()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for FakeScheduler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if UnixStream::connect(&self.socket).is_ok() {
            if let Some(thread) = self.thread.take() {
                let _ = thread.join();
            }
        }
    }
}

fn serve(stream: UnixStream, state: &Mutex<State>) {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reader = BufReader::new(&stream);
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return; // The wake-up connection of Drop.
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_owned();
    let path = parts.next().unwrap_or_default().to_owned();
    let mut length = 0;
    loop {
        let mut header = String::new();
        reader.read_line(&mut header).unwrap();
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        let (name, value) = header.split_once(':').unwrap();
        if name.eq_ignore_ascii_case("content-length") {
            length = value.trim().parse().unwrap();
        }
    }
    let mut raw = vec![0; length];
    reader.read_exact(&mut raw).unwrap();
    let body = (length > 0).then(|| serde_json::from_slice(&raw).unwrap());

    let (status, answer) = {
        let mut state = state.lock().unwrap();
        state.requests.push(Recorded {
            method: method.clone(),
            path: path.clone(),
            body,
        });
        state
            .routes
            .get(&(method, path))
            .cloned()
            .unwrap_or((404, r#"{"error":"Not found."}"#.to_owned()))
    };
    let head = if status == 204 {
        format!("HTTP/1.1 {status} No Content\r\nconnection: close\r\n\r\n")
    } else {
        format!(
            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
             connection: close\r\n\r\n",
            answer.len()
        )
    };
    let mut writer = &stream;
    writer.write_all(head.as_bytes()).unwrap();
    if status != 204 {
        writer.write_all(answer.as_bytes()).unwrap();
    }
}

/// The built `vgpuctl`, without `VGPU_SCHEDULER` or `RUST_LOG` from the environment.
pub fn vgpuctl_command(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_vgpuctl"));
    command
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("VGPU_SCHEDULER");
    command
}

pub fn vgpuctl(args: &[&str]) -> Output {
    vgpuctl_command(args).output().unwrap()
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}
