//! Shared helpers for the end-to-end tests.
//!
//! The tests run the real pieces as separate processes: the `vgpu-backend`
//! binary, and client programs (C programs built here with `cc` against our
//! `cuda.h`, and a Rust program on cudarc) whose `libcuda.so.1` is the guest
//! library built by the workspace. Everything is found next to the test
//! executable in `target/<profile>/`; `scripts/test.sh` builds it first.
//!
//! Nothing here sleeps for a fixed time: every wait polls a condition under
//! a deadline, and every child process is killed when its owner is dropped.

pub mod raw;

use std::collections::HashMap;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::symlink;
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long a backend may take to accept connections after it starts.
pub const BACKEND_START_TIMEOUT: Duration = Duration::from_secs(30);
/// The interval at which conditions are polled.
pub const POLL_INTERVAL: Duration = Duration::from_millis(10);
/// The default limit for a client program to run to completion.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);

const BUILD_FIRST: &str = "run `cargo build --workspace` first";

/// The built artifacts the tests run.
#[derive(Debug)]
pub struct Artifacts {
    /// `target/<profile>`.
    pub profile_dir: PathBuf,
    /// The `vgpu-backend` binary.
    pub backend: PathBuf,
    /// The guest library, `libcuda.so` as cargo names it.
    pub libcuda: PathBuf,
    /// A directory holding `libcuda.so.1` and `libcuda.so`, symlinks to
    /// [`Artifacts::libcuda`]: what clients link against and load.
    pub lib_dir: PathBuf,
}

/// The artifacts of this build, located once per process.
///
/// Panics, saying to run `cargo build --workspace`, if the backend or the
/// guest library has not been built.
pub fn artifacts() -> &'static Artifacts {
    static ARTIFACTS: OnceLock<Artifacts> = OnceLock::new();
    ARTIFACTS.get_or_init(locate_artifacts)
}

/// `target/<profile>` of the running executable: integration tests live in
/// `target/<profile>/deps/`, binaries in `target/<profile>/`.
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe()
        .unwrap_or_else(|e| panic!("Cannot find the running executable: {e}"));
    let mut dir = exe
        .parent()
        .unwrap_or_else(|| panic!("Executable {} has no parent", exe.display()))
        .to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    dir
}

fn locate_artifacts() -> Artifacts {
    let profile_dir = profile_dir();
    let backend = profile_dir.join("vgpu-backend");
    let libcuda = profile_dir.join("libcuda.so");
    for path in [&backend, &libcuda] {
        assert!(
            path.is_file(),
            "{} is missing: {BUILD_FIRST}",
            path.display()
        );
    }
    let lib_dir = profile_dir.join("vgpu-tests").join("lib");
    fs::create_dir_all(&lib_dir)
        .unwrap_or_else(|e| panic!("Cannot create {}: {e}", lib_dir.display()));
    for name in ["libcuda.so.1", "libcuda.so"] {
        ensure_symlink(&libcuda, &lib_dir.join(name));
    }
    Artifacts {
        profile_dir,
        backend,
        libcuda,
        lib_dir,
    }
}

/// Makes `link` a symlink to `target`, atomically (safe against other test
/// processes doing the same).
fn ensure_symlink(target: &Path, link: &Path) {
    if fs::read_link(link).is_ok_and(|t| t == target) {
        return;
    }
    let tmp = link.with_extension(format!("tmp{}", unique_suffix()));
    symlink(target, &tmp).unwrap_or_else(|e| panic!("Cannot create {}: {e}", tmp.display()));
    fs::rename(&tmp, link).unwrap_or_else(|e| panic!("Cannot create {}: {e}", link.display()));
}

/// A string unique within this machine for the life of the process.
pub fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{}-{n}-{nanos:08x}", std::process::id())
}

/// A temporary directory, removed on drop. A test that panics keeps it, and
/// its path is printed, so logs can be read afterwards.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `$TMPDIR/vgpu-tests-<label>-<unique>`.
    pub fn new(label: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!("vgpu-tests-{label}-{}", unique_suffix()));
        fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("Cannot create {}: {e}", path.display()));
        TempDir { path }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("keeping {} for inspection", self.path.display());
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// Polls `f` every [`POLL_INTERVAL`] until it returns `Some`, or panics
/// after `timeout` with `what`.
pub fn poll_until<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = f() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "Timed out after {timeout:?} waiting for {what}"
        );
        thread::sleep(POLL_INTERVAL);
    }
}

/// A running `vgpu-backend`, killed (SIGKILL) and reaped on drop.
#[derive(Debug)]
pub struct BackendProcess {
    child: Option<Child>,
    socket: PathBuf,
    log: PathBuf,
    executes_kernels: bool,
    memory_limit: u64,
    _dir: TempDir,
}

impl BackendProcess {
    /// Starts `vgpu-backend --device emulated --memory-limit LIMIT` on a
    /// fresh socket and waits until it accepts connections.
    pub fn spawn_emulated(memory_limit: u64) -> BackendProcess {
        BackendProcess::spawn("emulated", memory_limit)
    }

