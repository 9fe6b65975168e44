//! Context-independent libraries and kernels (`cuLibrary*`, `cuKernel*`),
//! which the CUDA runtime uses to load its fatbins and launch kernels.
//!
//! A `CUlibrary` points at a boxed record holding a copy of the sized image;
//! the image is loaded as a backend module into each context that uses it
//! (at load time into the current context, later into others on first
//! use). A `CUkernel` points at a boxed record naming a library and a
//! kernel; it resolves, per context, to that module's `CUfunction`, so a
//! kernel is accepted wherever a function is ([`as_function`]).

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::sync::{LazyLock, Mutex};

use vgpu_spec::fatbin::WRAPPER_MAGIC;
use vgpu_spec::Status;

use crate::ctx::{current, session_ctx};
use crate::errors::{guard, non_null, write_out, CuResult};
use crate::image::{size_image, ImageBytes, RawImage};
use crate::module::{cuModuleGetFunction, cuModuleGetGlobal_v2, cuModuleLoadData, cuModuleUnload};
use crate::state::{driver, lock};
use crate::types::{CUdevice, CUdeviceptr, CUfunction, CUmodule, CUresult};

/// `CUlibrary`.
pub type CUlibrary = *mut c_void;
/// `CUkernel`.
pub type CUkernel = *mut c_void;

/// `CU_MODULE_EAGER_LOADING`.
const CU_MODULE_EAGER_LOADING: c_int = 1;
/// `CU_MODULE_LAZY_LOADING`.
const CU_MODULE_LAZY_LOADING: c_int = 2;

/// Whether a `CUDA_MODULE_LOADING` value asks for lazy loading: anything
/// but `EAGER` does, as natively (lazy is the default since CUDA 12.2).
fn lazy_from(value: Option<&str>) -> bool {
    !value.is_some_and(|v| v.trim().eq_ignore_ascii_case("EAGER"))
}

/// Whether libraries are loaded into a context only when first used.
/// cuBLASLt registers over a thousand fatbins, most of them for other
/// architectures; loading each eagerly would ship them all to the backend.
fn lazy_loading() -> bool {
    static LAZY: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *LAZY.get_or_init(|| lazy_from(std::env::var("CUDA_MODULE_LOADING").ok().as_deref()))
}

struct Library {
    /// The sized image (PTX with its NUL).
    image: Vec<u8>,
    /// Backend module per context.
    modules: HashMap<u64, u64>,
}

struct Kernel {
    library: usize,
    name: CString,
    /// `CUfunction` per context.
    functions: HashMap<u64, usize>,
}

#[derive(Default)]
struct Tables {
    libraries: HashMap<usize, Box<Library>>,
    kernels: HashMap<usize, Box<Kernel>>,
}

static TABLES: LazyLock<Mutex<Tables>> = LazyLock::new(Mutex::default);

fn addr_of<T>(boxed: &T) -> usize {
    std::ptr::from_ref(boxed).addr()
}

/// If `image` is a fatbin wrapper (`__fatBinC_Wrapper_t`, which nvcc emits
/// and the runtime hands to the driver), the fatbin it points at; otherwise
/// `image` itself.
///
/// # Safety
/// `image` must point at a module image or a fatbin wrapper, as the CUDA
/// API defines them.
pub(crate) unsafe fn unwrap_fatbin_wrapper(image: *const c_void) -> CuResult<*const c_void> {
    non_null(image)?;
    // SAFETY: the caller's contract; the magic is compared byte by byte, so
    // a short string is not read past its first mismatch.
    let raw = unsafe { RawImage::new(image.cast()) };
    let magic = WRAPPER_MAGIC.to_le_bytes();
    if !magic
        .iter()
        .enumerate()
        .all(|(i, b)| raw.byte(i) == Some(*b))
    {
        return Ok(image);
    }
    let mut wrapper = [0u8; 24];
    if !raw.read(0, &mut wrapper) {
        return Err(Status::INVALID_IMAGE);
    }
    let fields = vgpu_spec::fatbin::Wrapper::parse(&wrapper).map_err(|err| {
        tracing::debug!(%err, "fatbin wrapper rejected");
        Status::INVALID_IMAGE
    })?;
    if fields.prelinked != 0 {
        crate::logging::warn_once("A fatbin wrapper's prelinked fatbins are ignored");
    }
    let data: *const c_void = std::ptr::with_exposed_provenance(fields.data as usize);
    non_null(data).map_err(|_| Status::INVALID_IMAGE)?;
    Ok(data)
}

