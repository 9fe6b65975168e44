//! A `vgpu-backend` process for one test.

use std::fs;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::Instant;

use crate::artifacts::artifacts;
use crate::client::{client_command, describe_status};
use crate::tempdir::TempDir;
use crate::{BACKEND_START_TIMEOUT, POLL_INTERVAL};

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
        BackendProcess::spawn_with_args(device, memory_limit, &[])
    }

    /// [`BackendProcess::spawn`] with extra command-line arguments.
    pub fn spawn_with_args(device: &str, memory_limit: u64, extra: &[&str]) -> BackendProcess {
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
            .args(extra)
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

    /// Kills it with SIGKILL and reaps it; its worker processes die with it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let workers = crate::children_of(child.id());
            let _ = child.kill();
            let _ = child.wait();
            crate::wait_until_exited(&workers, std::time::Duration::from_secs(10));
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
