//! `cuInit` and the device queries. There is exactly one device, ordinal 0;
//! everything about it is answered locally from what `cuInit` fetched.

use std::ffi::{c_char, c_int, c_uint, CStr};

use vgpu_spec::Status;

use crate::errors::{guard, non_null, write_out, CuResult};
use crate::state::{driver, init, initialized, DeviceInfo};
use crate::types::{CUdevice, CUresult, CUuuid, DEFAULT_DRIVER_VERSION};

/// Fails with `CUDA_ERROR_INVALID_DEVICE` for any ordinal but 0.
pub(crate) fn check_device(dev: CUdevice) -> CuResult<()> {
    if dev == 0 {
        Ok(())
    } else {
        Err(Status::INVALID_DEVICE)
    }
}

fn device_info(dev: CUdevice) -> CuResult<&'static DeviceInfo> {
    let drv = driver()?;
    check_device(dev)?;
    Ok(&drv.info)
}

/// The value of a `CUdevice_attribute` from the cached table.
pub(crate) fn attribute(attributes: &[i32], attrib: c_int) -> CuResult<i32> {
    usize::try_from(attrib)
        .ok()
        .filter(|index| *index >= 1)
        .and_then(|index| attributes.get(index).copied())
        .ok_or(Status::INVALID_VALUE)
}

/// Parses `[domain:]bus:device.function` (hex) into its four numbers.
pub(crate) fn parse_pci_bus_id(text: &str) -> Option<(u32, u8, u8, u8)> {
    let parts: Vec<&str> = text.trim().split(':').collect();
    let (domain, bus, rest) = match parts.as_slice() {
        [domain, bus, rest] => (u32::from_str_radix(domain, 16).ok()?, *bus, *rest),
        [bus, rest] => (0, *bus, *rest),
        _ => return None,
    };
    let (device, function) = rest.split_once('.')?;
    Some((
        domain,
        u8::from_str_radix(bus, 16).ok()?,
        u8::from_str_radix(device, 16).ok()?,
        u8::from_str_radix(function, 16).ok()?,
    ))
}

/// Copies `text` into a C buffer of `len` bytes, truncated, NUL-terminated.
///
/// # Safety
/// `out` must be valid for writes of `len` bytes.
unsafe fn copy_c_string(out: *mut c_char, len: c_int, text: &str) -> CuResult<()> {
    non_null(out)?;
    let len = usize::try_from(len)
        .ok()
        .filter(|len| *len > 0)
        .ok_or(Status::INVALID_VALUE)?;
    let n = text.len().min(len - 1);
    // SAFETY: `out` is valid for `len` bytes and `n + 1 <= len`; the source is
    // a distinct Rust string.
    unsafe {
        std::ptr::copy_nonoverlapping(text.as_ptr(), out.cast::<u8>(), n);
        out.add(n).write(0);
    }
    Ok(())
}

/// `cuInit`: connects to the backend (once). `flags` must be 0.
#[no_mangle]
pub unsafe extern "C" fn cuInit(flags: c_uint) -> CUresult {
    guard(|| {
        if flags != 0 {
            return Err(Status::INVALID_VALUE);
        }
        init()
    })
}

/// `cuDriverGetVersion`: the backend's driver version (a CUDA 13.0 driver
/// before `cuInit`, which native CUDA does not require here).
#[no_mangle]
pub unsafe extern "C" fn cuDriverGetVersion(version: *mut c_int) -> CUresult {
    guard(|| {
        let value = initialized().map_or(DEFAULT_DRIVER_VERSION, |d| d.info.driver_version);
        // SAFETY: the caller passes a writable `int` or NULL (checked).
        unsafe { write_out(version, value) }
    })
}

/// `cuDeviceGet`: ordinal 0 is the only device.
#[no_mangle]
pub unsafe extern "C" fn cuDeviceGet(device: *mut CUdevice, ordinal: c_int) -> CUresult {
    guard(|| {
        driver()?;
        non_null(device)?;
        check_device(ordinal)?;
        // SAFETY: non-null, and per the API a writable `CUdevice`.
        unsafe { write_out(device, 0) }
    })
}

