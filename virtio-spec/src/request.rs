//! Requests: decoding from the bytes a guest placed in a chain, and encoding
//! on the driver side.
//!
//! [`Request::decode`] is the one entry point for guest input. It never
//! panics, checks every length against the limits in the crate root, and
//! rejects trailing bytes, so a request means exactly one thing.

use thiserror::Error;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::link::LinkParts;
use crate::wire::*;
use crate::Status;

/// Why a request could not be decoded.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// Fewer bytes than the layout needs.
    #[error("Request is truncated: needs {need} bytes, has {have}")]
    Truncated {
        /// Bytes the layout needs.
        need: usize,
        /// Bytes present.
        have: usize,
    },
    /// Bytes beyond what the layout describes.
    #[error("Request has {0} trailing bytes")]
    Trailing(usize),
    /// The opcode is not one this version defines.
    #[error("Unknown opcode {0:#x}")]
    UnknownOpcode(u32),
    /// Flags this version does not define.
    #[error("Unknown request flags {0:#x}")]
    UnknownFlags(u32),
    /// A length field is over its limit or inconsistent.
    #[error("Invalid length in {field}: {value}")]
    BadLength {
        /// The field.
        field: &'static str,
        /// Its value.
        value: u64,
    },
}

impl DecodeError {
    /// The status a device answers a request it cannot decode with.
    pub fn status(&self) -> Status {
        match self {
            DecodeError::UnknownOpcode(_) => Status::NOT_SUPPORTED,
            _ => Status::INVALID_VALUE,
        }
    }
}

