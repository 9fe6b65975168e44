//! `MODULE_LINK`: the variable parts of the request, their decoding, and the
//! layout of the output buffer the device writes the linked image and the
//! logs into.
//!
//! Output buffer (the concatenation of the request's scatter-gather
//! entries, `out_len` bytes): the info log area (`info_log_len` bytes), the
//! error log area (`error_log_len` bytes), then the image area (the rest).
//! Each log is written as text and a terminating NUL, truncated to fit its
//! area; an area of 0 bytes receives nothing.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::request::{exact, take, DecodeError};
use crate::wire::{JitOption, LinkInput, LinkReq, SgEntry};

/// The `CU_JIT_*` options a `MODULE_LINK` request may carry, all of
/// integer type: max registers (0), threads per block (1), optimization
/// level (7), target from context (8), target (9), fallback strategy (10),
/// debug info (11), verbose log (12), line info (13), cache mode (14), LTO
/// and its float controls (20-24), unused device variables (29),
/// position-independent code (30), min CTAs per SM (31), max threads per
/// block (32), override directive values (33). Options that carry pointers
/// (log buffers, symbol tables, name lists) never cross the wire, and
/// `CU_JIT_SPLIT_COMPILE` (34), whose 0 means "every CPU of the host", is
/// not the guest's to choose.
pub const FORWARDED_OPTIONS: &[u32] = &[
    0, 1, 7, 8, 9, 10, 11, 12, 13, 14, 20, 21, 22, 23, 24, 29, 30, 31, 32, 33,
];

/// The trailing parts of a `MODULE_LINK` request. Borrows from the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkParts<'a> {
    /// The JIT options, in order.
    pub options: &'a [JitOption],
    /// The inputs, in order.
    pub inputs: &'a [LinkInput],
    /// The output buffer in guest memory.
    pub segs: &'a [SgEntry],
    /// Each input's name and then its data, input after input.
    pub data: &'a [u8],
}

/// One input with its name and data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputData<'a> {
    /// `CUjitInputType`.
    pub kind: u32,
    /// The name (no NUL); empty for none.
    pub name: &'a [u8],
    /// The input bytes.
    pub data: &'a [u8],
}

impl<'a> LinkParts<'a> {
    /// Each input with its name and data, in order. A decoded request's
    /// lengths add up to `data` exactly; for a hand-built one whose lengths
    /// overrun `data`, the iteration stops at the first input that does not
    /// fit.
    pub fn input_data(&self) -> impl Iterator<Item = InputData<'a>> + 'a {
        let mut rest = self.data;
        self.inputs.iter().map_while(move |input| {
            let name_len = input.name_len.get() as usize;
            let data_len = usize::try_from(input.data_len.get()).ok()?;
            let end = name_len.checked_add(data_len)?;
            let name = rest.get(..name_len)?;
            let data = rest.get(name_len..end)?;
            rest = rest.get(end..)?;
            Some(InputData {
                kind: input.kind.get(),
                name,
                data,
            })
        })
    }

    /// Appends the trailing parts, in wire order, to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.options.as_bytes());
        out.extend_from_slice(self.inputs.as_bytes());
        out.extend_from_slice(self.segs.as_bytes());
        out.extend_from_slice(self.data);
    }
}

/// Where the image area starts in the output buffer.
pub fn image_offset(req: &LinkReq) -> u64 {
    u64::from(req.info_log_len.get()) + u64::from(req.error_log_len.get())
}

/// Bytes of the image area (0 if the log areas take the whole buffer).
pub fn image_capacity(req: &LinkReq) -> u64 {
    req.out_len.get().saturating_sub(image_offset(req))
}

/// The part of `text` a log area of `area` bytes holds, leaving room for
/// the NUL: nothing for an area of 0 or 1 byte.
pub fn fit_log(text: &[u8], area: usize) -> &[u8] {
    &text[..text.len().min(area.saturating_sub(1))]
}

/// The text of a log area: the bytes before its first NUL (the whole area
/// if it has none).
pub fn read_log(area: &[u8]) -> &[u8] {
    let end = area.iter().position(|b| *b == 0).unwrap_or(area.len());
    &area[..end]
}

fn bad(field: &'static str, value: u64) -> DecodeError {
    DecodeError::BadLength { field, value }
}