/// `cuDeviceGetCount`: 1.
#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetCount(count: *mut c_int) -> CUresult {
    guard(|| {
        driver()?;
        // SAFETY: the caller passes a writable `int` or NULL (checked).
        unsafe { write_out(count, 1) }
    })
}

/// `cuDeviceGetName`.
#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetName(name: *mut c_char, len: c_int, dev: CUdevice) -> CUresult {
    guard(|| {
        let info = device_info(dev)?;
        // SAFETY: per the API `name` holds `len` writable bytes.
        unsafe { copy_c_string(name, len, &info.config.device_name()) }
    })
}

unsafe fn get_uuid(uuid: *mut CUuuid, dev: CUdevice) -> CuResult<()> {
    let info = device_info(dev)?;
    let value = CUuuid {
        bytes: info.config.uuid,
    };
    // SAFETY: the caller passes a writable `CUuuid` or NULL (checked).
    unsafe { write_out(uuid, value) }
}

/// `cuDeviceGetUuid`: the slice's UUID.
#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetUuid(uuid: *mut CUuuid, dev: CUdevice) -> CUresult {
    // SAFETY: forwards the caller's pointer under the same contract.
    guard(|| unsafe { get_uuid(uuid, dev) })
}

/// `cuDeviceGetUuid_v2`.
#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetUuid_v2(uuid: *mut CUuuid, dev: CUdevice) -> CUresult {
    // SAFETY: forwards the caller's pointer under the same contract.
    guard(|| unsafe { get_uuid(uuid, dev) })
}

/// `cuDeviceTotalMem` (legacy: 32-bit result, saturated).
#[no_mangle]
pub unsafe extern "C" fn cuDeviceTotalMem(bytes: *mut c_uint, dev: CUdevice) -> CUresult {
    guard(|| {
        let info = device_info(dev)?;
        let value = c_uint::try_from(info.total_mem).unwrap_or(c_uint::MAX);
        // SAFETY: the caller passes a writable `unsigned int` or NULL (checked).
        unsafe { write_out(bytes, value) }
    })
}

/// `cuDeviceTotalMem_v2`: the slice's memory limit.
#[no_mangle]
pub unsafe extern "C" fn cuDeviceTotalMem_v2(bytes: *mut usize, dev: CUdevice) -> CUresult {
    guard(|| {
        let info = device_info(dev)?;
        let value = usize::try_from(info.total_mem).unwrap_or(usize::MAX);
        // SAFETY: the caller passes a writable `size_t` or NULL (checked).
        unsafe { write_out(bytes, value) }
    })
}

/// `cuDeviceGetAttribute`: from the table fetched at `cuInit`.
#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetAttribute(
    pi: *mut c_int,
    attrib: c_int,
    dev: CUdevice,
) -> CUresult {
    guard(|| {
        let info = device_info(dev)?;
        non_null(pi)?;
        let value = attribute(&info.attributes, attrib)?;
        // SAFETY: non-null, and per the API a writable `int`.
        unsafe { write_out(pi, value) }
    })
}

/// `cuDeviceComputeCapability`.
#[no_mangle]
pub unsafe extern "C" fn cuDeviceComputeCapability(
    major: *mut c_int,
    minor: *mut c_int,
    dev: CUdevice,
) -> CUresult {
    guard(|| {
        let info = device_info(dev)?;
        non_null(major)?;
        non_null(minor)?;
        // SAFETY: both non-null, and per the API writable `int`s.
        unsafe {
            write_out(major, c_int::from(info.config.cc_major.get()))?;
            write_out(minor, c_int::from(info.config.cc_minor.get()))
        }
    })
}

