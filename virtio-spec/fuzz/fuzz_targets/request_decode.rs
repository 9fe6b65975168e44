//! `Request::decode` on arbitrary bytes: never panics, and whatever decodes
//! re-encodes to exactly the input and decodes again to the same request.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vgpu_spec::{wire::op, Request, Status};

fuzz_target!(|data: &[u8]| {
    let (header, request) = match Request::decode(data) {
        Ok(decoded) => decoded,
        Err(err) => {
            let status = err.status();
            assert!(
                status == Status::INVALID_VALUE || status == Status::NOT_SUPPORTED,
                "decode error {err} maps to {status:?}"
            );
            let _ = err.to_string();
            return;
        }
    };
    assert_eq!(header.opcode.get(), request.opcode());
    let _ = request.is_async(header.flags.get());
    let _ = op::is_control(request.opcode());

    let mut encoded = Vec::with_capacity(data.len());
    request.encode(header, &mut encoded);
    // Decoding rejects trailing bytes and keeps reserved fields, so the
    // encoding of a decoded request is the input itself.
    assert_eq!(encoded.as_slice(), data, "encoding differs from the input");

    let (header2, request2) = match Request::decode(&encoded) {
        Ok(decoded) => decoded,
        Err(err) => panic!("re-encoded {request:?} does not decode: {err}"),
    };
    assert_eq!(header2, header);
    assert_eq!(request2, request);
});
