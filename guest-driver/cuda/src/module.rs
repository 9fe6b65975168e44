//! Modules and functions. A `CUmodule` is the backend's module handle as a
//! pointer value. A `CUfunction` points at a boxed [`FunctionInfo`] owned by
//! the [`ModuleTable`], which caches the backend's parameter layout so
//! launches are packed locally; the boxes are freed when their module is
//! unloaded or its context destroyed, and a launch accepts only a pointer the
//! table knows.

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_uint, c_void, CStr, OsStr};
use std::os::unix::ffi::OsStrExt;

use vgpu_spec::wire::{
    FunctionResp, GlobalResp, HandleReq, HandleResp, ModuleLoadReq, ModuleSymbolReq, ParamInfo,
};
use vgpu_spec::{Request, Response, Status};

use crate::ctx::session_ctx;
use crate::errors::{guard, non_null, write_out, CuResult};
use crate::image::{size_image, ImageError, RawImage};
use crate::logging;
use crate::state::{lock, parse};
use crate::types::{CUdeviceptr, CUdeviceptrV1, CUfunction, CUmodule, CUresult};

/// One kernel parameter's place in the packed block (validated).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Param {
    /// Byte offset.
    pub offset: usize,
    /// Size in bytes.
    pub size: usize,
}

/// What the library knows about a function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FunctionInfo {
    /// The backend's function handle.
    pub handle: u64,
    /// The parameters, in declaration order.
    pub layout: Vec<Param>,
    /// Size of the packed parameter block.
    pub param_bytes: usize,
}

struct ModuleEntry {
    ctx: u64,
    /// Function name to the address of its boxed record.
    by_name: HashMap<Vec<u8>, usize>,
}

/// Loaded modules and the functions looked up in them.
#[derive(Default)]
pub(crate) struct ModuleTable {
    modules: HashMap<u64, ModuleEntry>,
    /// Address of the boxed record (the `CUfunction` value) to the record.
    functions: HashMap<usize, Box<FunctionInfo>>,
}

impl std::fmt::Debug for ModuleTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModuleTable")
            .field("modules", &self.modules.len())
            .field("functions", &self.functions.len())
            .finish()
    }
}

impl ModuleTable {
    fn add_module(&mut self, module: u64, ctx: u64) {
        self.modules.insert(
            module,
            ModuleEntry {
                ctx,
                by_name: HashMap::new(),
            },
        );
    }

    fn contains(&self, module: u64) -> bool {
        self.modules.contains_key(&module)
    }

    fn cached(&self, module: u64, name: &[u8]) -> Option<usize> {
        self.modules.get(&module)?.by_name.get(name).copied()
    }

    /// Records a function; returns its `CUfunction` address (the existing one
    /// if another thread got there first), or `None` if the module is gone.
    fn add_function(&mut self, module: u64, name: &[u8], info: FunctionInfo) -> Option<usize> {
        let entry = self.modules.get_mut(&module)?;
        if let Some(addr) = entry.by_name.get(name) {
            return Some(*addr);
        }
        let boxed = Box::new(info);
        let addr = std::ptr::from_ref::<FunctionInfo>(&boxed).addr();
        entry.by_name.insert(name.to_vec(), addr);
        self.functions.insert(addr, boxed);
        Some(addr)
    }

    fn remove_module(&mut self, module: u64) {
        if let Some(entry) = self.modules.remove(&module) {
            for addr in entry.by_name.values() {
                self.functions.remove(addr);
            }
        }
    }

    /// Forgets the modules of a destroyed context.
    pub(crate) fn forget_context(&mut self, ctx: u64) {
        let gone: Vec<u64> = self
            .modules
            .iter()
            .filter(|(_, entry)| entry.ctx == ctx)
            .map(|(module, _)| *module)
            .collect();
        for module in gone {
            self.remove_module(module);
        }
    }

    /// The record behind a `CUfunction`, if it is live.
    pub(crate) fn function(&self, f: CUfunction) -> Option<&FunctionInfo> {
        self.functions.get(&f.addr()).map(|boxed| &**boxed)
    }
}