/// `cuDeviceGetPCIBusId`: the physical GPU's bus id.
#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetPCIBusId(
    pci_bus_id: *mut c_char,
    len: c_int,
    dev: CUdevice,
) -> CUresult {
    guard(|| {
        let info = device_info(dev)?;
        // SAFETY: per the API `pci_bus_id` holds `len` writable bytes.
        unsafe { copy_c_string(pci_bus_id, len, &info.config.pci_bus_id()) }
    })
}

/// `cuDeviceGetByPCIBusId`: 0 if the id names our device.
#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetByPCIBusId(
    dev: *mut CUdevice,
    pci_bus_id: *const c_char,
) -> CUresult {
    guard(|| {
        let drv = driver()?;
        non_null(dev)?;
        non_null(pci_bus_id)?;
        // SAFETY: non-null, and per the API a NUL-terminated string.
        let text = unsafe { CStr::from_ptr(pci_bus_id) };
        let wanted = text
            .to_str()
            .ok()
            .and_then(parse_pci_bus_id)
            .ok_or(Status::INVALID_VALUE)?;
        let config = &drv.info.config;
        let ours = (
            config.pci_domain.get(),
            config.pci_bus,
            config.pci_device,
            config.pci_function,
        );
        if wanted != ours {
            return Err(Status::INVALID_DEVICE);
        }
        // SAFETY: non-null, and per the API a writable `CUdevice`.
        unsafe { write_out(dev, 0) }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attribute_out_of_range_is_invalid_value() {
        let table = [0, 1024, 7, 9];
        assert_eq!(attribute(&table, 1), Ok(1024));
        assert_eq!(attribute(&table, 3), Ok(9));
        assert_eq!(attribute(&table, 0), Err(Status::INVALID_VALUE));
        assert_eq!(attribute(&table, 4), Err(Status::INVALID_VALUE));
        assert_eq!(attribute(&table, -1), Err(Status::INVALID_VALUE));
    }

    #[test]
    fn pci_bus_ids_parse_with_and_without_domain() {
        assert_eq!(parse_pci_bus_id("00000000:1b:00.0"), Some((0, 0x1b, 0, 0)));
        assert_eq!(parse_pci_bus_id("0001:1B:02.3"), Some((1, 0x1b, 2, 3)));
        assert_eq!(parse_pci_bus_id("1b:00.0"), Some((0, 0x1b, 0, 0)));
        assert_eq!(parse_pci_bus_id("1b:00"), None);
        assert_eq!(parse_pci_bus_id("zz:00.0"), None);
    }

    #[test]
    fn c_strings_are_truncated_and_terminated() {
        let mut buf = [0x55 as c_char; 6];
        // SAFETY: `buf` holds 6 writable bytes.
        unsafe { copy_c_string(buf.as_mut_ptr(), 6, "NVIDIA H100") }.unwrap();
        // SAFETY: `copy_c_string` NUL-terminated the buffer.
        let text = unsafe { CStr::from_ptr(buf.as_ptr()) };
        assert_eq!(text.to_str().unwrap(), "NVIDI");
        // SAFETY: a zero length is rejected before any write.
        let rc = unsafe { copy_c_string(buf.as_mut_ptr(), 0, "x") };
        assert_eq!(rc, Err(Status::INVALID_VALUE));
    }

    #[test]
    fn device_queries_before_init_are_not_initialized() {
        let mut count = 0;
        // SAFETY: a valid out-pointer.
        let rc = unsafe { cuDeviceGetCount(&mut count) };
        assert_eq!(rc, Status::NOT_INITIALIZED.0);
        let mut version = 0;
        // SAFETY: a valid out-pointer.
        let rc = unsafe { cuDriverGetVersion(&mut version) };
        assert_eq!(rc, 0);
        assert_eq!(version, DEFAULT_DRIVER_VERSION);
    }

    #[test]
    fn init_with_nonzero_flags_is_invalid_value() {
        // SAFETY: no pointer arguments.
        let rc = unsafe { cuInit(1) };
        assert_eq!(rc, Status::INVALID_VALUE.0);
    }
}
