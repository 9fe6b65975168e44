//! `Response::decode` on arbitrary bytes, then every fixed response body and
//! the arrays that follow `FunctionResp` and `DeviceInfoResp`: never panics,
//! lengths are exact, and what decodes re-encodes to the same bytes.

#![no_main]

use std::mem::size_of;

use libfuzzer_sys::fuzz_target;
use vgpu_spec::response::{encode, encode_status};
use vgpu_spec::wire::{
    DeviceInfoResp, ElapsedResp, FunctionResp, GlobalResp, HandleResp, LinkResp, MemInfoResp,
    ParamInfo, SessionOpenResp, ValueResp,
};
use vgpu_spec::Response;
use zerocopy::little_endian::I32;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Decodes a fixed body `T`; checks lengths and that re-encoding the header,
/// `T` and the rest gives back the response bytes. Returns the rest.
fn check_fixed<'a, T>(resp: &Response<'a>, data: &[u8]) -> Option<(T, &'a [u8])>
where
    T: FromBytes + IntoBytes + KnownLayout + Immutable + Copy,
{
    match resp.fixed::<T>() {
        Ok((value, rest)) => {
            assert!(resp.body.len() >= size_of::<T>());
            assert_eq!(rest.len(), resp.body.len() - size_of::<T>());
            assert_eq!(value.as_bytes(), &resp.body[..size_of::<T>()]);
            let mut out = Vec::new();
            encode(
                resp.status(),
                resp.header.request_id.get(),
                &value,
                rest,
                &mut out,
            );
            // `encode` writes the reserved header flags as zero.
            if resp.header.flags.get() == 0 {
                assert_eq!(out.as_slice(), data);
            } else {
                assert_eq!(&out[16..], &data[16..]);
            }
            Some((value, rest))
        }
        Err(_) => {
            assert!(resp.body.len() < size_of::<T>());
            None
        }
    }
}

/// Decodes `count` values of `T` from `rest` and checks the result.
fn check_array<T>(rest: &[u8], count: usize)
where
    T: FromBytes + IntoBytes + KnownLayout + Immutable + Copy,
{
    match Response::array::<T>(rest, count) {
        Ok(items) => {
            assert_eq!(items.len(), count);
            assert_eq!(items.as_bytes(), &rest[..count * size_of::<T>()]);
        }
        Err(_) => {
            let fits = count
                .checked_mul(size_of::<T>())
                .is_some_and(|need| need <= rest.len());
            assert!(!fits, "array of {count} fits in {} bytes", rest.len());
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let resp = match Response::decode(data) {
        Ok(resp) => resp,
        Err(_) => {
            assert!(data.len() < 16);
            return;
        }
    };
    assert_eq!(resp.body.len(), data.len() - 16);
    let status = resp.status();
    let _ = (status.name(), status.description(), status.to_string());

    if resp.body.is_empty() && resp.header.flags.get() == 0 {
        let mut out = Vec::new();
        encode_status(status, resp.header.request_id.get(), &mut out);
        assert_eq!(out.as_slice(), data);
    }

    check_fixed::<SessionOpenResp>(&resp, data);
    check_fixed::<HandleResp>(&resp, data);
    check_fixed::<MemInfoResp>(&resp, data);
    check_fixed::<GlobalResp>(&resp, data);
    check_fixed::<ElapsedResp>(&resp, data);
    check_fixed::<ValueResp>(&resp, data);
    check_fixed::<LinkResp>(&resp, data);
    if let Some((f, rest)) = check_fixed::<FunctionResp>(&resp, data) {
        check_array::<ParamInfo>(rest, f.param_count.get() as usize);
    }
    if let Some((info, rest)) = check_fixed::<DeviceInfoResp>(&resp, data) {
        check_array::<I32>(rest, info.attr_count.get() as usize);
    }
});
