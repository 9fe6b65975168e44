//! Responses: what the device writes into a chain's writable descriptors.
//!
//! A response is a [`RespHeader`] followed by a body whose layout depends on
//! the request's opcode. The driver knows which request it sent, so it asks
//! for the body type it expects; [`Response::decode`] checks the lengths.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::request::DecodeError;
use crate::wire::RespHeader;
use crate::Status;

/// A decoded response: the header and the body bytes after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Response<'a> {
    /// The header.
    pub header: RespHeader,
    /// Everything after the header.
    pub body: &'a [u8],
}

impl<'a> Response<'a> {
    /// Splits `bytes` (the used length of the chain's writable part) into
    /// header and body.
    pub fn decode(bytes: &'a [u8]) -> Result<Response<'a>, DecodeError> {
        let (header, body) =
            RespHeader::read_from_prefix(bytes).map_err(|_| DecodeError::Truncated {
                need: std::mem::size_of::<RespHeader>(),
                have: bytes.len(),
            })?;
        Ok(Response { header, body })
    }

    /// The status the device reported.
    pub fn status(&self) -> Status {
        Status(self.header.status.get())
    }

    /// The fixed body `T` at the front of the body, and what follows it.
    pub fn fixed<T: FromBytes + KnownLayout + Immutable + Copy>(
        &self,
    ) -> Result<(T, &'a [u8]), DecodeError> {
        T::read_from_prefix(self.body).map_err(|_| DecodeError::Truncated {
            need: std::mem::size_of::<T>(),
            have: self.body.len(),
        })
    }

    /// `count` values of `T` at the front of `rest`, copied out.
    pub fn array<T: FromBytes + KnownLayout + Immutable + Copy>(
        rest: &[u8],
        count: usize,
    ) -> Result<Vec<T>, DecodeError> {
        let need = count
            .checked_mul(std::mem::size_of::<T>())
            .ok_or(DecodeError::BadLength {
                field: "count",
                value: count as u64,
            })?;
        if rest.len() < need {
            return Err(DecodeError::Truncated {
                need,
                have: rest.len(),
            });
        }
        let items = <[T]>::ref_from_bytes(&rest[..need]).map_err(|_| DecodeError::BadLength {
            field: "count",
            value: count as u64,
        })?;
        Ok(items.to_vec())
    }
}

/// Writes a response header and body into `out` (cleared first).
pub fn encode<T: IntoBytes + Immutable>(
    status: Status,
    request_id: u64,
    body: &T,
    tail: &[u8],
    out: &mut Vec<u8>,
) {
    out.clear();
    let header = RespHeader {
        status: status.0.into(),
        flags: 0.into(),
        request_id: request_id.into(),
    };
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(body.as_bytes());
    out.extend_from_slice(tail);
}

/// Writes a header-only response into `out` (cleared first).
pub fn encode_status(status: Status, request_id: u64, out: &mut Vec<u8>) {
    encode(status, request_id, &(), &[], out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{FunctionResp, ParamInfo};

    #[test]
    fn function_response_round_trips_with_params() {
        let params = [
            ParamInfo {
                offset: 0.into(),
                size: 8.into(),
            },
            ParamInfo {
                offset: 8.into(),
                size: 4.into(),
            },
        ];
        let body = FunctionResp {
            function: 11.into(),
            param_count: 2.into(),
            param_bytes: 12.into(),
        };
        let mut out = Vec::new();
        encode(Status::SUCCESS, 5, &body, params.as_bytes(), &mut out);
        let resp = Response::decode(&out).unwrap();
        assert_eq!(resp.status(), Status::SUCCESS);
        assert_eq!(resp.header.request_id.get(), 5);
        let (f, rest) = resp.fixed::<FunctionResp>().unwrap();
        assert_eq!(f.function.get(), 11);
        let p = Response::array::<ParamInfo>(rest, 2).unwrap();
        assert_eq!(p, params.to_vec());
        assert!(Response::array::<ParamInfo>(rest, 3).is_err());
    }

    #[test]
    fn short_response_is_truncated() {
        assert!(Response::decode(&[0u8; 15]).is_err());
        let mut out = Vec::new();
        encode_status(Status::NOT_READY, 1, &mut out);
        let resp = Response::decode(&out).unwrap();
        assert_eq!(resp.status(), Status::NOT_READY);
        assert!(resp.fixed::<FunctionResp>().is_err());
    }
}
