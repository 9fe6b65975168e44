//! Successful results of requests, and their encoding into responses.

use vgpu_spec::response;
use vgpu_spec::wire::{
    DeviceInfoResp, ElapsedResp, FunctionResp, GlobalResp, HandleResp, LinkResp, MemInfoResp,
    ParamInfo, SessionOpenResp, ValueResp,
};
use vgpu_spec::Status;
use zerocopy::little_endian::I32;
use zerocopy::IntoBytes;

/// What a request returns on success.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// Status only.
    Empty,
    /// A handle or device pointer ([`HandleResp`]).
    Handle(u64),
    /// A new session ([`SessionOpenResp`]).
    Session(u64),
    /// Free and total memory ([`MemInfoResp`]).
    MemInfo {
        /// Free bytes.
        free: u64,
        /// Total bytes.
        total: u64,
    },
    /// A function and its parameter layout.
    Function(FunctionResp, Vec<ParamInfo>),
    /// A module global.
    Global(GlobalResp),
    /// Milliseconds between two events.
    Elapsed(f32),
    /// Device identity and attribute table.
    DeviceInfo(DeviceInfoResp, Vec<I32>),
    /// A function attribute or occupancy answer ([`ValueResp`]).
    Value(i64),
    /// The outcome of a JIT link ([`LinkResp`]).
    Link(LinkResp),
}

/// Encodes a request's outcome into `out` (cleared first). Failures carry a
/// status and no body.
pub fn encode(result: Result<Reply, Status>, request_id: u64, out: &mut Vec<u8>) {
    let ok = Status::SUCCESS;
    match result {
        Err(status) => response::encode_status(status, request_id, out),
        Ok(Reply::Empty) => response::encode_status(ok, request_id, out),
        Ok(Reply::Handle(handle)) => response::encode(
            ok,
            request_id,
            &HandleResp {
                handle: handle.into(),
            },
            &[],
            out,
        ),
        Ok(Reply::Session(session)) => response::encode(
            ok,
            request_id,
            &SessionOpenResp {
                session: session.into(),
            },
            &[],
            out,
        ),
        Ok(Reply::MemInfo { free, total }) => response::encode(
            ok,
            request_id,
            &MemInfoResp {
                free: free.into(),
                total: total.into(),
            },
            &[],
            out,
        ),
        Ok(Reply::Function(resp, params)) => {
            response::encode(ok, request_id, &resp, params.as_bytes(), out)
        }
        Ok(Reply::Global(resp)) => response::encode(ok, request_id, &resp, &[], out),
        Ok(Reply::Elapsed(ms)) => response::encode(
            ok,
            request_id,
            &ElapsedResp {
                millis_bits: ms.to_bits().into(),
                _pad: 0.into(),
            },
            &[],
            out,
        ),
        Ok(Reply::DeviceInfo(resp, attrs)) => {
            response::encode(ok, request_id, &resp, attrs.as_bytes(), out)
        }
        Ok(Reply::Value(value)) => response::encode(
            ok,
            request_id,
            &ValueResp {
                value: value.into(),
            },
            &[],
            out,
        ),
        Ok(Reply::Link(resp)) => response::encode(ok, request_id, &resp, &[], out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vgpu_spec::Response;

    #[test]
    fn errors_encode_header_only_with_the_request_id() {
        let mut out = Vec::new();
        encode(Err(Status::INVALID_HANDLE), 42, &mut out);
        let r = Response::decode(&out).unwrap();
        assert_eq!(r.status(), Status::INVALID_HANDLE);
        assert_eq!(r.header.request_id.get(), 42);
        assert!(r.body.is_empty());
    }

    #[test]
    fn value_is_sent_as_a_signed_64_bit_integer() {
        let mut out = Vec::new();
        encode(Ok(Reply::Value(-3)), 1, &mut out);
        let r = Response::decode(&out).unwrap();
        let (v, rest) = r.fixed::<ValueResp>().unwrap();
        assert_eq!(v.value.get(), -3);
        assert!(rest.is_empty());
    }

    #[test]
    fn elapsed_is_sent_as_f32_bits() {
        let mut out = Vec::new();
        encode(Ok(Reply::Elapsed(1.5)), 1, &mut out);
        let r = Response::decode(&out).unwrap();
        let (e, _) = r.fixed::<ElapsedResp>().unwrap();
        assert_eq!(f32::from_bits(e.millis_bits.get()), 1.5);
    }
}