    /// Starts `vgpu-backend --device DEVICE --memory-limit LIMIT` on a fresh
    /// socket and waits until it accepts connections.
    pub fn spawn(device: &str, memory_limit: u64) -> BackendProcess {
        let art = artifacts();
        let dir = TempDir::new("backend");
        let socket = dir.path().join("vgpu.sock");
        let log = dir.path().join("backend.log");
        let log_file = fs::File::create(&log)
            .unwrap_or_else(|e| panic!("Cannot create {}: {e}", log.display()));
        let log_err = log_file
            .try_clone()
            .unwrap_or_else(|e| panic!("Cannot duplicate the log file: {e}"));
        let mut cmd = Command::new(&art.backend);
        cmd.arg("--socket")
            .arg(&socket)
            .args(["--device", device])
            .args(["--memory-limit", &memory_limit.to_string()])
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err);
        cmd.env("NO_COLOR", "1");
        if let Ok(filter) = std::env::var("VGPU_TEST_BACKEND_LOG") {
            cmd.env("RUST_LOG", filter);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("Cannot start {}: {e}", art.backend.display()));
        let mut backend = BackendProcess {
            child: Some(child),
            socket,
            log,
            executes_kernels: device != "emulated",
            memory_limit,
            _dir: dir,
        };
        backend.wait_until_accepting();
        backend
    }

    fn wait_until_accepting(&mut self) {
        let deadline = Instant::now() + BACKEND_START_TIMEOUT;
        loop {
            if let Some(status) = self.try_wait() {
                panic!(
                    "vgpu-backend exited with {} before accepting connections; its log:\n{}",
                    describe_status(status),
                    self.log()
                );
            }
            if self.socket.exists() && UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "vgpu-backend did not accept connections on {} within {BACKEND_START_TIMEOUT:?}; its log:\n{}",
                self.socket.display(),
                self.log()
            );
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// The socket it listens on.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The memory limit it was started with.
    pub fn memory_limit(&self) -> u64 {
        self.memory_limit
    }

    /// True if launched kernels really run (not the emulated device).
    pub fn executes_kernels(&self) -> bool {
        self.executes_kernels
    }

    /// Everything the backend has logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The exit status, if it has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Kills it with SIGKILL and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A command for `program` with its environment pointed at this backend
    /// and at our libcuda.
    pub fn client(&self, program: &Path) -> Command {
        let mut cmd = client_command(program, &self.socket);
        cmd.env(
            "VGPU_EXPECT_EXECUTION",
            if self.executes_kernels { "1" } else { "0" },
        );
        cmd
    }
}

impl Drop for BackendProcess {
    fn drop(&mut self) {
        self.kill();
        if thread::panicking() {
            eprintln!("--- vgpu-backend log ---\n{}--- end ---", self.log());
        }
    }
}

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

/// The C sources of the test clients.
pub fn c_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("c")
}

/// Compiles `tests/c/<name>.c` with `cc` (or `$CC`) against our `cuda.h`,
/// linked to our libcuda, once per process. Returns the executable.
pub fn build_c_program(name: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let built = BUILT.get_or_init(|| Mutex::new(HashMap::new()));
    let mut built = built.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(path) = built.get(name) {
        return path.clone();
    }
    let art = artifacts();
    let src = c_dir().join(format!("{name}.c"));
    let out_dir = art.profile_dir.join("vgpu-tests").join("bin");
    fs::create_dir_all(&out_dir)
        .unwrap_or_else(|e| panic!("Cannot create {}: {e}", out_dir.display()));
    let out = out_dir.join(name);
    let tmp = out_dir.join(format!(".{name}.{}", unique_suffix()));
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_string());
    let include = c_dir().join("include");
    let mut rpath = std::ffi::OsString::from("-Wl,-rpath,");
    rpath.push(&art.lib_dir);
    let output = Command::new(&cc)
        .args(["-std=gnu11", "-O1", "-g", "-Wall", "-Wextra"])
        .arg("-I")
        .arg(&include)
        .arg("-I")
        .arg(c_dir())
        .arg(&src)
        .arg("-o")
        .arg(&tmp)
        .arg("-L")
        .arg(&art.lib_dir)
        .arg("-lcuda")
        .arg(rpath)
        .output()
        .unwrap_or_else(|e| panic!("Cannot run {cc}: {e}"));
    assert!(
        output.status.success(),
        "Compiling {} failed ({}):\n{}{}",
        src.display(),
        describe_status(output.status),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    fs::rename(&tmp, &out).unwrap_or_else(|e| panic!("Cannot create {}: {e}", out.display()));
    built.insert(name.to_string(), out.clone());
    out
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_info_line_is_parsed() {
        assert_eq!(
            parse_mem_info("PASS x\nMEMINFO free=10 total=20\nRESULT: PASS\n"),
            Some((10, 20))
        );
        assert_eq!(parse_mem_info("MEMINFO free=10\n"), None);
        assert_eq!(parse_mem_info("nothing\n"), None);
    }

    #[test]
    fn poll_until_returns_the_first_value() {
        let mut n = 0;
        let v = poll_until(Duration::from_secs(5), "n to reach 3", || {
            n += 1;
            (n >= 3).then_some(n)
        });
        assert_eq!(v, 3);
    }

    #[test]
    #[should_panic(expected = "Timed out")]
    fn poll_until_panics_at_the_deadline() {
        poll_until(Duration::from_millis(30), "never", || None::<()>);
    }

    #[test]
    fn temp_dir_is_removed_on_drop() {
        let dir = TempDir::new("selftest");
        let path = dir.path().to_path_buf();
        assert!(path.is_dir());
        drop(dir);
        assert!(!path.exists());
    }
}