/// The module of library `lib` in context `ctx`, loaded on first use.
fn module_in(lib: usize, ctx: u64) -> CuResult<u64> {
    let image_ptr = {
        let tables = lock(&TABLES);
        let library = tables.libraries.get(&lib).ok_or(Status::INVALID_HANDLE)?;
        if let Some(module) = library.modules.get(&ctx) {
            return Ok(*module);
        }
        // The boxed image stays put while the library lives; a concurrent
        // unload of a library still in use is the application's race.
        library.image.as_ptr()
    };
    if current() != Some(ctx) {
        return Err(Status::INVALID_CONTEXT);
    }
    let mut module: CUmodule = std::ptr::null_mut();
    // SAFETY: a complete, sized image owned by the library record.
    let rc = unsafe { cuModuleLoadData(&mut module, image_ptr.cast()) };
    Status(rc).into_result()?;
    let handle = module.addr() as u64;
    let mut tables = lock(&TABLES);
    match tables.libraries.get_mut(&lib) {
        Some(library) => {
            library.modules.insert(ctx, handle);
            Ok(handle)
        }
        None => Err(Status::INVALID_HANDLE),
    }
}

/// The `CUfunction` of kernel `kernel` in the current context.
fn kernel_function(kernel: usize) -> CuResult<CUfunction> {
    let (_, ctx) = session_ctx()?;
    let (lib, name) = {
        let tables = lock(&TABLES);
        let k = tables.kernels.get(&kernel).ok_or(Status::INVALID_HANDLE)?;
        if let Some(f) = k.functions.get(&ctx) {
            return Ok(std::ptr::without_provenance_mut(*f));
        }
        (k.library, k.name.clone())
    };
    let module = module_in(lib, ctx)?;
    let mut f: CUfunction = std::ptr::null_mut();
    // SAFETY: a writable out-pointer and a NUL-terminated name.
    let rc = unsafe {
        cuModuleGetFunction(
            &mut f,
            std::ptr::without_provenance_mut(module as usize),
            name.as_ptr(),
        )
    };
    Status(rc).into_result()?;
    if let Some(k) = lock(&TABLES).kernels.get_mut(&kernel) {
        k.functions.insert(ctx, f.addr());
    }
    Ok(f)
}

/// `f` itself, or the current context's function if `f` is a `CUkernel`.
pub(crate) fn as_function(f: CUfunction) -> CuResult<CUfunction> {
    if !lock(&TABLES).kernels.contains_key(&f.addr()) {
        return Ok(f);
    }
    kernel_function(f.addr())
}

/// Forgets the modules and functions of a destroyed context.
pub(crate) fn forget_context(ctx: u64) {
    let mut tables = lock(&TABLES);
    for library in tables.libraries.values_mut() {
        library.modules.remove(&ctx);
    }
    for kernel in tables.kernels.values_mut() {
        kernel.functions.remove(&ctx);
    }
}

/// Whether a library whose load into a context failed with `status` is
/// kept, to fail only when one of its kernels or globals is used: the
/// native driver loads libraries lazily, so a fatbin with no code for this
/// device (cuBLAS ships some built only for other architectures) loads
/// fine until something in it is needed.
fn load_failure_is_deferred(status: Status) -> bool {
    matches!(
        status,
        Status::NO_BINARY_FOR_GPU | Status::INVALID_PTX | UNSUPPORTED_PTX_VERSION
    )
}

/// `CUDA_ERROR_UNSUPPORTED_PTX_VERSION` (not in the protocol's table).
const UNSUPPORTED_PTX_VERSION: Status = Status(222);

