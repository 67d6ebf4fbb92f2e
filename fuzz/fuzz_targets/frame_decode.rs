//! Fuzzes the control-frame decoders: any bytes must decode or fail with a typed error, and a
//! frame that decodes must re-encode to bytes that decode to the same value.
#![no_main]

use kvd_proto::frame::{body_len, Request, Response, MAX_FRAME_BYTES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() >= 4 {
        let _ = body_len([data[0], data[1], data[2], data[3]], MAX_FRAME_BYTES);
    }
    if let Ok((id, req)) = Request::decode(data) {
        let again = req.encode(id);
        assert_eq!(Request::decode(&again[4..]), Ok((id, req)));
    }
    if let Ok((id, resp)) = Response::decode(data) {
        let again = resp.encode(id);
        assert_eq!(Response::decode(&again[4..]), Ok((id, resp)));
    }
});
