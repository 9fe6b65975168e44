//! Client programs run as child processes: environment, output capture,
//! line-by-line interaction and bounded waits.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::artifacts::{artifacts, build_c_program};
use crate::backend::BackendProcess;
use crate::POLL_INTERVAL;

/// A command that runs `program` with `VGPU_SOCKET=socket` and our libcuda
/// first on the library path.
pub fn client_command(program: &Path, socket: &Path) -> Command {
    let art = artifacts();
    let mut cmd = Command::new(program);
    let mut paths = vec![art.lib_dir.clone()];
    if let Some(old) = std::env::var_os("LD_LIBRARY_PATH") {
        paths.extend(std::env::split_paths(&old));
    }
    let joined =
        std::env::join_paths(paths).unwrap_or_else(|e| panic!("Cannot build LD_LIBRARY_PATH: {e}"));
    cmd.env("VGPU_SOCKET", socket)
        .env("LD_LIBRARY_PATH", joined)
        .stdin(Stdio::null());
    cmd
}

/// Describes an exit status: the code, or the signal that ended it.
pub fn describe_status(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => format!("signal {sig}"),
        _ => format!("{status}"),
    }
}

/// What a finished client printed, and how it ended.
#[derive(Debug)]
pub struct ClientOutput {
    /// The program, for messages.
    pub name: String,
    /// How it ended.
    pub status: ExitStatus,
    /// Everything on stdout.
    pub stdout: String,
    /// Everything on stderr.
    pub stderr: String,
    /// From start to exit.
    pub elapsed: Duration,
}

impl ClientOutput {
    /// The `FAIL ...` lines it printed.
    pub fn failures(&self) -> Vec<&str> {
        self.stdout
            .lines()
            .filter(|l| l.starts_with("FAIL"))
            .collect()
    }

    /// The number of `PASS ...` lines it printed.
    pub fn passes(&self) -> usize {
        self.stdout
            .lines()
            .filter(|l| l.starts_with("PASS"))
            .count()
    }

    /// Panics, showing the whole output, unless it exited 0 with no FAIL line.
    pub fn assert_passed(&self) {
        assert!(
            self.status.success() && self.failures().is_empty(),
            "{} ended with {} and {} failed checks: {:#?}\n{}",
            self.name,
            describe_status(self.status),
            self.failures().len(),
            self.failures(),
            self.transcript()
        );
    }

    /// stdout and stderr, labelled, for panic messages.
    pub fn transcript(&self) -> String {
        format!(
            "--- {} stdout ---\n{}--- {} stderr ---\n{}--- end ---",
            self.name, self.stdout, self.name, self.stderr
        )
    }
}

/// A running client program whose stdout lines can be awaited.
#[derive(Debug)]
pub struct Client {
    name: String,
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
    started: Instant,
}