/// Registers a library for a sized image. With eager loading, loads it into
/// the current context, if any, so that a bad image fails here (unless the
/// failure is one the native driver would only report on first use).
fn register(image: Vec<u8>) -> CuResult<usize> {
    let boxed = Box::new(Library {
        image,
        modules: HashMap::new(),
    });
    let lib = addr_of(&*boxed);
    lock(&TABLES).libraries.insert(lib, boxed);
    if lazy_loading() {
        return Ok(lib);
    }
    if let Some(ctx) = current() {
        match module_in(lib, ctx) {
            Ok(_) => {}
            Err(status) if load_failure_is_deferred(status) => {
                tracing::debug!(
                    status = status.0,
                    "library kept unloaded: its code does not fit this device"
                );
            }
            Err(status) => {
                lock(&TABLES).libraries.remove(&lib);
                return Err(status);
            }
        }
    }
    Ok(lib)
}

/// `cuLibraryLoadData`: a fatbin wrapper, fatbin, cubin or PTX from memory.
/// JIT and library options are ignored.
#[no_mangle]
pub unsafe extern "C" fn cuLibraryLoadData(
    library: *mut CUlibrary,
    code: *const c_void,
    _jit_options: *mut c_int,
    _jit_option_values: *mut *mut c_void,
    _num_jit_options: c_uint,
    _library_options: *mut c_int,
    _library_option_values: *mut *mut c_void,
    _num_library_options: c_uint,
) -> CUresult {
    guard(|| {
        driver()?;
        non_null(library)?;
        // SAFETY: per the API `code` is a module image or fatbin wrapper.
        let image = unsafe { unwrap_fatbin_wrapper(code) }?;
        // SAFETY: as above.
        let raw = unsafe { RawImage::new(image.cast()) };
        let sized = size_image(&raw).map_err(|err| err.status())?;
        // SAFETY: `size_image` established that the image spans `sized.len`
        // readable bytes.
        let bytes = unsafe { std::slice::from_raw_parts(image.cast::<u8>(), sized.len) };
        let lib = register(bytes.to_vec())?;
        // SAFETY: non-null, and per the API a writable `CUlibrary`.
        unsafe { write_out(library, std::ptr::without_provenance_mut(lib)) }
    })
}

/// `cuLibraryLoadFromFile`.
#[no_mangle]
pub unsafe extern "C" fn cuLibraryLoadFromFile(
    library: *mut CUlibrary,
    file_name: *const c_char,
    _jit_options: *mut c_int,
    _jit_option_values: *mut *mut c_void,
    _num_jit_options: c_uint,
    _library_options: *mut c_int,
    _library_option_values: *mut *mut c_void,
    _num_library_options: c_uint,
) -> CUresult {
    guard(|| {
        driver()?;
        non_null(library)?;
        non_null(file_name)?;
        // SAFETY: non-null, and per the API a NUL-terminated path.
        let path = OsStr::from_bytes(unsafe { CStr::from_ptr(file_name) }.to_bytes());
        let mut bytes = std::fs::read(path).map_err(|_| Status::FILE_NOT_FOUND)?;
        if !bytes.is_empty() && !bytes.contains(&0) {
            bytes.push(0);
        }
        let sized = size_image(&bytes[..]).map_err(|err| err.status())?;
        bytes.truncate(sized.len);
        let lib = register(bytes)?;
        // SAFETY: non-null, and per the API a writable `CUlibrary`.
        unsafe { write_out(library, std::ptr::without_provenance_mut(lib)) }
    })
}

/// `cuLibraryUnload`: unloads the library's module from every context.
#[no_mangle]
pub unsafe extern "C" fn cuLibraryUnload(library: CUlibrary) -> CUresult {
    guard(|| {
        driver()?;
        let removed = {
            let mut tables = lock(&TABLES);
            let removed = tables
                .libraries
                .remove(&library.addr())
                .ok_or(Status::INVALID_HANDLE)?;
            tables.kernels.retain(|_, k| k.library != library.addr());
            removed
        };
        let mut result = Ok(());
        for (ctx, module) in &removed.modules {
            let pushed = current() != Some(*ctx);
            let ctx_ptr = std::ptr::without_provenance_mut(*ctx as usize);
            // SAFETY: a context handle this library loaded into.
            if pushed && unsafe { crate::ctx::cuCtxPushCurrent_v2(ctx_ptr) } != 0 {
                continue;
            }
            // SAFETY: a module handle this library loaded.
            let rc = unsafe { cuModuleUnload(std::ptr::without_provenance_mut(*module as usize)) };
            if pushed {
                let mut popped = std::ptr::null_mut();
                // SAFETY: pops the context pushed above.
                unsafe { crate::ctx::cuCtxPopCurrent_v2(&mut popped) };
            }
            if rc != 0 && result.is_ok() {
                result = Err(Status(rc));
            }
        }
        result
    })
}