/// Builds a function record from the backend's answer, checking that the
/// layout fits the block and the block fits the protocol's limit.
pub(crate) fn function_from_wire(resp: &FunctionResp, rest: &[u8]) -> CuResult<FunctionInfo> {
    let bad = |why: &str| {
        logging::report_once(&format!(
            "The vGPU backend sent an invalid kernel parameter layout: {why}"
        ));
        Status::UNKNOWN
    };
    let count = resp.param_count.get();
    let param_bytes = resp.param_bytes.get();
    if count > vgpu_spec::MAX_PARAMS {
        return Err(bad("too many parameters"));
    }
    if param_bytes > vgpu_spec::MAX_PARAM_BYTES {
        return Err(bad("parameter block too large"));
    }
    let params =
        Response::array::<ParamInfo>(rest, count as usize).map_err(|_| bad("truncated"))?;
    let mut layout = Vec::with_capacity(params.len());
    for p in params {
        let (offset, size) = (p.offset.get(), p.size.get());
        if offset.checked_add(size).is_none_or(|end| end > param_bytes) {
            return Err(bad("parameter outside the block"));
        }
        layout.push(Param {
            offset: offset as usize,
            size: size as usize,
        });
    }
    Ok(FunctionInfo {
        handle: resp.function.get(),
        layout,
        param_bytes: param_bytes as usize,
    })
}

fn module_ptr(handle: u64) -> CUmodule {
    std::ptr::without_provenance_mut(handle as usize)
}

/// Ships a sized image; returns the new module handle.
fn load(image: &[u8], kind: u32) -> CuResult<u64> {
    let (drv, ctx) = session_ctx()?;
    let req = ModuleLoadReq {
        image_len: (image.len() as u64).into(),
        kind: kind.into(),
        _pad: 0.into(),
    };
    let mut body = Vec::new();
    drv.call(ctx, 0, &Request::ModuleLoad(req, image), &mut body)?;
    let (resp, _) = parse::<HandleResp>(&body, "MODULE_LOAD")?;
    let module = resp.handle.get();
    lock(&drv.modules).add_module(module, ctx);
    Ok(module)
}

fn image_failed(err: ImageError) -> Status {
    tracing::debug!(%err, "module image rejected");
    err.status()
}

/// Shared body of `cuModuleLoadData(Ex)`.
unsafe fn load_data(module: *mut CUmodule, image: *const c_void) -> CuResult<()> {
    session_ctx()?;
    non_null(module)?;
    non_null(image)?;
    // SAFETY: per the API `image` is a module image or a fatbin wrapper.
    let image = unsafe { crate::library::unwrap_fatbin_wrapper(image) }?;
    // SAFETY: per the API `image` points at a complete module image.
    let raw = unsafe { RawImage::new(image.cast()) };
    let sized = size_image(&raw).map_err(image_failed)?;
    // SAFETY: `size_image` established that the image spans `sized.len`
    // readable bytes from `image`, which stay valid for this call.
    let bytes = unsafe { std::slice::from_raw_parts(image.cast::<u8>(), sized.len) };
    let handle = load(bytes, sized.kind)?;
    // SAFETY: non-null, and per the API a writable `CUmodule`.
    unsafe { write_out(module, module_ptr(handle)) }
}

/// `cuModuleLoadData`: PTX, cubin or fatbin from memory.
#[no_mangle]
pub unsafe extern "C" fn cuModuleLoadData(module: *mut CUmodule, image: *const c_void) -> CUresult {
    // SAFETY: forwards the caller's pointers under the same contract.
    guard(|| unsafe { load_data(module, image) })
}

/// `cuModuleLoadDataEx`: the JIT options are ignored.
#[no_mangle]
pub unsafe extern "C" fn cuModuleLoadDataEx(
    module: *mut CUmodule,
    image: *const c_void,
    _num_options: c_uint,
    _options: *mut c_int,
    _option_values: *mut *mut c_void,
) -> CUresult {
    // SAFETY: forwards the caller's pointers under the same contract.
    guard(|| unsafe { load_data(module, image) })
}

/// The module bytes of a file: sized like an in-memory image, except that a
/// PTX file needs no terminating NUL.
fn file_image(mut bytes: Vec<u8>) -> Result<(Vec<u8>, u32), ImageError> {
    let text = bytes
        .first()
        .is_some_and(|b| b.is_ascii_graphic() || b.is_ascii_whitespace());
    if text && !bytes.contains(&0) {
        bytes.push(0);
    }
    let sized = size_image(&bytes[..])?;
    bytes.truncate(sized.len);
    Ok((bytes, sized.kind))
}

/// `cuModuleLoad`: reads a module file.
#[no_mangle]
pub unsafe extern "C" fn cuModuleLoad(module: *mut CUmodule, fname: *const c_char) -> CUresult {
    guard(|| {
        session_ctx()?;
        non_null(module)?;
        non_null(fname)?;
        // SAFETY: non-null, and per the API a NUL-terminated path.
        let path = OsStr::from_bytes(unsafe { CStr::from_ptr(fname) }.to_bytes());
        let bytes = std::fs::read(path).map_err(|err| {
            tracing::debug!(path = ?path, %err, "cannot read module file");
            Status::FILE_NOT_FOUND
        })?;
        let (image, kind) = file_image(bytes).map_err(image_failed)?;
        let handle = load(&image, kind)?;
        // SAFETY: non-null, and per the API a writable `CUmodule`.
        unsafe { write_out(module, module_ptr(handle)) }
    })
}

