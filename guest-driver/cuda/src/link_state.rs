//! The guest side of a JIT link. A `CUlinkState` is this library's record:
//! the options `cuLinkCreate` was given, the inputs added since, and every
//! image `cuLinkComplete` produced, which stay valid until `cuLinkDestroy`
//! (the driver API's lifetime for them). Nothing is sent before
//! `cuLinkComplete` (see `link.rs`), so an input the linker refuses (bad
//! PTX) fails there rather than at `cuLinkAddData` as natively.
//!
//! Options: the log buffers (`CU_JIT_INFO_LOG_BUFFER`,
//! `CU_JIT_ERROR_LOG_BUFFER` and their sizes) and the wall time are kept
//! here and filled in from the device's answer; the options of integer
//! type the device accepts ([`FORWARDED_OPTIONS`]) are sent; the rest (global
//! symbol tables, the deprecated name lists, internal and unknown options)
//! are ignored with a warning, as is every per-input option of
//! `cuLinkAddData`.

use std::collections::HashMap;
use std::ffi::{c_int, c_uint, c_void};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use vgpu_spec::link::FORWARDED_OPTIONS;
use vgpu_spec::wire::{jit_input, JitOption, LinkInput};
use vgpu_spec::Status;

use crate::errors::{non_null, CuResult};
use crate::logging;
use crate::state::lock;

/// `CU_JIT_WALL_TIME`.
const WALL_TIME: c_int = 2;
/// `CU_JIT_INFO_LOG_BUFFER`.
const INFO_LOG_BUFFER: c_int = 3;
/// `CU_JIT_INFO_LOG_BUFFER_SIZE_BYTES`.
const INFO_LOG_BUFFER_SIZE_BYTES: c_int = 4;
/// `CU_JIT_ERROR_LOG_BUFFER`.
const ERROR_LOG_BUFFER: c_int = 5;
/// `CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES`.
const ERROR_LOG_BUFFER_SIZE_BYTES: c_int = 6;

/// The most options one call may pass (native has no documented limit;
/// this only bounds a corrupt count).
const MAX_OPTIONS: usize = 1024;

/// A slot of the application's `optionValues` array, where an output goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Slot(usize);

impl Slot {
    /// Overwrites the slot with `value`, as the driver does.
    ///
    /// # Safety
    /// The array the slot was taken from is still valid and writable (the
    /// API requires it for the life of the link state when output options
    /// are used).
    pub(crate) unsafe fn write(self, value: usize) {
        let slot = std::ptr::with_exposed_provenance_mut::<*mut c_void>(self.0);
        // SAFETY: the caller's contract; `write_unaligned` makes no
        // alignment demand.
        unsafe { slot.write_unaligned(std::ptr::without_provenance_mut(value)) };
    }
}

/// An application log buffer and its size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Log {
    /// The buffer's address (0: none given).
    pub buffer: usize,
    /// Its size, NUL included.
    pub size: u32,
    /// Where the size option's output goes.
    pub size_slot: Option<Slot>,
}

impl Log {
    /// Bytes of log area to ask the device for: the buffer's size, up to
    /// the protocol's limit; 0 without a buffer.
    pub(crate) fn area(&self) -> u32 {
        if self.buffer == 0 {
            0
        } else {
            self.size.min(vgpu_spec::MAX_LINK_LOG)
        }
    }

    /// Copies `text` into the buffer, truncated to leave room for the NUL,
    /// and stores `used` in the size slot.
    ///
    /// # Safety
    /// The buffer is still writable for `size` bytes and the size slot as
    /// for [`Slot::write`].
    pub(crate) unsafe fn deliver(&self, text: &[u8], used: u32) {
        if self.buffer != 0 && self.size > 0 {
            let text = vgpu_spec::link::fit_log(text, self.size as usize);
            let dst = std::ptr::with_exposed_provenance_mut::<u8>(self.buffer);
            // SAFETY: the caller's contract: the buffer holds `size` bytes,
            // and `text` is at most `size - 1` of them.
            unsafe {
                std::ptr::copy_nonoverlapping(text.as_ptr(), dst, text.len());
                dst.add(text.len()).write(0);
            }
        }
        if let Some(slot) = self.size_slot {
            // SAFETY: the caller's contract.
            unsafe { slot.write(used as usize) };
        }
    }
}