/// `cuLibraryGetKernel`: the same `CUkernel` for the same name.
#[no_mangle]
pub unsafe extern "C" fn cuLibraryGetKernel(
    kernel: *mut CUkernel,
    library: CUlibrary,
    name: *const c_char,
) -> CUresult {
    guard(|| {
        driver()?;
        non_null(kernel)?;
        non_null(name)?;
        // SAFETY: non-null, and per the API a NUL-terminated name.
        let name = unsafe { CStr::from_ptr(name) }.to_owned();
        let lib = library.addr();
        let existing = {
            let tables = lock(&TABLES);
            if !tables.libraries.contains_key(&lib) {
                return Err(Status::INVALID_HANDLE);
            }
            tables
                .kernels
                .iter()
                .find(|(_, k)| k.library == lib && k.name == name)
                .map(|(addr, _)| *addr)
        };
        let addr = match existing {
            Some(addr) => addr,
            None => {
                let boxed = Box::new(Kernel {
                    library: lib,
                    name,
                    functions: HashMap::new(),
                });
                let addr = addr_of(&*boxed);
                lock(&TABLES).kernels.insert(addr, boxed);
                // In a context, an unknown name fails now, as natively.
                if current().is_some() {
                    if let Err(status) = kernel_function(addr) {
                        lock(&TABLES).kernels.remove(&addr);
                        return Err(status);
                    }
                }
                addr
            }
        };
        // SAFETY: non-null, and per the API a writable `CUkernel`.
        unsafe { write_out(kernel, std::ptr::without_provenance_mut(addr)) }
    })
}

/// `cuLibraryGetModule`: the library's module in the current context.
#[no_mangle]
pub unsafe extern "C" fn cuLibraryGetModule(module: *mut CUmodule, library: CUlibrary) -> CUresult {
    guard(|| {
        let (_, ctx) = session_ctx()?;
        non_null(module)?;
        let handle = module_in(library.addr(), ctx)?;
        // SAFETY: non-null, and per the API a writable `CUmodule`.
        unsafe { write_out(module, std::ptr::without_provenance_mut(handle as usize)) }
    })
}

/// `cuLibraryGetGlobal`: a global of the library's module in the current
/// context; either out-pointer may be NULL.
#[no_mangle]
pub unsafe extern "C" fn cuLibraryGetGlobal(
    dptr: *mut CUdeviceptr,
    bytes: *mut usize,
    library: CUlibrary,
    name: *const c_char,
) -> CUresult {
    guard(|| {
        let (_, ctx) = session_ctx()?;
        let module = module_in(library.addr(), ctx)?;
        let hmod = std::ptr::without_provenance_mut(module as usize);
        // SAFETY: forwards the caller's pointers under the same contract.
        Status(unsafe { cuModuleGetGlobal_v2(dptr, bytes, hmod, name) }).into_result()
    })
}

/// `cuKernelGetFunction`: the kernel's function in the current context.
#[no_mangle]
pub unsafe extern "C" fn cuKernelGetFunction(func: *mut CUfunction, kernel: CUkernel) -> CUresult {
    guard(|| {
        driver()?;
        non_null(func)?;
        let f = kernel_function(kernel.addr())?;
        // SAFETY: non-null, and per the API a writable `CUfunction`.
        unsafe { write_out(func, f) }
    })
}

/// `cuKernelGetLibrary`.
#[no_mangle]
pub unsafe extern "C" fn cuKernelGetLibrary(library: *mut CUlibrary, kernel: CUkernel) -> CUresult {
    guard(|| {
        driver()?;
        non_null(library)?;
        let lib = lock(&TABLES)
            .kernels
            .get(&kernel.addr())
            .map(|k| k.library)
            .ok_or(Status::INVALID_HANDLE)?;
        // SAFETY: non-null, and per the API a writable `CUlibrary`.
        unsafe { write_out(library, std::ptr::without_provenance_mut(lib)) }
    })
}

