//! `cuPointerGetAttribute(s)`: what a pointer is, answered locally.
//!
//! A pointer mapped in this process is host memory (pageable, or pinned memory shared with the
//! backend, which kernels cannot address through the slice); anything else is treated as device
//! memory, which in a slice is only ever addressed by its own value. Triton's launchers ask for
//! `CU_POINTER_ATTRIBUTE_DEVICE_POINTER` of every tensor argument and take `INVALID_VALUE` to
//! mean "a CPU tensor", as with the real driver.

use std::ffi::{c_uint, c_void};

use vgpu_spec::Status;

use crate::copy_generic::is_host;
use crate::ctx::session_ctx;
use crate::errors::{guard, write_out, CuResult};
use crate::types::{CUdeviceptr, CUresult};

/// `CU_POINTER_ATTRIBUTE_CONTEXT`.
const CONTEXT: c_uint = 1;
/// `CU_POINTER_ATTRIBUTE_MEMORY_TYPE`.
const MEMORY_TYPE: c_uint = 2;
/// `CU_POINTER_ATTRIBUTE_DEVICE_POINTER`.
const DEVICE_POINTER: c_uint = 3;
/// `CU_POINTER_ATTRIBUTE_HOST_POINTER`.
const HOST_POINTER: c_uint = 4;
/// `CU_POINTER_ATTRIBUTE_IS_MANAGED`.
const IS_MANAGED: c_uint = 8;
/// `CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL`.
const DEVICE_ORDINAL: c_uint = 9;

/// `CU_MEMORYTYPE_HOST`, `CU_MEMORYTYPE_DEVICE`.
const MEMORYTYPE_HOST: c_uint = 1;
const MEMORYTYPE_DEVICE: c_uint = 2;

/// One attribute's value, as the bytes the API writes.
#[derive(Debug, PartialEq, Eq)]
enum Value {
    Pointer(u64),
    Uint(c_uint),
    Int(i32),
}

/// The value of `attribute` for `ptr`, given whether it is host memory and the current
/// context.
fn value(attribute: c_uint, ptr: u64, host: bool, ctx: u64) -> CuResult<Value> {
    match (attribute, host) {
        (CONTEXT, false) => Ok(Value::Pointer(ctx)),
        (MEMORY_TYPE, true) => Ok(Value::Uint(MEMORYTYPE_HOST)),
        (MEMORY_TYPE, false) => Ok(Value::Uint(MEMORYTYPE_DEVICE)),
        (DEVICE_POINTER, false) => Ok(Value::Pointer(ptr)),
        (HOST_POINTER, true) => Ok(Value::Pointer(ptr)),
        (IS_MANAGED, _) => Ok(Value::Uint(0)),
        (DEVICE_ORDINAL, false) => Ok(Value::Int(0)),
        // Host memory has no device pointer or context through a slice; device memory no host
        // pointer: as the real driver for unregistered memory.
        (CONTEXT | DEVICE_POINTER | HOST_POINTER | DEVICE_ORDINAL, _) => Err(Status::INVALID_VALUE),
        _ => Err(Status::NOT_SUPPORTED),
    }
}

/// Writes `v` through `data`.
///
/// # Safety
/// `data` must be valid for a write of the attribute's type.
unsafe fn write(data: *mut c_void, v: Value) -> CuResult<()> {
    // SAFETY: per the caller, `data` holds the attribute's type: a pointer-sized value for
    // pointers, an unsigned or signed int otherwise.
    unsafe {
        match v {
            Value::Pointer(p) => write_out(data.cast::<u64>(), p),
            Value::Uint(u) => write_out(data.cast::<c_uint>(), u),
            Value::Int(i) => write_out(data.cast::<i32>(), i),
        }
    }
}

/// `cuPointerGetAttribute`.
#[no_mangle]
pub unsafe extern "C" fn cuPointerGetAttribute(
    data: *mut c_void,
    attribute: c_uint,
    ptr: CUdeviceptr,
) -> CUresult {
    guard(|| {
        let (_, ctx) = session_ctx()?;
        let v = value(attribute, ptr, is_host(ptr, 1), ctx)?;
        // SAFETY: the API contract: `data` points at the attribute's type.
        unsafe { write(data, v) }
    })
}

/// `cuPointerGetAttributes`: each attribute in turn; an unsupported one is left as it is,
/// as the real driver leaves what it cannot answer.
#[no_mangle]
pub unsafe extern "C" fn cuPointerGetAttributes(
    count: c_uint,
    attributes: *const c_uint,
    data: *mut *mut c_void,
    ptr: CUdeviceptr,
) -> CUresult {
    guard(|| {
        if count > 0 && (attributes.is_null() || data.is_null()) {
            return Err(Status::INVALID_VALUE);
        }
        let (_, ctx) = session_ctx()?;
        let host = is_host(ptr, 1);
        for i in 0..count as usize {
            // SAFETY: the caller passes `count` attributes and `count` data pointers.
            let (attribute, out) = unsafe { (*attributes.add(i), *data.add(i)) };
            if out.is_null() {
                continue;
            }
            match value(attribute, ptr, host, ctx) {
                // SAFETY: `out` points at this attribute's type (API contract).
                Ok(v) => unsafe { write(out, v)? },
                Err(Status::NOT_SUPPORTED) => {}
                // Attributes that do not apply read as zero here, as the driver reports them.
                Err(_) => {
                    // SAFETY: as above; zero of the attribute's type.
                    unsafe { write(out, zero_of(attribute))? }
                }
            }
        }
        Ok(())
    })
}

fn zero_of(attribute: c_uint) -> Value {
    match attribute {
        CONTEXT | DEVICE_POINTER | HOST_POINTER => Value::Pointer(0),
        DEVICE_ORDINAL => Value::Int(-2),
        _ => Value::Uint(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_memory_is_its_own_device_pointer_in_the_current_context() {
        assert_eq!(
            value(DEVICE_POINTER, 0x7f00_0000_1000, false, 5),
            Ok(Value::Pointer(0x7f00_0000_1000))
        );
        assert_eq!(
            value(MEMORY_TYPE, 0x7f00_0000_1000, false, 5),
            Ok(Value::Uint(MEMORYTYPE_DEVICE))
        );
        assert_eq!(value(CONTEXT, 1, false, 5), Ok(Value::Pointer(5)));
        assert_eq!(value(DEVICE_ORDINAL, 1, false, 5), Ok(Value::Int(0)));
    }

    #[test]
    fn host_memory_has_no_device_pointer_so_triton_sees_a_cpu_tensor() {
        assert_eq!(
            value(DEVICE_POINTER, 0x1000, true, 5),
            Err(Status::INVALID_VALUE)
        );
        assert_eq!(
            value(MEMORY_TYPE, 0x1000, true, 5),
            Ok(Value::Uint(MEMORYTYPE_HOST))
        );
        assert_eq!(
            value(HOST_POINTER, 0x1000, true, 5),
            Ok(Value::Pointer(0x1000))
        );
        assert_eq!(value(IS_MANAGED, 0x1000, true, 5), Ok(Value::Uint(0)));
    }

    #[test]
    fn unknown_attributes_are_not_supported() {
        assert_eq!(value(11, 0x1000, false, 5), Err(Status::NOT_SUPPORTED));
    }

    #[test]
    fn a_pointer_into_this_process_is_host_memory() {
        let local = 7u64;
        assert!(is_host(&local as *const u64 as u64, 8));
    }
}