/// `count` values of `T` at the front of `bytes`, and the rest.
fn array<'b, T: FromBytes + KnownLayout + Immutable>(
    bytes: &'b [u8],
    count: u32,
    field: &'static str,
) -> Result<(&'b [T], &'b [u8]), DecodeError> {
    let need = count as usize * std::mem::size_of::<T>();
    if bytes.len() < need {
        return Err(DecodeError::Truncated {
            need,
            have: bytes.len(),
        });
    }
    let (items, rest) = bytes.split_at(need);
    let items = <[T]>::ref_from_bytes(items).map_err(|_| bad(field, count.into()))?;
    Ok((items, rest))
}

fn check_count(count: u32, limit: u32, field: &'static str) -> Result<(), DecodeError> {
    if count > limit {
        return Err(bad(field, count.into()));
    }
    Ok(())
}

/// The largest `LinkReq.out_len`: the largest image and both logs.
const MAX_OUT_LEN: u64 = crate::MAX_MODULE_IMAGE + 2 * crate::MAX_LINK_LOG as u64;

/// The largest `LinkReq.data_len`: every input's data within
/// `MAX_MODULE_IMAGE` and every name within `MAX_SYMBOL_NAME`.
const MAX_DATA_LEN: u64 =
    crate::MAX_MODULE_IMAGE + crate::MAX_LINK_INPUTS as u64 * crate::MAX_SYMBOL_NAME as u64;