/// What `cuLinkCreate`'s options ask for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct LinkOptions {
    /// Options sent to the device.
    pub forwarded: Vec<JitOption>,
    /// The info log.
    pub info: Log,
    /// The error log.
    pub error: Log,
    /// Where the wall time goes.
    pub wall_slot: Option<Slot>,
}

/// Reads the options of `cuLinkCreate`.
///
/// # Safety
/// `options` and `values` are NULL or hold `num` entries each (the API
/// contract); the slots of output options stay valid for the life of the
/// link state.
pub(crate) unsafe fn parse_options(
    num: c_uint,
    options: *const c_int,
    values: *mut *mut c_void,
) -> CuResult<LinkOptions> {
    let num = num as usize;
    let mut parsed = LinkOptions::default();
    if num == 0 {
        return Ok(parsed);
    }
    non_null(options)?;
    non_null(values)?;
    if num > MAX_OPTIONS {
        return Err(Status::INVALID_VALUE);
    }
    for i in 0..num {
        // SAFETY: both arrays hold `num` entries (the caller's contract).
        let (option, value) = unsafe { (options.add(i).read_unaligned(), values.add(i)) };
        let slot = Slot(value.expose_provenance());
        // SAFETY: as above.
        let raw = unsafe { value.read_unaligned() }.expose_provenance();
        // Options of integer type carry the integer in the pointer.
        let int = raw as u32;
        match option {
            WALL_TIME => parsed.wall_slot = Some(slot),
            INFO_LOG_BUFFER => parsed.info.buffer = raw,
            INFO_LOG_BUFFER_SIZE_BYTES => {
                parsed.info.size = int;
                parsed.info.size_slot = Some(slot);
            }
            ERROR_LOG_BUFFER => parsed.error.buffer = raw,
            ERROR_LOG_BUFFER_SIZE_BYTES => {
                parsed.error.size = int;
                parsed.error.size_slot = Some(slot);
            }
            o if u32::try_from(o).is_ok_and(|o| FORWARDED_OPTIONS.contains(&o)) => {
                parsed.forwarded.push(JitOption {
                    option: (o as u32).into(),
                    _pad: 0.into(),
                    value: u64::from(int).into(),
                })
            }
            other => logging::warn_once(&format!(
                "JIT option {other} of cuLinkCreate is not supported and is ignored"
            )),
        }
    }
    if parsed.forwarded.len() > vgpu_spec::MAX_JIT_OPTIONS as usize {
        return Err(Status::INVALID_VALUE);
    }
    Ok(parsed)
}

/// One pending link.
#[derive(Debug)]
pub(crate) struct LinkState {
    /// The context current at `cuLinkCreate`: the link's target.
    pub ctx: u64,
    /// What the options asked for.
    pub options: LinkOptions,
    /// The inputs, in order, as the wire describes them.
    pub inputs: Vec<LinkInput>,
    /// Each input's name and then its data, input after input.
    pub data: Vec<u8>,
    /// Every image completed so far (the last one is current); freed at
    /// `cuLinkDestroy`.
    pub images: Vec<Vec<u8>>,
}

impl LinkState {
    /// A state with no inputs.
    pub(crate) fn new(ctx: u64, options: LinkOptions) -> LinkState {
        LinkState {
            ctx,
            options,
            inputs: Vec::new(),
            data: Vec::new(),
            images: Vec::new(),
        }
    }

