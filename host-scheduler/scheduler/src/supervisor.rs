//! Supervision of one backend process per attached slice: start it, restart it when it exits
//! (backoff 100 ms doubling to 5 s, reset after 10 s up), count the restarts, and stop it with
//! SIGTERM, then SIGKILL after 2 s.
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// First restart delay.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest restart delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A backend up this long resets the delay.
pub const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(10);
/// Time between SIGTERM and SIGKILL.
pub const KILL_GRACE: Duration = Duration::from_secs(2);

/// Errors starting a backend.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// The process could not be started.
    #[error("Cannot start the backend {} for slice {slice}: {source}", program.display())]
    Spawn {
        /// The backend binary.
        program: PathBuf,
        /// The slice.
        slice: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// How to start one slice's backend.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    /// The slice's name (for logs).
    pub slice: String,
    /// The backend binary.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// The vhost-user socket it listens on (a stale one is removed before each start).
    pub socket: PathBuf,
}

/// Called after the backend process exited (crashed, or was stopped).
pub type OnExit = Arc<dyn Fn() + Send + Sync>;

/// A supervised backend.
pub struct Backend {
    pid: Arc<AtomicU32>,
    restarts: Arc<AtomicU64>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("pid", &self.pid())
            .field("restarts", &self.restarts())
            .finish_non_exhaustive()
    }
}

fn spawn(spec: &LaunchSpec) -> Result<Child, SupervisorError> {
    match std::fs::remove_file(&spec.socket) {
        Ok(()) => {
            tracing::debug!(socket = %spec.socket.display(), "removed a stale backend socket")
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(socket = %spec.socket.display(), "cannot remove a stale backend socket: {e}")
        }
    }
    Command::new(&spec.program)
        .args(&spec.args)
        .stdin(Stdio::null())
        // Its own process group: a terminal's Ctrl-C reaches the scheduler, which then stops
        // the backends in order.
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| SupervisorError::Spawn {
            program: spec.program.clone(),
            slice: spec.slice.clone(),
            source,
        })
}

impl Backend {
    /// Starts the backend now (so a bad binary fails here) and supervises it from a task of the
    /// current tokio runtime. `on_exit` runs after every exit of the process.
    pub fn start(spec: LaunchSpec, on_exit: OnExit) -> Result<Backend, SupervisorError> {
        let child = spawn(&spec)?;
        let pid = Arc::new(AtomicU32::new(child.id().unwrap_or(0)));
        tracing::info!(slice = %spec.slice, pid = pid.load(Ordering::Relaxed), "backend started");
        let restarts = Arc::new(AtomicU64::new(0));
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(supervise(
            spec,
            child,
            Arc::clone(&pid),
            Arc::clone(&restarts),
            stop_rx,
            on_exit,
        ));
        Ok(Backend {
            pid,
            restarts,
            stop,
            task,
        })
    }

    /// The running backend's process id, if one runs.
    pub fn pid(&self) -> Option<u32> {
        Some(self.pid.load(Ordering::Relaxed)).filter(|&p| p != 0)
    }

    /// How many times it was restarted.
    pub fn restarts(&self) -> u64 {
        self.restarts.load(Ordering::Relaxed)
    }

    /// Stops the backend (SIGTERM, then SIGKILL after [`KILL_GRACE`]) and waits until it
    /// exited; it is not restarted.
    pub async fn stop(self) {
        // An error means the supervising task is gone already.
        let _ = self.stop.send(true);
        if let Err(e) = self.task.await {
            tracing::error!("backend supervisor task failed: {e}");
        }
    }
}

async fn terminate(slice: &str, child: &mut Child) {
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        // SAFETY: kill(2) with a process id we spawned and have not reaped yet (`child.id()` is
        // `Some` only until the child is waited for), so it cannot name a recycled process.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        if tokio::time::timeout(KILL_GRACE, child.wait()).await.is_ok() {
            tracing::info!(slice, pid, "backend stopped");
            return;
        }
        tracing::warn!(
            slice,
            pid,
            "backend ignored SIGTERM for {KILL_GRACE:?}; killing it"
        );
    }
    if let Err(e) = child.kill().await {
        tracing::error!(slice, "cannot kill the backend: {e}");
    }
}

