//! Device interrupts as a file descriptor a waiter sleeps on: the uio node
//! of `uio_pci_generic`, or the INTx eventfd of a VFIO device
//! (`crate::vfio`). Either way the flow is the same: `poll` the fd, consume
//! the event, acknowledge the device (reading the virtio ISR deasserts
//! INTx), then unmask the line.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Duration;

/// A device interrupt delivered through a file descriptor.
pub trait Interrupts: Send + Sync {
    /// The descriptor that becomes readable when the device interrupts.
    fn fd(&self) -> RawFd;
    /// Consumes the pending event (reads its counter).
    fn clear(&self);
    /// Unmasks the interrupt once the device has been acknowledged.
    fn unmask(&self);
}

/// Sleeps up to `timeout` or until `irq` fires; on an interrupt, consumes
/// it, acknowledges the device (`ack` reads the ISR) and unmasks it.
pub fn wait(irq: &dyn Interrupts, timeout: Duration, ack: impl Fn() -> u8) {
    let mut pfd = libc::pollfd {
        fd: irq.fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: one valid pollfd and a valid timespec; no signal mask.
    let n = unsafe { libc::ppoll(&mut pfd, 1, &ts, std::ptr::null()) };
    if n > 0 && pfd.revents & libc::POLLIN != 0 {
        irq.clear();
        ack();
        irq.unmask();
    }
}

/// The uio node: INTx notifications of the device.
#[derive(Debug)]
pub struct Uio {
    file: File,
}

impl Uio {
    /// Opens `/dev/uioN` and unmasks the interrupt.
    pub fn open(path: &Path) -> std::io::Result<Uio> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)?;
        let uio = Uio { file };
        uio.unmask();
        Ok(uio)
    }
}

impl Interrupts for Uio {
    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn clear(&self) {
        let mut count = [0u8; 4];
        // SAFETY: reads at most 4 bytes into a live buffer.
        let _ = unsafe { libc::read(self.file.as_raw_fd(), count.as_mut_ptr().cast(), 4) };
    }

    fn unmask(&self) {
        let one = 1u32.to_ne_bytes();
        // SAFETY: writes 4 bytes from a live buffer to an fd we own.
        let _ = unsafe { libc::write(self.file.as_raw_fd(), one.as_ptr().cast(), 4) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Instant;

    /// An eventfd standing in for the device's interrupt.
    struct FakeIrq {
        fd: File,
        cleared: AtomicU32,
        unmasked: AtomicU32,
    }

    impl FakeIrq {
        fn new() -> FakeIrq {
            // SAFETY: eventfd takes no pointers; the result is checked.
            let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
            assert!(fd >= 0);
            // SAFETY: `fd` is a fresh descriptor nothing else owns.
            let fd = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
            FakeIrq {
                fd,
                cleared: AtomicU32::new(0),
                unmasked: AtomicU32::new(0),
            }
        }

        fn fire(&self) {
            let one = 1u64.to_ne_bytes();
            // SAFETY: writes 8 bytes from a live buffer to our eventfd.
            let n = unsafe { libc::write(self.fd.as_raw_fd(), one.as_ptr().cast(), 8) };
            assert_eq!(n, 8);
        }
    }

    impl Interrupts for FakeIrq {
        fn fd(&self) -> RawFd {
            self.fd.as_raw_fd()
        }
        fn clear(&self) {
            let mut count = [0u8; 8];
            // SAFETY: reads at most 8 bytes into a live buffer.
            let _ = unsafe { libc::read(self.fd.as_raw_fd(), count.as_mut_ptr().cast(), 8) };
            self.cleared.fetch_add(1, Ordering::SeqCst);
        }
        fn unmask(&self) {
            self.unmasked.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn pending_interrupt_is_cleared_acknowledged_and_unmasked() {
        let irq = FakeIrq::new();
        irq.fire();
        let acks = AtomicU32::new(0);
        let start = Instant::now();
        wait(&irq, Duration::from_secs(5), || {
            acks.fetch_add(1, Ordering::SeqCst);
            1
        });
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "woke on the event"
        );
        assert_eq!(irq.cleared.load(Ordering::SeqCst), 1);
        assert_eq!(acks.load(Ordering::SeqCst), 1);
        assert_eq!(irq.unmasked.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn quiet_interrupt_times_out_without_acknowledging() {
        let irq = FakeIrq::new();
        let acks = AtomicU32::new(0);
        wait(&irq, Duration::from_millis(5), || {
            acks.fetch_add(1, Ordering::SeqCst);
            0
        });
        assert_eq!(acks.load(Ordering::SeqCst), 0);
        assert_eq!(irq.cleared.load(Ordering::SeqCst), 0);
        assert_eq!(irq.unmasked.load(Ordering::SeqCst), 0);
    }
}