    /// Adds an input (`cuLinkAddData`). The name is cut at the protocol's
    /// limit; inputs beyond the protocol's limits are `NOT_SUPPORTED`.
    pub(crate) fn add(&mut self, kind: c_int, data: &[u8], name: &[u8]) -> CuResult<()> {
        let kind = u32::try_from(kind).map_err(|_| Status::INVALID_VALUE)?;
        if kind > jit_input::NVVM || data.is_empty() {
            return Err(Status::INVALID_VALUE);
        }
        let payload: usize = self.inputs.iter().map(|i| i.data_len.get() as usize).sum();
        if self.inputs.len() >= vgpu_spec::MAX_LINK_INPUTS as usize
            || (payload + data.len()) as u64 > vgpu_spec::MAX_MODULE_IMAGE
        {
            logging::warn_once("a JIT link with more inputs than a vGPU request carries");
            return Err(Status::NOT_SUPPORTED);
        }
        let name = &name[..name.len().min(vgpu_spec::MAX_SYMBOL_NAME as usize)];
        self.inputs.push(LinkInput {
            kind: kind.into(),
            name_len: (name.len() as u32).into(),
            data_len: (data.len() as u64).into(),
        });
        self.data.extend_from_slice(name);
        self.data.extend_from_slice(data);
        Ok(())
    }

    /// Adds a file's contents (`cuLinkAddFile`), named by its path. A
    /// missing or unreadable file is `FILE_NOT_FOUND`; PTX text gets the
    /// NUL a file does not hold.
    pub(crate) fn add_file(&mut self, kind: c_int, path: &std::path::Path) -> CuResult<()> {
        let mut bytes = std::fs::read(path).map_err(|err| {
            tracing::debug!(path = ?path, %err, "cannot read link input");
            Status::FILE_NOT_FOUND
        })?;
        if kind == jit_input::PTX as c_int && bytes.last().is_some_and(|b| *b != 0) {
            bytes.push(0);
        }
        let name = path.as_os_str().as_encoded_bytes();
        self.add(kind, &bytes, name)
    }
}

/// Ids start well above small integers and are 16-aligned, so they look
/// like the pointers they stand for.
const FIRST_ID: usize = 0x5000;
const ID_STRIDE: usize = 0x10;

/// Live link states by `CUlinkState` value.
#[derive(Default)]
pub(crate) struct LinkTable {
    states: Mutex<HashMap<usize, Arc<Mutex<LinkState>>>>,
    next: AtomicUsize,
}

impl LinkTable {
    /// Registers a state; returns the `CUlinkState` value.
    pub(crate) fn insert(&self, state: LinkState) -> usize {
        let id = FIRST_ID + self.next.fetch_add(1, Ordering::Relaxed) * ID_STRIDE;
        lock(&self.states).insert(id, Arc::new(Mutex::new(state)));
        id
    }

    /// The state behind a `CUlinkState`, or `INVALID_HANDLE`.
    pub(crate) fn get(&self, id: usize) -> CuResult<Arc<Mutex<LinkState>>> {
        lock(&self.states)
            .get(&id)
            .cloned()
            .ok_or(Status::INVALID_HANDLE)
    }

    /// Forgets a state, freeing its images once no call uses it.
    pub(crate) fn remove(&self, id: usize) -> CuResult<()> {
        lock(&self.states)
            .remove(&id)
            .map(drop)
            .ok_or(Status::INVALID_HANDLE)
    }