/// `cuKernelGetName`: the name lives as long as the kernel.
#[no_mangle]
pub unsafe extern "C" fn cuKernelGetName(name: *mut *const c_char, kernel: CUkernel) -> CUresult {
    guard(|| {
        driver()?;
        non_null(name)?;
        let ptr = lock(&TABLES)
            .kernels
            .get(&kernel.addr())
            .map(|k| k.name.as_ptr())
            .ok_or(Status::INVALID_HANDLE)?;
        // SAFETY: non-null, and per the API a writable `const char *`.
        unsafe { write_out(name, ptr) }
    })
}

/// `cuKernelGetAttribute`: the attribute of its function in the current
/// context (the device must be 0).
#[no_mangle]
pub unsafe extern "C" fn cuKernelGetAttribute(
    pi: *mut c_int,
    attrib: c_int,
    kernel: CUkernel,
    dev: CUdevice,
) -> CUresult {
    guard(|| {
        crate::device::check_device(dev)?;
        let f = kernel_function(kernel.addr())?;
        // SAFETY: forwards the caller's pointer under the same contract.
        Status(unsafe { crate::launch::cuFuncGetAttribute(pi, attrib, f) }).into_result()
    })
}

/// `cuKernelSetAttribute`: set on the kernel's function in the current
/// context (the device must be 0).
#[no_mangle]
pub unsafe extern "C" fn cuKernelSetAttribute(
    attrib: c_int,
    val: c_int,
    kernel: CUkernel,
    dev: CUdevice,
) -> CUresult {
    guard(|| {
        crate::device::check_device(dev)?;
        let f = kernel_function(kernel.addr())?;
        crate::func_query::set_attribute(f, attrib, val)
    })
}

/// `cuKernelSetCacheConfig`: a hint, accepted.
#[no_mangle]
pub unsafe extern "C" fn cuKernelSetCacheConfig(
    kernel: CUkernel,
    _config: c_int,
    dev: CUdevice,
) -> CUresult {
    guard(|| {
        crate::device::check_device(dev)?;
        kernel_function(kernel.addr()).map(|_| ())
    })
}

/// Offset and size of parameter `index` of function `f`.
fn param_info(f: CUfunction, index: usize) -> CuResult<(usize, usize)> {
    let drv = driver()?;
    let table = lock(&drv.modules);
    let info = table.function(f).ok_or(Status::INVALID_HANDLE)?;
    let param = info.layout.get(index).ok_or(Status::INVALID_VALUE)?;
    Ok((param.offset, param.size))
}

/// Writes a parameter's offset and size (either pointer may be NULL).
///
/// # Safety
/// Each non-null pointer must be writable.
unsafe fn write_param(
    (offset, size): (usize, usize),
    p_offset: *mut usize,
    p_size: *mut usize,
) -> CuResult<()> {
    if !p_offset.is_null() {
        // SAFETY: non-null and writable (the caller's contract).
        unsafe { write_out(p_offset, offset) }?;
    }
    if !p_size.is_null() {
        // SAFETY: as above.
        unsafe { write_out(p_size, size) }?;
    }
    Ok(())
}

/// `cuFuncGetParamInfo`: from the layout cached at `cuModuleGetFunction`.
#[no_mangle]
pub unsafe extern "C" fn cuFuncGetParamInfo(
    func: CUfunction,
    param_index: usize,
    param_offset: *mut usize,
    param_size: *mut usize,
) -> CUresult {
    guard(|| {
        let f = as_function(func)?;
        // SAFETY: the API's contract for the out-pointers.
        unsafe { write_param(param_info(f, param_index)?, param_offset, param_size) }
    })
}

/// `cuKernelGetParamInfo`.
#[no_mangle]
pub unsafe extern "C" fn cuKernelGetParamInfo(
    kernel: CUkernel,
    param_index: usize,
    param_offset: *mut usize,
    param_size: *mut usize,
) -> CUresult {
    guard(|| {
        let f = kernel_function(kernel.addr())?;
        // SAFETY: the API's contract for the out-pointers.
        unsafe { write_param(param_info(f, param_index)?, param_offset, param_size) }
    })
}

