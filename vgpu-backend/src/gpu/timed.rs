//! Timed synthetic kernels: `vgpu_timed_spin(u64 ns)`.
//!
//! The same PTX module ([`TIMED_SPIN_PTX`]) loads everywhere. On a real GPU
//! the kernel spins on `%globaltimer` for `ns` nanoseconds. On the emulated
//! device a launch of it holds the emulated GPU lock (a `flock`ed file that
//! stands for one physical GPU, shared by every backend on it, and a mutex
//! inside this process) and busy-waits `ns` of CLOCK_MONOTONIC before the
//! launch returns, so emulated backends sharing a lock contend for "GPU
//! time" as contexts on one GPU do. The time spent spinning is counted as
//! the slot's busy time.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use vgpu_board::monotonic_ns;

use super::ParamLayout;
use crate::throttle::Throttle;

/// The entry point of the timed kernel.
pub const TIMED_SPIN_ENTRY: &str = "vgpu_timed_spin";

/// A PTX module holding `vgpu_timed_spin(u64 ns)`.
pub const TIMED_SPIN_PTX: &str = include_str!("../../../tests/ptx/vgpu_timed_spin.ptx");

/// The longest spin one launch may ask for (10 s): longer requests are
/// clamped, so a guest cannot wedge its connection's worker indefinitely.
pub const MAX_SPIN_NS: u64 = 10_000_000_000;

/// True if an entry with this name and layout is the timed kernel.
pub fn is_timed_spin(name: &str, params: &[ParamLayout]) -> bool {
    name == TIMED_SPIN_ENTRY && params == [ParamLayout { offset: 0, size: 8 }]
}

/// The `ns` argument of a timed-kernel launch's packed parameters.
pub fn spin_ns(params: &[u8]) -> Option<u64> {
    let bytes: [u8; 8] = params.get(..8)?.try_into().ok()?;
    Some(u64::from_le_bytes(bytes))
}

/// Runs timed kernels for the emulated device.
pub struct EmulatedClock {
    /// The emulated GPU: held while a kernel "runs". The file, if any, is
    /// the lock shared with other processes.
    gpu: Mutex<Option<File>>,
    throttle: Arc<Throttle>,
}

impl std::fmt::Debug for EmulatedClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmulatedClock").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `flock(fd, op)`, retried on EINTR.
fn flock(file: &File, op: libc::c_int) -> io::Result<()> {
    loop {
        // SAFETY: flock takes a file descriptor we own (kept open by `file`)
        // and an operation flag; it touches no memory.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

impl EmulatedClock {
    /// A clock with no lock file: timed kernels of this process still run
    /// one at a time.
    pub fn unlocked(throttle: Arc<Throttle>) -> EmulatedClock {
        EmulatedClock {
            gpu: Mutex::new(None),
            throttle,
        }
    }

    /// A clock whose kernels hold the lock file at `path` (created if
    /// missing) while they run.
    pub fn with_lock_file(path: &Path, throttle: Arc<Throttle>) -> io::Result<EmulatedClock> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        Ok(EmulatedClock {
            gpu: Mutex::new(Some(file)),
            throttle,
        })
    }

    /// Runs one timed kernel: waits for the emulated GPU, spins `ns`
    /// nanoseconds (at most [`MAX_SPIN_NS`]) and counts them as busy time.
    /// Returns the nanoseconds spent spinning.
    pub fn run(&self, ns: u64) -> u64 {
        let ns = ns.min(MAX_SPIN_NS);
        // Queued on the "GPU" from here on: waiting for the lock is waiting
        // behind other contexts' kernels.
        self.throttle.inflight_begin(1);
        let gpu = lock(&self.gpu);
        let locked = match gpu.as_ref() {
            Some(file) => match flock(file, libc::LOCK_EX) {
                Ok(()) => true,
                Err(error) => {
                    tracing::warn!(%error, "Cannot lock the emulated GPU; spinning unlocked");
                    false
                }
            },
            None => false,
        };
        let start = monotonic_ns();
        let mut now = start;
        while now.saturating_sub(start) < ns {
            std::hint::spin_loop();
            now = monotonic_ns();
        }
        let spent = now.saturating_sub(start);
        if let (true, Some(file)) = (locked, gpu.as_ref()) {
            if let Err(error) = flock(file, libc::LOCK_UN) {
                tracing::warn!(%error, "Cannot unlock the emulated GPU");
            }
        }
        drop(gpu);
        self.throttle.add_busy_ns(spent);
        // Billed to the session whose launch this is (see crate::metering):
        // the kernel's duration, not the host's preemptions of the spin.
        crate::metering::charge_thread_gpu_ns(ns);
        self.throttle.inflight_end(1);
        spent
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::ptx;

    #[test]
    fn the_timed_spin_ptx_parses_with_one_u64_parameter() {
        let module = ptx::parse(TIMED_SPIN_PTX.as_bytes()).unwrap();
        let entry = module
            .entries
            .iter()
            .find(|e| e.name == TIMED_SPIN_ENTRY)
            .unwrap();
        assert!(is_timed_spin(&entry.name, &entry.params));
        assert_eq!(
            ptx::image_kind(TIMED_SPIN_PTX.as_bytes()),
            ptx::ImageKind::Ptx
        );
    }

    #[test]
    fn only_the_named_entry_with_one_u64_is_timed() {
        let one = [ParamLayout { offset: 0, size: 8 }];
        assert!(is_timed_spin("vgpu_timed_spin", &one));
        assert!(!is_timed_spin("other", &one));
        assert!(!is_timed_spin(
            "vgpu_timed_spin",
            &[ParamLayout { offset: 0, size: 4 }]
        ));
        assert_eq!(spin_ns(&5u64.to_le_bytes()), Some(5));
        assert_eq!(spin_ns(&[1, 2]), None);
    }

    #[test]
    fn a_spin_takes_at_least_its_time_and_is_counted_as_busy() {
        let throttle = Throttle::disabled();
        let clock = EmulatedClock::unlocked(throttle.clone());
        let t = std::time::Instant::now();
        let spent = clock.run(3_000_000);
        assert!(t.elapsed() >= std::time::Duration::from_millis(3));
        assert!(spent >= 3_000_000);
        assert_eq!(throttle.usage().busy_ns, spent);
        assert_eq!(throttle.inflight(), 0);
    }

    #[test]
    fn spins_sharing_a_lock_file_never_overlap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gpu.lock");
        // Two clocks stand for two backend processes: separate open files.
        let a = Arc::new(EmulatedClock::with_lock_file(&path, Throttle::disabled()).unwrap());
        let b = Arc::new(EmulatedClock::with_lock_file(&path, Throttle::disabled()).unwrap());
        let t = std::time::Instant::now();
        let threads: Vec<_> = [a, b]
            .into_iter()
            .map(|c| std::thread::spawn(move || c.run(20_000_000)))
            .collect();
        for th in threads {
            th.join().unwrap();
        }
        assert!(
            t.elapsed() >= std::time::Duration::from_millis(40),
            "two 20 ms spins on one emulated GPU took {:?}",
            t.elapsed()
        );
    }
}
