//! `cuMemcpy` / `cuMemcpyAsync`: copies between two unified addresses,
//! whose direction the driver works out. Native CUDA reserves device
//! addresses in the process, so an address is host memory exactly when it
//! is not a device address. Here device addresses live in the backend's
//! process, so the test is the other way round: an address mapped in this
//! process is host memory (pageable or pinned), anything else is a device
//! address, which the backend validates against the session's allocations.

use std::ffi::c_void;

use crate::copy::{dtod, dtoh, htod};
use crate::errors::{guard, CuResult};
use crate::types::{CUdeviceptr, CUresult, CUstream};

/// True if the page holding `addr` is mapped in this process.
fn page_mapped(addr: u64) -> bool {
    // SAFETY: `sysconf` has no preconditions.
    let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    let start = addr - addr % page.max(1);
    let mut residency = 0u8;
    // SAFETY: `mincore` only inspects the mapping of one page at a
    // page-aligned address and writes one byte into `residency`; an
    // unmapped page makes it fail with ENOMEM, touching nothing.
    let rc = unsafe {
        libc::mincore(
            std::ptr::without_provenance_mut(start as usize),
            page as usize,
            &mut residency,
        )
    };
    rc == 0
}

/// Whether `[addr, addr + len)` is host memory of this process (its first
/// and last pages are mapped).
pub(crate) fn is_host(addr: u64, len: usize) -> bool {
    addr != 0 && page_mapped(addr) && page_mapped(addr.saturating_add(len.max(1) as u64 - 1))
}

/// Which way a generic copy goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Direction {
    HostToHost,
    HostToDevice,
    DeviceToHost,
    DeviceToDevice,
}

/// The direction of a copy given which ends are host memory.
pub(crate) fn direction(dst_host: bool, src_host: bool) -> Direction {
    match (dst_host, src_host) {
        (true, true) => Direction::HostToHost,
        (false, true) => Direction::HostToDevice,
        (true, false) => Direction::DeviceToHost,
        (false, false) => Direction::DeviceToDevice,
    }
}

/// The shared body; `stream` set means the async entry point.
///
/// # Safety
/// Host ends must be valid for `len` bytes (the API's contract).
unsafe fn copy(dst: u64, src: u64, len: usize, stream: Option<CUstream>) -> CuResult<()> {
    if len == 0 {
        return Ok(());
    }
    let dst_ptr: *mut c_void = std::ptr::with_exposed_provenance_mut(dst as usize);
    let src_ptr: *const c_void = std::ptr::with_exposed_provenance(src as usize);
    match direction(is_host(dst, len), is_host(src, len)) {
        Direction::HostToHost => {
            crate::ctx::session_ctx()?;
            // SAFETY: both ends are host memory valid for `len` bytes (the
            // caller's contract); `copy` allows overlap.
            unsafe { std::ptr::copy(src_ptr.cast::<u8>(), dst_ptr.cast::<u8>(), len) };
            Ok(())
        }
        // SAFETY: `src` is readable host memory (the caller's contract).
        Direction::HostToDevice => unsafe { htod(dst, src_ptr, len, stream) },
        // SAFETY: `dst` is writable host memory (the caller's contract).
        Direction::DeviceToHost => unsafe { dtoh(dst_ptr, src, len, stream) },
        Direction::DeviceToDevice => dtod(dst, src, len, stream),
    }
}

/// `cuMemcpy`.
#[no_mangle]
pub unsafe extern "C" fn cuMemcpy(
    dst: CUdeviceptr,
    src: CUdeviceptr,
    byte_count: usize,
) -> CUresult {
    // SAFETY: the caller's pointers, under the API's contract.
    guard(|| unsafe { copy(dst, src, byte_count, None) })
}

/// `cuMemcpyAsync`.
#[no_mangle]
pub unsafe extern "C" fn cuMemcpyAsync(
    dst: CUdeviceptr,
    src: CUdeviceptr,
    byte_count: usize,
    stream: CUstream,
) -> CUresult {
    // SAFETY: as `cuMemcpy`.
    guard(|| unsafe { copy(dst, src, byte_count, Some(stream)) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_host_buffers_are_host_and_unmapped_addresses_are_device() {
        let buffer = vec![0u8; 3 * 4096];
        let addr = buffer.as_ptr().addr() as u64;
        assert!(is_host(addr, buffer.len()));
        // A device-style address nothing in this process maps.
        assert!(!is_host(0x7e00_0000_0000 + 0x1234_5000, 256));
        assert!(!is_host(0, 16));
    }

    #[test]
    fn direction_follows_which_ends_are_host_memory() {
        assert_eq!(direction(true, true), Direction::HostToHost);
        assert_eq!(direction(false, true), Direction::HostToDevice);
        assert_eq!(direction(true, false), Direction::DeviceToHost);
        assert_eq!(direction(false, false), Direction::DeviceToDevice);
    }

    #[test]
    fn generic_copies_need_an_initialized_driver() {
        let a = [1u8; 8];
        let mut b = [0u8; 8];
        let (dst, src) = (b.as_mut_ptr().addr() as u64, a.as_ptr().addr() as u64);
        // SAFETY: two valid host buffers of 8 bytes.
        let rc = unsafe { cuMemcpy(dst, src, 8) };
        assert_eq!(rc, vgpu_spec::Status::NOT_INITIALIZED.0);
        // SAFETY: nothing is copied for zero bytes.
        let rc = unsafe { cuMemcpyAsync(dst, src, 0, std::ptr::null_mut()) };
        assert_eq!(rc, 0);
    }
}