/// `cuModuleUnload`: frees the module's function records too.
#[no_mangle]
pub unsafe extern "C" fn cuModuleUnload(hmod: CUmodule) -> CUresult {
    guard(|| {
        let (drv, ctx) = session_ctx()?;
        let module = hmod.addr() as u64;
        if !lock(&drv.modules).contains(module) {
            return Err(Status::INVALID_HANDLE);
        }
        let req = HandleReq {
            handle: module.into(),
        };
        drv.call_release(ctx, &Request::ModuleUnload(req), &mut Vec::new())?;
        lock(&drv.modules).remove_module(module);
        Ok(())
    })
}

/// A symbol name from the application, checked against the protocol limit.
///
/// # Safety
/// `name` must be null or a NUL-terminated string.
unsafe fn symbol<'a>(name: *const c_char) -> CuResult<&'a [u8]> {
    non_null(name)?;
    // SAFETY: non-null, and per the caller's contract NUL-terminated.
    let bytes = unsafe { CStr::from_ptr(name) }.to_bytes();
    if bytes.is_empty() || bytes.len() > vgpu_spec::MAX_SYMBOL_NAME as usize {
        return Err(Status::NOT_FOUND);
    }
    Ok(bytes)
}

fn symbol_req(module: u64, name: &[u8]) -> ModuleSymbolReq {
    ModuleSymbolReq {
        module: module.into(),
        name_len: (name.len() as u32).into(),
        _pad: 0.into(),
    }
}

/// `cuModuleGetFunction`: the same `CUfunction` for the same name.
#[no_mangle]
pub unsafe extern "C" fn cuModuleGetFunction(
    hfunc: *mut CUfunction,
    hmod: CUmodule,
    name: *const c_char,
) -> CUresult {
    guard(|| {
        let (drv, ctx) = session_ctx()?;
        non_null(hfunc)?;
        // SAFETY: per the API `name` is a NUL-terminated string (null checked).
        let name = unsafe { symbol(name) }?;
        let module = hmod.addr() as u64;
        let cached = {
            let table = lock(&drv.modules);
            if !table.contains(module) {
                return Err(Status::INVALID_HANDLE);
            }
            table.cached(module, name)
        };
        let addr = match cached {
            Some(addr) => addr,
            None => {
                let mut body = Vec::new();
                let req = Request::GetFunction(symbol_req(module, name), name);
                drv.call(ctx, 0, &req, &mut body)?;
                let (resp, rest) = parse::<FunctionResp>(&body, "MODULE_GET_FUNCTION")?;
                let info = function_from_wire(&resp, rest)?;
                lock(&drv.modules)
                    .add_function(module, name, info)
                    .ok_or(Status::INVALID_HANDLE)?
            }
        };
        // SAFETY: non-null, and per the API a writable `CUfunction`.
        unsafe { write_out(hfunc, std::ptr::without_provenance_mut(addr)) }
    })
}

/// Looks a global up: (device address, size).
///
/// # Safety
/// `name` must be null or a NUL-terminated string.
unsafe fn get_global(hmod: CUmodule, name: *const c_char) -> CuResult<(u64, u64)> {
    let (drv, ctx) = session_ctx()?;
    // SAFETY: the caller's contract.
    let name = unsafe { symbol(name) }?;
    let module = hmod.addr() as u64;
    if !lock(&drv.modules).contains(module) {
        return Err(Status::INVALID_HANDLE);
    }
    let mut body = Vec::new();
    let req = Request::GetGlobal(symbol_req(module, name), name);
    drv.call(ctx, 0, &req, &mut body)?;
    let (resp, _) = parse::<GlobalResp>(&body, "MODULE_GET_GLOBAL")?;
    Ok((resp.dptr.get(), resp.size.get()))
}

/// `cuModuleGetGlobal_v2`: either out-pointer may be NULL.
#[no_mangle]
pub unsafe extern "C" fn cuModuleGetGlobal_v2(
    dptr: *mut CUdeviceptr,
    bytes: *mut usize,
    hmod: CUmodule,
    name: *const c_char,
) -> CUresult {
    guard(|| {
        // SAFETY: per the API `name` is a NUL-terminated string.
        let (addr, size) = unsafe { get_global(hmod, name) }?;
        if !dptr.is_null() {
            // SAFETY: non-null, and per the API a writable `CUdeviceptr`.
            unsafe { write_out(dptr, addr) }?;
        }
        if !bytes.is_null() {
            let size = usize::try_from(size).map_err(|_| Status::UNKNOWN)?;
            // SAFETY: non-null, and per the API a writable `size_t`.
            unsafe { write_out(bytes, size) }?;
        }
        Ok(())
    })
}