    /// Number of live states.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        lock(&self.states).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn int(v: usize) -> *mut c_void {
        std::ptr::without_provenance_mut(v)
    }

    #[test]
    fn log_buffers_wall_time_and_integer_options_are_parsed() {
        let mut info = [0u8; 32];
        let opts = [
            WALL_TIME,
            INFO_LOG_BUFFER,
            INFO_LOG_BUFFER_SIZE_BYTES,
            7,
            8,
            17,
            99,
        ];
        let mut values = [
            std::ptr::null_mut(),
            info.as_mut_ptr().cast(),
            int(32),
            int(3),
            std::ptr::null_mut(),
            int(0xdead),
            int(1),
        ];
        // SAFETY: both arrays hold 7 entries.
        let parsed = unsafe { parse_options(7, opts.as_ptr(), values.as_mut_ptr()) }.unwrap();
        assert_eq!(parsed.info.buffer, info.as_ptr().addr());
        assert_eq!(parsed.info.size, 32);
        assert_eq!(parsed.info.area(), 32);
        assert_eq!(parsed.error, Log::default());
        assert_eq!(parsed.error.area(), 0);
        assert_eq!(parsed.wall_slot, Some(Slot(values.as_ptr().addr())));
        let forwarded: Vec<(u32, u64)> = parsed
            .forwarded
            .iter()
            .map(|o| (o.option.get(), o.value.get()))
            .collect();
        assert_eq!(forwarded, vec![(7, 3), (8, 0)], "17 and 99 are ignored");
    }

    #[test]
    fn options_with_null_arrays_are_invalid_unless_there_are_none() {
        // SAFETY: null arrays with a count of 0 are not read.
        let none = unsafe { parse_options(0, std::ptr::null(), std::ptr::null_mut()) };
        assert_eq!(none, Ok(LinkOptions::default()));
        // SAFETY: null is rejected before use.
        let missing = unsafe { parse_options(1, std::ptr::null(), std::ptr::null_mut()) };
        assert_eq!(missing, Err(Status::INVALID_VALUE));
    }

    #[test]
    fn delivered_logs_are_truncated_nul_terminated_and_report_their_size() {
        let mut buffer = [0xffu8; 6];
        let mut values = [int(6)];
        let log = Log {
            buffer: buffer.as_mut_ptr().expose_provenance(),
            size: 6,
            size_slot: Some(Slot(values.as_mut_ptr().expose_provenance())),
        };
        // SAFETY: the buffer holds 6 bytes and the slot is live.
        unsafe { log.deliver(b"linker says hi", 15) };
        assert_eq!(&buffer, b"linke\0");
        assert_eq!(values[0].addr(), 15);
    }

    #[test]
    fn inputs_are_packed_name_then_data() {
        let mut state = LinkState::new(1, LinkOptions::default());
        state.add(1, b"ptx\0", b"a").unwrap();
        state.add(0, b"\x7fELF", b"").unwrap();
        assert_eq!(state.inputs.len(), 2);
        assert_eq!(state.inputs[0].name_len.get(), 1);
        assert_eq!(state.inputs[1].data_len.get(), 4);
        assert_eq!(state.data, b"aptx\0\x7fELF");
        assert_eq!(state.add(6, b"x", b""), Err(Status::INVALID_VALUE));
        assert_eq!(state.add(-1, b"x", b""), Err(Status::INVALID_VALUE));
        assert_eq!(state.add(1, b"", b""), Err(Status::INVALID_VALUE));
    }

    #[test]
    fn adding_a_missing_file_is_file_not_found() {
        let mut state = LinkState::new(1, LinkOptions::default());
        let missing = std::path::Path::new("/nonexistent/vgpu/link-input.ptx");
        assert_eq!(state.add_file(1, missing), Err(Status::FILE_NOT_FOUND));
        assert!(state.inputs.is_empty());
    }

    #[test]
    fn a_ptx_file_gets_its_nul_and_is_named_by_its_path() {
        let dir = std::env::temp_dir().join(format!("vgpu-link-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("k.ptx");
        std::fs::write(&path, b".version 7.0\n").unwrap();
        let mut state = LinkState::new(1, LinkOptions::default());
        state.add_file(1, &path).unwrap();
        let name = path.as_os_str().as_encoded_bytes();
        assert_eq!(state.inputs[0].name_len.get() as usize, name.len());
        assert_eq!(&state.data[..name.len()], name);
        assert_eq!(&state.data[name.len()..], b".version 7.0\n\0");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn destroyed_states_are_gone_and_their_handles_stay_invalid() {
        let table = LinkTable::default();
        let a = table.insert(LinkState::new(1, LinkOptions::default()));
        let b = table.insert(LinkState::new(1, LinkOptions::default()));
        assert_ne!(a, b);
        assert!(a >= FIRST_ID && a % ID_STRIDE == 0);
        let state = table.get(a).unwrap();
        lock(&state).images.push(vec![1, 2, 3]);
        drop(state);
        assert_eq!(table.remove(a), Ok(()));
        assert_eq!(table.len(), 1);
        assert_eq!(table.get(a).map(drop), Err(Status::INVALID_HANDLE));
        assert_eq!(table.remove(a), Err(Status::INVALID_HANDLE));
        assert!(table.get(b).is_ok());
    }
}