/// `cuModuleGetLoadingMode`: lazy unless `CUDA_MODULE_LOADING=EAGER`.
#[no_mangle]
pub unsafe extern "C" fn cuModuleGetLoadingMode(mode: *mut c_int) -> CUresult {
    guard(|| {
        driver()?;
        let value = if lazy_loading() {
            CU_MODULE_LAZY_LOADING
        } else {
            CU_MODULE_EAGER_LOADING
        };
        // SAFETY: the caller passes a writable `CUmoduleLoadingMode` or NULL
        // (checked).
        unsafe { write_out(mode, value) }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wrapper(version: u32, data: u64, prelinked: u64) -> [u8; 24] {
        let mut w = [0u8; 24];
        w[..4].copy_from_slice(&WRAPPER_MAGIC.to_le_bytes());
        w[4..8].copy_from_slice(&version.to_le_bytes());
        w[8..16].copy_from_slice(&data.to_le_bytes());
        w[16..24].copy_from_slice(&prelinked.to_le_bytes());
        w
    }

    #[test]
    fn module_loading_is_lazy_unless_eager_is_asked_for() {
        assert!(lazy_from(None));
        assert!(lazy_from(Some("LAZY")));
        assert!(lazy_from(Some("")));
        assert!(!lazy_from(Some("EAGER")));
        assert!(!lazy_from(Some(" eager ")));
    }

    #[test]
    fn library_without_code_for_this_device_loads_and_fails_on_use() {
        assert!(load_failure_is_deferred(Status::NO_BINARY_FOR_GPU));
        assert!(load_failure_is_deferred(Status::INVALID_PTX));
        assert!(load_failure_is_deferred(Status(222)));
        assert!(!load_failure_is_deferred(Status::INVALID_IMAGE));
        assert!(!load_failure_is_deferred(Status::OUT_OF_MEMORY));
        assert!(!load_failure_is_deferred(Status::DEVICE_UNAVAILABLE));
    }

    #[test]
    fn fatbin_wrapper_is_unwrapped_to_its_fatbin() {
        let fatbin = [0x50u8, 0xed, 0x55, 0xba];
        let w = wrapper(1, fatbin.as_ptr().expose_provenance() as u64, 0);
        // SAFETY: a complete wrapper.
        let inner = unsafe { unwrap_fatbin_wrapper(w.as_ptr().cast()) }.unwrap();
        assert_eq!(inner.addr(), fatbin.as_ptr().addr());
    }

    #[test]
    fn other_images_pass_through_and_bad_wrappers_are_invalid_image() {
        let ptx = b".version 8.0\0";
        // SAFETY: a NUL-terminated string.
        let same = unsafe { unwrap_fatbin_wrapper(ptx.as_ptr().cast()) }.unwrap();
        assert_eq!(same.addr(), ptx.as_ptr().addr());
        let w = wrapper(7, 0x1000, 0);
        // SAFETY: a complete wrapper.
        let rc = unsafe { unwrap_fatbin_wrapper(w.as_ptr().cast()) };
        assert_eq!(rc, Err(Status::INVALID_IMAGE));
        let w = wrapper(2, 0, 0);
        // SAFETY: a complete wrapper.
        let rc = unsafe { unwrap_fatbin_wrapper(w.as_ptr().cast()) };
        assert_eq!(rc, Err(Status::INVALID_IMAGE));
    }

    #[test]
    fn plain_functions_are_not_kernels() {
        let f: CUfunction = std::ptr::without_provenance_mut(0x4242_0000);
        assert_eq!(as_function(f), Ok(f));
    }

    #[test]
    fn library_calls_before_init_are_not_initialized() {
        let mut lib: CUlibrary = std::ptr::null_mut();
        let code = b".version 8.0\0";
        // SAFETY: valid pointers; null option arrays with zero counts.
        let rc = unsafe {
            cuLibraryLoadData(
                &mut lib,
                code.as_ptr().cast(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                0,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                0,
            )
        };
        assert_eq!(rc, Status::NOT_INITIALIZED.0);
        let mut mode = 0;
        // SAFETY: a valid out-pointer.
        let rc = unsafe { cuModuleGetLoadingMode(&mut mode) };
        assert_eq!(rc, Status::NOT_INITIALIZED.0);
    }
}
