//! A `vgpu-scheduler` process for one test, on the emulated device, with its own state
//! directory, talked to over its REST API.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vgpu_vmm::http::UnixHttpClient;

use crate::artifacts::{artifacts, profile_dir};
use crate::client::describe_status;
use crate::tempdir::TempDir;
use crate::{poll_until, BACKEND_START_TIMEOUT};

/// A running scheduler: SIGTERM on drop (it stops its backends), then SIGKILL if it lingers.
#[derive(Debug)]
pub struct SchedulerProcess {
    child: Option<Child>,
    dir: TempDir,
    log: PathBuf,
}

impl SchedulerProcess {
    /// Starts `vgpu-scheduler --config <config> --state-dir <tmp> --device emulated` with the
    /// workspace's backend, and waits until its API answers `/healthz`.
    pub fn spawn(config_toml: &str) -> SchedulerProcess {
        Self::spawn_with_env(config_toml, &[])
    }

    /// As [`SchedulerProcess::spawn`], with `env` set for the scheduler and the backends it
    /// starts.
    pub fn spawn_with_env(config_toml: &str, env: &[(&str, &str)]) -> SchedulerProcess {
        let dir = TempDir::new("scheduler");
        let config = dir.path().join("vgpu.toml");
        fs::write(&config, config_toml)
            .unwrap_or_else(|e| panic!("Cannot write {}: {e}", config.display()));
        let state = dir.path().join("state");
        let log = dir.path().join("scheduler.log");
        let out = fs::File::create(&log)
            .unwrap_or_else(|e| panic!("Cannot create {}: {e}", log.display()));
        let err = out
            .try_clone()
            .unwrap_or_else(|e| panic!("Cannot duplicate the log file: {e}"));
        let exe = profile_dir().join("vgpu-scheduler");
        assert!(
            exe.is_file(),
            "{} is missing: run `cargo build --workspace` first",
            exe.display()
        );
        let mut cmd = Command::new(&exe);
        cmd.arg("--config")
            .arg(&config)
            .arg("--state-dir")
            .arg(&state)
            .args(["--device", "emulated"])
            .arg("--backend")
            .arg(&artifacts().backend)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .env("NO_COLOR", "1")
            // A faulting guest's sticky checks must finish before its backend stops for a
            // restart; a debug build on a loaded machine gets more than the default 200 ms.
            .env("VGPU_FAULT_RESTART_MS", "1000")
            .env(
                "RUST_LOG",
                std::env::var("VGPU_TEST_SCHEDULER_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(env.iter().copied());
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("Cannot start {}: {e}", exe.display()));
        let mut scheduler = SchedulerProcess {
            child: Some(child),
            dir,
            log,
        };
        let deadline = Instant::now() + BACKEND_START_TIMEOUT;
        loop {
            if scheduler
                .request("GET", "/healthz", None)
                .is_some_and(|(status, _)| status == 200)
            {
                break;
            }
            if let Some(child) = scheduler.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "vgpu-scheduler exited ({}) before serving its API:\n{}",
                        describe_status(status),
                        scheduler.log()
                    );
                }
            }
            assert!(
                Instant::now() < deadline,
                "vgpu-scheduler did not serve its API within {BACKEND_START_TIMEOUT:?}:\n{}",
                scheduler.log()
            );
            std::thread::sleep(crate::POLL_INTERVAL);
        }
        scheduler
    }

    /// Its state directory.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Its API socket.
    pub fn api_socket(&self) -> PathBuf {
        self.state_dir().join("api.sock")
    }

    /// The socket of slice `name`'s backend.
    pub fn slice_socket(&self, name: &str) -> PathBuf {
        self.state_dir().join("slices").join(format!("{name}.sock"))
    }

    /// Waits until slice `name`'s backend accepts connections.
    pub fn wait_for_slice(&self, name: &str) -> PathBuf {
        let socket = self.slice_socket(name);
        poll_until(
            BACKEND_START_TIMEOUT,
            &format!("the backend of slice {name}"),
            || std::os::unix::net::UnixStream::connect(&socket).ok(),
        );
        socket
    }

    /// One API request: the status and the body text, or `None` if the socket does not answer.
    pub fn request(&self, method: &str, path: &str, body: Option<&str>) -> Option<(u16, String)> {
        UnixHttpClient::new(self.api_socket())
            .with_timeout(Duration::from_secs(10))
            .request(method, path, body.map(str::as_bytes))
            .ok()
            .map(|r| (r.status, r.body_text()))
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Where its log is.
    pub fn log_path(&self) -> &Path {
        &self.log
    }
}

impl Drop for SchedulerProcess {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(pid) = i32::try_from(child.id()) {
            // SAFETY: sending a signal to our own child, which has not been reaped.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(crate::POLL_INTERVAL);
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}
