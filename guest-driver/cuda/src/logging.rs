//! Logging. The library never installs a global `tracing` subscriber unless
//! `VGPU_LOG` is set (the application may have its own); then it writes to
//! stderr with `VGPU_LOG` as the filter (`1` or empty meaning `debug`).
//! Problems the user must see (no backend, backend gone) reach stderr either
//! way, each distinct message once.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

use tracing_subscriber::EnvFilter;

/// The environment variable that turns logging on.
pub const LOG_ENV: &str = "VGPU_LOG";

static INSTALLED: AtomicBool = AtomicBool::new(false);

/// The filter directive a `VGPU_LOG` value stands for.
fn directive(value: &str) -> String {
    match value.trim() {
        "" | "1" | "true" | "yes" | "on" => "debug".to_string(),
        other => other.to_string(),
    }
}

/// Installs the stderr subscriber if `VGPU_LOG` is set. Idempotent.
pub(crate) fn install() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let Some(value) = std::env::var_os(LOG_ENV) else {
            return;
        };
        let value = value.to_string_lossy();
        let filter =
            EnvFilter::try_new(directive(&value)).unwrap_or_else(|_| EnvFilter::new("debug"));
        let installed = tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_env_filter(filter)
            .try_init()
            .is_ok();
        INSTALLED.store(installed, Ordering::Relaxed);
    });
}

/// True the first time `message` is seen in this process.
fn first_time(message: &str) -> bool {
    static SEEN: Mutex<Option<HashSet<String>>> = Mutex::new(None);
    let mut seen = SEEN.lock().unwrap_or_else(|poison| poison.into_inner());
    seen.get_or_insert_with(HashSet::new)
        .insert(message.to_string())
}

/// Reports a problem on stderr, once per distinct message: through the
/// subscriber when logging is on, directly otherwise.
pub(crate) fn report_once(message: &str) {
    if !first_time(message) {
        return;
    }
    if INSTALLED.load(Ordering::Relaxed) {
        safely(|| tracing::error!("{message}"));
    } else {
        eprintln!("libcuda.so.1 (vgpu): {message}");
    }
}

/// Runs `log` (a `tracing` call) unless this thread is past the point where
/// its thread-local storage is destroyed: the process's exit handlers (the
/// runtime unloading its modules) call the driver then, and the subscriber
/// would panic, which aborts at the C boundary. A panic that slips through
/// is caught.
pub(crate) fn safely(log: impl FnOnce()) {
    struct Alive;
    impl Drop for Alive {
        fn drop(&mut self) {}
    }
    thread_local! {
        static ALIVE: Alive = const { Alive };
    }
    if ALIVE.try_with(|_| ()).is_ok() {
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(log));
    }
}

/// Logs a warning once per distinct message (visible only with `VGPU_LOG`).
pub(crate) fn warn_once(message: &str) {
    if first_time(message) {
        safely(|| tracing::warn!("{message}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_env_values_map_to_filter_directives() {
        assert_eq!(directive("1"), "debug");
        assert_eq!(directive(""), "debug");
        assert_eq!(directive("trace"), "trace");
        assert_eq!(directive("cuda=info"), "cuda=info");
    }

    #[test]
    fn a_panicking_log_call_is_contained() {
        let mut ran = false;
        safely(|| ran = true);
        assert!(ran);
        safely(|| panic!("subscriber gone"));
    }

    #[test]
    fn each_message_is_reported_once() {
        assert!(first_time("logging test message a"));
        assert!(!first_time("logging test message a"));
        assert!(first_time("logging test message b"));
    }
}
