//! SIGTERM and SIGINT stop the backend cleanly: the scheduler stops a
//! backend with SIGTERM (SIGKILL 2 s later), and a clean stop closes every
//! session and sends the last usage report.
//!
//! [`block_stop_signals`] must run before any thread starts, so that every
//! thread inherits the blocked mask and only the waiting thread
//! ([`stop_on_signal`]) ever receives them.

use std::io;

fn stop_set() -> libc::sigset_t {
    // SAFETY: sigset_t is a plain bit set; all-zero is a valid value that
    // sigemptyset then initializes.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: set is a valid sigset_t owned by this frame.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
    }
    set
}

/// Blocks SIGTERM and SIGINT on the calling thread (and the threads it
/// starts from now on).
pub fn block_stop_signals() -> io::Result<()> {
    let set = stop_set();
    // SAFETY: set is initialized; a null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}

/// Starts a thread that waits for SIGTERM or SIGINT (blocked before with
/// [`block_stop_signals`]) and then stops the backend by calling `stop` (for example
/// [`crate::StopHandle::stop`]).
pub fn stop_on_signal(stop: impl FnOnce() + Send + 'static) -> io::Result<()> {
    std::thread::Builder::new()
        .name("vgpu-signals".into())
        .spawn(move || {
            let set = stop_set();
            let mut signal: libc::c_int = 0;
            // SAFETY: set is initialized and signal a valid out-pointer.
            let rc = unsafe { libc::sigwait(&set, &mut signal) };
            if rc != 0 {
                tracing::error!(
                    error = %io::Error::from_raw_os_error(rc),
                    "Cannot wait for stop signals; SIGTERM will not stop the backend cleanly"
                );
                return;
            }
            let name = if signal == libc::SIGTERM {
                "SIGTERM"
            } else {
                "SIGINT"
            };
            tracing::info!(signal = name, "Stopping");
            stop();
        })
        .map(|_| ())
}