/// `cuModuleGetGlobal` (legacy: 32-bit address and size).
#[no_mangle]
pub unsafe extern "C" fn cuModuleGetGlobal(
    dptr: *mut CUdeviceptrV1,
    bytes: *mut c_uint,
    hmod: CUmodule,
    name: *const c_char,
) -> CUresult {
    guard(|| {
        // SAFETY: per the API `name` is a NUL-terminated string.
        let (addr, size) = unsafe { get_global(hmod, name) }?;
        let addr = CUdeviceptrV1::try_from(addr).map_err(|_| Status::NOT_SUPPORTED)?;
        let size = c_uint::try_from(size).map_err(|_| Status::NOT_SUPPORTED)?;
        if !dptr.is_null() {
            // SAFETY: non-null, and per the API a writable `CUdeviceptr_v1`.
            unsafe { write_out(dptr, addr) }?;
        }
        if !bytes.is_null() {
            // SAFETY: non-null, and per the API a writable `unsigned int`.
            unsafe { write_out(bytes, size) }?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use zerocopy::IntoBytes;

    fn resp(count: u32, bytes: u32) -> FunctionResp {
        FunctionResp {
            function: 9.into(),
            param_count: count.into(),
            param_bytes: bytes.into(),
        }
    }

    fn params(list: &[(u32, u32)]) -> Vec<u8> {
        let infos: Vec<ParamInfo> = list
            .iter()
            .map(|(offset, size)| ParamInfo {
                offset: (*offset).into(),
                size: (*size).into(),
            })
            .collect();
        infos.as_bytes().to_vec()
    }

    #[test]
    fn function_layout_is_taken_from_the_backend_answer() {
        let info = function_from_wire(&resp(2, 16), &params(&[(0, 8), (8, 4)])).unwrap();
        assert_eq!(info.handle, 9);
        assert_eq!(info.param_bytes, 16);
        assert_eq!(
            info.layout,
            vec![Param { offset: 0, size: 8 }, Param { offset: 8, size: 4 }]
        );
    }

    #[test]
    fn function_layout_outside_its_block_is_rejected() {
        assert!(function_from_wire(&resp(1, 8), &params(&[(4, 8)])).is_err());
        assert!(function_from_wire(&resp(2, 16), &params(&[(0, 8)])).is_err());
        assert!(function_from_wire(&resp(0, vgpu_spec::MAX_PARAM_BYTES + 1), &[]).is_err());
        assert!(function_from_wire(&resp(1, 8), &params(&[(u32::MAX, 2)])).is_err());
    }

    #[test]
    fn function_records_live_until_their_module_goes() {
        let mut table = ModuleTable::default();
        table.add_module(1, 100);
        table.add_module(2, 200);
        let info = function_from_wire(&resp(0, 0), &[]).unwrap();
        let f = table.add_function(1, b"k", info.clone()).unwrap();
        assert_eq!(table.add_function(1, b"k", info.clone()), Some(f));
        assert_eq!(table.cached(1, b"k"), Some(f));
        let g = table.add_function(2, b"k", info.clone()).unwrap();
        assert_ne!(f, g);
        let fp: CUfunction = std::ptr::without_provenance_mut(f);
        assert_eq!(table.function(fp).map(|i| i.handle), Some(9));
        table.remove_module(1);
        assert!(table.function(fp).is_none());
        assert!(table.add_function(1, b"k", info).is_none());
        table.forget_context(200);
        assert!(!table.contains(2));
        assert!(table
            .function(std::ptr::without_provenance_mut(g))
            .is_none());
    }

    #[test]
    fn ptx_files_need_no_nul_and_cubins_are_trimmed() {
        let (image, kind) = file_image(b".version 8.0\n".to_vec()).unwrap();
        assert_eq!(kind, vgpu_spec::wire::image::PTX);
        assert_eq!(image.last(), Some(&0));
        assert!(file_image(vec![1, 2, 3]).is_err());
        assert!(file_image(Vec::new()).is_err());
    }

    #[test]
    fn module_calls_without_a_context_fail() {
        let mut m: CUmodule = std::ptr::null_mut();
        // SAFETY: valid out-pointer and a NUL-terminated image.
        let rc = unsafe { cuModuleLoadData(&mut m, c".version 8.0".as_ptr().cast()) };
        assert_eq!(rc, Status::NOT_INITIALIZED.0);
    }
}