async fn supervise(
    spec: LaunchSpec,
    first: Child,
    pid: Arc<AtomicU32>,
    restarts: Arc<AtomicU64>,
    mut stop: watch::Receiver<bool>,
    on_exit: OnExit,
) {
    let mut child = Some(first);
    let mut started = Instant::now();
    let mut backoff = BACKOFF_MIN;
    let slice = spec.slice.as_str();
    loop {
        if let Some(mut c) = child.take() {
            tokio::select! {
                status = c.wait() => {
                    pid.store(0, Ordering::Relaxed);
                    on_exit();
                    match status {
                        Ok(s) => tracing::warn!(slice, "backend exited ({s}); restarting in {backoff:?}"),
                        Err(e) => tracing::error!(slice, "cannot wait for the backend: {e}"),
                    }
                    if started.elapsed() >= BACKOFF_RESET_AFTER {
                        backoff = BACKOFF_MIN;
                    }
                }
                _ = stop.changed() => {
                    terminate(slice, &mut c).await;
                    pid.store(0, Ordering::Relaxed);
                    on_exit();
                    return;
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => return,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
        match spawn(&spec) {
            Ok(c) => {
                let n = restarts.fetch_add(1, Ordering::Relaxed) + 1;
                pid.store(c.id().unwrap_or(0), Ordering::Relaxed);
                tracing::info!(slice, pid = c.id(), restarts = n, "backend restarted");
                started = Instant::now();
                child = Some(c);
            }
            Err(e) => tracing::error!(slice, "{e}; retrying in {backoff:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn sh(script: &str, dir: &std::path::Path) -> LaunchSpec {
        LaunchSpec {
            slice: "t".into(),
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            socket: dir.join("t.sock"),
        }
    }

    async fn wait_for(mut f: impl FnMut() -> bool) {
        for _ in 0..1000 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("condition not reached in 10 s");
    }

    #[tokio::test]
    async fn exited_backend_is_restarted_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let exits = Arc::new(AtomicUsize::new(0));
        let e = Arc::clone(&exits);
        let b = Backend::start(
            sh("exit 3", dir.path()),
            Arc::new(move || {
                e.fetch_add(1, Ordering::Relaxed);
            }),
        )
        .unwrap();
        wait_for(|| b.restarts() >= 2).await;
        assert!(exits.load(Ordering::Relaxed) >= 2);
        b.stop().await;
    }

    #[tokio::test]
    async fn stop_terminates_the_backend_and_does_not_restart_it() {
        let dir = tempfile::tempdir().unwrap();
        let b = Backend::start(sh("exec sleep 30", dir.path()), Arc::new(|| {})).unwrap();
        let pid = i32::try_from(b.pid().unwrap()).unwrap();
        b.stop().await;
        // SAFETY: signal 0 only checks whether the process exists.
        let alive = unsafe { libc::kill(pid, 0) } == 0;
        assert!(!alive, "backend still running after stop");
    }

    #[tokio::test]
    async fn backend_ignoring_sigterm_is_killed() {
        let dir = tempfile::tempdir().unwrap();
        let ready = dir.path().join("ready");
        let script = format!(
            "trap '' TERM; touch {}; while true; do sleep 0.05; done",
            ready.display()
        );
        let b = Backend::start(sh(&script, dir.path()), Arc::new(|| {})).unwrap();
        wait_for(|| ready.exists()).await;
        let t = Instant::now();
        b.stop().await;
        assert!(t.elapsed() >= KILL_GRACE);
    }

    #[tokio::test]
    async fn missing_binary_fails_to_start_with_a_clear_error() {
        let spec = LaunchSpec {
            slice: "lc".into(),
            program: "/nonexistent/vgpu-backend".into(),
            args: vec![],
            socket: "/nonexistent/lc.sock".into(),
        };
        let e = Backend::start(spec, Arc::new(|| {}))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("Cannot start the backend /nonexistent/vgpu-backend for slice lc: "),
            "{e}"
        );
    }
}
