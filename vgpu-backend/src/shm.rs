//! A shared memory mapping of a file that holds one `T` made only of atomics: the slice's
//! counters shared by a backend's worker processes, and the emulated GPU's memory budget shared
//! by every backend on it.

use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;

/// Types that may live in memory other processes write concurrently: every bit pattern is a
/// valid value (all-zero included) and every access goes through atomics.
///
/// # Safety
/// Implement only for `#[repr(C)]` structs of atomics (and arrays of them).
pub(crate) unsafe trait Atomics {}

/// A `MAP_SHARED` mapping of the first `size_of::<T>()` bytes (rounded up to a page) of a file.
pub(crate) struct SharedMap<T: Atomics> {
    ptr: NonNull<T>,
}

// SAFETY: `T` is accessed through atomics only (the `Atomics` contract), and the mapping lives
// as long as the value.
unsafe impl<T: Atomics> Send for SharedMap<T> {}
// SAFETY: as above.
unsafe impl<T: Atomics> Sync for SharedMap<T> {}

impl<T: Atomics> SharedMap<T> {
    /// The mapping's length: `T` rounded up to a page. The file must be at least this long.
    pub(crate) const LEN: usize = std::mem::size_of::<T>().next_multiple_of(4096);

    /// Maps the file `fd` refers to (at least [`Self::LEN`] bytes long).
    pub(crate) fn map(fd: &impl AsRawFd) -> io::Result<SharedMap<T>> {
        // SAFETY: a fresh shared mapping of a file the caller made at least LEN bytes long;
        // the result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                Self::LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr =
            NonNull::new(ptr.cast::<T>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(SharedMap { ptr })
    }

    /// The shared value.
    pub(crate) fn get(&self) -> &T {
        // SAFETY: a live, page-aligned mapping of at least size_of::<T>() bytes; `T` is valid
        // for any bit pattern and only accessed atomically (the `Atomics` contract).
        unsafe { self.ptr.as_ref() }
    }
}

impl<T: Atomics> Drop for SharedMap<T> {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping `map` made; no reference into it outlives `self`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), Self::LEN) };
    }
}
