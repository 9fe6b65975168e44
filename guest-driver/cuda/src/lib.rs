//! The guest `libcuda.so.1`: the CUDA driver API, forwarded to a vGPU slice.
//!
//! Each exported function checks its arguments, answers locally what it
//! can (device attributes, the current context, error strings), and sends
//! the rest to the backend as virtio-vgpu requests through
//! [`vgpu_transport`]. Work that native CUDA queues (launches, async copies
//! and memsets, event records, stream waits) is submitted without waiting;
//! its errors surface at the next synchronizing call in its context, and a
//! sticky one (a faulting kernel) fails every later call in that context
//! until it is destroyed (see `ctx_errors`).
//!
//! Every export is an `unsafe extern "C"` function whose safety contract is
//! the one the CUDA driver API documents for it: pointer arguments are NULL
//! or valid for the reads and writes that function performs, strings are
//! NUL-terminated. NULL out-pointers are rejected with
//! `CUDA_ERROR_INVALID_VALUE`; handles are looked up in this library's
//! tables before use, never dereferenced.

// The exports' safety contracts are the CUDA API's (see above); repeating a
// `# Safety` section on each of them would add nothing.
#![allow(clippy::missing_safety_doc)]

mod capture;
mod capture_api;
mod copy;
mod copy_generic;
mod ctx;
mod ctx_errors;
mod device;
mod errors;
mod event;
mod export_table;
mod func_query;
mod graph;
mod handles;
mod image;
mod integrity;
mod launch;
mod launch_ex;
mod library;
mod link;
mod link_state;
mod logging;
mod memory;
mod mempool;
mod mempool_table;
mod module;
mod pointer_attr;
mod priority;
mod procaddr;
mod procaddr_table;
mod ptds;
mod runtime;
mod runtime_exports;
mod state;
mod stream;
mod types;
mod unsupported;

/// Marks this library as vgpu's guest driver, so that a backend which loads
/// it by mistake in place of NVIDIA's driver (a stray `LD_LIBRARY_PATH`)
/// refuses with a clear error instead of forwarding to itself.
#[no_mangle]
pub extern "C" fn vgpu_guest_library() {}