/// Decodes a `MODULE_LINK` body. Counts and lengths are checked against
/// their limits before anything is read; the inputs' names and data must
/// add up to `data_len` exactly, the entries' lengths to `out_len`, and the
/// two log areas must fit in the output buffer.
pub(crate) fn decode(bytes: &[u8]) -> Result<(LinkReq, LinkParts<'_>), DecodeError> {
    let (req, rest) = take::<LinkReq>(bytes)?;
    check_count(
        req.option_count.get(),
        crate::MAX_JIT_OPTIONS,
        "option_count",
    )?;
    check_count(req.input_count.get(), crate::MAX_LINK_INPUTS, "input_count")?;
    check_count(req.nsegs.get(), crate::MAX_SG_ENTRIES, "nsegs")?;
    check_count(req.info_log_len.get(), crate::MAX_LINK_LOG, "info_log_len")?;
    check_count(
        req.error_log_len.get(),
        crate::MAX_LINK_LOG,
        "error_log_len",
    )?;
    if req.data_len.get() > MAX_DATA_LEN {
        return Err(bad("data_len", req.data_len.get()));
    }
    let (options, rest) = array::<JitOption>(rest, req.option_count.get(), "option_count")?;
    let (inputs, rest) = array::<LinkInput>(rest, req.input_count.get(), "input_count")?;
    let (segs, rest) = array::<SgEntry>(rest, req.nsegs.get(), "nsegs")?;
    let data = exact(rest, req.data_len.get(), "data_len", MAX_DATA_LEN)?;

    let (mut names, mut payload) = (0u64, 0u64);
    for input in inputs {
        let name_len = input.name_len.get();
        if name_len > crate::MAX_SYMBOL_NAME {
            return Err(bad("name_len", name_len.into()));
        }
        let data_len = input.data_len.get();
        if data_len == 0 || data_len > crate::MAX_MODULE_IMAGE {
            return Err(bad("input data_len", data_len));
        }
        names += u64::from(name_len);
        // At most MAX_LINK_INPUTS inputs of at most MAX_MODULE_IMAGE each:
        // no overflow.
        payload += data_len;
    }
    if payload > crate::MAX_MODULE_IMAGE {
        return Err(bad("input data_len", payload));
    }
    if names + payload != req.data_len.get() {
        return Err(bad("data_len", req.data_len.get()));
    }
    let mut out_len: u64 = 0;
    for seg in segs {
        out_len = out_len
            .checked_add(seg.len.get())
            .ok_or(bad("sg length", u64::MAX))?;
    }
    if out_len != req.out_len.get() || out_len > MAX_OUT_LEN {
        return Err(bad("out_len", req.out_len.get()));
    }
    if image_offset(&req) > out_len {
        return Err(bad("log areas", image_offset(&req)));
    }
    Ok((
        req,
        LinkParts {
            options,
            inputs,
            segs,
            data,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::header;
    use crate::wire::jit_input;
    use crate::{Request, Status};

    fn input(kind: u32, name: &[u8], data: &[u8]) -> LinkInput {
        LinkInput {
            kind: kind.into(),
            name_len: (name.len() as u32).into(),
            data_len: (data.len() as u64).into(),
        }
    }

    fn seg(gpa: u64, len: u64) -> SgEntry {
        SgEntry {
            gpa: gpa.into(),
            len: len.into(),
        }
    }

    /// A request for two inputs with a 4 KiB output buffer in two pieces.
    fn parts_for<'a>(
        inputs: &'a [LinkInput],
        segs: &'a [SgEntry],
        options: &'a [JitOption],
        data: &'a [u8],
    ) -> (LinkReq, LinkParts<'a>) {
        let req = LinkReq {
            input_count: (inputs.len() as u32).into(),
            option_count: (options.len() as u32).into(),
            data_len: (data.len() as u64).into(),
            out_len: segs.iter().map(|s| s.len.get()).sum::<u64>().into(),
            info_log_len: 256.into(),
            error_log_len: 512.into(),
            nsegs: (segs.len() as u32).into(),
            _pad: 0.into(),
        };
        (
            req,
            LinkParts {
                options,
                inputs,
                segs,
                data,
            },
        )
    }

    fn encoded(req: LinkReq, parts: LinkParts<'_>) -> Vec<u8> {
        let mut buf = Vec::new();
        Request::ModuleLink(req, parts).encode(header(1, 2, 3, 0), &mut buf);
        buf
    }

    const PTX: &[u8] = b".version 7.0\n.target sm_75\n.address_size 64\n\0";

    #[test]
    fn link_request_round_trips_with_inputs_in_order() {
        let inputs = [
            input(jit_input::PTX, b"a.ptx", PTX),
            input(jit_input::CUBIN, b"", b"\x7fELF"),
        ];
        let mut data = b"a.ptx".to_vec();
        data.extend_from_slice(PTX);
        data.extend_from_slice(b"\x7fELF");
        let segs = [seg(0x1000, 4000), seg(0x9000, 96)];
        let options = [JitOption {
            option: 7.into(),
            _pad: 0.into(),
            value: 3.into(),
        }];
        let (req, parts) = parts_for(&inputs, &segs, &options, &data);
        let buf = encoded(req, parts);
        let (hdr, back) = Request::decode(&buf).unwrap();
        assert_eq!(hdr.opcode.get(), crate::wire::op::MODULE_LINK);
        assert_eq!(back, Request::ModuleLink(req, parts));
        let Request::ModuleLink(_, got) = back else {
            panic!("not a link request");
        };
        let items: Vec<InputData<'_>> = got.input_data().collect();
        assert_eq!(items.len(), 2);
        assert_eq!(items[0].name, b"a.ptx");
        assert_eq!(items[0].data, PTX);
        assert_eq!(items[0].kind, jit_input::PTX);
        assert_eq!(items[1].name, b"");
        assert_eq!(items[1].data, b"\x7fELF");
        assert_eq!(image_offset(&req), 768);
        assert_eq!(image_capacity(&req), 4096 - 768);
    }

    #[test]
    fn link_request_with_no_inputs_decodes() {
        let segs = [seg(0, 64)];
        let (mut req, parts) = parts_for(&[], &segs, &[], &[]);
        req.info_log_len = 0.into();
        req.error_log_len = 64.into();
        let buf = encoded(req, parts);
        assert!(Request::decode(&buf).is_ok());
    }

    fn decode_err(req: LinkReq, parts: LinkParts<'_>) -> DecodeError {
        let err = Request::decode(&encoded(req, parts)).unwrap_err();
        assert_eq!(err.status(), Status::INVALID_VALUE);
        err
    }

    #[test]
    fn link_lengths_that_do_not_add_up_are_rejected() {
        let inputs = [input(jit_input::PTX, b"n", PTX)];
        let mut data = b"n".to_vec();
        data.extend_from_slice(PTX);
        let segs = [seg(0, 4096)];
        let (req, parts) = parts_for(&inputs, &segs, &[], &data);

        let mut short = req;
        short.data_len = (data.len() as u64 - 1).into();
        let cut = LinkParts {
            data: &data[..data.len() - 1],
            ..parts
        };
        assert!(matches!(
            decode_err(short, cut),
            DecodeError::BadLength {
                field: "data_len",
                ..
            }
        ));

        let mut wrong_out = req;
        wrong_out.out_len = 4095.into();
        assert!(matches!(
            decode_err(wrong_out, parts),
            DecodeError::BadLength {
                field: "out_len",
                ..
            }
        ));

        // An output buffer larger than the largest image and both logs is refused.
        let big = [seg(0x10_0000, MAX_OUT_LEN + 1)];
        let mut huge_out = req;
        huge_out.out_len = (MAX_OUT_LEN + 1).into();
        assert!(matches!(
            decode_err(
                huge_out,
                LinkParts {
                    segs: &big,
                    ..parts
                }
            ),
            DecodeError::BadLength {
                field: "out_len",
                ..
            }
        ));

        let mut logs_too_big = req;
        logs_too_big.info_log_len = 4000.into();
        logs_too_big.error_log_len = 97.into();
        assert!(matches!(
            decode_err(logs_too_big, parts),
            DecodeError::BadLength {
                field: "log areas",
                ..
            }
        ));

        let empty = [input(jit_input::PTX, b"n", b"")];
        let (req0, parts0) = parts_for(&empty, &segs, &[], b"n");
        assert!(matches!(
            decode_err(req0, parts0),
            DecodeError::BadLength {
                field: "input data_len",
                ..
            }
        ));
    }

    /// A change that makes a link request invalid.
    type Mutation = fn(&mut LinkReq);

    #[test]
    fn link_counts_over_their_limits_are_rejected_before_reading() {
        let req = LinkReq::default();
        let cases: [(Mutation, &str); 6] = [
            (
                |r| r.input_count = (crate::MAX_LINK_INPUTS + 1).into(),
                "input_count",
            ),
            (
                |r| r.option_count = (crate::MAX_JIT_OPTIONS + 1).into(),
                "option_count",
            ),
            (|r| r.nsegs = (crate::MAX_SG_ENTRIES + 1).into(), "nsegs"),
            (
                |r| r.info_log_len = (crate::MAX_LINK_LOG + 1).into(),
                "info_log_len",
            ),
            (
                |r| r.error_log_len = (crate::MAX_LINK_LOG + 1).into(),
                "error_log_len",
            ),
            (|r| r.data_len = u64::MAX.into(), "data_len"),
        ];
        for (mutate, want) in cases {
            let mut bad_req = req;
            mutate(&mut bad_req);
            // The body alone: nothing follows, so only a check made before
            // reading can name the field.
            let mut buf = Vec::new();
            buf.extend_from_slice(header(1, 2, 3, 0).as_bytes());
            buf[0..4].copy_from_slice(&crate::wire::op::MODULE_LINK.to_le_bytes());
            buf.extend_from_slice(bad_req.as_bytes());
            match Request::decode(&buf) {
                Err(DecodeError::BadLength { field, .. }) => assert_eq!(field, want),
                other => panic!("{want}: {other:?}"),
            }
        }
    }

    #[test]
    fn link_names_over_the_symbol_limit_are_rejected() {
        let name = vec![b'x'; crate::MAX_SYMBOL_NAME as usize + 1];
        let inputs = [input(jit_input::PTX, &name, PTX)];
        let mut data = name.clone();
        data.extend_from_slice(PTX);
        let segs = [seg(0, 64)];
        let (mut req, parts) = parts_for(&inputs, &segs, &[], &data);
        req.info_log_len = 0.into();
        req.error_log_len = 0.into();
        assert!(matches!(
            decode_err(req, parts),
            DecodeError::BadLength {
                field: "name_len",
                ..
            }
        ));
    }

    #[test]
    fn link_decoder_never_panics_on_prefixes() {
        let inputs = [input(jit_input::PTX, b"n", PTX)];
        let mut data = b"n".to_vec();
        data.extend_from_slice(PTX);
        let segs = [seg(0, 4096)];
        let (req, parts) = parts_for(&inputs, &segs, &[], &data);
        let buf = encoded(req, parts);
        for cut in 0..buf.len() {
            assert!(Request::decode(&buf[..cut]).is_err(), "prefix {cut}");
        }
        let mut longer = buf.clone();
        longer.push(0);
        assert_eq!(
            Request::decode(&longer).unwrap_err(),
            DecodeError::Trailing(1)
        );
    }

    #[test]
    fn logs_are_truncated_to_leave_room_for_the_nul_and_read_up_to_it() {
        assert_eq!(fit_log(b"hello", 4), b"hel");
        assert_eq!(fit_log(b"hello", 64), b"hello");
        assert_eq!(fit_log(b"hello", 1), b"");
        assert_eq!(fit_log(b"hello", 0), b"");
        assert_eq!(read_log(b"abc\0def"), b"abc");
        assert_eq!(read_log(b"abc"), b"abc");
        assert_eq!(read_log(b""), b"");
    }

    #[test]
    fn hand_built_parts_with_overrunning_lengths_stop_iterating() {
        let inputs = [input(jit_input::PTX, b"n", PTX)];
        let parts = LinkParts {
            options: &[],
            inputs: &inputs,
            segs: &[],
            data: b"n",
        };
        assert_eq!(parts.input_data().count(), 0);
    }
}