/// A decoded request body. Trailing data borrows from the input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request<'a> {
    /// `GET_DEVICE_INFO`.
    GetDeviceInfo,
    /// `SESSION_OPEN`.
    SessionOpen(SessionOpenReq),
    /// `SESSION_CLOSE`.
    SessionClose,
    /// `CTX_CREATE`.
    CtxCreate(CtxCreateReq),
    /// `CTX_DESTROY` of the handle.
    CtxDestroy(HandleReq),
    /// `CTX_SYNCHRONIZE` of the header's context.
    CtxSynchronize,
    /// `MEM_ALLOC`.
    MemAlloc(MemAllocReq),
    /// `MEM_FREE` of the pointer.
    MemFree(HandleReq),
    /// `MEM_GET_INFO`.
    MemGetInfo,
    /// `MEMCPY_HTOD`.
    MemcpyHtoD(MemcpyHostReq, &'a [SgEntry]),
    /// `MEMCPY_DTOH`.
    MemcpyDtoH(MemcpyHostReq, &'a [SgEntry]),
    /// `MEMCPY_DTOD`.
    MemcpyDtoD(MemcpyDtoDReq),
    /// `MEMSET`.
    Memset(MemsetReq),
    /// `MODULE_LOAD`.
    ModuleLoad(ModuleLoadReq, &'a [u8]),
    /// `MODULE_UNLOAD`.
    ModuleUnload(HandleReq),
    /// `MODULE_GET_FUNCTION`.
    GetFunction(ModuleSymbolReq, &'a [u8]),
    /// `MODULE_GET_GLOBAL`.
    GetGlobal(ModuleSymbolReq, &'a [u8]),
    /// `LAUNCH_KERNEL`.
    Launch(LaunchReq, &'a [u8]),
    /// `STREAM_CREATE`.
    StreamCreate(StreamCreateReq),
    /// `STREAM_DESTROY`.
    StreamDestroy(HandleReq),
    /// `STREAM_SYNCHRONIZE`.
    StreamSynchronize(HandleReq),
    /// `STREAM_QUERY`.
    StreamQuery(HandleReq),
    /// `STREAM_WAIT_EVENT`.
    StreamWaitEvent(StreamWaitEventReq),
    /// `EVENT_CREATE`.
    EventCreate(EventCreateReq),
    /// `EVENT_RECORD`.
    EventRecord(EventRecordReq),
    /// `EVENT_SYNCHRONIZE`.
    EventSynchronize(HandleReq),
    /// `EVENT_QUERY`.
    EventQuery(HandleReq),
    /// `EVENT_ELAPSED`.
    EventElapsed(EventElapsedReq),
    /// `EVENT_DESTROY`.
    EventDestroy(HandleReq),
    /// `FUNC_GET_ATTRIBUTE`.
    FuncGetAttribute(FuncAttributeReq),
    /// `FUNC_SET_ATTRIBUTE`.
    FuncSetAttribute(FuncAttributeReq),
    /// `FUNC_OCCUPANCY`.
    FuncOccupancy(OccupancyReq),
    /// `MODULE_LINK`.
    ModuleLink(LinkReq, LinkParts<'a>),
}

/// Reads a fixed struct from the front of `bytes`.
pub(crate) fn take<T: FromBytes + KnownLayout + Immutable + Copy>(
    bytes: &[u8],
) -> Result<(T, &[u8]), DecodeError> {
    T::read_from_prefix(bytes).map_err(|_| DecodeError::Truncated {
        need: std::mem::size_of::<T>(),
        have: bytes.len(),
    })
}

/// Reads a fixed struct that must be the whole of `bytes`.
fn only<T: FromBytes + KnownLayout + Immutable + Copy>(bytes: &[u8]) -> Result<T, DecodeError> {
    let (value, rest) = take::<T>(bytes)?;
    if !rest.is_empty() {
        return Err(DecodeError::Trailing(rest.len()));
    }
    Ok(value)
}

/// Checks that `rest` is exactly `len` bytes.
pub(crate) fn exact<'b>(
    rest: &'b [u8],
    len: u64,
    field: &'static str,
    limit: u64,
) -> Result<&'b [u8], DecodeError> {
    if len > limit {
        return Err(DecodeError::BadLength { field, value: len });
    }
    let len = len as usize;
    match rest.len().cmp(&len) {
        std::cmp::Ordering::Less => Err(DecodeError::Truncated {
            need: len,
            have: rest.len(),
        }),
        std::cmp::Ordering::Greater => Err(DecodeError::Trailing(rest.len() - len)),
        std::cmp::Ordering::Equal => Ok(rest),
    }
}

fn empty(bytes: &[u8]) -> Result<(), DecodeError> {
    if bytes.is_empty() {
        Ok(())
    } else {
        Err(DecodeError::Trailing(bytes.len()))
    }
}

fn decode_copy(bytes: &[u8]) -> Result<(MemcpyHostReq, &[SgEntry]), DecodeError> {
    let (req, rest) = take::<MemcpyHostReq>(bytes)?;
    let nsegs = req.nsegs.get();
    if nsegs > crate::MAX_SG_ENTRIES {
        return Err(DecodeError::BadLength {
            field: "nsegs",
            value: nsegs.into(),
        });
    }
    let need = nsegs as u64 * std::mem::size_of::<SgEntry>() as u64;
    let rest = exact(rest, need, "nsegs", u64::MAX)?;
    let segs = <[SgEntry]>::ref_from_bytes(rest).map_err(|_| DecodeError::BadLength {
        field: "nsegs",
        value: nsegs.into(),
    })?;
    let mut sum: u64 = 0;
    for seg in segs {
        sum = sum
            .checked_add(seg.len.get())
            .ok_or(DecodeError::BadLength {
                field: "sg length",
                value: u64::MAX,
            })?;
    }
    if sum != req.total_len.get() {
        return Err(DecodeError::BadLength {
            field: "total_len",
            value: req.total_len.get(),
        });
    }
    Ok((req, segs))
}

fn decode_symbol(bytes: &[u8]) -> Result<(ModuleSymbolReq, &[u8]), DecodeError> {
    let (req, rest) = take::<ModuleSymbolReq>(bytes)?;
    let name = exact(
        rest,
        req.name_len.get().into(),
        "name_len",
        crate::MAX_SYMBOL_NAME.into(),
    )?;
    if name.is_empty() {
        return Err(DecodeError::BadLength {
            field: "name_len",
            value: 0,
        });
    }
    Ok((req, name))
}

impl<'a> Request<'a> {
    /// Decodes a whole request: header plus body. `bytes` is everything the
    /// chain's readable descriptors held, in order.
    pub fn decode(bytes: &'a [u8]) -> Result<(ReqHeader, Request<'a>), DecodeError> {
        let (header, body) = take::<ReqHeader>(bytes)?;
        let flags = header.flags.get();
        if flags & !KNOWN_FLAGS != 0 {
            return Err(DecodeError::UnknownFlags(flags));
        }
        Ok((header, Self::decode_body(header.opcode.get(), body)?))
    }

    /// Decodes the body of a request whose opcode is known.
    pub fn decode_body(opcode: u32, b: &'a [u8]) -> Result<Request<'a>, DecodeError> {
        use crate::wire::op;
        Ok(match opcode {
            op::GET_DEVICE_INFO => empty(b).map(|_| Request::GetDeviceInfo)?,
            op::SESSION_OPEN => Request::SessionOpen(only(b)?),
            op::SESSION_CLOSE => empty(b).map(|_| Request::SessionClose)?,
            op::CTX_CREATE => Request::CtxCreate(only(b)?),
            op::CTX_DESTROY => Request::CtxDestroy(only(b)?),
            op::CTX_SYNCHRONIZE => empty(b).map(|_| Request::CtxSynchronize)?,
            op::MEM_ALLOC => Request::MemAlloc(only(b)?),
            op::MEM_FREE => Request::MemFree(only(b)?),
            op::MEM_GET_INFO => empty(b).map(|_| Request::MemGetInfo)?,
            op::MEMCPY_HTOD => {
                let (r, s) = decode_copy(b)?;
                Request::MemcpyHtoD(r, s)
            }
            op::MEMCPY_DTOH => {
                let (r, s) = decode_copy(b)?;
                Request::MemcpyDtoH(r, s)
            }
            op::MEMCPY_DTOD => Request::MemcpyDtoD(only(b)?),
            op::MEMSET => {
                let req: MemsetReq = only(b)?;
                if !matches!(req.elem_size.get(), 1 | 2 | 4) {
                    return Err(DecodeError::BadLength {
                        field: "elem_size",
                        value: req.elem_size.get().into(),
                    });
                }
                Request::Memset(req)
            }
            op::MODULE_LOAD => {
                let (req, rest) = take::<ModuleLoadReq>(b)?;
                let image = exact(
                    rest,
                    req.image_len.get(),
                    "image_len",
                    crate::MAX_MODULE_IMAGE,
                )?;
                if image.is_empty() {
                    return Err(DecodeError::BadLength {
                        field: "image_len",
                        value: 0,
                    });
                }
                Request::ModuleLoad(req, image)
            }
            op::MODULE_UNLOAD => Request::ModuleUnload(only(b)?),
            op::MODULE_GET_FUNCTION => {
                let (r, n) = decode_symbol(b)?;
                Request::GetFunction(r, n)
            }
            op::MODULE_GET_GLOBAL => {
                let (r, n) = decode_symbol(b)?;
                Request::GetGlobal(r, n)
            }
            op::LAUNCH_KERNEL => {
                let (req, rest) = take::<LaunchReq>(b)?;
                let params = exact(
                    rest,
                    req.param_bytes.get().into(),
                    "param_bytes",
                    crate::MAX_PARAM_BYTES.into(),
                )?;
                Request::Launch(req, params)
            }
            op::STREAM_CREATE => Request::StreamCreate(only(b)?),
            op::STREAM_DESTROY => Request::StreamDestroy(only(b)?),
            op::STREAM_SYNCHRONIZE => Request::StreamSynchronize(only(b)?),
            op::STREAM_QUERY => Request::StreamQuery(only(b)?),
            op::STREAM_WAIT_EVENT => Request::StreamWaitEvent(only(b)?),
            op::EVENT_CREATE => Request::EventCreate(only(b)?),
            op::EVENT_RECORD => Request::EventRecord(only(b)?),
            op::EVENT_SYNCHRONIZE => Request::EventSynchronize(only(b)?),
            op::EVENT_QUERY => Request::EventQuery(only(b)?),
            op::EVENT_ELAPSED => Request::EventElapsed(only(b)?),
            op::EVENT_DESTROY => Request::EventDestroy(only(b)?),
            op::FUNC_GET_ATTRIBUTE => Request::FuncGetAttribute(only(b)?),
            op::FUNC_SET_ATTRIBUTE => Request::FuncSetAttribute(only(b)?),
            op::FUNC_OCCUPANCY => Request::FuncOccupancy(only(b)?),
            op::MODULE_LINK => {
                let (req, parts) = crate::link::decode(b)?;
                Request::ModuleLink(req, parts)
            }
            other => return Err(DecodeError::UnknownOpcode(other)),
        })
    }

    /// The opcode of this request.
    pub fn opcode(&self) -> u32 {
        use crate::wire::op;
        match self {
            Request::GetDeviceInfo => op::GET_DEVICE_INFO,
            Request::SessionOpen(_) => op::SESSION_OPEN,
            Request::SessionClose => op::SESSION_CLOSE,
            Request::CtxCreate(_) => op::CTX_CREATE,
            Request::CtxDestroy(_) => op::CTX_DESTROY,
            Request::CtxSynchronize => op::CTX_SYNCHRONIZE,
            Request::MemAlloc(_) => op::MEM_ALLOC,
            Request::MemFree(_) => op::MEM_FREE,
            Request::MemGetInfo => op::MEM_GET_INFO,
            Request::MemcpyHtoD(..) => op::MEMCPY_HTOD,
            Request::MemcpyDtoH(..) => op::MEMCPY_DTOH,
            Request::MemcpyDtoD(_) => op::MEMCPY_DTOD,
            Request::Memset(_) => op::MEMSET,
            Request::ModuleLoad(..) => op::MODULE_LOAD,
            Request::ModuleUnload(_) => op::MODULE_UNLOAD,
            Request::GetFunction(..) => op::MODULE_GET_FUNCTION,
            Request::GetGlobal(..) => op::MODULE_GET_GLOBAL,
            Request::Launch(..) => op::LAUNCH_KERNEL,
            Request::StreamCreate(_) => op::STREAM_CREATE,
            Request::StreamDestroy(_) => op::STREAM_DESTROY,
            Request::StreamSynchronize(_) => op::STREAM_SYNCHRONIZE,
            Request::StreamQuery(_) => op::STREAM_QUERY,
            Request::StreamWaitEvent(_) => op::STREAM_WAIT_EVENT,
            Request::EventCreate(_) => op::EVENT_CREATE,
            Request::EventRecord(_) => op::EVENT_RECORD,
            Request::EventSynchronize(_) => op::EVENT_SYNCHRONIZE,
            Request::EventQuery(_) => op::EVENT_QUERY,
            Request::EventElapsed(_) => op::EVENT_ELAPSED,
            Request::EventDestroy(_) => op::EVENT_DESTROY,
            Request::FuncGetAttribute(_) => op::FUNC_GET_ATTRIBUTE,
            Request::FuncSetAttribute(_) => op::FUNC_SET_ATTRIBUTE,
            Request::FuncOccupancy(_) => op::FUNC_OCCUPANCY,
            Request::ModuleLink(..) => op::MODULE_LINK,
        }
    }

    /// Appends the body (everything after the header) to `out`.
    pub fn encode_body(&self, out: &mut Vec<u8>) {
        fn put<T: IntoBytes + Immutable>(out: &mut Vec<u8>, v: &T) {
            out.extend_from_slice(v.as_bytes());
        }
        match self {
            Request::GetDeviceInfo
            | Request::SessionClose
            | Request::CtxSynchronize
            | Request::MemGetInfo => {}
            Request::SessionOpen(r) => put(out, r),
            Request::CtxCreate(r) => put(out, r),
            Request::MemAlloc(r) => put(out, r),
            Request::CtxDestroy(r)
            | Request::MemFree(r)
            | Request::ModuleUnload(r)
            | Request::StreamDestroy(r)
            | Request::StreamSynchronize(r)
            | Request::StreamQuery(r)
            | Request::EventSynchronize(r)
            | Request::EventQuery(r)
            | Request::EventDestroy(r) => put(out, r),
            Request::MemcpyHtoD(r, segs) | Request::MemcpyDtoH(r, segs) => {
                put(out, r);
                out.extend_from_slice(segs.as_bytes());
            }
            Request::MemcpyDtoD(r) => put(out, r),
            Request::Memset(r) => put(out, r),
            Request::ModuleLoad(r, data) => {
                put(out, r);
                out.extend_from_slice(data);
            }
            Request::GetFunction(r, name) | Request::GetGlobal(r, name) => {
                put(out, r);
                out.extend_from_slice(name);
            }
            Request::Launch(r, params) => {
                put(out, r);
                out.extend_from_slice(params);
            }
            Request::StreamCreate(r) => put(out, r),
            Request::StreamWaitEvent(r) => put(out, r),
            Request::EventCreate(r) => put(out, r),
            Request::EventRecord(r) => put(out, r),
            Request::EventElapsed(r) => put(out, r),
            Request::FuncGetAttribute(r) | Request::FuncSetAttribute(r) => put(out, r),
            Request::FuncOccupancy(r) => put(out, r),
            Request::ModuleLink(r, parts) => {
                put(out, r);
                parts.encode(out);
            }
        }
    }

    /// Appends header and body to `out`; the header's opcode is set from the
    /// request.
    pub fn encode(&self, mut header: ReqHeader, out: &mut Vec<u8>) {
        header.opcode = self.opcode().into();
        out.extend_from_slice(header.as_bytes());
        self.encode_body(out);
    }

    /// True for requests the driver may leave unanswered until the next
    /// synchronizing call (launches, async copies, memsets, event records,
    /// stream waits), given the header's flags.
    pub fn is_async(&self, flags: u32) -> bool {
        match self {
            Request::Launch(..) | Request::EventRecord(_) | Request::StreamWaitEvent(_) => true,
            Request::MemcpyHtoD(..)
            | Request::MemcpyDtoH(..)
            | Request::MemcpyDtoD(_)
            | Request::Memset(_) => flags & FLAG_ASYNC != 0,
            _ => false,
        }
    }
}

/// Builds a request header.
pub fn header(session: u64, context: u64, request_id: u64, flags: u32) -> ReqHeader {
    ReqHeader {
        opcode: 0.into(),
        flags: flags.into(),
        session: session.into(),
        request_id: request_id.into(),
        context: context.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::op;

    fn round_trip(req: Request<'_>, flags: u32) {
        let mut buf = Vec::new();
        req.encode(header(7, 3, 99, flags), &mut buf);
        let (hdr, back) = Request::decode(&buf).expect("decodes");
        assert_eq!(hdr.session.get(), 7);
        assert_eq!(hdr.context.get(), 3);
        assert_eq!(hdr.request_id.get(), 99);
        assert_eq!(hdr.opcode.get(), req.opcode());
        assert_eq!(back, req);
    }

    fn h(v: u64) -> HandleReq {
        HandleReq { handle: v.into() }
    }

    #[test]
    fn every_request_round_trips() {
        let segs = [
            SgEntry {
                gpa: 0x1000.into(),
                len: 64.into(),
            },
            SgEntry {
                gpa: 0x9000.into(),
                len: 36.into(),
            },
        ];
        let copy = MemcpyHostReq {
            device_ptr: 0x7f00_0000.into(),
            stream: 5.into(),
            total_len: 100.into(),
            nsegs: 2.into(),
            _pad: 0.into(),
        };
        let sym = ModuleSymbolReq {
            module: 4.into(),
            name_len: 5.into(),
            _pad: 0.into(),
        };
        let launch = LaunchReq {
            function: 9.into(),
            stream: 0.into(),
            grid: [4.into(), 1.into(), 1.into()],
            block: [128.into(), 1.into(), 1.into()],
            shared_mem: 0.into(),
            param_bytes: 12.into(),
        };
        let image = b"// ptx\0";
        let link_inputs = [LinkInput {
            kind: crate::wire::jit_input::PTX.into(),
            name_len: 0.into(),
            data_len: (image.len() as u64).into(),
        }];
        let cases: Vec<Request<'_>> = vec![
            Request::GetDeviceInfo,
            Request::SessionOpen(SessionOpenReq {
                pid: 42.into(),
                version: 1.into(),
            }),
            Request::SessionClose,
            Request::CtxCreate(CtxCreateReq::default()),
            Request::CtxDestroy(h(2)),
            Request::CtxSynchronize,
            Request::MemAlloc(MemAllocReq { size: 4096.into() }),
            Request::MemFree(h(0x7f00_0000)),
            Request::MemGetInfo,
            Request::MemcpyHtoD(copy, &segs),
            Request::MemcpyDtoH(copy, &segs),
            Request::MemcpyDtoD(MemcpyDtoDReq {
                dst: 1.into(),
                src: 2.into(),
                size: 3.into(),
                stream: 0.into(),
            }),
            Request::Memset(MemsetReq {
                dst: 0x10.into(),
                value: 0xab.into(),
                elem_size: 1.into(),
                count: 10.into(),
                stream: 0.into(),
            }),
            Request::ModuleLoad(
                ModuleLoadReq {
                    image_len: (image.len() as u64).into(),
                    kind: crate::wire::image::PTX.into(),
                    _pad: 0.into(),
                },
                image,
            ),
            Request::ModuleUnload(h(4)),
            Request::GetFunction(sym, b"saxpy"),
            Request::GetGlobal(sym, b"gdata"),
            Request::Launch(launch, &[1u8; 12]),
            Request::StreamCreate(StreamCreateReq {
                flags: 1.into(),
                priority: (-1).into(),
            }),
            Request::StreamDestroy(h(5)),
            Request::StreamSynchronize(h(5)),
            Request::StreamQuery(h(5)),
            Request::StreamWaitEvent(StreamWaitEventReq {
                stream: 5.into(),
                event: 6.into(),
                flags: 0.into(),
                _pad: 0.into(),
            }),
            Request::EventCreate(EventCreateReq::default()),
            Request::EventRecord(EventRecordReq {
                event: 6.into(),
                stream: 5.into(),
            }),
            Request::EventSynchronize(h(6)),
            Request::EventQuery(h(6)),
            Request::EventElapsed(EventElapsedReq {
                start: 6.into(),
                end: 7.into(),
            }),
            Request::EventDestroy(h(6)),
            Request::FuncGetAttribute(FuncAttributeReq {
                function: 9.into(),
                attrib: 4.into(),
                value: 0.into(),
            }),
            Request::FuncSetAttribute(FuncAttributeReq {
                function: 9.into(),
                attrib: 8.into(),
                value: 100_000.into(),
            }),
            Request::FuncOccupancy(OccupancyReq {
                function: 9.into(),
                query: crate::wire::occupancy::MAX_ACTIVE_CLUSTERS.into(),
                grid: [132.into(), 1.into(), 1.into()],
                block: [384.into(), 1.into(), 1.into()],
                cluster: [2.into(), 1.into(), 1.into()],
                shared_mem: 200_000.into(),
                ..OccupancyReq::default()
            }),
            Request::ModuleLink(
                LinkReq {
                    input_count: 1.into(),
                    data_len: (image.len() as u64).into(),
                    out_len: 64.into(),
                    error_log_len: 16.into(),
                    nsegs: 1.into(),
                    ..LinkReq::default()
                },
                LinkParts {
                    options: &[],
                    inputs: &link_inputs,
                    segs: &segs[..1],
                    data: image,
                },
            ),
        ];
        assert_eq!(cases.len(), 33);
        for req in cases {
            round_trip(req.clone(), 0);
            round_trip(req, FLAG_ASYNC);
        }
    }

    #[test]
    fn truncated_header_is_rejected() {
        let err = Request::decode(&[0u8; 31]).unwrap_err();
        assert_eq!(err, DecodeError::Truncated { need: 32, have: 31 });
        assert_eq!(err.status(), Status::INVALID_VALUE);
    }

    #[test]
    fn unknown_opcode_returns_not_supported() {
        let mut buf = Vec::new();
        buf.extend_from_slice(header(1, 0, 1, 0).as_bytes());
        buf[0..4].copy_from_slice(&0xdead_u32.to_le_bytes());
        let err = Request::decode(&buf).unwrap_err();
        assert_eq!(err, DecodeError::UnknownOpcode(0xdead));
        assert_eq!(err.status(), Status::NOT_SUPPORTED);
    }

    #[test]
    fn unknown_flags_are_rejected() {
        let mut buf = Vec::new();
        Request::MemGetInfo.encode(header(1, 0, 1, 0x80), &mut buf);
        assert_eq!(
            Request::decode(&buf).unwrap_err(),
            DecodeError::UnknownFlags(0x80)
        );
    }

    #[test]
    fn overlong_fixed_body_is_rejected() {
        let mut buf = Vec::new();
        Request::MemAlloc(MemAllocReq { size: 1.into() }).encode(header(1, 0, 1, 0), &mut buf);
        buf.push(0);
        assert_eq!(Request::decode(&buf).unwrap_err(), DecodeError::Trailing(1));
    }

    #[test]
    fn copy_with_mismatched_total_is_rejected() {
        let segs = [SgEntry {
            gpa: 0.into(),
            len: 8.into(),
        }];
        let copy = MemcpyHostReq {
            total_len: 9.into(),
            nsegs: 1.into(),
            ..Default::default()
        };
        let mut buf = Vec::new();
        Request::MemcpyHtoD(copy, &segs).encode(header(1, 0, 1, 0), &mut buf);
        assert!(matches!(
            Request::decode(&buf),
            Err(DecodeError::BadLength {
                field: "total_len",
                ..
            })
        ));
    }

    #[test]
    fn copy_with_too_many_segments_is_rejected_before_reading_them() {
        let copy = MemcpyHostReq {
            nsegs: (crate::MAX_SG_ENTRIES + 1).into(),
            ..Default::default()
        };
        let mut buf = Vec::new();
        buf.extend_from_slice(header(1, 0, 1, 0).as_bytes());
        buf[0..4].copy_from_slice(&op::MEMCPY_HTOD.to_le_bytes());
        buf.extend_from_slice(copy.as_bytes());
        assert!(matches!(
            Request::decode(&buf),
            Err(DecodeError::BadLength { field: "nsegs", .. })
        ));
    }

    #[test]
    fn launch_params_must_match_declared_length() {
        let launch = LaunchReq {
            param_bytes: 16.into(),
            ..Default::default()
        };
        let mut buf = Vec::new();
        Request::Launch(launch, &[0u8; 8]).encode(header(1, 0, 1, 0), &mut buf);
        assert_eq!(
            Request::decode(&buf).unwrap_err(),
            DecodeError::Truncated { need: 16, have: 8 }
        );
        let huge = LaunchReq {
            param_bytes: (crate::MAX_PARAM_BYTES + 1).into(),
            ..Default::default()
        };
        let mut buf = Vec::new();
        Request::Launch(huge, &[]).encode(header(1, 0, 1, 0), &mut buf);
        assert!(matches!(
            Request::decode(&buf),
            Err(DecodeError::BadLength { .. })
        ));
    }

    #[test]
    fn memset_with_bad_element_size_is_rejected() {
        let mut buf = Vec::new();
        Request::Memset(MemsetReq {
            elem_size: 3.into(),
            ..Default::default()
        })
        .encode(header(1, 0, 1, 0), &mut buf);
        assert!(Request::decode(&buf).is_err());
    }

    #[test]
    fn empty_symbol_name_and_empty_image_are_rejected() {
        let mut buf = Vec::new();
        Request::GetFunction(ModuleSymbolReq::default(), b"").encode(header(1, 0, 1, 0), &mut buf);
        assert!(Request::decode(&buf).is_err());
        let mut buf = Vec::new();
        Request::ModuleLoad(ModuleLoadReq::default(), b"").encode(header(1, 0, 1, 0), &mut buf);
        assert!(Request::decode(&buf).is_err());
    }

    #[test]
    fn async_classification_follows_flags() {
        let set = Request::Memset(MemsetReq::default());
        assert!(!set.is_async(0));
        assert!(set.is_async(FLAG_ASYNC));
        assert!(Request::Launch(LaunchReq::default(), &[]).is_async(0));
        assert!(!Request::MemAlloc(MemAllocReq::default()).is_async(FLAG_ASYNC));
    }

    #[test]
    fn decoder_never_panics_on_prefixes_of_valid_requests() {
        let mut buf = Vec::new();
        let segs = [SgEntry {
            gpa: 1.into(),
            len: 2.into(),
        }];
        let copy = MemcpyHostReq {
            total_len: 2.into(),
            nsegs: 1.into(),
            ..Default::default()
        };
        Request::MemcpyDtoH(copy, &segs).encode(header(1, 1, 1, 0), &mut buf);
        assert!(Request::decode(&buf).is_ok());
        for cut in 0..buf.len() {
            assert!(
                Request::decode(&buf[..cut]).is_err(),
                "prefix {cut} decoded"
            );
        }
    }
}