impl Client {
    /// Starts `cmd` with piped stdin, stdout and stderr.
    pub fn spawn(mut cmd: Command) -> Client {
        let name = Path::new(cmd.get_program())
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("Cannot start {name}: {e}"));
        let stdin = child.stdin.take();
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, lines) = mpsc::channel();
        let mut readers = Vec::new();
        if let Some(out) = child.stdout.take() {
            let buf = Arc::clone(&stdout);
            readers.push(thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    if let Ok(mut b) = buf.lock() {
                        b.push_str(&line);
                        b.push('\n');
                    }
                    let _ = tx.send(line);
                }
            }));
        }
        if let Some(mut err) = child.stderr.take() {
            let buf = Arc::clone(&stderr);
            readers.push(thread::spawn(move || {
                let mut chunk = [0u8; 4096];
                while let Ok(n) = err.read(&mut chunk) {
                    if n == 0 {
                        break;
                    }
                    if let Ok(mut b) = buf.lock() {
                        b.push_str(&String::from_utf8_lossy(&chunk[..n]));
                    }
                }
            }));
        }
        Client {
            name,
            child: Some(child),
            stdin,
            lines,
            stdout,
            stderr,
            readers,
            started,
        }
    }

    /// Its process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Waits for a stdout line starting with `prefix` and returns it. Panics
    /// if the client exits first or `timeout` passes.
    pub fn wait_for_line(&mut self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return line,
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => panic!(
                    "{} printed no line starting with {prefix:?} within {timeout:?}\n{}",
                    self.name,
                    self.snapshot()
                ),
                Err(RecvTimeoutError::Disconnected) => {
                    let out = self.wait(Duration::from_secs(10));
                    panic!(
                        "{} ended ({}) without printing a line starting with {prefix:?}\n{}",
                        self.name,
                        describe_status(out.status),
                        out.transcript()
                    );
                }
            }
        }
    }

    /// Waits up to `timeout` for a stdout line starting with `prefix`: `None` if none came
    /// (for checking that a client is held, not for waiting on one).
    pub fn try_line(&mut self, prefix: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return Some(line),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }

    /// Writes `line` and a newline to its stdin.
    pub fn send_line(&mut self, line: &str) {
        if let Some(stdin) = self.stdin.as_mut() {
            writeln!(stdin, "{line}")
                .and_then(|()| stdin.flush())
                .unwrap_or_else(|e| panic!("Cannot write to {}: {e}", self.name));
        }
    }

    /// Kills it with SIGKILL and reaps it.
    pub fn kill(&mut self) -> ClientOutput {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
        }
        self.wait(Duration::from_secs(10))
    }

    /// Waits for it to exit. If it does not within `timeout`, kills it and
    /// panics with what it printed.
    pub fn wait(&mut self, timeout: Duration) -> ClientOutput {
        self.stdin = None;
        let deadline = Instant::now() + timeout;
        let status = loop {
            let Some(child) = self.child.as_mut() else {
                panic!("{} was already waited for", self.name);
            };
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) => {}
                Err(e) => panic!("Cannot wait for {}: {e}", self.name),
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                self.child = None;
                self.join_readers();
                panic!(
                    "{} did not finish within {timeout:?} (killed)\n{}",
                    self.name,
                    self.snapshot()
                );
            }
            thread::sleep(POLL_INTERVAL);
        };
        let elapsed = self.started.elapsed();
        self.child = None;
        self.join_readers();
        ClientOutput {
            name: self.name.clone(),
            status,
            stdout: lock_string(&self.stdout),
            stderr: lock_string(&self.stderr),
            elapsed,
        }
    }

    fn join_readers(&mut self) {
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
    }

    fn snapshot(&self) -> String {
        format!(
            "--- {} stdout ---\n{}--- {} stderr ---\n{}--- end ---",
            self.name,
            lock_string(&self.stdout),
            self.name,
            lock_string(&self.stderr)
        )
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn lock_string(s: &Mutex<String>) -> String {
    s.lock().map(|s| s.clone()).unwrap_or_default()
}

/// Runs `cmd` to completion within `timeout` (killing it and panicking
/// otherwise).
pub fn run_client(cmd: Command, timeout: Duration) -> ClientOutput {
    Client::spawn(cmd).wait(timeout)
}

/// The slice's (free, total) memory as a fresh client sees it.
pub fn mem_info(backend: &BackendProcess) -> (u64, u64) {
    let out = run_client(
        backend.client(&build_c_program("mem_info")),
        Duration::from_secs(30),
    );
    out.assert_passed();
    parse_mem_info(&out.stdout)
        .unwrap_or_else(|| panic!("mem_info printed no MEMINFO line\n{}", out.transcript()))
}

/// Parses `MEMINFO free=<n> total=<n>`.
pub fn parse_mem_info(stdout: &str) -> Option<(u64, u64)> {
    let line = stdout.lines().find(|l| l.starts_with("MEMINFO"))?;
    let mut free = None;
    let mut total = None;
    for word in line.split_whitespace() {
        if let Some(v) = word.strip_prefix("free=") {
            free = v.parse().ok();
        } else if let Some(v) = word.strip_prefix("total=") {
            total = v.parse().ok();
        }
    }
    Some((free?, total?))
}
